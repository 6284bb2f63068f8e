"""A refinement module's first conv with the upsampling moved after the weights, inference only.

    y = conv2d(cat([up(f), label]), weight, padding=1)        up: bilinear 2x, align_corners=True

Both the conv and the bilinear upsampling are linear, so the feature half of the conv can be
applied at the low resolution, before upsampling. With W_t the weight of tap t = (dy, dx) on
the feature channels and b(q, s) the bilinear weight of source pixel s at output pixel q:

    y(p) = sum_t [p + t inside] (W_t up(f)(p + t) + V_t label(p + t))
         = sum_t [p + t inside] (sum_s b(p + t, s) g_t(s) + V_t label(p + t)),   g_t = W_t f

    g       one GEMM at the low resolution (cuBLAS): f as (pixels, Cf) @ (Cf, 9 Cout) -> for every
            source pixel, 9 tap vectors of Cout channels
    _upconv_kernel  per output row segment and tap, the bilinear blend of g_t, one of two ways
            (the tile says which; the GPU times both): 4 gathers per output pixel blended in fp32
            (contiguous Cout-vectors, mostly from L1/L2: neighbouring pixels share them), or, in
            bf16/fp16, on the tensor cores: the segment's source columns in its two source rows
            as dense [KW, Cout-block] tiles times its [pixels, KW] bilinear weight matrix (2
            nonzeros a row; the fp32 weights as two bf16 parts, as accurate as the gathers).
            The column taps of dx = -1, 0, 1 are computed once per program, the taps loop over
            rows. Plus the layout's 3x3 conv as 9 small tensor-core dots (K = the 20 classes,
            padded to 32); then the conv_norm epilogue: y stored once, with this tile's (count,
            mean, M2) for the layer norm that follows (conv_norm._finalize_kernel merges them)

The GEMM does a quarter of the feature half's multiply-adds (the low resolution has a quarter of
the pixels; at 1024p, ~1.4 of the forward's 3.16 TFLOP gone), and the upsample-concat tensor (up to
640 MB per module at 1024x2048 in bf16) is neither written nor read: g (9 Cout channels at a
quarter of the pixels, 2.25x the output's bytes; 300 MB at 1024p's modules 6-8) is instead.
It is the same sum in another order: g is rounded once to the input's dtype where the direct
path rounds the upsample-concat output once; the tests hold it to the direct conv's tolerance.
``CRN(fused_conv="lowres")`` runs conv1 of modules 1.. this way ("auto" times it against the others).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from crn_fast.constants import LN_EPS

from ._runtime import HAS_TRITON, cdiv, launch, next_pow2, runs_kernel, symbolic, tl, triton, triton_op, tuning_allowed
from ._tuning import choose
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
    def _load_g(ptrs, cm, EVEN_C: tl.constexpr):
        """A [pixels, channels] tile of g in fp32: unmasked where the channel block divides Cout
        (the pixels' addresses are clamped inside g; no zero-fill before each load)."""
        if EVEN_C:
            return tl.load(ptrs).to(tl.float32)
        else:
            return tl.load(ptrs, mask=cm[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _columns(ox, dx: tl.constexpr, pm, W, w, scale_w, x_first, KW: tl.constexpr):
        """The segment's bilinear column taps for tap column dx: (x0, x1, their weights, 0 where the
        tap is in the conv's zero padding, the padding mask, the clamped output column, and for
        KW > 0 the segment's first source column xb and its [BLOCK_P, KW] weight matrix over
        columns xb.. (2 nonzeros per row; the caller checks that the columns fit in KW))."""
        qx = ox + dx
        inb = pm & (qx >= 0) & (qx < W)
        qxc = tl.minimum(tl.maximum(qx, 0), W - 1)
        x0, x1, wx = _taps(qxc, scale_w, w)
        on1 = tl.where(inb, wx, 0.0)
        on0 = tl.where(inb, 1.0 - wx, 0.0)
        if KW > 0:
            # the segment's first source column (the columns grow with ox)
            xf = tl.minimum(tl.maximum(x_first + dx, 0), W - 1)
            xb = tl.minimum((xf.to(tl.float32) * scale_w).to(tl.int32), w - 1)
            kw = tl.arange(0, KW)
            bw = tl.where(kw[None, :] == (x0 - xb)[:, None], on0[:, None], 0.0) + \
                tl.where(kw[None, :] == (x1 - xb)[:, None], on1[:, None], 0.0)
        else:
            xb = 0
            bw = 0.0
        return x0, x1, on0, on1, inb, qxc, xb, bw

    @triton.jit
    def _blend_dot(weights, g, acc, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
        """acc + weights @ g on the tensor cores, the fp32 weights as two parts in g's dtype (hi, and
        the rest): bf16 alone would round them to 8 bits, and the blend would be ~1.5x as far from
        the exact conv as the fp32 gathers (measured); hi + lo keeps ~16 bits, as accurate as them."""
        hi = weights.to(g.dtype)
        acc = _mma(hi, g, acc, IEEE, DOT_F32)
        return _mma((weights - hi.to(tl.float32)).to(g.dtype), g, acc, IEEE, DOT_F32)

    @triton.jit
    def _pick(i: tl.constexpr, a, b, c):
        if i == 0:
            return a
        elif i == 1:
            return b
        else:
            return c

    @triton.jit
    def _upconv_kernel(G, L, WL, Y, PCnt, PMean, PM2, Cout, CL, H, W, h, w, ls0, ls1, ls2, ls3, n_xb, P,
                       scale_h, scale_w, STATS: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
                       EVEN_C: tl.constexpr, L_DENSE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_L: tl.constexpr, KW: tl.constexpr):
        """Program (row segment, output-channel block, sample): BLOCK_P pixels of output row oy by
        BLOCK_C channels. Per tap row dy the two source rows and their weight are scalars; per tap
        column dx the source columns are computed once for the segment. G: (N, h, w, 9 Cout)
        contiguous; L: the layout level (strides ls*; L_DENSE = CL when each pixel's classes are one
        contiguous run, as in channels_last, else 0); WL: (9, CL, Cout) contiguous.

        The blend of g, per tap: KW = 0, 4 gathers per output pixel (contiguous Cout-vectors, one
        FMA per element each, in fp32); KW > 0, on the tensor cores: the KW source columns the
        segment reads, in its two source rows, are loaded as two dense [KW, BLOCK_C] tiles, and the
        segment's bilinear weights as a [BLOCK_P, KW] matrix (2 nonzeros per row, fp32 as two parts
        in the input's dtype) multiply them (the caller checks that the segment's columns fit in KW)."""
        pid = tl.program_id(0)
        cb = tl.program_id(1)
        n = tl.program_id(2)
        n_cb = tl.cdiv(Cout, BLOCK_C)
        oy = pid // n_xb
        x_first = (pid - oy * n_xb) * BLOCK_P
        ox = x_first + tl.arange(0, BLOCK_P)
        pm = ox < W
        co = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = co < Cout
        k = tl.arange(0, BLOCK_L)
        km = k < CL
        c9 = 9 * Cout
        gb = G + n.to(tl.int64) * h * w * c9
        lb = L + n.to(tl.int64) * ls0
        acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)  # the feature half's gathers (KW = 0)
        acc_l = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)  # the dots (the layout half; the blends if KW > 0)
        # the column taps of dx = -1, 0, 1, the same in every tap row: computed once
        cm1 = _columns(ox, -1, pm, W, w, scale_w, x_first, KW)
        c00 = _columns(ox, 0, pm, W, w, scale_w, x_first, KW)
        cp1 = _columns(ox, 1, pm, W, w, scale_w, x_first, KW)
        for dy in range(-1, 2):  # the tap rows: a loop (unrolled, the 9 taps' tiles spill)
            qy = oy + dy
            qyc = tl.minimum(tl.maximum(qy, 0), H - 1)
            y0, y1, wy = _taps(qyc, scale_h, h)
            row_in = (qy >= 0) & (qy < H)  # a tap row outside the image is the conv's zero padding
            w_in = tl.where(row_in, W, 0)  # no column of such a row is inside
            w_top = tl.where(row_in, 1.0 - wy, 0.0)
            w_bot = tl.where(row_in, wy, 0.0)
            r0 = gb + y0.to(tl.int64) * w * c9
            r1 = gb + y1.to(tl.int64) * w * c9
            lrow = lb + qyc.to(tl.int64) * ls2
            for i in tl.static_range(3):  # the tap columns, unrolled: each uses its own precomputed taps
                x0, x1, on0, on1, inb, qxc, xb, bw = _pick(i, cm1, c00, cp1)
                t = (dy + 1) * 3 + i
                col = t * Cout + co
                if KW > 0:  # the blend as two dots: [segment pixels, KW source columns] x [KW, channels]
                    gw = ((xb + tl.arange(0, KW)) * c9)[:, None] + col[None, :]
                    gwm = (xb + tl.arange(0, KW) < w)[:, None] & cm[None, :]
                    g_top = tl.load(r0 + gw, mask=gwm, other=0.0)
                    acc_l = _blend_dot(bw * w_top, g_top, acc_l, IEEE, DOT_F32)
                    g_bot = tl.load(r1 + gw, mask=gwm, other=0.0)
                    acc_l = _blend_dot(bw * w_bot, g_bot, acc_l, IEEE, DOT_F32)
                else:  # 4 gathers per output pixel, one FMA per element each (the clamped source
                    # pixels are always inside g: only channels past Cout need a mask)
                    o0 = (x0 * c9)[:, None] + col[None, :]
                    o1 = (x1 * c9)[:, None] + col[None, :]
                    acc += (w_top * on0)[:, None] * _load_g(r0 + o0, cm, EVEN_C)
                    acc += (w_top * on1)[:, None] * _load_g(r0 + o1, cm, EVEN_C)
                    acc += (w_bot * on0)[:, None] * _load_g(r1 + o0, cm, EVEN_C)
                    acc += (w_bot * on1)[:, None] * _load_g(r1 + o1, cm, EVEN_C)
                inr = inb & (qxc < w_in)  # inside the image: this column and this tap row
                if L_DENSE > 0:  # each pixel's L_DENSE (= CL) classes contiguous, a compile-time run length:
                    # the compiler sees its alignment and loads it as vectors
                    lt = tl.load(lrow + (qxc * L_DENSE)[:, None] + k[None, :],
                                 mask=inr[:, None] & (k < L_DENSE)[None, :], other=0.0)
                else:
                    lt = tl.load(lrow + (qxc * ls3)[:, None] + (k * ls1)[None, :], mask=inr[:, None] & km[None, :],
                                 other=0.0)
                wt = tl.load(WL + (t * CL + k).to(tl.int64)[:, None] * Cout + co[None, :],
                             mask=km[:, None] & cm[None, :], other=0.0)
                acc_l = _mma(lt, wt, acc_l, IEEE, DOT_F32)
        acc += acc_l
        yrow = ((n * H + oy).to(tl.int64) * W + ox) * Cout  # y is channels_last contiguous
        _epilogue(acc, Y, Y, PCnt, PMean, PM2, yrow, pm, co, cm, n * P + pid * n_cb + cb, STATS, False, False)


# (BLOCK_P, BLOCK_C, num_warps, KW) tiles the GPU times per shape among those that fit (_fits); none
# spills registers on sm_80 or sm_90 with Triton 3.6 or 3.9 (each in bf16, the first in every dtype:
# tests/gpu_compile_check.py). Issue cost per output element and tap, sm_90 SASS of the tap-row loop
# (benchmarks/sass_census.py, Triton 3.9; a dense channels_last layout): the gathers (KW = 0, 32
# channels) ~17-23 instructions (the first, the untuned choice, 20; 31-36 before the column taps were
# hoisted and the loads unmasked); the dots (KW > 0, bf16/fp16, 128-256 channels) ~9-13.5. Under the
# interpreter one small tile.
TILES = [(32, 32, 4, 0), (64, 32, 8, 0), (128, 32, 8, 0), (16, 128, 4, 16), (32, 128, 8, 32), (32, 256, 8, 32)]
DOT_ENV = "CRN_FAST_UPCONV_DOT"  # "0": the gather tiles only (to rule the tensor-core blend out)
_INTERPRETER_TILE = (16, 16, 4, 0)
_TUNED: dict[tuple, tuple] = {}


def _fits(tile: tuple, dtype: torch.dtype, scale_w: float, cout: int = 0) -> bool:
    """Should ``tile`` run this conv: a channel block no wider than the channels need (beyond 32), and
    a gather tile (in fp32 the first only), or a dot tile in bf16/fp16 (fp32 would multiply on CUDA
    cores) whose KW columns hold every source column a segment reads (x1 - the first x0 <=
    scale_w (BLOCK_P - 1) + 2, with one column to spare for the fp32 rounding of the coordinates)."""
    bp, bc, _, kw = tile
    if bc > max(32, cout) or (dtype == torch.float32 and tile != TILES[0]):
        return False  # fp32: the others spill registers with Triton 3.6 (fp32 is not lowres's speed path)
    return kw == 0 or (dtype in (torch.bfloat16, torch.float16) and scale_w * (bp - 1) + 3 <= kw and
                       os.environ.get(DOT_ENV, "1") != "0")


def _parse_tile(values: list):
    """A tile from the tuning file's values (BLOCK_P, BLOCK_C, num_warps, KW), None for values that
    are not one of TILES (a file written by another version of this kernel)."""
    return tuple(values) if tuple(values) in TILES else None


def _tile(key: tuple, features: torch.Tensor, scale_w: float, cout: int, run) -> tuple:
    """The tile for this shape: tuned once per process on a GPU among the TILES that fit (CUDA
    events; not while tracing or capturing a CUDA graph; CRN_FAST_CONV_TUNE=0 keeps the first), and
    kept in the CRN_FAST_CONV_TUNING file when one is set, as conv_norm tunes and keeps its tiles."""
    if features.device.type == "cpu":  # the interpreter's tile, as gathers where its dots cannot run
        return _INTERPRETER_TILE if _fits(_INTERPRETER_TILE, features.dtype, scale_w) else _INTERPRETER_TILE[:3] + (0,)
    if symbolic(key):
        return TILES[0]
    if key not in _TUNED:
        if not tuning_allowed(features):
            return TILES[0]
        _TUNED[key] = choose("upsample_conv", key, features.device,
                             [t for t in TILES if _fits(t, features.dtype, scale_w, cout)], run, _parse_tile)[0]
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
    if not runs_kernel(features) or features.dtype == torch.float64:
        return reference_with_stats(upsample_conv_reference(features, label, _unpack(wg, wl)).to(features.dtype),
                                    stats, eps)
    f = features.permute(0, 2, 3, 1)  # (N, h, w, Cf): a view when the features are channels_last
    g = torch.mm(f.reshape(n * h * w, cf), wg)  # (N h w, 9 Cout): the feature half, at the low resolution
    label = label.to(features.dtype)
    y = torch.empty((n, cout, H, W), device=features.device, dtype=features.dtype, memory_format=torch.channels_last)
    cuda, scale_w = features.device.type == "cuda", _scale(w, W)
    dense = cl if label.stride(1) == 1 and label.stride(3) == cl else 0  # each pixel's classes one run

    def run(tile):
        bp, bc, warps, kw = tile
        n_xb, n_cb = cdiv(W, bp), cdiv(cout, bc)
        p = H * n_xb * n_cb
        part = torch.empty((3, n, p), device=y.device, dtype=torch.float32) if stats else None
        pc, pmn, pm2 = part.unbind(0) if stats else (y,) * 3
        launch(_upconv_kernel, (H * n_xb, n_cb, n), g, label, wl, y, pc, pmn, pm2, cout, cl, H, W, h, w,
               *label.stride(), n_xb, p, _scale(h, H), scale_w, STATS=stats,
               IEEE=features.dtype == torch.float32, DOT_F32=not cuda and features.dtype != torch.float32,
               EVEN_C=cout % bc == 0, L_DENSE=dense, BLOCK_P=bp, BLOCK_C=bc, BLOCK_L=max(16, next_pow2(cl)),
               KW=kw, num_warps=warps)
        return part
    tile = _tile((n, cf, cout, cl, h, w, H, W, features.dtype, stats), features, scale_w, cout, run)
    return with_merged_stats(y, run(tile), eps)


def upsample_conv(features, label, wg, wl, eps: float = LN_EPS, stats: bool = True):
    """conv1 of a refinement module on cat([up(features), label]) (``torch.ops.crn_fast.upsample_conv``,
    inference only), computed with the feature weights applied before the upsampling (module
    docstring). features: (N, Cf, h, w), normalised (the previous module's output), best channels_last;
    label: (N, CL, H, W), the layout level; ``wg, wl = pack_upsample_conv_weight(conv1.weight, Cf)``.
    Returns (y, mean, rstd) of y when ``stats`` (for conv1's layer norm), else y."""
    y, m, r = torch.ops.crn_fast.upsample_conv(features, label, wg, wl, float(eps), bool(stats))
    return (y, m, r) if stats else y


__all__ = ["upsample_conv", "upsample_conv_reference", "pack_upsample_conv_weight"]
