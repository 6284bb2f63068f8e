"""Turning tensors into pictures: clipping to 0..255, k-image grids and sample sheets."""
from __future__ import annotations

import collections
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import atomic_path
from .labels import CITYSCAPES, ClassSet


def uint8_images(images: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) on 0..255 (unclipped) -> (..., H, W, 3) uint8, contiguous, on their device."""
    return images.detach().float().clamp(0, 255).round().to(torch.uint8).movedim(-3, -1).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) on 0..255 (unclipped) -> (..., H, W, 3) uint8 on the host."""
    return uint8_images(images).cpu().numpy()


def output_row(output: torch.Tensor) -> np.ndarray:
    """One sample's generator output (3k, H, W) -> its k images side by side (H, k*W, 3)."""
    return side_by_side(to_uint8(output.view(-1, 3, *output.shape[1:])))


def side_by_side(images: np.ndarray) -> np.ndarray:
    """(k, H, W, 3) uint8 -> (H, k*W, 3)."""
    return images[0] if len(images) == 1 else np.concatenate(list(images), axis=1)


def sample_sheet(ids: torch.Tensor, targets: torch.Tensor | None, outputs: torch.Tensor,
                 classes: ClassSet = CITYSCAPES) -> np.ndarray:
    """Rows of layout (in the classes' colours) | target | output(s)."""
    rows = []
    for i in range(outputs.shape[0]):
        parts = [classes.to_colors(ids[i].cpu().numpy().astype(np.uint8))]
        if targets is not None:
            parts.append(to_uint8(targets[i]))
        parts.append(output_row(outputs[i]))
        rows.append(np.concatenate(parts, axis=1))
    return np.concatenate(rows, axis=0)


def save_png(array: np.ndarray, path: str | Path, compress_level: int = 6) -> Path:
    """Write ``array`` as a PNG, atomically. compress_level: zlib's 0..9 (6, PIL's default)."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=compress_level)
    return Path(path)


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def save_png_copies(array: np.ndarray, paths, compress_level: int = 6) -> bytes:
    """``array`` encoded once, written atomically to each of ``paths`` (a sample sheet and latest.png);
    returns the PNG's bytes (TensorBoard's copy)."""
    data = encode_png(array, compress_level)
    for path in paths:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return data


class _Now:
    """A future whose work runs when its result is asked for (``workers=0``: in the calling thread)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


class OrderedWrites:
    """Writes (PNG encodes, which release the GIL) in ``workers`` background threads, finished in
    order: at most ``max_pending`` wait, so memory stays bounded, and ``on_done`` sees each result
    in turn. A failed write is raised when it is reached: at a later ``write``, or at ``drain`` /
    ``close``, after every write before it has finished. Later writes not yet started are then
    cancelled; those already running finish (each atomic: a file is whole or absent). ``submit``
    runs other work (decoding) in the same threads. ``workers=0``: each write runs in the calling
    thread when it is reached (at once with ``max_pending=0``), as a plain loop would."""

    def __init__(self, workers: int, max_pending: int, on_done=lambda result: None, name: str = "crn-writes"):
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix=name) if workers else None
        self.max_pending, self.on_done = max_pending, on_done
        self.pending: collections.deque = collections.deque()

    def submit(self, fn, *args):
        return self.pool.submit(fn, *args) if self.pool else _Now(fn, *args)

    def write(self, fn, *args) -> None:
        self.pending.append(self.submit(fn, *args))
        while len(self.pending) > self.max_pending:
            self._retire()

    def _retire(self) -> None:
        try:
            result = self.pending.popleft().result()
        except BaseException:
            for later in self.pending:  # not started: not written (as if stopped here)
                if not isinstance(later, _Now):
                    later.cancel()
            self.pending.clear()
            raise
        self.on_done(result)

    def drain(self) -> None:
        while self.pending:
            self._retire()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            if self.pool:
                self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        self.close()  # an earlier write's error (earlier in order) takes the place of the one raised
        return False
