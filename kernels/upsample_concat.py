"""Fused bilinear upsample (align_corners=True) + channel concat, forward and backward, and its
inference-only variant that also applies the previous layer's norm + leaky ReLU on the fly.

    out = cat([interpolate(features, size=label.shape[-2:], mode="bilinear", align_corners=True), label], 1)

Memory plan (the output's memory format picks the forward kernel):
    _fwd_cl_kernel  channels_last: one program per (sample, block of ROWS output rows, column block,
                 channel block) walks down its rows writing [BLOCK_W pixels, BLOCK_C channels] tiles,
                 channels fastest (each bilinear tap is a contiguous channel vector). Interpolation is
                 separable: it keeps the two source rows, already interpolated along x (and, fused,
                 normalised), that the current output row blends, and loads the next one only when
                 the walk reaches it: a source row serves about two output rows, so the taps are
                 loaded and normalised half as often as per output pixel, and the x taps, weights
                 and in-row offsets are computed once per program. An exact 2x upsampling runs in
                 pixel pairs (2j+1 and 2j+2 share source pixels j, j+1): half again. Blocks past
                 the features copy the label and write zeros into pad channels (a padded output,
                 see channels_multiple).
    _fwd_kernel  NCHW: one program per (sample*channel, block of ROWS output rows, column block):
                 a feature channel by the same row walk (1-D row tiles; an exact 2x upsampling in
                 pixel pairs 2m, 2m+1 from source columns m-1, m, m+1: a run of 4 columns a thread,
                 one vector load shifted in registers), a label channel
                 by row copies -> out written once. The upsampled tensor and the cat copy never exist.
    _bwd_cl_kernel  channels_last: one program per (sample*source row, source column block, channel
                 block) gathers [BLOCK_W, BLOCK_C] tiles of dL/dout, each row a contiguous channel
                 vector, and writes dL/dfeatures channels_last.
    _bwd_kernel  NCHW: one program per (sample*channel, source row block, column block) gathers every output
                 pixel whose taps touch its pixels, re-deriving the forward's taps with the same float
                 arithmetic: the transpose of the interpolation without atomics, hence deterministic.
    norm_lrelu_upsample_concat: the taps are the previous module's raw conv output; each is
                 normalised with (mean, rstd, weight, bias) and passed through leaky ReLU before
                 interpolation, so the normalised features are never stored (forward only).
"""
from __future__ import annotations

import functools
import math
import struct

import torch
import torch.nn.functional as F

from crn_fast.constants import LEAKY_SLOPE

from . import _runtime
from ._runtime import HAS_TRITON, cdiv, check_norm_args, launch, next_pow2, runs_kernel, symbolic, tl, triton, \
    triton_op
from .layer_norm_lrelu import layer_norm_lrelu_reference, norm_lrelu_reference


