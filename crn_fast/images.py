"""Turning tensors into pictures: clipping to 0..255, k-image grids and sample sheets."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import atomic_path
from .labels import train_ids_to_colors


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) on 0..255 (unclipped) -> (..., H, W, 3) uint8."""
    return images.detach().float().clamp(0, 255).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


def output_row(output: torch.Tensor) -> np.ndarray:
    """One sample's generator output (3k, H, W) -> its k images side by side (H, k*W, 3)."""
    return side_by_side(to_uint8(output.view(-1, 3, *output.shape[1:])))


def side_by_side(images: np.ndarray) -> np.ndarray:
    """(k, H, W, 3) uint8 -> (H, k*W, 3)."""
    return images[0] if len(images) == 1 else np.concatenate(list(images), axis=1)


def sample_sheet(ids: torch.Tensor, targets: torch.Tensor | None, outputs: torch.Tensor) -> np.ndarray:
    """Rows of layout | target | output(s)."""
    rows = []
    for i in range(outputs.shape[0]):
        parts = [train_ids_to_colors(ids[i].cpu().numpy().astype(np.uint8))]
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
