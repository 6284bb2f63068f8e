"""The layout at every module's size: the area (box) average pyramid, all levels in a few passes.

    levels[k] = avg_pool2d(layout, 2**k)      k = 1 .. L-1 (TF resize_area at exactly 1/2**k size)

Memory plan: _pyramid_kernel reads a [2**P, 2**P] pixel tile of its input once (every channel) and
writes the next P levels of that tile: the tile is halved P times in registers (2x2 sums, fp32),
each level stored once. A 9-level 1024p pyramid is two passes: levels 1-4 from the layout, 5-8
from level 4, instead of eight avg_pool2d launches that each re-read the level above.

Each level is the fp32 average of the level above, rounded to the layout's dtype once, at its
store. For a one-hot layout every level up to a 2**4 x 2**4 box is then exact in bf16 (multiples
of 1/256), so every level is the exactly rounded box average of the layout: more precise than
pooling bf16 level by bf16 level (which rounds the 1/1024 multiples of level 5 and then pools
them), and equal to it in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._runtime import HAS_TRITON, cdiv, launch, memory_format_of, next_pow2, runs_kernel, tl, triton, triton_op

PASS_LEVELS = 4  # levels per pass: a 16 x 16 pixel tile


def area_pyramid_reference(layout: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[layout, layout/2, ..., layout/2**(levels-1)], finest first: each level the 2x2 average of
    the one before (F.avg_pool2d, in the layout's dtype)."""
    pyramid = [layout]
    for _ in range(levels - 1):
        pyramid.append(F.avg_pool2d(pyramid[-1], 2))
    return pyramid


if HAS_TRITON:

    @triton.jit
    def _halve(v, T: tl.constexpr, BLOCK_C: tl.constexpr):
        """[T, T, C] -> [T/2, T/2, C]: the average of each 2x2 pixel block (fp32)."""
        v = tl.reshape(v, (T // 2, 2, T // 2, 2, BLOCK_C))
        return tl.sum(tl.sum(v, axis=3), axis=1) * 0.25

    @triton.jit
    def _tile(P, n, ty, tx, C: tl.constexpr, H, W, CL: tl.constexpr, T: tl.constexpr, BLOCK_C: tl.constexpr):
        """Pointers and mask of tile (ty, tx) of a dense (N, C, H, W) level, channels_last (CL) or
        NCHW: a [T, T, BLOCK_C] block of pixels x channels."""
        y = ty * T + tl.arange(0, T)
        x = tx * T + tl.arange(0, T)
        c = tl.arange(0, BLOCK_C)
        if CL:
            offs = (y[:, None, None] * W + x[None, :, None]) * C + c[None, None, :]
        else:
            offs = c[None, None, :] * (H * W) + y[:, None, None] * W + x[None, :, None]
        mask = (y < H)[:, None, None] & (x < W)[None, :, None] & (c < C)[None, None, :]
        return P + n.to(tl.int64) * C * H * W + offs, mask

    @triton.jit
    def _store_level(Y, v, n, ty, tx, C: tl.constexpr, H, W, CL: tl.constexpr, T: tl.constexpr,
                     BLOCK_C: tl.constexpr):
        ptrs, mask = _tile(Y, n, ty, tx, C, H, W, CL, T, BLOCK_C)
        tl.store(ptrs, v.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _pyramid_kernel(X, Y1, Y2, Y3, Y4, C: tl.constexpr, H, W, NLEV: tl.constexpr, CL: tl.constexpr,
                        BLOCK_C: tl.constexpr):
        """Program (tile column, tile row, n): a [2**NLEV, 2**NLEV] pixel tile of X (N, C, H, W),
        dense channels_last (CL) or NCHW, -> its tiles of the next NLEV levels, Y1 (H/2, W/2) ..
        Y<NLEV>. H, W: X's size, multiples of 2**NLEV. C (the classes) is a compile-time
        constant: a pixel's channel run (20 classes: 40 bytes) then loads as 8-byte vectors."""
        T: tl.constexpr = 2 ** NLEV
        tx = tl.program_id(0)
        ty = tl.program_id(1)
        n = tl.program_id(2)
        ptrs, mask = _tile(X, n, ty, tx, C, H, W, CL, T, BLOCK_C)
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        v = _halve(v, T, BLOCK_C)
        _store_level(Y1, v, n, ty, tx, C, H // 2, W // 2, CL, T // 2, BLOCK_C)
        if NLEV >= 2:
            v = _halve(v, T // 2, BLOCK_C)
            _store_level(Y2, v, n, ty, tx, C, H // 4, W // 4, CL, T // 4, BLOCK_C)
        if NLEV >= 3:
            v = _halve(v, T // 4, BLOCK_C)
            _store_level(Y3, v, n, ty, tx, C, H // 8, W // 8, CL, T // 8, BLOCK_C)
        if NLEV >= 4:
            v = _halve(v, T // 8, BLOCK_C)
            _store_level(Y4, v, n, ty, tx, C, H // 16, W // 16, CL, T // 16, BLOCK_C)


@triton_op("crn_fast::area_pyramid", mutates_args=())
def _area_pyramid_op(layout: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The levels-1 coarser levels of the layout, finest first (the layout itself is not among
    them: outputs may not alias inputs)."""
    if not runs_kernel(layout) or layout.shape[2] % (1 << (levels - 1)) or layout.shape[3] % (1 << (levels - 1)):
        return area_pyramid_reference(layout, levels)[1:]
    fmt = memory_format_of(layout)
    x = layout.contiguous(memory_format=fmt)
    n, c = x.shape[:2]
    out, done = [], 0
    while done < levels - 1:
        nlev = min(PASS_LEVELS, levels - 1 - done)
        h, w = x.shape[2:]
        ys = [torch.empty((n, c, h >> k, w >> k), device=x.device, dtype=x.dtype, memory_format=fmt)
              for k in range(1, nlev + 1)]
        t = 1 << nlev
        launch(_pyramid_kernel, (cdiv(w, t), cdiv(h, t), n), x, *(ys + [ys[-1]] * (4 - nlev)), c, h, w,
               NLEV=nlev, CL=fmt == torch.channels_last, BLOCK_C=next_pow2(c), num_warps=4)
        out += ys
        x, done = ys[-1], done + nlev
    return out


def area_pyramid(layout: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Triton version of :func:`area_pyramid_reference` (``torch.ops.crn_fast.area_pyramid``):
    [layout, layout/2, ..., layout/2**(levels-1)], finest first, each level in the layout's dtype
    and memory format. A layout that needs a gradient takes the reference."""
    if levels <= 1:
        return [layout]
    if layout.dim() != 4 or min(layout.shape[2:]) >> (levels - 1) < 1:
        raise ValueError(f"area_pyramid needs a (N, C, H, W) layout with H and W of at least 2^(levels-1) = "
                         f"{1 << (levels - 1)} for {levels} levels, got shape {tuple(layout.shape)}")
    if torch.is_grad_enabled() and layout.requires_grad:
        return area_pyramid_reference(layout, levels)
    return [layout, *torch.ops.crn_fast.area_pyramid(layout, int(levels))]


__all__ = ["area_pyramid", "area_pyramid_reference"]
