"""The one home of crn_fast's own file formats.

* Generator files (``model.ckpt``): safetensors, with the :class:`CRNConfig` as JSON in the
  metadata. Loading never executes pickled code.
* Training state (``train_state.pt``): optimizer, step and RNG states, saved with torch.save and
  loaded with ``weights_only=True``.
Every write goes to a temporary file in the target directory (``.<name>.<random>.tmp``) and is
renamed into place, so a kill at any moment leaves the previous file intact; the file gets the
permissions a plain ``open()`` would give (0666 less the umask). Temporaries left by a killed
process are removed by :func:`remove_stale_temporaries` (training does so when it starts), only
while no other run writes into the folder: runs hold their output folder with :func:`writing_into`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from .config import CRNConfig
from .errors import CheckpointError, CRNError, absent

FORMAT = "crn_fast.generator"
FORMAT_VERSION = "1"


TMP_SUFFIX = ".tmp"


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask. Reading it means setting it, so threads (crn-synthesize's PNG writers)
    take turns: two interleaved swaps would leave the umask at 0."""
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else remove it."""
    path = Path(path)
    if path.is_dir():
        raise CRNError(f"{path} is a folder; give a file name (e.g. {path / 'model.ckpt'})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        from .cli import describe_os_error
        raise CRNError(f"cannot write to {path.parent}: {describe_os_error(e)}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp (and safetensors, which recreates the file) make 0600: give what open() would
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, Exception) and _disk_full(path.parent, e):
            # safetensors, torch.save and PIL report a full disk in their own words (or not at all)
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
        raise


def _disk_full(folder: Path, e: Exception) -> bool:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
        return True
    try:
        return shutil.disk_usage(folder).free < (1 << 20)  # a write failed and under 1 MiB is left
    except OSError:
        return False


def remove_stale_temporaries(folder: str | os.PathLike, name: str = "*", min_age_s: float = 0.0) -> list[Path]:
    """Remove atomic-write temporaries of files called ``name`` (``.<name>.<random>.tmp``) left in
    ``folder`` by killed processes; the caller must own those names (no other process writing them)."""
    import time
    folder, gone = Path(folder), []
    if not folder.is_dir():
        return gone
    now = time.time()
    for f in folder.glob(f".{name}.*{TMP_SUFFIX}"):
        try:
            if f.is_file() and now - f.stat().st_mtime >= min_age_s:
                f.unlink()
                gone.append(f)
        except OSError:
            pass
    return gone


def _flock(fd: int, how: int) -> bool | None:
    """flock without waiting: True held, False another open file holds it, None where the file
    system has no flock (some network file systems)."""
    import fcntl
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


@contextlib.contextmanager
def writing_into(folder: str | os.PathLike, what: str, alone: bool, clean=None, wait_s: float = 10.0):
    """Hold ``folder`` as one of crn_fast's writers for the with-block, by the kernel's advisory lock
    on the folder itself (flock): no file is made, and a killed process's hold ends with it.

    ``alone`` (a training run): no other crn_fast writer may be there; if one is, a CRNError says so
    (``what`` names the option, e.g. "--out"). Otherwise (crn-synthesize) writers share the folder:
    runs of other layouts into the same --out go on side by side, and one waits up to ``wait_s`` for a
    writer that holds the folder alone (another's ``clean``) before the same error. ``clean()`` runs
    only while no other writer holds the folder: it removes the temporaries of killed runs, which
    would otherwise take a live run's for stale ones. Without flock (Windows; a network file system
    without it) nothing is held, and ``clean`` runs as before. The folder is made if it is not there."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CRNError(f"cannot write to {what} {folder}: {e.strerror or e}") from None
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # no fcntl (Windows), or a folder we cannot open
        fd = None
    if fd is None:  # unguarded, as before
        if clean:
            clean()
        yield
        return
    try:
        held = _flock(fd, fcntl.LOCK_EX)
        if held is not False and clean:  # no other writer (or no flock here): the temporaries are stale
            clean()
        if held and not alone:  # from alone to shared, so that a run of other layouts may start too (not
            held = _flock(fd, fcntl.LOCK_SH)  # atomic: another may take it alone in between, for a while)
        if held is False and not alone:
            import time
            deadline = time.monotonic() + wait_s
            while (held := _flock(fd, fcntl.LOCK_SH)) is False and time.monotonic() < deadline:
                time.sleep(0.05)
        if held is False:
            raise CRNError(f"{what} {folder} is being written by another crn_fast run that is still going " +
                           ("(training or synthesis)" if alone else "(a training run)") +
                           f"; wait for it to end, or give another {what}")
        yield
    finally:
        os.close(fd)


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


