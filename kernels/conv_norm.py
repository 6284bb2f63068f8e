"""A CRN convolution with its layer norms folded in: implicit-GEMM 3x3 (or 1x1) conv, inference only.

    y = conv2d(prologue(x), weight, bias, padding=k // 2)            (no bias in the 3x3 convs)
    prologue(x) = leaky_relu((x - mean) * rstd * gamma + beta)        when the input's norm is given,
                  applied to every loaded tap; padding stays 0 (it pads the normalised tensor)
    epilogue:     per-tile (count, mean, M2) of the stored y          when its statistics are wanted
                  (x + 1) / 2 * 255 in fp32                           for the generator's head

Memory plan, per refinement module (channels_last, Cin the fast dimension):
    _conv_kernel or   reads x (raw conv output of the layer before, or the upsample-concat output)
    _conv_tma_kernel  and the packed weight -> writes y once, plus P partial statistics per sample
    _finalize_kernel  reads the P partials -> per-sample mean, rstd (Chan's parallel merge)
So the normalised activations are never stored, and nothing re-reads y to find its statistics:
conv1 -> finalize -> conv2 (normalises conv1's output on load) -> finalize -> the next module's
norm_lrelu_upsample_concat (upsample_concat.py) or the head.

The GEMM: M = output pixels of one sample (BLOCK_M per program), N = output channels (BLOCK_N),
K = taps x input channels, walked as one flat loop of (tap, BLOCK_K channel block) steps so that
Triton pipelines the loads across taps. Each A tile is BLOCK_M pixels of BLOCK_K contiguous
channels (a shifted window of x, zero outside the image); each B tile is BLOCK_K rows of the
weight packed as [tap, Cin, Cout] (Cout contiguous). Two kernels load them:
    _conv_kernel      pointer loads (cp.async), BLOCK_M pixels in raster order, masks computed per
                      element: any GPU, any dtype, any pixel stride
    _conv_tma_kernel  the tensor memory accelerator (sm_90+, 16-bit, 16-byte strides and Cout % 8):
                      BLOCK_M pixels of one image row; the hardware fills the conv's zero padding,
                      so the mainloop is the loads, the wgmma and its barriers (~94 SASS
                      instructions per 128x128x64 step where the pointer kernel issues ~231)
The tuner times both kinds of tile on the GPU (``tma_unavailable_reason`` says when the TMA kernel
cannot run). Rows of x are 16-byte aligned when the pixel stride is a multiple of 8 elements: the
upsample-concat output is allocated with its channel count rounded up to 16
(``channels_multiple``), the pad channels never read.

An input norm costs ~8 instructions per loaded element (unpack, scale and shift, leaky ReLU,
repack), and each element is loaded once per tap (9 times). The TMA kernel keeps that low: in
bf16 it reads x (and gamma, beta) as int32 pairs of channels, unpacked by one shift and one mask
(``BF16_PAIRS``: a bf16 is the high half of an fp32), and it applies the padding mask only in
tiles whose window crosses the image border (a branch the others skip). Its mainloop is then 354
SASS instructions per 128x128x64 step on that hot path (Triton 3.9; 365 with 3.6), from 453
(464) with a mask and a conversion per element. That still issues ~1.4x longer than the step's
wgmma at 128 output channels per tile, and ~4x at 32 (benchmarks/sass_census.py): a fused conv2
is likely slower than cuDNN + the apply pass at modules 7-8 (Cout 128, 32). So the model can also run a
module "split": conv1 -> one apply pass with conv1's statistics (layer_norm_lrelu.norm_lrelu) ->
conv2 without an input norm, at the cost of writing and re-reading the normalised features once.
``CRN(fused_conv="auto")`` times cuDNN, fused and split per module.

fp32 inputs use IEEE fp32 products (never TF32); bf16/fp16 use tensor cores with fp32 accumulation.
The statistics are those of y as stored (rounded to its dtype), like the unfused path's.
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from crn_fast.constants import LEAKY_SLOPE, LN_EPS

from ._runtime import (HAS_TRITON, TensorDescriptor, cdiv, launch, next_pow2, runs_kernel, symbolic, tl, triton,
                       triton_op, tuning_allowed)
from ._tuning import choose
from .layer_norm_lrelu import _stats_torch, norm_lrelu_reference


def conv_norm_reference(x, weight, bias=None, norm=None, negative_slope: float = LEAKY_SLOPE, head: bool = False):
    """Torch reference: conv2d of the normalised input (x as stored in its dtype), optional head
    scaling. ``weight`` is a plain (Cout, Cin, k, k) conv weight; ``norm`` = (mean, rstd, gamma, beta)."""
    if norm is not None:
        x = norm_lrelu_reference(x, *norm, negative_slope)
    y = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), padding=weight.shape[-1] // 2)
    return (y + 1.0) / 2.0 * 255.0 if head else y


def pack_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, k, k) conv weight -> (k*k, Cin, Cout) contiguous, the kernel's B operand."""
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] not in (1, 3):
        raise ValueError(f"conv_norm takes a (Cout, Cin, k, k) weight with k 1 or 3, got {tuple(weight.shape)}")
    cout, cin, k, _ = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(k * k, cin, cout).contiguous()


