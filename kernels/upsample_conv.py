"""A refinement module's first conv with the upsampling moved after the weights, inference only.

    y = conv2d(cat([up(f), label]), weight, padding=1)        up: bilinear 2x, align_corners=True

Both the conv and the bilinear upsampling are linear, so the feature half of the conv can be
applied at the low resolution, before upsampling. With W_t the weight of tap t = (dy, dx) on
the feature channels and b(q, s) the bilinear weight of source pixel s at output pixel q:

    y(p) = sum_t [p + t inside] (W_t up(f)(p + t) + V_t label(p + t))
         = sum_t [p + t inside] (sum_s b(p + t, s) g_t(s) + V_t label(p + t)),   g_t = W_t f

    g       one GEMM at the low resolution (cuBLAS): f as (pixels, Cf) @ (Cf, 9 Cout) -> for every
            source pixel, 9 tap vectors of Cout channels
    _upconv_kernel  per output pixel and tap, the 4 bilinear taps of g_t blended in fp32 (36
            contiguous Cout-vectors per pixel, mostly from L1/L2: neighbouring pixels share them),
            plus the layout's 3x3 conv as 9 small tensor-core dots (K = the 20 classes, padded to
            32); then the conv_norm epilogue: y stored once, with this tile's (count, mean, M2)
            for the layer norm that follows (conv_norm._finalize_kernel merges them)

The GEMM does a quarter of the feature half's multiply-adds (the low resolution has a quarter of
the pixels; at 1024p, ~1.4 of the forward's 3.16 TFLOP gone), and the upsample-concat tensor (up to
640 MB per module at 1024x2048 in bf16) is neither written nor read: g (9 Cout channels at a
quarter of the pixels, 2.25x the output's bytes; 300 MB at 1024p's modules 6-8) is instead.
It is the same sum in another order: g is rounded once to the input's dtype where the direct
path rounds the upsample-concat output once; the tests hold it to the direct conv's tolerance.
``CRN(fused_conv="lowres")`` runs conv1 of modules 1.. this way ("auto" times it against the others).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from crn_fast.constants import LN_EPS

from ._runtime import (HAS_TRITON, can_run, cdiv, cuda_time, launch, next_pow2, symbolic, triton, triton_op, tl,
                       tuning_allowed)
from ._tuning import store_tile, stored_tile, tune
from .conv_norm import pack_conv_weight, reference_with_stats, with_merged_stats
from .upsample_concat import _scale, upsample_concat_reference


def upsample_conv_reference(features: torch.Tensor, label: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The direct computation (fp32): conv2d(upsample_concat(features, label), weight, padding=1)."""
    return F.conv2d(upsample_concat_reference(features.float(), label.float()), weight.float(), padding=1)


