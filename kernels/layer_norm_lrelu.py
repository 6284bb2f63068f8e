"""Fused layer norm over (C, H, W) + per-channel affine + leaky ReLU, forward and backward.

    y = leaky_relu(group_norm(x, num_groups=1, weight, bias, eps), slope)

Memory plan (forward, per sample n of M = C*H*W elements):
    _stats_kernel   reads x once          -> writes P partial (count, mean, M2) per sample
    _apply_kernel   reads x once, partials -> writes y; program 0 also writes mean, rstd
    (_finalize_kernel replaces the apply pass when only mean/rstd are wanted: layer_norm_stats)
Backward:
    _bwd_reduce_kernel reads x, dy -> P partial sums of dxhat and dxhat*xhat per sample, and one
                                      partial dweight/dbias row per (sample, hw-tile): no atomics
    _bwd_dx_kernel     reads x, dy -> writes dx
Only x, mean and rstd are saved for backward; the normalised value is recomputed.

Each sample is cut into [BLOCK_C, BLOCK_HW] tiles; each of P programs per sample walks a
contiguous run of tiles, so the grid is (P, N) with P sized to the device, not to N. Partial
statistics are merged with Chan's parallel rule around a shift (the tile's first element), so a
large mean with a tiny spread keeps its precision and a constant input gives exactly ``bias``.
Accumulation is fp32 (fp64 for fp64 inputs, which is what gradcheck uses). Offsets are 64-bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._runtime import HAS_TRITON, can_run, triton, tl


def layer_norm_lrelu_reference(x, weight, bias, eps: float = 1e-12, negative_slope: float = 0.2):
    """The torch reference: TF slim.layer_norm over (C,H,W) (biased variance) + leaky ReLU."""
    return F.leaky_relu(F.group_norm(x, 1, weight, bias, eps), negative_slope)


# 4096-element tiles over 8 warps: 16 elements per thread. Static sm_90 register use (bf16, from
# tests/gpu_compile_check.py + cuobjdump): stats 60, apply 80, bwd_reduce 97, bwd_dx 102, no spills
# (with 4 warps: 92 / 142 / 115 / 158).
NUM_WARPS = 8


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _plan(x: torch.Tensor, num_programs: int | None):
    """Tile shape and programs per sample for x (N, C, H, W)."""
    n, c, h, w = x.shape
    hw = h * w
    channels_last = x.dim() == 4 and c > 1 and x.stride(1) == 1 and not x.is_contiguous()
    if channels_last:  # C is contiguous: make it the wide side of the tile
        block_c = min(_next_pow2(c), 256)
        block_hw = min(_next_pow2(hw), max(1, 4096 // block_c))
    else:
        block_hw = min(_next_pow2(hw), 1024)
        block_c = min(_next_pow2(c), max(1, 4096 // block_hw))
    n_ct, n_hwt = triton.cdiv(c, block_c), triton.cdiv(hw, block_hw)
    tiles = n_ct * n_hwt
    if num_programs is None:
        if x.is_cuda:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            num_programs = max(1, (8 * sms) // n)
        else:
            num_programs = 4
    p = max(1, min(tiles, num_programs, 1024))
    tpp = triton.cdiv(tiles, p)
    p = triton.cdiv(tiles, tpp)
    strides = (x.stride(0), x.stride(1), 1 if channels_last is False and x.is_contiguous() else x.stride(3))
    return dict(block_c=block_c, block_hw=block_hw, n_hwt=n_hwt, tiles=tiles, tpp=tpp, p=p,
                block_p=_next_pow2(p), strides=strides)


if HAS_TRITON:

    @triton.jit
    def _tile(base, t, n_hwt, C, HW, sC, sHW, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
        """Channel indices, pointers and mask of tile t of one sample."""
        ct = t // n_hwt
        ht = t % n_hwt
        c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
        hw = ht * BLOCK_HW + tl.arange(0, BLOCK_HW)
        mask = (c < C)[:, None] & (hw < HW)[None, :]
        offs = c.to(tl.int64)[:, None] * sC + hw.to(tl.int64)[None, :] * sHW
        return c, offs, mask, ht

    @triton.jit
    def _combine(Cnt, Mean, M2, n, P, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
        """Chan's rule over the P partials of sample n: (count, mean, M2)."""
        i = tl.arange(0, BLOCK_P)
        m = i < P
        cnt = tl.load(Cnt + n * P + i, mask=m, other=0.0)
        mean_p = tl.load(Mean + n * P + i, mask=m, other=0.0)
        m2_p = tl.load(M2 + n * P + i, mask=m, other=0.0)
        shift = tl.load(Mean + n * P)
        total = tl.sum(cnt, axis=0)
        mean = shift + tl.sum(cnt * (mean_p - shift), axis=0) / total
        d = mean_p - mean
        m2 = tl.sum(m2_p, axis=0) + tl.sum(cnt * d * d, axis=0)
        return total, mean, m2

    @triton.jit
    def _stats_kernel(X, Cnt, Mean, M2, C, HW, sN, sC, sHW, T, n_hwt, TPP, P,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
        p = tl.program_id(0)
        n = tl.program_id(1)
        base = X + n.to(tl.int64) * sN
        cnt = tl.zeros((), ACC)
        mean = tl.zeros((), ACC)
        m2 = tl.zeros((), ACC)
        t_end = tl.minimum(p * TPP + TPP, T)
        for t in range(p * TPP, t_end):
            c, offs, mask, ht = _tile(base, t, n_hwt, C, HW, sC, sHW, BLOCK_C, BLOCK_HW)
            x = tl.load(base + offs, mask=mask, other=0.0).to(ACC)
            c0 = (t // n_hwt) * BLOCK_C
            hw0 = ht * BLOCK_HW
            shift = tl.load(base + c0.to(tl.int64) * sC + hw0.to(tl.int64) * sHW).to(ACC)  # tile's first element
            d = tl.where(mask, x - shift, 0.0)
            n_t = (tl.minimum(C - c0, BLOCK_C) * tl.minimum(HW - hw0, BLOCK_HW)).to(ACC)
            dm = tl.sum(tl.sum(d, axis=1), axis=0) / n_t
            e = tl.where(mask, d - dm, 0.0)
            m2_t = tl.sum(tl.sum(e * e, axis=1), axis=0)
            mean_t = shift + dm
            new_cnt = cnt + n_t
            delta = mean_t - mean
            mean = mean + delta * (n_t / new_cnt)
            m2 = m2 + m2_t + delta * delta * (cnt * n_t / new_cnt)
            cnt = new_cnt
        tl.store(Cnt + n * P + p, cnt)
        tl.store(Mean + n * P + p, mean)
        tl.store(M2 + n * P + p, m2)

    @triton.jit
    def _finalize_kernel(Cnt, Mean, M2, MeanOut, RstdOut, P, eps, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
        """Statistics only (no apply pass): per-sample mean and rstd from the P partials."""
        n = tl.program_id(0)
        total, mean, m2 = _combine(Cnt, Mean, M2, n, P, BLOCK_P, ACC)
        if ACC == tl.float64:
            rstd = 1.0 / tl.sqrt(m2 / total + eps)
        else:
            rstd = 1.0 / tl.sqrt_rn(m2 / total + eps)
        tl.store(MeanOut + n, mean)
        tl.store(RstdOut + n, rstd)

    @triton.jit
    def _apply_kernel(X, Y, W, B, Cnt, Mean, M2, MeanOut, RstdOut, C, HW, sN, sC, sHW, T, n_hwt, TPP, P,
                      eps, slope, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_P: tl.constexpr,
                      ACC: tl.constexpr):
        p = tl.program_id(0)
        n = tl.program_id(1)
        total, mean, m2 = _combine(Cnt, Mean, M2, n, P, BLOCK_P, ACC)
        if ACC == tl.float64:
            rstd = 1.0 / tl.sqrt(m2 / total + eps)
        else:
            rstd = 1.0 / tl.sqrt_rn(m2 / total + eps)  # IEEE-rounded, like torch
        if p == 0:
            tl.store(MeanOut + n, mean)
            tl.store(RstdOut + n, rstd)
        base_off = n.to(tl.int64) * sN
        t_end = tl.minimum(p * TPP + TPP, T)
        for t in range(p * TPP, t_end):
            c, offs, mask, ht = _tile(X, t, n_hwt, C, HW, sC, sHW, BLOCK_C, BLOCK_HW)
            x = tl.load(X + base_off + offs, mask=mask, other=0.0).to(ACC)
            w = tl.load(W + c, mask=c < C, other=0.0).to(ACC)
            b = tl.load(B + c, mask=c < C, other=0.0).to(ACC)
            z = (x - mean) * rstd * w[:, None] + b[:, None]
            y = tl.where(z > 0, z, z * slope)
            tl.store(Y + base_off + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _recompute(X, DY, W, B, base_off, offs, mask, c, C, mean, rstd, slope, ACC: tl.constexpr):
        """Backward's view of one tile: xhat (0 outside the mask), dz = dL/d(affine out), dxhat."""
        x = tl.load(X + base_off + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + base_off + offs, mask=mask, other=0.0).to(ACC)
        w = tl.load(W + c, mask=c < C, other=0.0).to(ACC)
        b = tl.load(B + c, mask=c < C, other=0.0).to(ACC)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        z = xhat * w[:, None] + b[:, None]
        dz = tl.where(z > 0, dy, dy * slope)
        return xhat, dz, dz * w[:, None]

    @triton.jit
    def _bwd_reduce_kernel(X, DY, W, B, MeanIn, RstdIn, S1, S2, DWp, DBp, C, HW, sN, sC, sHW, T, n_hwt, TPP,
                           P, slope, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
        p = tl.program_id(0)
        n = tl.program_id(1)
        mean = tl.load(MeanIn + n)
        rstd = tl.load(RstdIn + n)
        base_off = n.to(tl.int64) * sN
        s1 = tl.zeros((), ACC)
        s2 = tl.zeros((), ACC)
        t_end = tl.minimum(p * TPP + TPP, T)
        for t in range(p * TPP, t_end):
            c, offs, mask, ht = _tile(X, t, n_hwt, C, HW, sC, sHW, BLOCK_C, BLOCK_HW)
            xhat, dz, dxh = _recompute(X, DY, W, B, base_off, offs, mask, c, C, mean, rstd, slope, ACC)
            s1 += tl.sum(tl.sum(dxh, axis=1), axis=0)
            s2 += tl.sum(tl.sum(dxh * xhat, axis=1), axis=0)
            row = (n * n_hwt + ht).to(tl.int64) * C
            tl.store(DWp + row + c, tl.sum(dz * xhat, axis=1), mask=c < C)
            tl.store(DBp + row + c, tl.sum(dz, axis=1), mask=c < C)
        tl.store(S1 + n * P + p, s1)
        tl.store(S2 + n * P + p, s2)

    @triton.jit
    def _bwd_dx_kernel(X, DY, DX, W, B, MeanIn, RstdIn, S1, S2, C, HW, sN, sC, sHW, T, n_hwt, TPP, P, slope,
                       BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
        p = tl.program_id(0)
        n = tl.program_id(1)
        mean = tl.load(MeanIn + n)
        rstd = tl.load(RstdIn + n)
        i = tl.arange(0, BLOCK_P)
        inv_m = 1.0 / (C * HW).to(ACC)
        c1 = tl.sum(tl.load(S1 + n * P + i, mask=i < P, other=0.0), axis=0) * inv_m
        c2 = tl.sum(tl.load(S2 + n * P + i, mask=i < P, other=0.0), axis=0) * inv_m
        base_off = n.to(tl.int64) * sN
        t_end = tl.minimum(p * TPP + TPP, T)
        for t in range(p * TPP, t_end):
            c, offs, mask, ht = _tile(X, t, n_hwt, C, HW, sC, sHW, BLOCK_C, BLOCK_HW)
            xhat, dz, dxh = _recompute(X, DY, W, B, base_off, offs, mask, c, C, mean, rstd, slope, ACC)
            dx = rstd * (dxh - c1 - xhat * c2)
            tl.store(DX + base_off + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _acc(x):
    return (tl.float64, torch.float64) if x.dtype == torch.float64 else (tl.float32, torch.float32)


def _prepare(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"layer_norm_lrelu expects a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _forward(x, weight, bias, eps, slope, num_programs=None, stats_only=False):
    n, c, h, w = x.shape
    plan = _plan(x, num_programs)
    acc_tl, acc_torch = _acc(x)
    part = torch.empty((3, n, plan["p"]), device=x.device, dtype=acc_torch)
    mean = torch.empty(n, device=x.device, dtype=acc_torch)
    rstd = torch.empty(n, device=x.device, dtype=acc_torch)
    sN, sC, sHW = plan["strides"]
    grid = (plan["p"], n)
    common = (c, h * w, sN, sC, sHW, plan["tiles"], plan["n_hwt"], plan["tpp"], plan["p"])
    _stats_kernel[grid](x, part[0], part[1], part[2], *common,
                        BLOCK_C=plan["block_c"], BLOCK_HW=plan["block_hw"], ACC=acc_tl, num_warps=NUM_WARPS)
    if stats_only:
        _finalize_kernel[(n,)](part[0], part[1], part[2], mean, rstd, plan["p"], eps, BLOCK_P=plan["block_p"],
                               ACC=acc_tl)
        return None, mean, rstd
    y = torch.empty_like(x)
    _apply_kernel[grid](x, y, weight, bias, part[0], part[1], part[2], mean, rstd, *common, eps, slope,
                        BLOCK_C=plan["block_c"], BLOCK_HW=plan["block_hw"], BLOCK_P=plan["block_p"], ACC=acc_tl,
                        num_warps=NUM_WARPS)
    return y, mean, rstd


def _backward(dy, x, weight, bias, mean, rstd, slope, num_programs=None):
    n, c, h, w = x.shape
    dy = dy.contiguous(memory_format=torch.channels_last) if x.stride(1) == 1 and not x.is_contiguous() \
        else dy.contiguous()
    plan = _plan(x, num_programs)
    acc_tl, acc_torch = _acc(x)
    s = torch.empty((2, n, plan["p"]), device=x.device, dtype=acc_torch)
    dwb = torch.empty((2, n, plan["n_hwt"], c), device=x.device, dtype=acc_torch)
    dx = torch.empty_like(x)
    sN, sC, sHW = plan["strides"]
    grid = (plan["p"], n)
    common = (c, h * w, sN, sC, sHW, plan["tiles"], plan["n_hwt"], plan["tpp"], plan["p"])
    _bwd_reduce_kernel[grid](x, dy, weight, bias, mean, rstd, s[0], s[1], dwb[0], dwb[1], *common, slope,
                             BLOCK_C=plan["block_c"], BLOCK_HW=plan["block_hw"], ACC=acc_tl, num_warps=NUM_WARPS)
    _bwd_dx_kernel[grid](x, dy, dx, weight, bias, mean, rstd, s[0], s[1], *common, slope,
                         BLOCK_C=plan["block_c"], BLOCK_HW=plan["block_hw"], BLOCK_P=plan["block_p"], ACC=acc_tl,
                         num_warps=NUM_WARPS)
    dwb = dwb.sum(dim=(1, 2))  # fixed-order reduction: deterministic
    return dx, dwb[0].to(weight.dtype), dwb[1].to(bias.dtype)


class LayerNormLReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, slope, num_programs):
        x = _prepare(x)
        y, mean, rstd = _forward(x, weight, bias, eps, slope, num_programs)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.slope, ctx.num_programs = slope, num_programs
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = _backward(dy, x, weight, bias, mean, rstd, ctx.slope, ctx.num_programs)
        return dx, dw, db, None, None, None


def layer_norm_lrelu(x, weight, bias, eps: float = 1e-12, negative_slope: float = 0.2, num_programs=None):
    """Triton version of :func:`layer_norm_lrelu_reference` (same arguments and result).

    ``num_programs`` overrides the programs per sample (tests use it to force the split path).
    Tensors Triton cannot run on (CPU without TRITON_INTERPRET=1) take the reference path.
    """
    if not can_run(x):
        return layer_norm_lrelu_reference(x, weight, bias, eps, negative_slope)
    return LayerNormLReLU.apply(x, weight, bias, float(eps), float(negative_slope), num_programs)


def layer_norm_stats(x, eps: float = 1e-12, num_programs=None):
    """Per-sample (mean, rstd) of x over (C,H,W), from the same split reduction (fp32 or fp64)."""
    if not can_run(x):
        var, mean = torch.var_mean(x.float(), dim=(1, 2, 3), correction=0)
        return mean, torch.rsqrt(var + eps)
    _, mean, rstd = _forward(_prepare(x), None, None, eps, 1.0, num_programs, stats_only=True)
    return mean, rstd