def unpack_conv_weight(packed: torch.Tensor) -> torch.Tensor:
    taps, cin, cout = packed.shape
    k = int(round(taps ** 0.5))
    return packed.reshape(k, k, cin, cout).permute(3, 2, 0, 1)


class Tile(NamedTuple):
    """One launch config of the fused conv. ``tma``: the tensor-memory-accelerator kernel
    (``_conv_tma_kernel``: BLOCK_M pixels of one image row, sm_90+, 16-bit) instead of pointer loads
    (``_conv_kernel``: BLOCK_M pixels in raster order, any GPU and dtype)."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tma: bool = False


# The candidates the tuner times on a GPU (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), each
# with 2-4 pipelined stages of bf16 A/B tiles within the 228 KB of an H100 SM's shared memory.
CONFIGS = [(128, 128, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3), (64, 64, 32, 4, 3),
           (128, 32, 64, 4, 4), (256, 32, 64, 8, 3), (256, 32, 32, 4, 3), (128, 32, 32, 4, 4),
           (128, 16, 64, 4, 3), (256, 16, 32, 4, 3), (128, 16, 32, 4, 3)]  # the last three: the head (3k outputs)
# The TMA kernel's candidates (16-bit on sm_90+): 64-128 rows per warpgroup (wgmma's M is 64 per
# warpgroup), 3-4 stages of A and B tiles in 64-144 KB of shared memory (tests/gpu_compile_check.py
# holds the sizes, the TMA loads and the wgmma). Its mainloop is about 94 SASS instructions per
# 128x128x64 step with 8 warps where the pointer kernel's is about 231 (benchmarks/sass_census.py).
TMA_CONFIGS = [Tile(128, 128, 64, 8, 3, True), Tile(128, 256, 64, 8, 3, True), Tile(256, 128, 64, 8, 3, True),
               Tile(128, 64, 64, 4, 4, True), Tile(64, 64, 64, 4, 4, True), Tile(128, 32, 64, 4, 4, True),
               Tile(256, 32, 64, 8, 3, True), Tile(128, 16, 64, 4, 4, True),
               Tile(128, 32, 32, 4, 4, True), Tile(256, 32, 32, 8, 3, True)]  # the last two: 32 input channels
# fp32 (IEEE products on CUDA cores, never TF32) holds 4-byte tiles: smaller ones, or registers spill
# and the larger 16-bit configs would exceed an A100's 164 KB of shared memory.
FP32_CONFIGS = [(64, 64, 32, 4, 2), (128, 32, 32, 8, 3), (32, 32, 32, 4, 2)]
# where no config above fits (few channels: tiny presets, a head on 16 channels), either dtype
SMALL_CONFIGS = [(32, 32, 32, 4, 2), (64, 16, 32, 4, 2), (64, 32, 16, 4, 2), (64, 16, 16, 4, 2)]
# under the interpreter: small tiles (fewer masked lanes per interpreted program), with TMA loads
# where they can run, so the CPU tests take the path a Hopper GPU takes
_INTERPRETER_CONFIGS = (Tile(16, 16, 16, 4, 1, True), Tile(32, 16, 16, 4, 1))

if HAS_TRITON:

    @triton.jit
    def _norm_tile(a, ci, km, inb, Gamma, Beta, mu, rs, slope):
        """The previous layer's norm + leaky ReLU on a loaded [pixels, channels] window, rounded to
        the input's dtype as the unfused path stores it; zero where the window is outside the image
        (padding pads the normalised tensor) and in channels past Cin."""
        g = tl.load(Gamma + ci, mask=km, other=0.0).to(tl.float32) * rs
        b = tl.load(Beta + ci, mask=km, other=0.0).to(tl.float32)
        z = (a.to(tl.float32) - mu) * g[None, :] + b[None, :]
        z = tl.where(z > 0, z, z * slope)
        return tl.where(inb[:, None] & km[None, :], z, 0.0).to(a.dtype)

    @triton.jit
    def _norm_tile_folded(a, ci, km, Gamma, Beta, mu, rs, slope):
        """``_norm_tile`` in fewer instructions per element, for 16-bit inputs: the per-sample norm
        and the affine folded per channel into one scale and shift (x * s + t, s = gamma * rstd,
        t = beta - mean * s: fp32 rounding differences far below a bf16/fp16 ulp), the leaky ReLU as
        max(z, slope * z) (0 <= slope <= 1, checked by the caller), and channels past Cin zero
        through s = t = 0 (no mask)."""
        g = tl.load(Gamma + ci, mask=km, other=0.0).to(tl.float32)
        b = tl.load(Beta + ci, mask=km, other=0.0).to(tl.float32)
        return _scale_shift_lrelu(a.to(tl.float32), g, b, mu, rs, slope).to(a.dtype)

    @triton.jit
    def _scale_shift_lrelu(x, g, b, mu, rs, slope):
        """max(z, slope * z) for z = x * s + t, with the channels' s = g * rstd, t = b - mean * s (fp32)."""
        s = g * rs
        t = b - mu * s
        z = x * s[None, :] + t[None, :]
        return tl.maximum(z, z * slope)

    @triton.jit
    def _bf16_halves(p):
        """The two bf16 packed in each int32 of p as fp32 (a bf16 is the high half of an fp32):
        one shift and one mask, where a per-element conversion extracts each half first."""
        return (p << 16).to(tl.float32, bitcast=True), (p & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _norm_pairs(p, c0, Cin, Gamma2, Beta2, mu, rs, slope, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """``_norm_tile_folded`` on bf16 channels loaded as int32 pairs p [BLOCK_M, BLOCK_K // 2] (gamma
        and beta too: Gamma2, Beta2 point at them as int32 pairs); the normalised halves are joined
        back into the [BLOCK_M, BLOCK_K] bf16 tile."""
        cp = c0 // 2 + tl.arange(0, BLOCK_K // 2)
        km = cp < Cin // 2
        g_lo, g_hi = _bf16_halves(tl.load(Gamma2 + cp, mask=km, other=0))
        b_lo, b_hi = _bf16_halves(tl.load(Beta2 + cp, mask=km, other=0))
        x_lo, x_hi = _bf16_halves(p)
        z_lo = _scale_shift_lrelu(x_lo, g_lo, b_lo, mu, rs, slope).to(tl.bfloat16)
        z_hi = _scale_shift_lrelu(x_hi, g_hi, b_hi, mu, rs, slope).to(tl.bfloat16)
        return tl.join(z_lo, z_hi).reshape(BLOCK_M, BLOCK_K)

    @triton.jit
    def _next_k(tap, c0, Cin, BLOCK_K: tl.constexpr):
        """The K walk's next (tap, channel offset): the next channel block, or the next tap's first
        (the TMA kernel's; in the pointer kernel the extra live registers spill 4 bytes on sm_80)."""
        c0 += BLOCK_K
        wrap = c0 >= Cin
        return tap + wrap.to(tl.int32), tl.where(wrap, 0, c0)

    @triton.jit
    def _mma(a, wt, acc, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
        if DOT_F32:  # Triton's interpreter multiplies bf16 tiles wrongly: exact fp32 products instead
            return tl.dot(a.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            return tl.dot(a, wt, acc, input_precision="ieee")
        else:
            return tl.dot(a, wt, acc)

    @triton.jit
    def _epilogue(acc, Y, Bias, PCnt, PMean, PM2, yrow, pm, co, cm, idx,
                  STATS: tl.constexpr, HAS_BIAS: tl.constexpr, HEAD: tl.constexpr):
        """Bias, the head's 0..255 scaling, the store of y (channels_last: ``yrow`` is each pixel's
        first element), and this tile's (count, mean, M2) of y as stored, centred on the tile's own
        mean, into partial slot ``idx``."""
        if HAS_BIAS:
            acc += tl.load(Bias + co, mask=cm, other=0.0).to(tl.float32)[None, :]
        if HEAD:
            acc = (acc + 1.0) / 2.0 * 255.0
        yv = acc.to(Y.dtype.element_ty)
        omask = pm[:, None] & cm[None, :]
        tl.store(Y + yrow[:, None] + co[None, :], yv, mask=omask)
        if STATS:
            v = tl.where(omask, yv.to(tl.float32), 0.0)
            cnt = tl.sum(pm.to(tl.float32), axis=0) * tl.sum(cm.to(tl.float32), axis=0)
            mean_t = tl.sum(tl.sum(v, axis=1), axis=0) / cnt
            e = tl.where(omask, v - mean_t, 0.0)
            tl.store(PCnt + idx, cnt)
            tl.store(PMean + idx, mean_t)
            tl.store(PM2 + idx, tl.sum(tl.sum(e * e, axis=1), axis=0))

    @triton.jit
    def _conv_kernel(X, Wp, Y, Bias, MeanIn, RstdIn, Gamma, Beta, PCnt, PMean, PM2,
                     Cin, Cout, H, W, sxn, sxh, sxw, P, slope,
                     KSIZE: tl.constexpr, NORM_IN: tl.constexpr, STATS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HEAD: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Pointer loads (any GPU, any dtype, any pixel stride). Program (tile, sample): a
        [BLOCK_M, BLOCK_N] tile of y. The output-channel block varies fastest, so the programs that
        read the same input pixels run together and share them in L2 (the weights, at most 19 MB
        per conv in bf16, stay in an H100's 50 MB L2 anyway)."""
        pid = tl.program_id(0)
        n = tl.program_id(1)
        n_nt = tl.cdiv(Cout, BLOCK_N)
        pid_m = pid // n_nt
        pid_n = pid - pid_m * n_nt
        HW = H * W
        pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pm = pix < HW
        py = pix // W
        px = pix - py * W
        co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cm = co < Cout
        xb = X + n.to(tl.int64) * sxn
        pix_off = py.to(tl.int64) * sxh + px.to(tl.int64) * sxw  # each tap adds one scalar shift to it
        if NORM_IN:
            mu = tl.load(MeanIn + n)
            rs = tl.load(RstdIn + n)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        n_kb = tl.cdiv(Cin, BLOCK_K)
        for kk in range(0, KSIZE * KSIZE * n_kb):
            tap = kk // n_kb
            ci = (kk - tap * n_kb) * BLOCK_K + tl.arange(0, BLOCK_K)
            km = ci < Cin
            dy = tap // KSIZE - KSIZE // 2
            dx = tap % KSIZE - KSIZE // 2
            inb = pm & (py + dy >= 0) & (py + dy < H) & (px + dx >= 0) & (px + dx < W)
            rows = xb + pix_off + (dy.to(tl.int64) * sxh + dx * sxw)
            a = tl.load(rows[:, None] + ci[None, :], mask=inb[:, None] & km[None, :], other=0.0)
            if NORM_IN:
                a = _norm_tile(a, ci, km, inb, Gamma, Beta, mu, rs, slope)
            wrow = (tap * Cin + ci).to(tl.int64) * Cout
            wt = tl.load(Wp + wrow[:, None] + co[None, :], mask=km[:, None] & cm[None, :], other=0.0)
            acc = _mma(a, wt, acc, IEEE, DOT_F32)
        yrow = (n.to(tl.int64) * HW + pix.to(tl.int64)) * Cout  # y is channels_last contiguous
        _epilogue(acc, Y, Bias, PCnt, PMean, PM2, yrow, pm, co, cm, n * P + pid, STATS, HAS_BIAS, HEAD)

    @triton.jit
    def _conv_tma_kernel(Xd, Wd, Y, Bias, MeanIn, RstdIn, Gamma, Beta, PCnt, PMean, PM2,
                         Cin, Cout, H, W, n_tw, P, slope,
                         KSIZE: tl.constexpr, NORM_IN: tl.constexpr, STATS: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HEAD: tl.constexpr, DOT_F32: tl.constexpr, BF16_PAIRS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Tensor-memory-accelerator loads (sm_90+, 16-bit, 16-byte strides). Program (tile,
        sample): BLOCK_M pixels of one image row by BLOCK_N output channels. Xd describes x as
        [N, H, W, Cin] and each (tap, channel block) step loads the box [1, 1, BLOCK_M, BLOCK_K] at
        (n, y + dy, x0 + dx, c0): the hardware fills whatever lies outside the image or past Cin with
        zeros, which is exactly the conv's zero padding, so no thread computes an address or a mask.
        Wd describes the packed weight as [taps, Cin, Cout] (box [1, BLOCK_K, BLOCK_N]). BF16_PAIRS
        (bf16 with an input norm): Xd describes x as int32 pairs of channels, [N, H, W, Cin / 2],
        and Gamma, Beta point at int32 pairs too (_norm_pairs). Both tiles
        land in shared memory in the layout wgmma reads; a one-row box keeps the A tile 2-D there
        (a taller box would be reshaped through registers)."""
        pid = tl.program_id(0)
        n = tl.program_id(1)
        n_nt = tl.cdiv(Cout, BLOCK_N)
        pid_m = pid // n_nt
        pid_n = pid - pid_m * n_nt
        row = pid_m // n_tw
        x0 = (pid_m - row * n_tw) * BLOCK_M
        co0 = pid_n * BLOCK_N
        if NORM_IN:
            mu = tl.load(MeanIn + n)
            rs = tl.load(RstdIn + n)
            px = x0 + tl.arange(0, BLOCK_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        n_kb = tl.cdiv(Cin, BLOCK_K)
        tap = 0  # (tap, channel offset) carried through the flat loop (_next_k): no division per step
        c0 = 0
        for kk in range(0, KSIZE * KSIZE * n_kb):
            dy = tap // KSIZE - KSIZE // 2
            dx = tap % KSIZE - KSIZE // 2
            if BF16_PAIRS:  # x described as int32 pairs of bf16 channels: unpacked by bit masks
                a = _norm_pairs(Xd.load([n, row + dy, x0 + dx, c0 // 2]).reshape(BLOCK_M, BLOCK_K // 2), c0, Cin,
                                Gamma, Beta, mu, rs, slope, BLOCK_M, BLOCK_K)
            else:
                a = Xd.load([n, row + dy, x0 + dx, c0]).reshape(BLOCK_M, BLOCK_K)
                if NORM_IN:
                    ci = c0 + tl.arange(0, BLOCK_K)
                    a = _norm_tile_folded(a, ci, ci < Cin, Gamma, Beta, mu, rs, slope)
            if NORM_IN:  # the hardware's zeros are raw zeros: the norm needs the padding mask
                if (x0 + dx < 0) | (x0 + dx + BLOCK_M > W) | (row + dy < 0) | (row + dy >= H):
                    inb = (px + dx >= 0) & (px + dx < W) & (row + dy >= 0) & (row + dy < H)
                    a = tl.where(inb[:, None], a, 0.0)
            wt = Wd.load([tap, c0, co0]).reshape(BLOCK_K, BLOCK_N)
            acc = _mma(a, wt, acc, False, DOT_F32)
            tap, c0 = _next_k(tap, c0, Cin, BLOCK_K)
        px_out = x0 + tl.arange(0, BLOCK_M)
        co = co0 + tl.arange(0, BLOCK_N)
        yrow = ((n * H + row).to(tl.int64) * W + px_out) * Cout
        _epilogue(acc, Y, Bias, PCnt, PMean, PM2, yrow, px_out < W, co, co < Cout, n * P + pid,
                  STATS, HAS_BIAS, HEAD)

    @triton.jit
    def _finalize_kernel(PCnt, PMean, PM2, MeanOut, RstdOut, P, eps, BLOCK_P: tl.constexpr):
        """Sample n's mean and rstd from its P tile partials: mean relative to the first tile's, then
        M2 = sum M2_i + sum n_i (mean_i - mean)^2 (never E[y^2] - E[y]^2)."""
        n = tl.program_id(0)
        base = n * P
        shift = tl.load(PMean + base)
        total = tl.zeros((), tl.float32)
        s = tl.zeros((), tl.float32)
        for p0 in range(0, P, BLOCK_P):
            i = p0 + tl.arange(0, BLOCK_P)
            m = i < P
            cnt = tl.load(PCnt + base + i, mask=m, other=0.0)
            total += tl.sum(cnt, axis=0)
            s += tl.sum(cnt * (tl.load(PMean + base + i, mask=m, other=0.0) - shift), axis=0)
        mean = shift + s / total
        m2 = tl.zeros((), tl.float32)
        for p0 in range(0, P, BLOCK_P):
            i = p0 + tl.arange(0, BLOCK_P)
            m = i < P
            cnt = tl.load(PCnt + base + i, mask=m, other=0.0)
            d = tl.load(PMean + base + i, mask=m, other=0.0) - mean
            m2 += tl.sum(tl.load(PM2 + base + i, mask=m, other=0.0) + cnt * d * d, axis=0)
        tl.store(MeanOut + n, mean)
        tl.store(RstdOut + n, 1.0 / tl.sqrt_rn(m2 / total + eps))


TMA_ENV = "CRN_FAST_CONV_TMA"


def tma_unavailable_reason(x: torch.Tensor, packed_weight: torch.Tensor,
                           negative_slope: float = LEAKY_SLOPE) -> Optional[str]:
    """None when the TMA kernel can run this conv, else why not. A tensor map needs 16-byte aligned
    strides and base: x's pixel stride a multiple of 8 16-bit elements (conv outputs of 8k channels;
    upsample-concat outputs padded with ``channels_multiple``) and Cout a multiple of 8. Its input
    norm's leaky ReLU is max(z, slope * z), so the slope must lie in [0, 1]. Inside torch.compile /
    torch.export tracing the pointer kernel runs (a descriptor over a strided view is not a traced
    argument this project has verified). ``CRN_FAST_CONV_TMA=0`` turns the TMA kernel off (the
    pointer kernel then runs every tile), e.g. to rule it out when a GPU misbehaves."""
    if os.environ.get(TMA_ENV, "1") == "0":
        return f"{TMA_ENV}=0 turns the TMA kernel off"
    if TensorDescriptor is None:
        return "this Triton has no host-side TensorDescriptor (Triton 3.4+)"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"{x.dtype} input: the TMA kernel multiplies 16-bit tiles on tensor cores"
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (9, 0):
        return "TMA needs compute capability 9.0 or newer"
    # only plain tensors: fake and functional ones (AOTAutograd, opcheck) are subclasses or wrappers
    traced = any(type(t) not in (torch.Tensor, torch.nn.Parameter) or torch._is_functional_tensor(t)
                 for t in (x, packed_weight))
    if traced or torch.compiler.is_compiling():
        return "traced (torch.compile / export / AOTAutograd): the pointer kernel is traced instead"
    strides = (x.stride(0), x.stride(2), x.stride(3))
    if x.stride(1) != 1 or any(s % 8 for s in strides) or x.storage_offset() % 8:
        return f"x's strides {tuple(x.stride())} (offset {x.storage_offset()}) are not 16-byte multiples " \
               "with contiguous channels"
    if not 0.0 <= negative_slope <= 1.0:
        return f"negative_slope {negative_slope} is outside [0, 1] (the TMA kernel's leaky ReLU is max(z, slope * z))"
    if packed_weight.shape[2] % 8 or not packed_weight.is_contiguous():
        return f"Cout {packed_weight.shape[2]} is not a multiple of 8 (or the packed weight is not contiguous)"
    return None


# The TMA kernel's input norm reads bf16 channels as int32 pairs (BF16_PAIRS; tests switch it off)
PAIRS = True


def _bf16_pairs(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> bool:
    """Can the TMA kernel read this bf16 input and its norm's gamma and beta as int32 pairs of
    channels: an even channel count, and gamma and beta dense bf16 on 4-byte boundaries."""
    return PAIRS and x.dtype == torch.bfloat16 and x.shape[1] % 2 == 0 and all(
        t.dtype == torch.bfloat16 and t.is_contiguous() and t.data_ptr() % 4 == 0 for t in (gamma, beta))


def _candidates(cin: int, cout: int, dtype: torch.dtype, width: int = 0, tma: bool = False) -> list[Tile]:
    """The configs worth timing for this shape (each costs a compile on first use): no tile wider
    than the channels it covers, and none narrower than 64 output channels where Cout allows (a
    narrow N tile re-reads the input once per tile); TMA tiles (first, when ``tma``) no wider than
    the image row ``width`` they cover."""
    n_cap, k_cap = max(16, next_pow2(cout)), max(16, next_pow2(cin))
    configs = [Tile(*c) for c in (FP32_CONFIGS if dtype == torch.float32 else CONFIGS)]
    if tma:
        configs = [c for c in TMA_CONFIGS if c.block_m <= width] + configs
    fits = [c for c in configs if min(n_cap, 64) <= c.block_n <= n_cap and c.block_k <= k_cap]
    return fits or [next(Tile(*c) for c in SMALL_CONFIGS if c[1] <= n_cap and c[2] <= k_cap)]


def _heuristic(cin: int, cout: int, dtype: torch.dtype, width: int = 0, tma: bool = False) -> Tile:
    """Untuned choice: the widest N tile the channels fill, with TMA loads where they can run (the
    shorter mainloop; the tuner measures it on the GPU)."""
    return _candidates(cin, cout, dtype, width, tma)[0]


# Tuned choices per (N, Cin, Cout, H, W, taps, dtype, norm, stats, bias, TMA possible): measured once
# per process on the GPU (CUDA events, best of 3 after a warm-up), outside torch.compile tracing and
# CUDA graph capture; CRN_FAST_CONV_TUNE=0 keeps the heuristic. CRN_FAST_CONV_TUNING=FILE keeps them
# across processes (a JSON file per GPU model and Triton version: measured once, then read).
_TUNED: dict[tuple, Tile] = {}
_TIMINGS: dict[tuple, dict[Tile, float]] = {}
_FAILURES: dict[tuple, dict[Tile, str]] = {}


def _parse_tile(values: list) -> Optional[Tile]:
    """A Tile from the tuning file's values (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, tma),
    None for values that are not one."""
    ok = len(values) == 6 and isinstance(values[5], bool) and \
        all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in values[:5])
    return Tile(*values) if ok else None


_PINNED: list[Tile] = []


@contextlib.contextmanager
def pinned_config(config: tuple):
    """Run every fused conv inside the block with one tile config (BLOCK_M, BLOCK_N, BLOCK_K,
    num_warps, num_stages[, tma]) instead of the tuned one: to time or debug a tile, and how the
    tests check each tuning candidate's results under the interpreter. A TMA tile on a conv the
    TMA kernel cannot run (``tma_unavailable_reason``) is an error, not a silent fallback."""
    ok = isinstance(config, tuple) and len(config) in (5, 6) and \
        all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in config[:5]) and \
        (len(config) == 5 or isinstance(config[5], bool))
    if not ok or any(b < 16 or b & (b - 1) for b in config[:3]):
        raise ValueError(f"pinned_config: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, tma]) with the "
                         f"blocks powers of two >= 16 (tensor-core tiles) and tma a bool, got {config!r}")
    _PINNED.append(Tile(*config))
    try:
        yield
    finally:
        _PINNED.pop()


def _choose(key, x, cin, cout, run, tma_reason) -> Tile:
    """A pinned config if any; interpreter: small fixed tiles; GPU: the tuned config for ``key``,
    tuning it now if allowed, else the heuristic's."""
    tma = tma_reason is None
    if _PINNED:
        if _PINNED[-1].tma and not tma:
            raise ValueError(f"pinned_config {tuple(_PINNED[-1])}: the TMA kernel cannot run this conv: {tma_reason}")
        return _PINNED[-1]
    if x.device.type == "cpu":  # Triton's interpreter
        return _INTERPRETER_CONFIGS[0] if tma and x.shape[3] >= _INTERPRETER_CONFIGS[0].block_m \
            else _INTERPRETER_CONFIGS[1]
    if symbolic(key):  # traced with dynamic shapes: the untuned tile
        return _heuristic(cin, cout, x.dtype, x.shape[3], tma)
    if key in _TUNED:
        return _TUNED[key]
    if not tuning_allowed(x):
        return _heuristic(cin, cout, x.dtype, x.shape[3], tma)
    _TUNED[key], timed, failed = choose("conv_norm", key, x.device, _candidates(cin, cout, x.dtype, x.shape[3], tma),
                                        run, _parse_tile, lambda cfg: run(cfg, warmup=True))
    if timed:
        _TIMINGS[key] = timed
    if failed:
        _FAILURES[key] = failed
    return _TUNED[key]


def tuned_configs(timings: bool = False, failures: bool = False) -> dict:
    """The configs chosen so far in this process, per shape key; with ``timings`` every
    candidate's measured ms per key (benchmarks record them); with ``failures`` the candidates
    that could not run, with their errors."""
    if failures:
        return {k: dict(v) for k, v in _FAILURES.items()}
    return {k: dict(v) for k, v in _TIMINGS.items()} if timings else dict(_TUNED)


def _check(x, packed, norm):
    if x.dim() != 4 or packed.dim() != 3 or packed.shape[1] != x.shape[1] or packed.shape[0] not in (1, 9):
        raise ValueError(f"conv_norm: x must be (N, Cin, H, W) and the packed weight (k*k, Cin, Cout) with k 1 or 3, "
                         f"got {tuple(x.shape)} and {tuple(packed.shape)}")
    if norm is not None and any(t is None for t in norm):
        raise ValueError("conv_norm: the input norm needs all of mean, rstd, gamma and beta")


# ----------------------------------------------------------------------------- operator
@triton_op("crn_fast::conv_norm", mutates_args=())
def _conv_norm_op(x: torch.Tensor, packed_weight: torch.Tensor, bias: Optional[torch.Tensor],
                  mean: Optional[torch.Tensor], rstd: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
                  beta: Optional[torch.Tensor], negative_slope: float, eps: float, stats: bool, head: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, y_mean, y_rstd): y = conv(prologue(x)) channels_last in x's dtype; the statistics are
    per sample over (C,H,W) of y (fp32), empty when ``stats`` is False."""
    norm = None if mean is None and rstd is None else (mean, rstd, gamma, beta)
    _check(x, packed_weight, norm)
    n, cin, h, w = x.shape
    taps, _, cout = packed_weight.shape
    if x.stride(1) != 1:
        x = x.contiguous(memory_format=torch.channels_last)
    if not runs_kernel(x) or x.dtype == torch.float64:
        return reference_with_stats(conv_norm_reference(x, unpack_conv_weight(packed_weight), bias, norm,
                                                        negative_slope, head).to(x.dtype), stats, eps)
    y = torch.empty((n, cout, h, w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    dummy = y  # stands in for absent pointers (never read: their constexpr flag is off)
    flags = dict(KSIZE=3 if taps == 9 else 1, NORM_IN=norm is not None, STATS=stats, HAS_BIAS=bias is not None,
                 HEAD=head, DOT_F32=x.device.type == "cpu" and x.dtype == torch.bfloat16)

    def run(cfg: Tile, warmup: bool = False):
        """Launch the conv with tile cfg; ``warmup``: only compile it (for precompile)."""
        go = (lambda kernel, grid, *args, **meta: kernel.warmup(*args, grid=grid, **meta)) if warmup else launch
        bm, bn, bk, warps, stages, tma = cfg
        n_tw = cdiv(w, bm)
        p = (h * n_tw if tma else cdiv(h * w, bm)) * cdiv(cout, bn)
        grid = (p, n)
        part = torch.empty((3, n, p), device=x.device, dtype=torch.float32) if stats else None
        pc, pmn, pm2 = part.unbind(0) if stats else (dummy,) * 3
        # bf16 channel pairs as int32 (x, gamma, beta): the TMA kernel's norm unpacks them by bit masks
        as_pairs = tma and pairs
        affine = (gamma.view(torch.int32), beta.view(torch.int32)) if as_pairs else (gamma, beta)
        ptrs = (y, *(t if t is not None else dummy for t in (bias, mean, rstd, *affine)), pc, pmn, pm2)
        if tma:  # x as [N, H, W, Cin] (a view: the pixel stride may be padded), boxes of one row
            nhwc = x.permute(0, 2, 3, 1)
            xd = TensorDescriptor.from_tensor(nhwc.view(torch.int32), [1, 1, bm, bk // 2]) if as_pairs else \
                TensorDescriptor.from_tensor(nhwc, [1, 1, bm, bk])
            wd = TensorDescriptor.from_tensor(packed_weight, [1, bk, bn])
            go(_conv_tma_kernel, grid, xd, wd, *ptrs, cin, cout, h, w, n_tw, p, negative_slope,
               **flags, BF16_PAIRS=pairs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        else:
            go(_conv_kernel, grid, x, packed_weight, *ptrs, cin, cout, h, w, x.stride(0), x.stride(2), x.stride(3),
               p, negative_slope, **flags, IEEE=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
               num_warps=warps, num_stages=stages)
        return part

    tma_reason = tma_unavailable_reason(x, packed_weight, negative_slope)
    pairs = norm is not None and tma_reason is None and _bf16_pairs(x, gamma, beta)
    key = (n, cin, cout, h, w, taps, x.dtype, norm is not None, stats, bias is not None, tma_reason is None)
    return with_merged_stats(y, run(_choose(key, x, cin, cout, run, tma_reason)), eps)


def reference_with_stats(y: torch.Tensor, stats: bool, eps: float):
    """(y channels_last, mean, rstd) where the torch reference computed y: the statistics by torch
    (empty ones unless ``stats``), as the kernels' epilogues return them."""
    y = y.contiguous(memory_format=torch.channels_last)
    if not stats:
        return y, y.new_empty(0, dtype=torch.float32), y.new_empty(0, dtype=torch.float32)
    mu, rstd = _stats_torch(y, eps)
    return y, mu.float(), rstd.float()


def with_merged_stats(y: torch.Tensor, part, eps: float):
    """(y, mean, rstd): y's per-sample statistics merged (_finalize_kernel, Chan's rule) from the
    (count, mean, M2) partials (3, N, P) an epilogue reduced; empty ones when ``part`` is None."""
    if part is None:
        return y, y.new_empty(0, dtype=torch.float32), y.new_empty(0, dtype=torch.float32)
    y_mean = torch.empty(y.shape[0], device=y.device, dtype=torch.float32)
    y_rstd = torch.empty(y.shape[0], device=y.device, dtype=torch.float32)
    launch(_finalize_kernel, (y.shape[0],), part[0], part[1], part[2], y_mean, y_rstd, part.shape[2], eps,
           BLOCK_P=1024)
    return y, y_mean, y_rstd


def conv_norm(x, packed_weight, bias=None, norm=None, negative_slope: float = LEAKY_SLOPE, eps: float = LN_EPS,
              stats: bool = True, head: bool = False):
    """Inference-only fused convolution (``torch.ops.crn_fast.conv_norm``), see the module docstring.

    x: (N, Cin, H, W) with contiguous channels (channels_last, or a channel slice of a wider
    channels_last buffer); packed_weight: ``pack_conv_weight(conv.weight)``; norm: the input's
    (mean, rstd, gamma, beta) or None. Returns (y, mean, rstd) of y when ``stats``, else y.
    """
    mean, rstd, gamma, beta = norm if norm is not None else (None,) * 4
    y, m, r = torch.ops.crn_fast.conv_norm(x, packed_weight, bias, mean, rstd, gamma, beta, float(negative_slope),
                                           float(eps), bool(stats), bool(head))
    return (y, m, r) if stats else y


__all__ = ["conv_norm", "conv_norm_reference", "pack_conv_weight", "unpack_conv_weight", "tuned_configs", "CONFIGS",
           "TMA_CONFIGS", "FP32_CONFIGS", "SMALL_CONFIGS", "Tile", "pinned_config", "tma_unavailable_reason"]