def read_generator_file(path: str | os.PathLike, weights: bool = True
                        ) -> tuple[CRNConfig, dict[str, torch.Tensor], dict]:
    """(config, state_dict, extra metadata) of a crn_fast generator file, with clear errors; or of
    the authors' TensorFlow checkpoints (``.../512p/model.ckpt``, its prefix), read through
    convert_tf as crn-convert-tf reads them, so every tool takes those too. ``weights=False``
    reads only a crn_fast file's header: the state's tensors are then on the meta device (names,
    shapes and dtypes, no data), which is what crn-info needs of a 400 MB file."""
    from safetensors import SafetensorError, safe_open
    from .tf_checkpoint import folder_checkpoints, is_tf_checkpoint
    if is_tf_checkpoint(path):
        from .convert_tf import read_tf_generator
        return read_tf_generator(path)
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            inside = path / "model.ckpt"
            several = folder_checkpoints(path)
            raise CheckpointError(f"checkpoint {path} is a folder, not a generator file" + (
                f"; the run's generator is {inside}" if inside.is_file() else
                f"; it holds {len(several)} TF checkpoints: give one prefix, {' or '.join(map(str, several))}"
                if several else ""))
        raise CheckpointError(f"checkpoint {path} {absent(path)}" if not path.exists()
                              else f"checkpoint {path} is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path} is a safetensors file but not a crn_fast generator "
                                      f"(no '{FORMAT}' metadata); convert TF checkpoints with crn-convert-tf")
            state = {k: f.get_tensor(k) if weights else _meta_tensor(f.get_slice(k)) for k in f.keys()}
    except CheckpointError:
        raise
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied (the file is not readable by this user)") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        import zipfile
        if zipfile.is_zipfile(path):  # what torch.save writes: a training run's train_state.pt, say
            raise CheckpointError(f"{path} is a PyTorch file (torch.save), not a crn_fast generator; a training "
                                  f"run's generator is the model.ckpt beside its train_state.pt") from None
        raise CheckpointError(f"{path} is not a readable crn_fast checkpoint (corrupt, truncated or another "
                              f"format): {' '.join(str(e).split())[:300]}") from None
    try:
        d = json.loads(meta["config"])
        if not isinstance(d, dict):
            raise TypeError(f"a JSON {type(d).__name__}, not an object")
        config = CRNConfig.from_dict(d)
    except (KeyError, ValueError, TypeError, AttributeError) as e:  # CRNError is a ValueError
        raise CheckpointError(f"{path}: the embedded model config is missing or invalid ({e})") from None
    try:
        extra = json.loads(meta["extra"]) if "extra" in meta else {}
    except ValueError as e:
        raise CheckpointError(f"{path}: the embedded 'extra' metadata is not valid JSON ({e})") from None
    return config, state, extra


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _meta_tensor(view) -> torch.Tensor:
    """A safetensors entry's shape and dtype as a meta tensor, its data left unread."""
    dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
    if dtype is None:
        raise ValueError(f"a tensor of dtype {view.get_dtype()}, which no crn_fast generator holds")
    return torch.empty(view.get_shape(), dtype=dtype, device="meta")


def load_generator(path: str | os.PathLike, backend: str = "eager", device=None, **kw):
    """Build a CRN from a crn_fast generator file (its config included) and load its weights."""
    from .model import CRN
    config, state, _ = read_generator_file(path)
    model = CRN(config, backend=backend, **kw)
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"{path}: the weights do not match the embedded config: {mismatch}")
    model.load_state_dict(state, strict=True)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: weights hold NaN or inf values ({', '.join(bad[:4])}"
                              f"{' ...' if len(bad) > 4 else ''}); the file came from a diverged run")
    if device is not None:
        model = model.to(device)
    return model.eval()


def state_dict_mismatch(expected: dict, got: dict, limit: int = 4) -> str:
    """'' when ``got`` has exactly ``expected``'s keys and shapes, else what differs, briefly."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {tuple(got[k].shape)} (expected {tuple(expected[k].shape)})" for k in expected
              if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            parts.append(f"{len(items)} {what}: " + ", ".join(items[:limit]) + (" ..." if len(items) > limit else ""))
    return "; ".join(parts)


def save_train_state(path: str | os.PathLike, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_train_state(path: str | os.PathLike, mmap: bool = False) -> dict:
    """A training state (weights_only). ``mmap``: its tensors memory-mapped, not read, for callers
    that want a few numbers of a 1024p run's gigabytes (its step, options, config)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"no training state at {path}") from None
    except Exception as e:  # torch raises many types for corrupt files; its weights_only refusal explains
        import zipfile  # itself over several lines: keep all of it, on one line; a cut file, in words
        text = "truncated or corrupt (no zip directory at its end: a copy or write cut short?)" if \
            os.path.isfile(path) and not zipfile.is_zipfile(path) else " ".join(str(e).split())[:1500]
        raise CheckpointError(f"{path} is not a readable training state: {text}") from None
