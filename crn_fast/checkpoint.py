"""The one home of crn_fast's own file formats.

* Generator files (``model.ckpt``): safetensors, with the :class:`CRNConfig` as JSON in the
  metadata. Loading never executes pickled code.
* Training state (``train_state.pt``): optimizer, step and RNG states, saved with torch.save and
  loaded with ``weights_only=True``.
Every write goes to a temporary file in the target directory and is renamed into place, so a
kill at any moment leaves the previous file intact.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .config import CRNConfig
from .errors import CheckpointError, CRNError

FORMAT = "crn_fast.generator"
FORMAT_VERSION = "1"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else remove it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CRNError(f"cannot write to {path.parent}: {e.strerror or e}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_generator(model, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the generator's weights and config to one safetensors file, atomically."""
    from safetensors.torch import save_file
    model = getattr(model, "module", model)  # DDP / compiled wrappers
    model = getattr(model, "_orig_mod", model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_json()}
    if extra:
        meta["extra"] = json.dumps(extra, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return Path(path)


def read_generator_file(path: str | os.PathLike) -> tuple[CRNConfig, dict[str, torch.Tensor], dict]:
    """(config, state_dict, extra metadata) of a crn_fast generator file, with clear errors."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists()
                              else f"checkpoint {path} is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path} is a safetensors file but not a crn_fast generator "
                                      f"(no '{FORMAT}' metadata); convert TF checkpoints with crn-convert-tf")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable crn_fast checkpoint (corrupt, truncated or another "
                              f"format): {str(e).splitlines()[0][:200]}") from None
    try:
        config = CRNConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, json.JSONDecodeError, TypeError, CRNError) as e:
        raise CheckpointError(f"{path}: the embedded model config is missing or invalid ({e})") from None
    extra = json.loads(meta["extra"]) if "extra" in meta else {}
    return config, state, extra


def load_generator(path: str | os.PathLike, backend: str = "eager", device=None, **kw):
    """Build a CRN from a crn_fast generator file (its config included) and load its weights."""
    from .model import CRN
    config, state, _ = read_generator_file(path)
    model = CRN(config, backend=backend, **kw)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the embedded config: {str(e).splitlines()[0]}") \
            from None
    if device is not None:
        model = model.to(device)
    return model.eval()


def save_train_state(path: str | os.PathLike, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_train_state(path: str | os.PathLike) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no training state at {path}") from None
    except Exception as e:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path} is not a readable training state: {str(e).splitlines()[0][:200]}") from None