def pack_upsample_conv_weight(weight: torch.Tensor, feature_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Cout, Cf + CL, 3, 3) conv weight -> (the GEMM's (Cf, 9 Cout) operand, column t * Cout + co for
    tap t = 3 (dy + 1) + dx + 1; the layout half packed (9, CL, Cout) as conv_norm packs it)."""
    cout, cin, kh, kw = weight.shape
    if (kh, kw) != (3, 3) or not 0 < feature_channels < cin:
        raise ValueError(f"upsample_conv takes a (Cout, Cf + CL, 3, 3) weight with 0 < Cf < Cf + CL, got "
                         f"{tuple(weight.shape)} and Cf = {feature_channels}")
    wg = weight[:, :feature_channels].permute(1, 2, 3, 0).reshape(feature_channels, 9 * cout).contiguous()
    return wg, pack_conv_weight(weight[:, feature_channels:])


if HAS_TRITON:
    from .conv_norm import _epilogue, _mma
    from .upsample_concat import _taps

    @triton.jit
    def _upconv_kernel(G, L, WL, Y, PCnt, PMean, PM2, Cout, CL, H, W, h, w, ls0, ls1, ls2, ls3, n_xb, P,
                       scale_h, scale_w, STATS: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        """Program (row segment, output-channel block, sample): BLOCK_P pixels of output row oy by
        BLOCK_C channels. Per tap row dy the two source rows and their weight are scalars; per tap
        column dx the source columns are computed once for the segment. G: (N, h, w, 9 Cout)
        contiguous; L: the layout level (strides ls*); WL: (9, CL, Cout) contiguous."""
        pid = tl.program_id(0)
        cb = tl.program_id(1)
        n = tl.program_id(2)
        n_cb = tl.cdiv(Cout, BLOCK_C)
        oy = pid // n_xb
        ox = (pid - oy * n_xb) * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = ox < W
        co = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = co < Cout
        k = tl.arange(0, BLOCK_L)
        km = k < CL
        c9 = 9 * Cout
        gb = G + n.to(tl.int64) * h * w * c9
        lb = L + n.to(tl.int64) * ls0
        acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        for t in range(9):  # a loop, not unrolled: one tap's tiles live at a time (unrolled, they spill)
            dy = t // 3 - 1
            dx = t - (dy + 1) * 3 - 1
            qy = oy + dy
            qyc = tl.minimum(tl.maximum(qy, 0), H - 1)
            y0, y1, wy = _taps(qyc, scale_h, h)
            w_in = tl.where((qy >= 0) & (qy < H), W, 0)  # a tap row outside the image: no column is inside
            qx = ox + dx
            inb = pm & (qx >= 0) & (qx < w_in)  # the conv's zero padding
            qxc = tl.minimum(tl.maximum(qx, 0), W - 1)
            x0, x1, wx = _taps(qxc, scale_w, w)
            col = t * Cout + co
            gm = inb[:, None] & cm[None, :]
            r0 = gb + y0.to(tl.int64) * w * c9
            r1 = gb + y1.to(tl.int64) * w * c9
            o0 = (x0 * c9)[:, None] + col[None, :]
            o1 = (x1 * c9)[:, None] + col[None, :]
            wxe = wx[:, None]
            top = (1.0 - wxe) * tl.load(r0 + o0, mask=gm, other=0.0).to(tl.float32) + \
                wxe * tl.load(r0 + o1, mask=gm, other=0.0).to(tl.float32)
            bot = (1.0 - wxe) * tl.load(r1 + o0, mask=gm, other=0.0).to(tl.float32) + \
                wxe * tl.load(r1 + o1, mask=gm, other=0.0).to(tl.float32)
            acc += (1.0 - wy) * top + wy * bot
            lt = tl.load(lb + qyc.to(tl.int64) * ls2 + (qxc * ls3)[:, None] + (k * ls1)[None, :],
                         mask=inb[:, None] & km[None, :], other=0.0)
            wt = tl.load(WL + (t * CL + k).to(tl.int64)[:, None] * Cout + co[None, :], mask=km[:, None] & cm[None, :],
                         other=0.0)
            acc = _mma(lt, wt, acc, IEEE, DOT_F32)
        yrow = ((n * H + oy).to(tl.int64) * W + ox) * Cout  # y is channels_last contiguous
        _epilogue(acc, Y, Y, PCnt, PMean, PM2, yrow, pm, co, cm, n * P + pid * n_cb + cb, STATS, False, False)


# (BLOCK_P, BLOCK_C, num_warps) tiles the GPU times per shape (none spills registers on sm_80 or sm_90:
# each in bf16 in tests/gpu_compile_check.py, and in fp32 and fp16 when checked once by hand; with
# the 9 taps unrolled instead of looped they spilled up to 48 KB); the first is the untuned choice
# (95-128 registers: 16 warps per SM to hide the gathers' latency). Under the interpreter one small tile.
TILES = [(32, 32, 4), (64, 32, 8), (32, 64, 4), (64, 64, 8), (128, 32, 8)]
_INTERPRETER_TILE = (16, 16, 4)
_TUNED: dict[tuple, tuple] = {}


def _parse_tile(values: list):
    """A tile from the tuning file's values (BLOCK_P, BLOCK_C, num_warps), None for values that are
    not one of TILES (a file written by another version of this kernel)."""
    return tuple(values) if tuple(values) in TILES else None


def _tile(key: tuple, features: torch.Tensor, run) -> tuple:
    """The tile for this shape: tuned once per process on a GPU (CUDA events; not while tracing or
    capturing a CUDA graph; CRN_FAST_CONV_TUNE=0 keeps the first), and kept in the
    CRN_FAST_CONV_TUNING file when one is set, as conv_norm tunes and keeps its tiles."""
    if features.device.type == "cpu":
        return _INTERPRETER_TILE
    if symbolic(key):
        return TILES[0]
    if key not in _TUNED:
        if not tuning_allowed(features):
            return TILES[0]
        stored = stored_tile("upsample_conv", key, features.device, _parse_tile)
        if stored is not None:
            _TUNED[key] = stored
            return stored
        _TUNED[key], timings, _ = tune("upsample_conv", TILES, run, cuda_time)
        store_tile("upsample_conv", key, features.device, _TUNED[key])
        logging.getLogger("crn_fast.kernels").debug("upsample_conv %s: %s of %s", key, _TUNED[key], timings)
    return _TUNED[key]


def _check(features, label, wg, wl):
    n, cf, h, w = features.shape if features.dim() == 4 else (None,) * 4
    ok = features.dim() == 4 and label.dim() == 4 and label.shape[0] == n and wg.dim() == 2 and wl.dim() == 3 \
        and wg.shape[0] == cf and wl.shape[0] == 9 and wl.shape[1] == label.shape[1] and wg.shape[1] == 9 * wl.shape[2]
    if not ok:
        raise ValueError(f"upsample_conv: features (N, Cf, h, w), label (N, CL, H, W) and the weights of "
                         f"pack_upsample_conv_weight ((Cf, 9 Cout), (9, CL, Cout)), got {tuple(features.shape)}, "
                         f"{tuple(label.shape)}, {tuple(wg.shape)}, {tuple(wl.shape)}")


def _unpack(wg, wl):
    """The (Cout, Cf + CL, 3, 3) weight back from pack_upsample_conv_weight's two operands."""
    cf, cout = wg.shape[0], wl.shape[2]
    feat = wg.reshape(cf, 3, 3, cout).permute(3, 0, 1, 2)
    lab = wl.reshape(3, 3, wl.shape[1], cout).permute(3, 2, 0, 1)
    return torch.cat([feat, lab], 1)