def upsample_concat_reference(features: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    up = F.interpolate(features, size=label.shape[-2:], mode="bilinear", align_corners=True)
    return torch.cat([up, label.to(up.dtype)], 1)


def norm_lrelu_upsample_concat_reference(x, mean, rstd, weight, bias, label, negative_slope=LEAKY_SLOPE):
    """Reference of the fused variant; mean/rstd are per sample (N,) over (C,H,W) of x."""
    return upsample_concat_reference(norm_lrelu_reference(x, mean, rstd, weight, bias, negative_slope), label)


def _scale(src: int, dst: int) -> float:
    return (src - 1) / (dst - 1) if dst > 1 else 0.0


def _out_channels_last(features: torch.Tensor, label: torch.Tensor) -> bool:
    """Keep channels_last when an input is in it (then output rows are strided writes)."""
    cl = torch.channels_last
    return features.is_contiguous(memory_format=cl) and not features.is_contiguous() or \
        label.is_contiguous(memory_format=cl) and not label.is_contiguous()


if HAS_TRITON:

    @triton.jit
    def _taps(pos, scale, size_in):
        """Source index, clamped next index and weight of output coordinate pos (torch's formula)."""
        src = pos.to(tl.float32) * scale
        i0 = tl.minimum(src.to(tl.int32), size_in - 1)
        i1 = tl.minimum(i0 + 1, size_in - 1)
        return i0, i1, src - i0.to(tl.float32)

    @triton.jit
    def _fwd_kernel(Fe, L, O, Mean, Rstd, Wn, Bn, C, CL, H, W, h, w, fs0, fs1, fs2, fs3, ls0, ls1, ls2, ls3,
                    os0, os1, os2, os3, scale_h, scale_w, slope, APPLY_NORM: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_W: tl.constexpr, PAIRS: tl.constexpr):
        """Program (n*(C+CL) + c, row block, column block): ROWS output rows of BLOCK_W pixels of
        channel c, a feature channel by the row walk (_walk_rows), a label channel by row copies.
        PAIRS (an exact 2x upsampling whose float taps follow the pattern, _pairs): the row's
        output pixels 2m and 2m+1 from source columns m-1, m, m+1: runs of 4 columns a thread, each
        loaded once as a vector and shifted in registers (_hrow mode 2; BLOCK_W a multiple of 8):
        the same floats as the per-pixel taps."""
        nc = tl.program_id(0)
        n = nc // (C + CL)
        c = nc % (C + CL)
        y_first = tl.program_id(1) * ROWS
        x = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
        mask = x < W
        obase = O + n.to(tl.int64) * os0 + c.to(tl.int64) * os1
        if c < C:
            if PAIRS:  # source columns m in runs of 4 a row: [BLOCK_W // 8, 4]
                m = tl.program_id(2) * (BLOCK_W // 2) + (4 * tl.arange(0, BLOCK_W // 8))[:, None] + \
                    tl.arange(0, 4)[None, :]
                mf = m.to(tl.float32)
                lx = (2 * m).to(tl.float32) * scale_w - (mf - 1.0)  # _taps' weights: x0 = m - 1, m
                lx2 = (2 * m + 1).to(tl.float32) * scale_w - mf
                xa = m * fs3
                xb = fs3
                ld = m < w
                ld_r = m + 1 < w
            else:
                x0, x1, lx = _taps(x, scale_w, w)
                lx2 = lx
                xa = x0 * fs3
                xb = x1 * fs3
                ld = mask
                ld_r = mask
            mu = 0.0
            g = 0.0
            bb = 0.0
            if APPLY_NORM:  # the previous module's layer norm + leaky ReLU, applied to each tap
                mu = tl.load(Mean + n)
                g = tl.load(Wn + c).to(tl.float32) * tl.load(Rstd + n)
                bb = tl.load(Bn + c).to(tl.float32)
            _walk_rows(Fe + n.to(tl.int64) * fs0 + c.to(tl.int64) * fs1, fs2, xa, xb, lx, lx2, ld, ld_r, mu, g, bb,
                       slope, obase, os2, x * os3, x * os3, mask, mask, y_first, H, h, scale_h, APPLY_NORM, ROWS,
                       2 if PAIRS else 0)
        else:
            lbase = L + n.to(tl.int64) * ls0 + (c - C).to(tl.int64) * ls1
            _copy_rows(lbase, ls2, x * ls3, mask, obase, os2, x * os3, mask, y_first, H, ROWS)

    @triton.jit
    def _hrow(row, x0o, x1o, lx, lx2, mask, mask_r, mu, g, bb, slope, APPLY_NORM: tl.constexpr,
              PAIRS: tl.constexpr):
        """Source row ``row`` (a scalar pointer) interpolated along x: an fp32 tile, each tap
        normalised first when APPLY_NORM. PAIRS 0: per output pixel, the taps at x0o and x1o
        weighted lx. PAIRS 1 (channels_last): the taps x0o, x1o are shared by two output pixels,
        weighted lx and lx2: both tiles. PAIRS 2 (NCHW): _hrow_runs."""
        if PAIRS == 2:
            a = _hrow_runs(row, x0o, x1o, lx, lx2, mask, mask_r, mu, g, bb, slope, APPLY_NORM)
            return a, a
        else:
            v0 = tl.load(row + x0o, mask=mask, other=0.0).to(tl.float32)
            v1 = tl.load(row + x1o, mask=mask, other=0.0).to(tl.float32)
            if APPLY_NORM:
                v0 = _norm_lrelu(v0, mu, g, bb, slope)
                v1 = _norm_lrelu(v1, mu, g, bb, slope)
            a = (1.0 - lx) * v0 + lx * v1
            if PAIRS == 1:
                return a, (1.0 - lx2) * v0 + lx2 * v1
            else:
                return a, a

    @triton.jit
    def _hrow_runs(row, mo, stride, lx, lx2, mask, mask_r, mu, g, bb, slope, APPLY_NORM: tl.constexpr):
        """_hrow's NCHW pairs: mo the [G, 4] offsets of source columns m, runs of 4 consecutive
        columns a thread holds (mask: m < w; mask_r: m + 1 < w), stride the column stride. Output
        pixels 2m (taps m-1 and m, weight lx) and 2m+1 (taps m and m+1, weight lx2), interleaved
        into one [8G] row tile. A run is one vector load; its neighbours m-1 and m+1 are the run
        shifted by one column, rebuilt in registers (split/join) from the run and the columns
        either side of it (two scalar loads): each source column is loaded and normalised 1.5
        times per 2 output pixels instead of 4, no gathers, no shared memory. At the image's
        edges the missing neighbour is column m, as _taps clamps it."""
        v1 = tl.load(row + mo, mask=mask, other=0.0).to(tl.float32)
        p_in = mask & (mo >= stride)  # column m-1 inside (mo = m * stride)
        o0 = _col(mo, 0)
        p = tl.load(row + o0 - stride, mask=_col(p_in, 0), other=0.0).to(tl.float32)  # column m-1 of a run
        q = tl.load(row + o0 + 4 * stride, mask=_col(mask_r, 3), other=0.0).to(tl.float32)  # column m+4
        if APPLY_NORM:
            v1 = _norm_lrelu(v1, mu, g, bb, slope)
            p = _norm_lrelu(p, mu, g, bb, slope)
            q = _norm_lrelu(q, mu, g, bb, slope)
        e02, e13 = _halves(v1)
        v0 = tl.reshape(tl.join(tl.join(p, _col(v1, 1)), e02), v1.shape)  # columns m-1: p, e0, e1, e2
        v2 = tl.reshape(tl.join(e13, tl.join(_col(v1, 2), q)), v1.shape)  # columns m+1: e1, e2, e3, q
        v0 = tl.where(p_in, v0, v1)
        v2 = tl.where(mask_r, v2, v1)
        even = (1.0 - lx) * v0 + lx * v1
        odd = (1.0 - lx2) * v1 + lx2 * v2
        return tl.reshape(tl.join(even, odd), [8 * v1.shape[0]])

    @triton.jit
    def _halves(t):
        """A [G, 4] tile's columns (0, 2) and (1, 3), each [G, 2]: register moves, no data motion."""
        return tl.split(tl.reshape(t, [t.shape[0], 2, 2]))

    @triton.jit
    def _col(t, K: tl.constexpr):
        """Column K of a [G, 4] tile, [G]: register moves."""
        return tl.split(_halves(t)[K % 2])[K // 2]

    @triton.jit
    def _walk_rows(src, fs2, x0o, x1o, lx, lx2, mask, mask_r, mu, g, bb, slope, obase, os2, oo, oo2, mask1, mask2,
                   y_first, H, h, scale_h, APPLY_NORM: tl.constexpr, ROWS: tl.constexpr, PAIRS: tl.constexpr):
        """Output rows y_first .. y_first+ROWS-1 (those < H) of one tile: each row blends two source
        rows interpolated along x (_hrow), held from the row before while they still apply; a
        source row is loaded (and normalised) only when the walk reaches it, about once per two
        output rows. src: the sample's (and, NCHW, channel's) first source row; x0o/x1o, oo: the
        tile's in-row offsets of the two x taps and of the output (mask1: the pixels it writes).
        PAIRS (_hrow's modes): 1, each tap pair also makes a second output pixel (weights lx2,
        offsets oo2, mask2); 2, a row tile of interleaved pixel pairs."""
        h0 = tl.zeros(oo.shape, tl.float32)
        h1 = tl.zeros(oo.shape, tl.float32)
        k0 = tl.zeros(oo.shape, tl.float32)  # the second pixels' rows (PAIRS 1)
        k1 = tl.zeros(oo.shape, tl.float32)
        s0 = tl.zeros((), tl.int32) - 1  # source rows held in h0, h1
        s1 = tl.zeros((), tl.int32) - 1
        for r in range(ROWS):
            y = y_first + r
            if y < H:
                i0, i1, ly = _taps(y, scale_h, h)
                if i0 != s0:  # rows only move down: the new top row is the old bottom one or below
                    if i0 == s1:
                        h0 = h1
                        k0 = k1
                    else:
                        h0, k0 = _hrow(src + i0.to(tl.int64) * fs2, x0o, x1o, lx, lx2, mask, mask_r, mu, g, bb,
                                       slope, APPLY_NORM, PAIRS)
                    if i1 == i0:
                        h1 = h0
                        k1 = k0
                    else:
                        h1, k1 = _hrow(src + i1.to(tl.int64) * fs2, x0o, x1o, lx, lx2, mask, mask_r, mu, g, bb,
                                       slope, APPLY_NORM, PAIRS)
                    s0 = i0
                    s1 = i1
                orow = obase + y.to(tl.int64) * os2
                up = (1.0 - ly) * h0 + ly * h1
                tl.store(orow + oo, up.to(obase.dtype.element_ty), mask=mask1)
                if PAIRS == 1:
                    up = (1.0 - ly) * k0 + ly * k1
                    tl.store(orow + oo2, up.to(obase.dtype.element_ty), mask=mask2)

    @triton.jit
    def _copy_rows(src, ls2, lo, lmask, obase, os2, oo, omask, y_first, H, ROWS: tl.constexpr):
        """Rows y_first .. y_first+ROWS-1 (those < H) of a label tile copied into the output; output
        lanes in omask but not lmask get zeros (pad channels)."""
        for r in range(ROWS):
            y = y_first + r
            if y < H:
                lv = tl.load(src + y.to(tl.int64) * ls2 + lo, mask=lmask, other=0.0)
                tl.store(obase + y.to(tl.int64) * os2 + oo, lv.to(obase.dtype.element_ty), mask=omask)

    @triton.jit
    def _fwd_cl_kernel(Fe, L, O, Mean, Rstd, Wn, Bn, C, CL, CP, H, W, h, w, fs0, fs1, fs2, fs3, ls0, ls1, ls2, ls3,
                       os0, os1, os2, os3, scale_h, scale_w, slope, APPLY_NORM: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CL: tl.constexpr, PIX: tl.constexpr,
                       LPIX: tl.constexpr, LV: tl.constexpr, PAIRS: tl.constexpr):
        """Program (channel block, column block, n*cdiv(H, ROWS) + row block): ROWS output rows of a
        [BLOCK_W pixels, BLOCK_C channels] tile, channels fastest. Feature blocks walk down the
        rows keeping the two x-interpolated source rows the current row blends; a source row is
        loaded (and normalised) only when the walk reaches it, about once per two output rows.
        Blocks past the features copy the label, then write zeros into the CP pad channels.
        The channel block is the fastest grid axis: the programs writing the same pixels run
        together, so L2 merges the sectors they share before they reach DRAM. PIX: a power of two
        dividing the output's pixel stride os3, written as a factor so the compiler can prove
        16-byte-aligned channel vectors and store them whole (Triton only learns divisibility by
        16 from an argument, and padded strides such as 1048, 536 and 152 are multiples of 8);
        LPIX the same for the label's pixel stride ls3 (20 classes: 4), and LV for the label's channel
        count CL and pad CP (20 and 4: 4), so its masks hold over runs of LV channels: the label's
        classes then load and store as 8-byte vectors, not one bf16 at a time.

        PAIRS (an exact 2x upsampling whose float taps follow the pattern, _pairs): output pixels
        2j+1 and 2j+2 both blend source pixels j and j+1, so a feature block holds BLOCK_W / 2 such
        pairs (output pixels x_start - 1 .. x_start + BLOCK_W - 2), loads and normalises each tap
        once for both pixels (half the loads, conversions and norms of a tap per output pixel) and
        stores the two pixels of each pair as two tiles. The weights are the same floats."""
        n_rb = tl.cdiv(H, ROWS)
        n = tl.program_id(2) // n_rb
        y_first = (tl.program_id(2) % n_rb) * ROWS
        cb = tl.program_id(0)
        x = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        xm = x < W
        obase = O + n.to(tl.int64) * os0
        n_fb = tl.cdiv(C, BLOCK_C)
        if cb < n_fb:
            c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
            cm = c < C
            if PAIRS:  # pair i: output pixels 2j+1 and 2j+2 of source pixels j, j+1
                j = tl.program_id(1) * (BLOCK_W // 2) - 1 + tl.arange(0, BLOCK_W // 2)
                xa = 2 * j + 1
                xb = xa + 1
                x0 = tl.maximum(j, 0)
                x1 = tl.minimum(j + 1, w - 1)
                lx = (xa.to(tl.float32) * scale_w - j.to(tl.float32))[:, None]  # _taps' weights: x0 = j
                lx2 = (xb.to(tl.float32) * scale_w - j.to(tl.float32))[:, None]
                ma = ((xa >= 0) & (xa < W))[:, None] & cm[None, :]
                mb = (xb < W)[:, None] & cm[None, :]
                mask = ma | mb
            else:
                x0, x1, lx = _taps(x, scale_w, w)
                lx = lx[:, None]
                lx2 = lx
                xa = x
                xb = x
                mask = xm[:, None] & cm[None, :]
                ma = mask
                mb = mask
            x0o = x0[:, None] * fs3 + c[None, :] * fs1  # in-row offsets: int32, the row base is int64
            x1o = x1[:, None] * fs3 + c[None, :] * fs1
            oo = (xa * (os3 // PIX) * PIX)[:, None] + c[None, :] * os1
            oo2 = (xb * (os3 // PIX) * PIX)[:, None] + c[None, :] * os1
            mu = 0.0
            g = tl.zeros([1, BLOCK_C], tl.float32)
            bb = tl.zeros([1, BLOCK_C], tl.float32)
            if APPLY_NORM:
                mu = tl.load(Mean + n)
                g = (tl.load(Wn + c, mask=cm, other=0.0).to(tl.float32) * tl.load(Rstd + n))[None, :]
                bb = tl.load(Bn + c, mask=cm, other=0.0).to(tl.float32)[None, :]
            _walk_rows(Fe + n.to(tl.int64) * fs0, fs2, x0o, x1o, lx, lx2, mask, mask, mu, g, bb, slope, obase, os2, oo,
                       oo2, ma, mb, y_first, H, h, scale_h, APPLY_NORM, ROWS, 1 if PAIRS else 0)
        else:
            k = (cb - n_fb) * BLOCK_CL + tl.arange(0, BLOCK_CL)
            lm = xm[:, None] & (k < (CL // LV) * LV)[None, :]  # label channels; CL <= k < CL + CP: zeros
            om = xm[:, None] & (k < ((CL + CP) // LV) * LV)[None, :]
            lo = (x * (ls3 // LPIX) * LPIX)[:, None] + k[None, :] * ls1
            lo_out = (x * (os3 // PIX) * PIX)[:, None] + (C + k)[None, :] * os1
            _copy_rows(L + n.to(tl.int64) * ls0, ls2, lo, lm, obase, os2, lo_out, om, y_first, H, ROWS)

    @triton.jit
    def _first_out(src, inv):
        """First output coordinate whose taps can reach source coordinate src (one of slack)."""
        return tl.maximum(tl.floor((src - 1).to(tl.float32) * inv).to(tl.int32) - 1, 0)

    @triton.jit
    def _tap_weight(pos, src, scale, size_in, size_out):
        """Interpolation weight of output coordinate pos on source coordinate src (0 past the end),
        from the forward's own taps, so the gather is its exact transpose."""
        a0, a1, frac = _taps(pos, scale, size_in)
        wgt = tl.where(a0 == src, 1.0 - frac, 0.0) + tl.where(a1 == src, frac, 0.0)
        return tl.where(pos < size_out, wgt, 0.0)

    @triton.jit
    def _norm_lrelu(v, mu, g, b, slope):
        """The previous layer's norm + leaky ReLU of a tap, kept in fp32 (not rounded to the
        features' dtype first: one rounding fewer than storing it, as Inductor's fusion does)."""
        z = (v - mu) * g + b
        return tl.where(z > 0, z, z * slope)

    @triton.jit
    def _pair_weights(j, scale, size_in, size_out):
        """The weights _tap_weight gives output coordinates 2j-1, 2j, 2j+1 and 2j+2 on source
        coordinate j of an exact 2x axis (_pairs: output x takes source coordinates max((x-1)//2, 0)
        and the next, clamped), in closed form, the same floats: x = 2j-1 and 2j blend j-1 and j
        (weight frac on j), x = 2j+1 and 2j+2 blend j and j+1 (weight 1 - frac); 0 for an output
        coordinate outside (2j-1 < 0, 2j+2 = size_out); output 0 takes source 0 whole, and the last
        output both taps at the last source coordinate."""
        jf = j.to(tl.float32)
        fa = (2 * j - 1).to(tl.float32) * scale - (jf - 1.0)
        fb = (2 * j).to(tl.float32) * scale - (jf - 1.0)
        fc = (2 * j + 1).to(tl.float32) * scale - jf
        fd = (2 * j + 2).to(tl.float32) * scale - jf
        w0 = tl.where(j >= 1, fa, 0.0)
        w1 = tl.where(j >= 1, fb, 1.0)
        w2 = tl.where(j == size_in - 1, (1.0 - fc) + fc, 1.0 - fc)  # fc is 0 there at widths 2 .. 5000
        w3 = tl.where(2 * j + 2 < size_out, 1.0 - fd, 0.0)
        return w0, w1, w2, w3

    @triton.jit
    def _gather_taps(gb, sy, sx, mask, acc, gs2, gs3, H, W, h, w, scale_h, scale_w, inv_h, inv_w, taps_h, taps_w,
                     PAIRS_H: tl.constexpr, PAIRS_W: tl.constexpr):
        """acc += the transpose of the interpolation at source pixels (sy, sx): every output pixel
        whose taps can touch them, weighted by the forward's own tap weights, row by row (ascending),
        each row's taps ascending, each term (weight_x * weight_y) * g. sy, sx and the base pointers
        gb broadcast to the tile (NCHW: rows x columns; channels_last: columns x channels).
        PAIRS_H/PAIRS_W: that axis is an exact 2x upsampling (_pairs): only output coordinates 2j-1
        .. 2j+2 reach source coordinate j, 4 taps (x: unrolled, their weights computed once,
        _pair_weights); otherwise taps_h/taps_w of them from _first_out, each weight from the
        forward's taps (_tap_weight). The taps left out have weight 0 either way: the same sums.
        The rows stay a loop: 16 taps unrolled would hold 16 tiles of loads (registers spill where
        the pixels' channels are not vectors)."""
        wx0 = 0.0
        wx1 = 0.0
        wx2 = 0.0
        wx3 = 0.0
        if PAIRS_W:
            wx0, wx1, wx2, wx3 = _pair_weights(sx, scale_w, w, W)
        if PAIRS_H:
            ylo = tl.maximum(2 * sy - 1, 0)
        else:
            ylo = _first_out(sy, inv_h)
        for ty in range(taps_h):
            acc = _gather_row(gb, ylo + ty, _tap_weight(ylo + ty, sy, scale_h, h, H), sx, mask, acc, gs2, gs3, W, w,
                              scale_w, inv_w, taps_w, wx0, wx1, wx2, wx3, PAIRS_W)
        return acc

    @triton.jit
    def _gather_row(gb, y, wy, sx, mask, acc, gs2, gs3, W, w, scale_w, inv_w, taps_w, wx0, wx1, wx2, wx3,
                    PAIRS_W: tl.constexpr):
        """_gather_taps' taps in output row y (weight wy): PAIRS_W, the 4 at 2sx-1 .. 2sx+2 (weights wx0
        .. wx3); else taps_w from _first_out."""
        row = gb + y.to(tl.int64) * gs2
        if PAIRS_W:
            x = 2 * sx - 1
            acc = _gather_tap(row, x, wx0 * wy, mask, acc, gs3)
            acc = _gather_tap(row, x + 1, wx1 * wy, mask, acc, gs3)
            acc = _gather_tap(row, x + 2, wx2 * wy, mask, acc, gs3)
            acc = _gather_tap(row, x + 3, wx3 * wy, mask, acc, gs3)
        else:
            xlo = _first_out(sx, inv_w)
            for tx in range(taps_w):
                acc = _gather_tap(row, xlo + tx, _tap_weight(xlo + tx, sx, scale_w, w, W) * wy, mask, acc, gs3)
        return acc

    @triton.jit
    def _gather_tap(row, x, wgt, mask, acc, gs3):
        """acc + wgt * the gradient at column x of row (not read where wgt is 0: outside the output)."""
        g = tl.load(row + x.to(tl.int64) * gs3, mask=mask & (wgt != 0.0), other=0.0)
        return acc + wgt * g.to(tl.float32)

    @triton.jit
    def _gather_runs(gb, sy, sx, m0, acc, gs2, H, W, h, w, scale_h, scale_w, inv_h, taps_h,
                     PAIRS_H: tl.constexpr, RUNS: tl.constexpr):
        """_gather_taps for NCHW with an exact 2x x axis, in runs of 4 source columns a thread: sx the
        [RUNS, 4] tile of source columns m0 .. m0+3 (m0 a multiple of 4), sy [RUNS] their rows. Source
        column j takes output columns 2j-1, 2j, 2j+1, 2j+2: of a run, output columns 2m0 .. 2m0+7,
        one vector load a row (even and odd columns split in registers), and the columns either side
        (2m0-1, 2m0+8; two scalar loads), shifted in by one. The same sums, term by term, as
        _gather_taps; the column weights computed once."""
        wx0, wx1, wx2, wx3 = _pair_weights(sx, scale_w, w, W)
        xo = 2 * m0[:, None] + tl.arange(0, 8)[None, :]  # [RUNS, 8]
        if PAIRS_H:
            wy0, wy1, wy2, wy3 = _pair_weights(sy, scale_h, h, H)
            y = 2 * sy - 1
            acc = _gather_run_row(gb, y, wy0, sy, m0, xo, acc, gs2, W, h, w, wx0, wx1, wx2, wx3, RUNS)
            acc = _gather_run_row(gb, y + 1, wy1, sy, m0, xo, acc, gs2, W, h, w, wx0, wx1, wx2, wx3, RUNS)
            acc = _gather_run_row(gb, y + 2, wy2, sy, m0, xo, acc, gs2, W, h, w, wx0, wx1, wx2, wx3, RUNS)
            acc = _gather_run_row(gb, y + 3, wy3, sy, m0, xo, acc, gs2, W, h, w, wx0, wx1, wx2, wx3, RUNS)
        else:
            ylo = _first_out(sy, inv_h)
            for ty in range(taps_h):
                acc = _gather_run_row(gb, ylo + ty, _tap_weight(ylo + ty, sy, scale_h, h, H), sy, m0, xo, acc, gs2,
                                      W, h, w, wx0, wx1, wx2, wx3, RUNS)
        return acc

    @triton.jit
    def _gather_run_row(gb, y, wy, sy, m0, xo, acc, gs2, W, h, w, wx0, wx1, wx2, wx3, RUNS: tl.constexpr):
        """_gather_runs' taps in output row y ([RUNS]; weight wy, 0 where the row is outside). Runs past
        the source (m0 >= w, sy >= h) read nothing."""
        row = gb + y.to(tl.int64) * gs2
        ok = (wy != 0.0) & (sy < h)
        v = tl.load(row[:, None] + xo, mask=ok[:, None] & (xo < W), other=0.0).to(tl.float32)
        even, odd = tl.split(tl.reshape(v, [RUNS, 4, 2]))  # output columns 2j and 2j+1, [RUNS, 4]
        p = tl.load(row + 2 * m0 - 1, mask=ok & (m0 >= 1) & (m0 < w), other=0.0).to(tl.float32)  # column 2m0 - 1
        q = tl.load(row + 2 * m0 + 8, mask=ok & (2 * m0 + 8 < W), other=0.0).to(tl.float32)  # column 2m0 + 8
        e02, e13 = _halves(even)
        o02, o13 = _halves(odd)
        odd_prev = tl.reshape(tl.join(tl.join(p, _col(odd, 1)), o02), [RUNS, 4])  # columns 2j - 1
        even_next = tl.reshape(tl.join(e13, tl.join(_col(even, 2), q)), [RUNS, 4])  # columns 2j + 2
        wy = wy[:, None]
        acc = acc + (wx0 * wy) * odd_prev
        acc = acc + (wx1 * wy) * even
        acc = acc + (wx2 * wy) * odd
        return acc + (wx3 * wy) * even_next

    @triton.jit
    def _bwd_kernel(G, DF, C, H, W, h, w, gs0, gs1, gs2, gs3, scale_h, scale_w, inv_h, inv_w, taps_h, taps_w,
                    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, PAIRS_H: tl.constexpr, PAIRS_W: tl.constexpr):
        """Program (n*C + c, row block, column block) gathers dL/dfeatures for a tile of source pixels;
        PAIRS_W (BLOCK_W a multiple of 4, gs3 = 1): in runs of 4 source columns (_gather_runs)."""
        nc = tl.program_id(0)
        n = nc // C
        c = nc % C
        gb = G + n.to(tl.int64) * gs0 + c.to(tl.int64) * gs1
        if PAIRS_W:
            RUNS: tl.constexpr = BLOCK_H * BLOCK_W // 4
            r = tl.arange(0, RUNS)
            sy1 = tl.program_id(1) * BLOCK_H + r // (BLOCK_W // 4)
            m0 = tl.program_id(2) * BLOCK_W + 4 * (r % (BLOCK_W // 4))
            sx = m0[:, None] + tl.arange(0, 4)[None, :]
            sy = sy1[:, None]
            mask = (sy < h) & (sx < w)
            acc = _gather_runs(gb, sy1, sx, m0, tl.zeros([RUNS, 4], tl.float32), gs2, H, W, h, w, scale_h,
                               scale_w, inv_h, taps_h, PAIRS_H, RUNS)
        else:
            sy = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[:, None]
            sx = (tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W))[None, :]
            mask = (sy < h) & (sx < w)
            acc = _gather_taps(gb, sy, sx, mask, tl.zeros([BLOCK_H, BLOCK_W], tl.float32), gs2, gs3, H, W, h, w,
                               scale_h, scale_w, inv_h, inv_w, taps_h, taps_w, PAIRS_H, PAIRS_W)
        dptr = DF + nc.to(tl.int64) * h * w + sy.to(tl.int64) * w + sx
        tl.store(dptr, acc.to(DF.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_cl_kernel(G, DF, C, H, W, h, w, gs0, gs1, gs2, gs3, ds0, ds1, ds2, ds3, scale_h, scale_w, inv_h,
                       inv_w, taps_h, taps_w, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, PAIRS_H: tl.constexpr,
                       PAIRS_W: tl.constexpr, PIX: tl.constexpr):
        """Program (n*h + sy, column block, channel block): dL/dfeatures for BLOCK_W source pixels of
        row sy and BLOCK_C channels, gathering the output pixels whose taps touch them. Channel
        strides 1 (gs1, ds1: channels_last); PIX a power of two that divides the gradient's pixel
        stride gs3 (C + 20 classes: 4), so that each pixel's channels load as vectors of that many."""
        ny = tl.program_id(0)
        n = ny // h
        sy = ny % h
        sx = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        xm = sx < w
        mask = xm[:, None] & (c < C)[None, :]
        gb = G + n.to(tl.int64) * gs0 + c.to(tl.int64)[None, :]
        acc = _gather_taps(gb, sy, sx[:, None], mask, tl.zeros([BLOCK_W, BLOCK_C], tl.float32), gs2,
                           (gs3 // PIX) * PIX, H, W, h, w, scale_h, scale_w, inv_h, inv_w, taps_h, taps_w, PAIRS_H,
                           PAIRS_W)
        dptr = DF + n.to(tl.int64) * ds0 + sy.to(tl.int64) * ds2 + sx.to(tl.int64)[:, None] * ds3 + \
            c.to(tl.int64)[None, :]
        tl.store(dptr, acc.to(DF.dtype.element_ty), mask=mask)


def _tile_shape(rows: int, cols: int, device) -> tuple[int, int]:
    """[BLOCK_H, BLOCK_W] of the NCHW kernels: whole rows where possible; bigger tiles under the
    interpreter (per-program Python overhead), ~1024 elements per program on GPUs."""
    budget = 1024 if device.type == "cuda" else 8192
    bw = min(next_pow2(cols), budget)
    return max(1, min(next_pow2(rows), budget // bw)), bw


def _tile_shape_cl(cols: int, channels: int, label_channels: int, device, budget: int = 2048
                   ) -> tuple[int, int, int]:
    """[BLOCK_W, BLOCK_C] of the channels_last kernels (``budget`` elements on GPUs, at most 64
    channels: 128-byte bf16 channel vectors per pixel), and BLOCK_CL for the label (+ pad) blocks."""
    budget = budget if device.type == "cuda" else 8192
    bc = min(next_pow2(channels), 64)
    bw = max(1, min(next_pow2(cols), budget // bc))
    return bw, bc, min(next_pow2(label_channels), 64)


ROW_TILE_CUDA = 1024  # the NCHW forward kernel's widest row tile on GPUs (_row_tile)


def _row_tile(cols: int, device) -> int:
    """BLOCK_W of the NCHW forward kernel: a whole row up to ROW_TILE_CUDA pixels on GPUs (1024: 8 a
    thread, one 16-byte bf16 store), 8192 under the interpreter. 2048 (16 a thread) cuts the fused
    bf16 row walk from ~14.1 to ~13.4 SASS instructions per output element (sm_90), with half as
    many programs at 2048-pixel rows; benchmarks/kernels.py times both where rows are that wide."""
    return min(next_pow2(cols), ROW_TILE_CUDA if device.type == "cuda" else 8192)


def _rows_per_program(rows: int, batch: int, programs_per_row_block: int, device) -> int:
    """Output rows one forward program walks (either format): 16 (a source row is then loaded about
    9 times per 16 output rows instead of 16), fewer where the grid would not fill the GPU four
    times over; 4 under the interpreter, so that small test shapes cross row blocks. More where
    batch x row blocks would pass the grid's limit (a batch beyond it runs the torch path)."""
    if device.type != "cuda":
        r = min(next_pow2(rows), 4)
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        r = min(next_pow2(rows), 16)
        while r > 2 and batch * cdiv(rows, r) * programs_per_row_block < 4 * sms:
            r //= 2
    while batch * cdiv(rows, r) > _runtime.MAX_GRID_BATCH and r < rows:
        r *= 2
    return r


@functools.lru_cache(maxsize=None)
def _pairs(w: int, W: int) -> bool:
    """Does every output column x of an upsampling from w to W columns take source columns
    (x - 1) // 2 and the next, with _taps' float arithmetic (an fp32 product with the fp32 scale,
    truncated)? Then both forward kernels may compute the output pixels in pairs (PAIRS). An exact 2x
    upsampling does for every width this was checked at (2 .. 5000 source columns); the check
    keeps the pairs bit for bit the same as the per-pixel taps at any width."""
    if w < 2 or W != 2 * w:
        return False
    scale = _f32(_scale(w, W))  # plain floats (no tensors: this runs while tracing, on fake tensors too)
    return all(min(int(_f32(x * scale)), w - 1) == max((x - 1) // 2, 0) for x in range(W))


def _paired(src: int, dst: int) -> bool:
    """_pairs where the sizes are known; symbolic sizes (tracing with dynamic shapes) take the
    general taps."""
    return not symbolic((src, dst)) and _pairs(src, dst)


def _f32(v: float) -> float:
    """v rounded to fp32 (to nearest even). A product of two fp32 values is exact in a Python float
    (48 significant bits), so _f32(x * scale) is the kernel's fp32 product."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _check(features, label):
    if features.dim() != 4 or label.dim() != 4 or features.shape[0] != label.shape[0]:
        raise ValueError(f"upsample_concat expects 4-D features and label with the same batch, got "
                         f"{tuple(features.shape)} and {tuple(label.shape)}")


def _padded_channels_last(n, c, h, w, multiple, like, zeros=False):
    """(n, c, h, w) channels_last view of a buffer whose pixels hold c rounded up to ``multiple``
    channels: each pixel's row then starts 16-byte aligned for the conv that reads it. The forward
    kernel writes zeros into the pad channels (a conv may read them, with zero weights)."""
    cs = cdiv(c, multiple) * multiple
    alloc = torch.zeros if zeros else torch.empty
    return alloc((n, h, w, cs), device=like.device, dtype=like.dtype).permute(0, 3, 1, 2)[:, :c]


def _launch_fwd(features, label, norm=None, slope=LEAKY_SLOPE, multiple=1):
    n, c, h, w = features.shape
    cl, H, W = label.shape[1:]
    channels_last = _out_channels_last(features, label)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    pad = 0
    if channels_last and multiple > 1:
        out = _padded_channels_last(n, c + cl, H, W, multiple, features)
        pad = out.stride(3) - (c + cl)
    else:
        out = torch.empty((n, c + cl, H, W), device=features.device, dtype=features.dtype, memory_format=fmt)
    mean, rstd, wn, bn = norm if norm is not None else (features,) * 4
    sizes = (c, cl, pad, H, W, h, w) if channels_last else (c, cl, H, W, h, w)
    args = (features, label, out, mean, rstd, wn, bn, *sizes, *features.stride(), *label.stride(),
            *out.stride(), _scale(h, H), _scale(w, W), slope)
    if channels_last:
        bw, bc, bcl = _tile_shape_cl(W, c, cl + pad, features.device)
        pairs = bw >= 2 and _paired(w, W)
        blocks = (cdiv(c, bc) + cdiv(cl + pad, bcl), cdiv(W + pairs, bw))  # pairs: pixels -1 .. W-1
        rows = _rows_per_program(H, n, blocks[0] * blocks[1], features.device)
        launch(_fwd_cl_kernel, (*blocks, n * cdiv(H, rows)), *args, APPLY_NORM=norm is not None, ROWS=rows,
               BLOCK_W=bw, BLOCK_C=bc, BLOCK_CL=bcl, PIX=math.gcd(out.stride(3), 16),
               LPIX=math.gcd(label.stride(3), 16), LV=math.gcd(cl, pad, 8), PAIRS=pairs, num_warps=4)
    else:
        bw = _row_tile(W, features.device)
        rows = _rows_per_program(H, 1, n * (c + cl) * cdiv(W, bw), features.device)
        launch(_fwd_kernel, (n * (c + cl), cdiv(H, rows), cdiv(W, bw)), *args, APPLY_NORM=norm is not None,
               ROWS=rows, BLOCK_W=bw, PAIRS=bw >= 8 and _paired(w, W))
    return out


def _interp_matrix(src: int, dst: int, device) -> torch.Tensor:
    """(dst, src): row i holds the align_corners=True bilinear weights of output coordinate i."""
    eye = torch.eye(src, device=device)[None, None]
    return F.interpolate(eye, size=(dst, src), mode="bilinear", align_corners=True)[0, 0]


def _n_taps(src: int, dst: int) -> tuple[float, int]:
    """(dst/src coordinate ratio, output rows that can touch one source row) for the gather."""
    if src <= 1 or dst <= 1:
        return 0.0, dst
    inv = (dst - 1) / (src - 1)
    return inv, min(dst, math.ceil(2 * inv) + 3)


# ----------------------------------------------------------------------------- operators
@triton_op("crn_fast::upsample_concat", mutates_args=())
def _upsample_concat_op(features: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """cat([bilinear(features, label size, align_corners=True), label], 1) in features' dtype;
    channels_last when either input is."""
    _check(features, label)
    if not runs_kernel(features):
        fmt = torch.channels_last if _out_channels_last(features, label) else torch.contiguous_format
        return upsample_concat_reference(features, label).contiguous(memory_format=fmt)
    return _launch_fwd(features, label)


@triton_op("crn_fast::upsample_concat_backward", mutates_args=())
def _upsample_concat_backward_op(grad: torch.Tensor, features_size: list[int]) -> torch.Tensor:
    """dL/dfeatures from dL/dout (the transpose of the interpolation, gathered without atomics)."""
    n, c, h, w = features_size
    _, _, H, W = grad.shape
    if not runs_kernel(grad):  # the transpose of the separable interpolation: df = A_h^T g A_w
        a_h, a_w = (_interp_matrix(src, dst, grad.device) for src, dst in ((h, H), (w, W)))
        return torch.einsum("Yy,ncYX,Xx->ncyx", a_h, grad[:, :c].float(), a_w).to(grad.dtype)
    cl = grad.dim() == 4 and grad.stride(1) == 1 and not grad.is_contiguous()  # channels_last: coalesced gather
    if cl:  # 16 bytes of gradient a thread a tap, and an fp32 accumulator for each element
        bw, bc, _ = _tile_shape_cl(w, c, 1, grad.device, budget=2048 // grad.element_size())
    else:
        bh, bw = _tile_shape(h, w, grad.device)
    # an exact 2x axis (every CRN module's): 4 output coordinates reach a source one (_n_taps says 8);
    # NCHW gathers its columns in runs of 4, vector loads along the gradient's rows (unit stride)
    pairs_h = _paired(h, H)
    pairs_w = _paired(w, W) and (cl or (bw % 4 == 0 and grad.stride(3) == 1))
    inv_h, taps_h = (0.0, 4) if pairs_h else _n_taps(h, H)
    inv_w, taps_w = (0.0, 4) if pairs_w else _n_taps(w, W)
    common = (c, H, W, h, w, *grad.stride())
    taps = (_scale(h, H), _scale(w, W), inv_h, inv_w, taps_h, taps_w)
    if cl:
        df = torch.empty((n, c, h, w), device=grad.device, dtype=grad.dtype, memory_format=torch.channels_last)
        launch(_bwd_cl_kernel, (n * h, cdiv(w, bw), cdiv(c, bc)), grad, df, *common, *df.stride(), *taps,
               BLOCK_W=bw, BLOCK_C=bc, PAIRS_H=pairs_h, PAIRS_W=pairs_w, PIX=math.gcd(grad.stride(3), 16))
        return df
    df = torch.empty((n, c, h, w), device=grad.device, dtype=grad.dtype)
    launch(_bwd_kernel, (n * c, cdiv(h, bh), cdiv(w, bw)), grad, df, *common, *taps, BLOCK_H=bh, BLOCK_W=bw,
           PAIRS_H=pairs_h, PAIRS_W=pairs_w)
    return df


def _uc_setup_context(ctx, inputs, output):
    features, label = inputs
    ctx.features_size = list(features.shape)
    ctx.label_dtype = label.dtype


def _uc_backward(ctx, grad):
    c = ctx.features_size[1]
    df = torch.ops.crn_fast.upsample_concat_backward(grad, ctx.features_size) if ctx.needs_input_grad[0] else None
    dl = grad[:, c:].to(ctx.label_dtype) if ctx.needs_input_grad[1] else None
    return df, dl


torch.library.register_autograd("crn_fast::upsample_concat", _uc_backward, setup_context=_uc_setup_context)


@triton_op("crn_fast::norm_lrelu_upsample_concat", mutates_args=())
def _norm_lrelu_upsample_concat_op(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor, label: torch.Tensor, negative_slope: float,
                                   channels_multiple: int = 1) -> torch.Tensor:
    """Inference only: upsample_concat(leaky_relu(layer_norm(x) * weight + bias), label) with the
    norm applied to each bilinear tap, from per-sample mean/rstd (layer_norm_stats). A channels_last
    output's pixel stride is the channel count rounded up to ``channels_multiple``, and the pad
    channels (in memory past the view's last channel) hold zeros."""
    check_norm_args("norm_lrelu_upsample_concat", x, weight, bias, mean, rstd)
    _check(x, label)
    if not runs_kernel(x):
        ref = norm_lrelu_upsample_concat_reference(x, mean, rstd, weight, bias, label, negative_slope)
        if not _out_channels_last(x, label):
            return ref.contiguous()
        out = _padded_channels_last(*ref.shape, max(1, channels_multiple), ref, zeros=True)
        return out.copy_(ref)
    return _launch_fwd(x, label, (mean.float(), rstd.float(), weight, bias), negative_slope, max(1, channels_multiple))


def upsample_concat(features: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`upsample_concat_reference` (``torch.ops.crn_fast.upsample_concat``);
    the output has features' dtype and is channels_last when either input is."""
    return torch.ops.crn_fast.upsample_concat(features, label)


def norm_lrelu_upsample_concat(x, mean, rstd, weight, bias, label, negative_slope: float = LEAKY_SLOPE,
                               channels_multiple: int = 1):
    """Inference-only fusion of module i's last norm + leaky ReLU with module i+1's upsample +
    concat: reads x (the raw conv output) at low resolution and writes the next module's input
    (channels_last: each pixel's channels padded with zeros to ``channels_multiple`` in memory, for
    aligned conv loads). With autograd recording, it runs the differentiable reference instead."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return norm_lrelu_upsample_concat_reference(x, mean, rstd, weight, bias, label, negative_slope)
    return torch.ops.crn_fast.norm_lrelu_upsample_concat(x, mean, rstd, weight, bias, label, float(negative_slope),
                                                         int(channels_multiple))


__all__ = ["upsample_concat", "upsample_concat_reference", "norm_lrelu_upsample_concat",
           "norm_lrelu_upsample_concat_reference", "layer_norm_lrelu_reference"]
