"""Tile tuning shared by the conv kernels (conv_norm, upsample_conv): time each candidate tile on
the GPU, and keep the winners across processes in one JSON file (CRN_FAST_CONV_TUNING=FILE), per
GPU model and Triton version, so a deployment tunes once and later processes read the file. The
generator's fused_conv="auto" keeps its per-module conv modes there too ("conv_modes" entries:
each module's index in CONV_MODES).

The file: {"format": 1, "devices": {"<GPU name> | triton <version>": {"<key text>": [tile values]}}}.
A key text is the shape key's values joined by "|", prefixed by the kernel's name for every kernel
but conv_norm (whose keys were the file's first and keep their text). A missing file is empty; an
unreadable, foreign or unwritable one is one warning per process, never a failed forward: the
tiles are then tuned in this process.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Callable, Optional

from ._runtime import cuda_time, precompile, triton

TUNING_FILE_ENV = "CRN_FAST_CONV_TUNING"
_FORMAT = 1  # bumped when a stored tile would no longer mean the same launch
_FILES: dict[str, dict[str, dict[str, list]]] = {}  # path -> device tag -> key text -> tile values, as read
_WARNED: set = set()
_log = logging.getLogger("crn_fast.kernels")


def _warn_once(path: str, what: str) -> None:
    if path not in _WARNED:
        _WARNED.add(path)
        _log.warning("%s %s: %s; the tiles are tuned in this process instead", TUNING_FILE_ENV, path, what)


def _values_ok(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(i, (int, bool)) for i in v)


def _read(path: str) -> dict[str, dict[str, list]]:
    """{device tag: {key text: tile values}} from a tuning file: {} for a missing file, one warning
    for an unreadable or foreign one. Entries that are not lists of integers are dropped (each
    kernel checks its own entries' length and values when it looks one up)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        _warn_once(path, f"cannot be read ({type(e).__name__}: {e})")
        return {}
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("devices"), dict):
        _warn_once(path, f"is not a crn_fast conv tuning file of format {_FORMAT}")
        return {}
    return {tag: {k: v for k, v in entries.items() if _values_ok(v)}
            for tag, entries in data["devices"].items() if isinstance(entries, dict)}


def key_text(kernel: str, key: tuple) -> str:
    return "|".join(([] if kernel == "conv_norm" else [kernel]) + [str(v) for v in key])


def device_tag(device) -> str:
    """What a tuned tile holds for: the GPU model and the Triton that compiled it."""
    import torch
    return f"{torch.cuda.get_device_name(device)} | triton {triton.__version__}"


def stored_tile(kernel: str, key: tuple, device, parse: Callable[[list], Optional[tuple]]):
    """The tile (or other tuned choice) stored for ``kernel``'s ``key`` on this GPU model (``device``)
    in the CRN_FAST_CONV_TUNING file, as ``parse(values)`` makes it (None for values that are not
    one of the kernel's), or None; None without reading anything when no file is set."""
    path = os.environ.get(TUNING_FILE_ENV)
    if not path:
        return None
    if path not in _FILES:
        _FILES[path] = _read(path)
    values = _FILES[path].get(device_tag(device), {}).get(key_text(kernel, key))
    return None if values is None else parse(values)


def store_tile(kernel: str, key: tuple, device, tile) -> None:
    """Add one tuned tile (a sequence of integers) to the CRN_FAST_CONV_TUNING file: re-read (other
    processes may have added theirs), merge, and replace the file atomically; a file that cannot be
    written is one warning."""
    path = os.environ.get(TUNING_FILE_ENV)
    if not path:
        return
    tiles = _read(path)
    tiles.setdefault(device_tag(device), {})[key_text(kernel, key)] = list(tile)
    _FILES[path] = tiles
    data = {"format": _FORMAT, "devices": {t: dict(sorted(e.items())) for t, e in sorted(tiles.items())}}
    try:
        folder = os.path.dirname(os.path.abspath(path))
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".tuning-", suffix=".json", delete=False) as f:
            json.dump(data, f, indent=1)
        os.replace(f.name, path)
    except OSError as e:
        _warn_once(path, f"cannot be written ({type(e).__name__}: {e})")


def tune(kernel: str, candidates: list, run, timer) -> tuple:
    """(fastest tile, each tile's ms, each failed tile's error): ``timer(lambda: run(tile))`` for
    every candidate. A tile this GPU cannot compile or launch (Triton's OutOfResources: shared
    memory or registers; a ptxas error) is skipped with one warning, as Triton's own autotuner
    skips it; when every tile fails, the first failure is raised."""
    timed, failed, first = {}, {}, None
    for cfg in candidates:
        try:
            timed[cfg] = timer(lambda: run(cfg))
        except triton.runtime.errors.TritonError as e:
            failed[cfg] = f"{type(e).__name__}: {e}"
            first = first or e
    if not timed:
        raise first
    if failed:
        _log.warning("%s: %d of %d tile configs cannot run on this GPU and were skipped: %s", kernel, len(failed),
                     len(candidates), "; ".join(f"{tuple(c)}: {m[:200]}" for c, m in failed.items()))
    return min(timed, key=timed.get), timed, failed


def choose(kernel: str, key: tuple, device, candidates: list, run, parse: Callable[[list], Optional[tuple]],
           compile_one=None) -> tuple:
    """(tile, each candidate's ms, each failed candidate's error) for ``kernel``'s ``key``: the tile
    stored in the CRN_FAST_CONV_TUNING file if it is one of ``candidates`` (then no timings), else
    the fastest candidate by ``run(tile)`` (CUDA events; compiled first all at once with
    ``compile_one`` when given, see _runtime.precompile), stored in the file for later processes."""
    stored = stored_tile(kernel, key, device, parse)
    if stored in candidates:
        return stored, {}, {}
    t0 = time.perf_counter()
    if compile_one is not None:
        precompile(candidates, compile_one)
    best, timed, failed = tune(kernel, candidates, run, cuda_time)
    store_tile(kernel, key, device, best)
    _log.debug("%s %s: %s of %s in %.1f s", kernel, key, best, timed, time.perf_counter() - t0)
    return best, timed, failed