@triton_op("crn_fast::upsample_conv", mutates_args=())
def _upsample_conv_op(features: torch.Tensor, label: torch.Tensor, wg: torch.Tensor, wl: torch.Tensor, eps: float,
                      stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, y_mean, y_rstd): y channels_last in the features' dtype; the statistics per sample over
    (C,H,W) of y as stored (fp32), empty when ``stats`` is False."""
    _check(features, label, wg, wl)
    n, cf, h, w = features.shape
    cl, H, W = label.shape[1:]
    cout = wl.shape[2]
    if not can_run(features) or features.dtype == torch.float64:
        return reference_with_stats(upsample_conv_reference(features, label, _unpack(wg, wl)).to(features.dtype),
                                    stats, eps)
    f = features.permute(0, 2, 3, 1)  # (N, h, w, Cf): a view when the features are channels_last
    g = torch.mm(f.reshape(n * h * w, cf), wg)  # (N h w, 9 Cout): the feature half, at the low resolution
    label = label.to(features.dtype)
    y = torch.empty((n, cout, H, W), device=features.device, dtype=features.dtype, memory_format=torch.channels_last)
    cuda = features.device.type == "cuda"

    def run(tile):
        bp, bc, warps = tile
        n_xb, n_cb = cdiv(W, bp), cdiv(cout, bc)
        p = H * n_xb * n_cb
        part = torch.empty((3, n, p), device=y.device, dtype=torch.float32) if stats else None
        pc, pmn, pm2 = part.unbind(0) if stats else (y,) * 3
        launch(_upconv_kernel, (H * n_xb, n_cb, n), g, label, wl, y, pc, pmn, pm2, cout, cl, H, W, h, w,
               *label.stride(), n_xb, p, _scale(h, H), _scale(w, W), STATS=stats,
               IEEE=features.dtype == torch.float32, DOT_F32=not cuda and features.dtype != torch.float32,
               BLOCK_P=bp, BLOCK_C=bc, BLOCK_L=max(16, next_pow2(cl)), num_warps=warps)
        return part
    return with_merged_stats(y, run(_tile((n, cf, cout, cl, h, w, H, W, features.dtype, stats), features, run)), eps)


def upsample_conv(features, label, wg, wl, eps: float = LN_EPS, stats: bool = True):
    """conv1 of a refinement module on cat([up(features), label]) (``torch.ops.crn_fast.upsample_conv``,
    inference only), computed with the feature weights applied before the upsampling (module
    docstring). features: (N, Cf, h, w), normalised (the previous module's output), best channels_last;
    label: (N, CL, H, W), the layout level; ``wg, wl = pack_upsample_conv_weight(conv1.weight, Cf)``.
    Returns (y, mean, rstd) of y when ``stats`` (for conv1's layer norm), else y."""
    y, m, r = torch.ops.crn_fast.upsample_conv(features, label, wg, wl, float(eps), bool(stats))
    return (y, m, r) if stats else y


__all__ = ["upsample_conv", "upsample_conv_reference", "pack_upsample_conv_weight"]
