"""Triton kernels against their torch references. On CPU they run through Triton's interpreter
(conftest sets TRITON_INTERPRET=1); the `gpu` tests run the same checks compiled on CUDA.

Tolerances: fp32 1e-5 absolute (outputs are O(1)); fp16 and bf16 are compared with the fp32
reference evaluated on the same (rounded) inputs, within a few ulps of the output dtype.
"""
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
from crn_fast import kernels as K  # noqa: E402
from crn_fast import CRN, CRNConfig  # noqa: E402
from crn_fast.labels import one_hot  # noqa: E402

import fuzz_kernels  # noqa: E402  (tests/, on sys.path under pytest)
from fuzz_kernels import view_of  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=2e-2), torch.float64: dict(atol=1e-10, rtol=1e-10)}
GRAD_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=1e-2),
            torch.bfloat16: dict(atol=1e-1, rtol=5e-2), torch.float64: dict(atol=1e-9, rtol=1e-9)}
pytestmark = pytest.mark.skipif(not K.can_run(torch.empty(0, device=DEV)), reason="Triton cannot run here")

SHAPES = [(1, 3, 5, 7), (2, 16, 8, 8), (3, 33, 9, 13), (1, 64, 4, 8), (2, 5, 1, 1)]


def ln_inputs(shape, dtype, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(DEV, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (torch.randn(shape[1], generator=g) * 0.5 + 1).to(DEV, dtype)
    b = (torch.randn(shape[1], generator=g) * 0.3).to(DEV, dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm_lrelu_forward_backward(shape, dtype, channels_last):
    x, w, b = ln_inputs(shape, dtype, channels_last)
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.detach().float().requires_grad_() for t in (x, w, b))
    y = K.layer_norm_lrelu(xs, ws, bs, num_programs=3)  # force the split reduction across programs
    yr = K.layer_norm_lrelu_reference(xr, wr, br, 1e-12, 0.2)
    assert y.dtype == dtype and y.shape == x.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), yr, **TOL[dtype])
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    gs = torch.autograd.grad(y, (xs, ws, bs), dy)
    gr = torch.autograd.grad(yr, (xr, wr, br), dy.float())
    for a, r in zip(gs, gr):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), r, **GRAD_TOL[dtype])


@pytest.mark.parametrize("num_programs", [1, 2, 7, None])
def test_layer_norm_any_program_count(num_programs):
    x, w, b = ln_inputs((2, 12, 11, 6), torch.float32, seed=3)
    torch.testing.assert_close(K.layer_norm_lrelu(x, w, b, num_programs=num_programs),
                               K.layer_norm_lrelu_reference(x, w, b), **TOL[torch.float32])


@pytest.mark.parametrize("mean, std", [(1e3, 0.1), (1e5, 1e-3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_mean_tiny_spread_stays_accurate(mean, std, channels_last):
    """fp32 input with a large mean and a tiny spread: E[x^2]-E[x]^2 cancels catastrophically (even
    goes negative), and so does plain F.group_norm on CPU (error 2..2000 on these inputs). Both
    the kernel and the eager reference stay within 1e-4 of the fp64 result of the same input."""
    g = torch.Generator().manual_seed(0)
    x = (mean + std * torch.randn(2, 8, 16, 16, generator=g)).to(DEV)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.ones(8, device=DEV), torch.zeros(8, device=DEV)
    exact = K.layer_norm_lrelu_reference(x.double(), w.double(), b.double())
    ours = (K.layer_norm_lrelu(x, w, b, num_programs=4).double() - exact).abs().max().item()
    eager = (K.layer_norm_lrelu_reference(x, w, b).double() - exact).abs().max().item()
    naive_var = (x.double() * x).mean((1, 2, 3)) - x.mean((1, 2, 3)).double() ** 2  # one-pass E[x^2] in fp32
    assert ours < 1e-4 and eager < 1e-4, (ours, eager)
    if mean == 1e3:
        naive_var = (x * x).mean((1, 2, 3)) - x.mean((1, 2, 3)) ** 2
        assert (naive_var - std ** 2).abs().max() > 0.5 * std ** 2  # what a one-pass E[x^2] would give


@pytest.mark.parametrize("fn", ["kernel", "eager"])
def test_constant_large_input_gives_leaky_relu_of_the_bias(fn):
    """A constant 1e4 (C,H,W) row normalises to 0, so the output is exactly leaky_relu(bias)."""
    x = torch.full((2, 6, 5, 7), 1e4, device=DEV)
    bias = torch.linspace(-1, 1, 6, device=DEV)
    f = K.layer_norm_lrelu if fn == "kernel" else K.layer_norm_lrelu_reference
    y = f(x, torch.ones(6, device=DEV), bias)
    assert torch.equal(y, torch.nn.functional.leaky_relu(bias, 0.2).view(1, 6, 1, 1).expand_as(y))


def test_constant_input_gives_exactly_the_bias():
    x = torch.full((2, 4, 3, 5), 0.1, device=DEV)
    bias = torch.tensor([0.0, 1.0, 2.0, 3.0], device=DEV)
    y = K.layer_norm_lrelu(x, torch.ones(4, device=DEV), bias, num_programs=2)
    assert torch.isfinite(y).all()
    assert torch.equal(y, bias.view(1, 4, 1, 1).expand_as(y))


def test_layer_norm_gradcheck_float64():
    x, w, b = (t.double().requires_grad_() for t in ln_inputs((1, 2, 3, 4), torch.float32, seed=5))
    assert torch.autograd.gradcheck(lambda a, c, d: K.layer_norm_lrelu(a, c, d, 1e-5, 0.2, 2), (x, w, b),
                                     eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, channels_last, num_programs", [((1, 12, 32, 40), False, 2), ((2, 300, 3, 5), True, 1)])
def test_layer_norm_backward_runs_across_channel_blocks(shape, channels_last, num_programs):
    """The backward's programs sum their run of tiles lane by lane and reduce once per channel block:
    runs that enter the next channel block mid-way (NCHW: 4-channel blocks of 1024 pixels, 3 tiles a
    program; channels_last: 256-channel blocks) give each block's dweight/dbias partials, and the
    blocks a program never visits stay zero in its partial row."""
    x, w, b = ln_inputs(shape, torch.float32, channels_last, seed=6)
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(DEV)
    gs = torch.autograd.grad(K.layer_norm_lrelu(xs, ws, bs, num_programs=num_programs), (xs, ws, bs), dy)
    gr = torch.autograd.grad(K.layer_norm_lrelu_reference(xr, wr, br, 1e-12, 0.2), (xr, wr, br), dy)
    for a, r in zip(gs, gr):
        torch.testing.assert_close(a, r, **GRAD_TOL[torch.float32])


def test_layer_norm_backward_is_deterministic():
    x, w, b = (t.requires_grad_() for t in ln_inputs((2, 24, 7, 9), torch.float32, seed=4))
    dy = torch.randn_like(x)
    g1 = torch.autograd.grad(K.layer_norm_lrelu(x, w, b, num_programs=3), (x, w, b), dy)
    g2 = torch.autograd.grad(K.layer_norm_lrelu(x, w, b, num_programs=3), (x, w, b), dy)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))


# (n, c, h, w, H, W). The channels_last forward walks blocks of 4 output rows on CPU: the cases
# cross row blocks, end in partial ones, keep one source row (h=1), skip source rows (H < h), map
# rows 1:1 (H = h) and put 3 output rows between two source rows (17 from 3).
UP_CASES = [(1, 3, 4, 8, 8, 16), (2, 5, 3, 5, 6, 10), (1, 4, 5, 7, 9, 13), (2, 2, 1, 2, 2, 4), (1, 6, 7, 3, 14, 6),
            (1, 3, 9, 6, 5, 4), (1, 2, 6, 5, 6, 5), (1, 3, 3, 4, 17, 9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", UP_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_concat_forward_backward(case, dtype, channels_last):
    n, c, h, w, H, W = case
    g = torch.Generator().manual_seed(0)
    f = torch.randn(n, c, h, w, generator=g).to(DEV, dtype)
    lab = torch.rand(n, 3, H, W, generator=g).to(DEV, dtype)
    if channels_last:
        f = f.to(memory_format=torch.channels_last)
    fs, fr = f.detach().clone().requires_grad_(), f.detach().float().requires_grad_()
    out = K.upsample_concat(fs, lab)
    ref = K.upsample_concat_reference(fr, lab.float())
    assert out.shape == (n, c + 3, H, W) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    dy = torch.randn(out.shape, generator=g).to(DEV, dtype)
    if channels_last:  # as a channels_last conv's backward hands it over: the coalesced gather
        dy = dy.to(memory_format=torch.channels_last)
    (gf,) = torch.autograd.grad(out, fs, dy)
    (gr,) = torch.autograd.grad(ref, fr, dy.float())
    assert gf.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(gf.float(), gr, **GRAD_TOL[dtype])


def test_upsample_concat_label_grad_only_when_required():
    f = torch.randn(1, 2, 3, 4, device=DEV, requires_grad=True)
    lab = torch.rand(1, 3, 6, 8, device=DEV)
    K.upsample_concat(f, lab).sum().backward()
    assert lab.grad is None and f.grad is not None
    lab.requires_grad_()
    dy = torch.randn(1, 5, 6, 8, device=DEV)
    K.upsample_concat(f, lab).backward(dy)
    torch.testing.assert_close(lab.grad, dy[:, 2:])


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_backward_is_the_adjoint_in_float64(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(9)
    f = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64).to(DEV).contiguous(memory_format=fmt)
    f.requires_grad_()
    lab = torch.zeros(1, 1, 9, 11, dtype=torch.float64, device=DEV)
    dy = torch.randn(1, 3, 9, 11, generator=g, dtype=torch.float64).to(DEV).contiguous(memory_format=fmt)
    (gf,) = torch.autograd.grad(K.upsample_concat(f, lab), f, dy)
    (gr,) = torch.autograd.grad(K.upsample_concat_reference(f, lab), f, dy)
    torch.testing.assert_close(gf, gr, atol=1e-5, rtol=1e-5)  # interpolation weights are fp32


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_backward_of_an_exact_2x_gathers_4_taps_an_axis(monkeypatch, channels_last):
    """An exact 2x axis (_pairs) gathers only output coordinates 2j-1 .. 2j+2 for source coordinate j
    (4 taps instead of ~7, each weighted by the forward's own taps): on CPU the same bits as the
    general gather, at the first and last rows and columns, across tiles (5x13 -> 10x26), and with
    one axis paired and the other not (5x13 -> 9x26)."""
    import importlib
    U = importlib.import_module("crn_fast.kernels.upsample_concat")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(3)
    f = torch.randn(1, 3, 5, 13, generator=g).to(DEV).contiguous(memory_format=fmt).requires_grad_()
    for H in (10, 9):
        lab = torch.zeros(1, 2, H, 26, device=DEV)
        dy = torch.randn(1, 5, H, 26, generator=g).to(DEV).contiguous(memory_format=fmt)
        with monkeypatch.context() as m:  # NCHW: 3x2 tiles a channel (18 interpreted programs, not 72)
            m.setattr(U, "_tile_shape", lambda rows, cols, device: (2, 8))
            (paired,) = torch.autograd.grad(K.upsample_concat(f, lab), f, dy)
            m.setattr(U, "_pairs", lambda w, W: False)
            (general,) = torch.autograd.grad(K.upsample_concat(f, lab), f, dy)
        (ref,) = torch.autograd.grad(K.upsample_concat_reference(f, lab), f, dy)
        if DEV == "cpu":
            assert torch.equal(paired, general), H
        torch.testing.assert_close(paired, ref, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_norm_lrelu_upsample_concat(dtype, channels_last):
    x, w, b = ln_inputs((2, 70, 4, 8), dtype, channels_last, seed=2)  # 70 channels: two channel blocks + a tail
    lab = torch.rand(2, 3, 8, 16, device=DEV).to(dtype)
    if channels_last:
        lab = lab.to(memory_format=torch.channels_last)
    mean, rstd = K.layer_norm_stats(x)
    with torch.no_grad():
        out = K.norm_lrelu_upsample_concat(x, mean, rstd, w, b, lab)
    ref = K.upsample_concat_reference(K.layer_norm_lrelu_reference(x.float(), w.float(), b.float()), lab.float())
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out.float(), ref, **GRAD_TOL[dtype])


@pytest.mark.parametrize("multiple", [8, 16])
def test_padded_output_has_zero_pad_channels(multiple):
    """channels_multiple pads each pixel's channels in memory; the kernel writes the pad's zeros
    (cuDNN's conv1 reads them with zero weights), whatever the buffer held before."""
    x, w, b = ln_inputs((1, 70, 3, 5), torch.float32, True, seed=4)
    lab = one_hot(torch.randint(0, 20, (1, 6, 10), generator=torch.Generator().manual_seed(4))).to(DEV)
    mean, rstd = K.layer_norm_stats(x)
    for _ in range(3):  # freed NaN memory of the buffer's size, for the allocator to hand back
        junk = torch.full((6 * 10 * 96,), float("nan"), device=DEV)
        del junk
        with torch.no_grad():
            out = K.norm_lrelu_upsample_concat(x, mean, rstd, w, b, lab, channels_multiple=multiple)
        cs = -(-90 // multiple) * multiple
        assert out.shape == (1, 90, 6, 10) and out.stride() == (60 * cs, 1, 10 * cs, cs)
        full = out.as_strided((1, cs, 6, 10), out.stride())
        assert torch.equal(full[:, 90:], torch.zeros_like(full[:, 90:]))
        ref = K.norm_lrelu_upsample_concat_reference(x, mean, rstd, w, b, lab)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_channels_last_upsample_with_nchw_label_and_wide_features():
    """channels_last features (several channel blocks) with an NCHW label: the label is read by strides."""
    g = torch.Generator().manual_seed(3)
    f = torch.randn(1, 130, 3, 5, generator=g).to(DEV).to(memory_format=torch.channels_last)
    lab = torch.rand(1, 20, 6, 10, generator=g).to(DEV)
    out = K.upsample_concat(f, lab)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, K.upsample_concat_reference(f, lab), **TOL[torch.float32])


@pytest.mark.parametrize("dtype, fused", [(torch.float32, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_in_pixel_pairs_is_the_per_pixel_taps(monkeypatch, dtype, fused, channels_last):
    """An exact 2x upsampling computes output pixels in pairs that share their source pixels
    (channels_last: 2j+1 and 2j+2 from j and j+1; NCHW: 2m and 2m+1 from m-1, m and m+1, a run of
    4 source columns loaded as a vector and shifted in registers), each tap loaded, and normalised, fewer times: on CPU the same bits as the
    per-pixel taps (on a GPU within rounding), across column blocks (channels_last: 8 pixels; NCHW:
    16, two runs of 4 source columns), at the first and last columns, and (channels_last) two
    channel blocks and a padded output."""
    import importlib
    U = importlib.import_module("crn_fast.kernels.upsample_concat")
    assert U._pairs(13, 26) and U._pairs(1024, 2048) and not U._pairs(13, 25) and not U._pairs(1, 2)
    monkeypatch.setattr(U, "_tile_shape_cl", lambda cols, channels, label_channels, device: (
        8, min(1 << (channels - 1).bit_length(), 64), min(1 << (label_channels - 1).bit_length(), 64)))
    monkeypatch.setattr(U, "_row_tile", lambda cols, device: 16)
    n, c = (2, 70) if channels_last else (1, 3)  # NCHW: a program per channel (the interpreter's time)
    x, w, b = ln_inputs((n, c, 5, 13), dtype, channels_last, seed=7)
    lab = one_hot(torch.randint(0, 20, (n, 10, 26), generator=torch.Generator().manual_seed(7))).to(DEV, dtype)
    lab = lab.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    mean, rstd = K.layer_norm_stats(x)

    def run():
        with torch.no_grad():
            if fused:
                return K.norm_lrelu_upsample_concat(x, mean, rstd, w, b, lab, channels_multiple=8)
            return K.upsample_concat(x, lab)
    pairs = run()
    monkeypatch.setattr(U, "_pairs", lambda w, W: False)
    taps = run()
    assert pairs.stride() == taps.stride()
    if DEV == "cpu":
        assert torch.equal(pairs, taps)
    else:
        torch.testing.assert_close(pairs, taps, **TOL[dtype])
    ref = K.norm_lrelu_upsample_concat_reference(x, mean, rstd, w, b, lab) if fused else \
        K.upsample_concat_reference(x, lab)
    torch.testing.assert_close(pairs.float(), ref.float(), **GRAD_TOL[dtype])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("levels, size", [(3, (12, 20)), (6, (64, 96))])  # one pass; two (4 + 1 levels)
def test_area_pyramid_equals_recursive_avg_pool(levels, size, channels_last):
    """fp32: every level is the reference's (recursive 2x2 avg_pool2d), batch 2, either format,
    and keeps the layout's memory format."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(2, 5, *size, generator=torch.Generator().manual_seed(levels)).to(DEV).contiguous(memory_format=fmt)
    got, ref = K.area_pyramid(x, levels), K.area_pyramid_reference(x, levels)
    assert len(got) == levels and got[0] is x
    for g, r in zip(got[1:], ref[1:]):
        assert g.shape == r.shape and g.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(DEV == "cuda", reason="the interpreter's rounding: CPU only")
def test_interpreter_rounds_fp32_to_bf16_like_a_gpu():
    """conftest.py makes Triton's interpreter round fp32 -> bf16 to nearest even, as cvt.rn does on
    a GPU (and torch on CPU): ties to even, overflow to inf, NaN kept, signed zeros and subnormals."""
    import triton
    import triton.language as tl

    @triton.jit
    def _to_bf16(X, Y, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(Y + i, tl.load(X + i).to(tl.bfloat16))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-140, 127, (4096,), generator=g).float())
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)])  # halfway: to the even neighbour
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.3895e38, -0.0, 0.0, 1e-40, -3e-39])
    x = torch.cat([x, ties, special])
    x = torch.nn.functional.pad(x, (0, 8192 - x.numel()))
    y = torch.empty(8192, dtype=torch.bfloat16)
    _to_bf16[(1,)](x, y, N=8192)
    want = x.to(torch.bfloat16)
    same = (y.view(torch.int16) == want.view(torch.int16)) | (y.isnan() & want.isnan())
    assert same.all(), x[~same][:5]


def test_area_pyramid_bf16_levels_are_exactly_rounded_box_averages():
    """A one-hot bf16 layout over 9 levels (two passes, 256 x 256 boxes): every level is the fp32
    box average rounded once, where pooling bf16 level by bf16 level is not (deep levels are
    rounded, then pooled and rounded again: 0.81 ulp off at level 8 here). On a GPU and under the
    tests' interpreter (which rounds fp32 to bf16 as GPUs do, see conftest.py) each level equals
    the box average's correct rounding."""
    layout = one_hot(torch.randint(0, 20, (1, 256, 512), generator=torch.Generator().manual_seed(5))).to(DEV)
    got = K.area_pyramid(layout.to(torch.bfloat16).contiguous(memory_format=torch.channels_last), 9)
    box = [torch.nn.functional.avg_pool2d(layout.double(), 1 << k) for k in range(9)]
    for g, e in zip(got, box):
        assert torch.equal(g, e.to(torch.bfloat16))
    recursive = K.area_pyramid_reference(layout.to(torch.bfloat16), 9)
    assert not all(torch.equal(r, e.to(torch.bfloat16)) for r, e in zip(recursive, box))


def test_area_pyramid_falls_back_where_the_kernel_does_not_apply():
    """Sizes not divisible by 2**(levels-1) (avg_pool2d floors them) and layouts that need a
    gradient take the reference; one level is the layout itself."""
    x = torch.rand(1, 3, 6, 10, device=DEV)
    for g, r in zip(K.area_pyramid(x, 3), K.area_pyramid_reference(x, 3)):
        torch.testing.assert_close(g, r)
    assert K.area_pyramid(x, 1) == [x]
    xg = torch.rand(1, 3, 8, 8, device=DEV, requires_grad=True)
    K.area_pyramid(xg, 3)[-1].sum().backward()
    torch.testing.assert_close(xg.grad, torch.full_like(xg, 1 / 16))


def tiny_pair(k=2, seed=0, memory_format=torch.channels_last):
    torch.manual_seed(seed)
    eager = CRN(CRNConfig(widths=(12, 10, 8, 6), k=k))
    for p in eager.parameters():
        p.data.normal_(0, 0.3)
    fast = CRN(eager.config, backend="triton", memory_format=memory_format)
    fast.load_state_dict(eager.state_dict())
    return eager, fast


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("input_format", [torch.channels_last, torch.contiguous_format])
def test_generator_triton_equals_eager(memory_format, input_format):
    """Both model memory formats, fed either input format (the model converts it once)."""
    eager, fast = tiny_pair(memory_format=memory_format)
    assert fast.backend == "triton" and fast.memory_format == memory_format
    layout = one_hot(torch.randint(0, 20, (2, 16, 32), generator=torch.Generator().manual_seed(0))).to(DEV)
    layout = layout.contiguous(memory_format=input_format)
    eager, fast = eager.to(DEV), fast.to(DEV)
    with torch.no_grad():
        ref = eager(layout)
        torch.testing.assert_close(fast(layout), ref, atol=2e-3, rtol=1e-5)  # fused inference path (0..255)
        fast.fuse_inference = False
        torch.testing.assert_close(fast(layout), ref, atol=2e-3, rtol=1e-5)


def test_cudnn_conv1_inputs_are_zero_padded_to_8_channels():
    """The triton inference path hands cuDNN conv1 inputs padded to a multiple of 8 channels
    (here 30 -> 32 and 28 -> 32; 32 stays) with zero weights for the pad; the pad channels hold
    zeros even where the buffer held NaN before, so the output is eager's."""
    from torch.profiler import profile
    eager, fast = tiny_pair()
    eager, fast = eager.to(DEV), fast.to(DEV)
    layout = one_hot(torch.randint(0, 20, (1, 16, 32), generator=torch.Generator().manual_seed(3))).to(DEV)
    junk = torch.full((1 << 20,), float("nan"), device=DEV)  # freed memory the padded buffers may reuse
    del junk
    with torch.no_grad(), profile(record_shapes=True) as prof:
        out = fast(layout)
    conv_in = [e.input_shapes[0][1] for e in prof.events() if e.name == "aten::convolution"]
    # conv1, conv2 per module, then the head: module 0's conv1 reads the 20-class layout itself
    assert conv_in[0::2] == [20, 32, 32, 32, 6] and conv_in[1::2] == [12, 10, 8, 6], conv_in
    with torch.no_grad():
        torch.testing.assert_close(out, eager(layout), atol=2e-3, rtol=1e-5)
    padded = [v for d in fast._packed_weights.values() for k, v in d.items() if k[0] == "padded"]
    assert padded and all(w[:, -1].abs().max() == 0 for _, w in padded)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_generator_triton_gradients_match_eager(memory_format):
    eager, fast = tiny_pair(k=1, seed=1, memory_format=memory_format)
    eager, fast = eager.to(DEV), fast.to(DEV)
    layout = one_hot(torch.randint(0, 20, (2, 16, 32), generator=torch.Generator().manual_seed(1))).to(DEV)
    target = torch.rand(2, 3, 16, 32, device=DEV) * 255
    for m in (eager, fast):
        ((m(layout) - target).abs().mean()).backward()
    pe, pf = dict(eager.named_parameters()), dict(fast.named_parameters())
    for k in pe:
        torch.testing.assert_close(pf[k].grad, pe[k].grad, atol=1e-4, rtol=1e-3, msg=k)


def test_training_with_triton_backend(tmp_path):
    from crn_fast.train import main
    assert main(["--out", str(tmp_path), "--steps", "1", "--backend", "triton", "--resolution", "16x32",
                 "--batch-size", "1", "--no-progress"]) == 0
    import json
    assert json.loads((tmp_path / "config.json").read_text())["backend_used"] == "triton"


@pytest.mark.parametrize("channels_last", [True, False])
def test_training_cascade_pads_the_layout_to_8_channels(monkeypatch, channels_last):
    """The triton backend's cascade (with grad) on a PAD_LAYOUT_DEVICES device appends zero channels
    to the layout, so every conv1 takes a multiple of 8 input channels (cuDNN's fast convs), with
    zero weights for them: the same images and the same gradients of every parameter, within the
    convs' rounding; the parameters keep their shapes (checkpoints and exports see no difference);
    no-grad inference keeps its own path. Here on CPU, where it is off by default."""
    import crn_fast.model as M
    cfg = CRNConfig(widths=(8, 8, 8), num_classes=21, k=2)  # conv1 inputs 21, 29, 29: padded to 24, 32, 32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = CRN(cfg, backend="triton", memory_format=fmt).to(DEV)
    with torch.no_grad():  # trained-like norms: non-trivial outputs
        for mod in model.refine:
            for norm in (mod.norm1, mod.norm2):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.3, 0.3)
    lab = one_hot(torch.randint(0, 21, (2, 16, 32), generator=torch.Generator().manual_seed(5)), 21).to(DEV)
    target = torch.rand(2, 6, 16, 32, generator=torch.Generator().manual_seed(6)).to(DEV) * 255
    seen = []
    hooks = [mod.register_forward_pre_hook(lambda m, args: seen.append(args[1].shape[1])) for mod in model.refine]

    def run():
        model.zero_grad(set_to_none=True)
        out = model(lab)
        ((out - target) ** 2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert model.layout_pad(lab) == 0
    out, grads = run()
    monkeypatch.setattr(M, "PAD_LAYOUT_DEVICES", ("cpu", "cuda"))
    assert model.layout_pad(lab) == 3 and [seen.pop(0) for _ in range(3)] == [21, 21, 21]
    out_p, grads_p = run()
    assert seen == [24, 24, 24]  # each module's layout level, 21 classes + 3 zero channels
    torch.testing.assert_close(out_p, out, rtol=1e-5, atol=1e-3)
    for name, g in grads.items():
        assert grads_p[name].shape == g.shape, name
        torch.testing.assert_close(grads_p[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name)
    assert [mod.conv1.weight.shape[1] for mod in model.refine] == [21, 29, 29]
    with torch.no_grad():
        assert model.layout_pad(lab) == 0  # inference: fast_inference.py pads on its own
    model.config = cfg.replace(widths=(8, 12, 8))  # a width not a multiple of 8: nothing to align
    assert model.layout_pad(lab) == 0
    for h in hooks:
        h.remove()


def test_fallback_warns_once_when_triton_cannot_run():
    code = ("import warnings, crn_fast\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    m = crn_fast.CRN.from_preset('tiny', backend='triton')\n"
            "print(m.backend, len(w), str(w[0].message))\n")
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("eager 1 ") and "using the eager torch reference ops" in r.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_module_shapes(dtype):
    """A 1024p-like module shape, compiled on CUDA (batch 1: one row of C*H*W elements)."""
    x, w, b = ln_inputs((1, 128, 512, 1024), dtype)
    torch.testing.assert_close(K.layer_norm_lrelu(x, w, b).float(),
                               K.layer_norm_lrelu_reference(x.float(), w.float(), b.float()), **GRAD_TOL[dtype])
    f = torch.randn(1, 128, 256, 512, device="cuda", dtype=dtype)
    lab = torch.rand(1, 20, 512, 1024, device="cuda", dtype=dtype)
    torch.testing.assert_close(K.upsample_concat(f, lab).float(),
                               K.upsample_concat_reference(f.float(), lab.float()), **GRAD_TOL[dtype])


@pytest.mark.gpu
def test_gpu_more_than_2_31_elements():
    """64-bit offsets: one sample of 34 x 8192 x 8192 bf16 elements (> 2^31)."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs a GPU with 40 GB")
    x = torch.randn(1, 34, 8192, 8192, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2 ** 31
    w, b = torch.ones(34, device="cuda", dtype=torch.bfloat16), torch.zeros(34, device="cuda", dtype=torch.bfloat16)
    y = K.layer_norm_lrelu(x, w, b)
    xf = x.float()
    var, mean = torch.var_mean(xf, correction=0)
    for idx in ((0, 0, 0), (33, 8191, 8191), (20, 4000, 123)):
        ref = torch.nn.functional.leaky_relu((xf[(0, *idx)] - mean) / torch.sqrt(var + 1e-12), 0.2)
        torch.testing.assert_close(y[(0, *idx)].float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 40, 3, 4)])  # 40 channels: two channel blocks on CPU
@pytest.mark.parametrize("channels_last", [False, True])
def test_norm_lrelu_with_given_statistics(shape, dtype, channels_last):
    """The apply pass alone (CRN's "split" modules: a conv's epilogue reduced the statistics):
    layer_norm_lrelu's result when given layer_norm_stats' mean and rstd, the reference's in every
    dtype, in x's memory format; per sample (a batch keeps each sample's own statistics)."""
    x, w, b = ln_inputs(shape, dtype, channels_last, seed=13)
    mean, rstd = K.layer_norm_stats(x)
    y = K.norm_lrelu(x, mean, rstd, w, b, num_programs=3)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last if channels_last else
                                                torch.contiguous_format)
    torch.testing.assert_close(y, K.norm_lrelu_reference(x, mean, rstd, w, b), **TOL[dtype])
    torch.testing.assert_close(y, K.layer_norm_lrelu(x, w, b), **TOL[dtype])


def test_the_norm_operators_reject_arguments_of_the_wrong_shape_or_dtype():
    """Checked from shapes and dtypes (torch.library.opcheck's fake tensors too): a weight shorter
    than the channels was read past its end by layer_norm_lrelu, and an integer x normalised as if
    float; now each is a ValueError naming the operator and the shapes it needs."""
    x, w, b = ln_inputs((2, 6, 4, 4), torch.float32)
    mean, rstd = K.layer_norm_stats(x)
    label = torch.zeros(2, 3, 8, 8)
    cases = [(lambda: K.norm_lrelu(x, mean[:1], rstd, w, b),
              r"^norm_lrelu: x \(2, 6, 4, 4\) needs weight and bias of shape \(6,\) and mean and rstd of shape "
              r"\(2,\), got mean \(1,\)$"),
             (lambda: K.layer_norm_lrelu(x, w[:5], b), r"^layer_norm_lrelu: .* got weight \(5,\)$"),
             (lambda: K.layer_norm_lrelu(x.long(), w, b), r"^layer_norm_lrelu expects a 4-D \(N, C, H, W\) "
              r"floating-point tensor, got shape \(2, 6, 4, 4\) of torch.int64$"),
             (lambda: K.layer_norm_stats(x[0]), r"^layer_norm_stats expects a 4-D"),
             (lambda: K.norm_lrelu_upsample_concat(x, mean, rstd, w, b[:1], label),
              r"^norm_lrelu_upsample_concat: .* got bias \(1,\)$"),
             (lambda: K.area_pyramid(label, 5), r"^area_pyramid needs .* at least 2\^\(levels-1\) = 16 for 5 levels, "
              r"got shape \(2, 3, 8, 8\)$")]
    for op, msg in cases:
        with pytest.raises(ValueError, match=msg):
            op()


def test_layer_norm_stats_match_torch():
    x, _, _ = ln_inputs((3, 7, 5, 9), torch.float32, seed=8)
    mean, rstd = K.layer_norm_stats(x, 1e-12, num_programs=3)
    var, ref_mean = torch.var_mean(x.double(), dim=(1, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(var + 1e-12), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("view", ["channel_slice", "channel_slice_cl", "every_other_column"])
def test_every_operator_takes_strided_views(view):
    """A user may hand an operator a view that is neither NCHW- nor channels_last-dense (a channel
    slice of a wider buffer in either format, every other column): every operator gives the
    reference's values for it, forward and (where it has one) backward, fp32 to 1e-5. These are
    tests/fuzz_kernels.py's three view kinds at one shape each; it draws them at random shapes."""
    g = torch.Generator().manual_seed(11)
    x = view_of(torch.randn(2, 6, 3, 5, generator=g), view).to(DEV)
    lab = view_of(torch.rand(2, 4, 6, 10, generator=g), view).to(DEV)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    _every_operator_matches_its_reference(x, lab, g, lambda shape: view_of(torch.randn(shape, generator=g), view))


def _every_operator_matches_its_reference(x, lab, g, grad_like):
    """Every operator on features x (N, C, h, w) and a layout lab (N, L, 2h, 2w) against its torch
    reference, fp32, forward and backward; grad_like(shape) makes the incoming gradients (CPU)."""
    c, cl = x.shape[1], lab.shape[1]
    wt, b = torch.randn(c, generator=g).to(DEV), torch.randn(c, generator=g).to(DEV)
    tol = TOL[torch.float32]
    # layer norm + leaky ReLU, its statistics and apply pass; gradients of x, weight and bias
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, wt, b))  # x keeps its strides
    y = K.layer_norm_lrelu(xs, ws, bs, num_programs=2)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, wt, b))
    yr = K.layer_norm_lrelu_reference(xr, wr, br)
    torch.testing.assert_close(y, yr, **tol)
    dy = grad_like(y.shape).to(DEV)
    for got, ref in zip(torch.autograd.grad(y, (xs, ws, bs), dy), torch.autograd.grad(yr, (xr, wr, br), dy)):
        torch.testing.assert_close(got, ref, **GRAD_TOL[torch.float32])
    mean, rstd = K.layer_norm_stats(x, num_programs=2)
    var, ref_mean = torch.var_mean(x.double(), dim=(1, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(K.norm_lrelu(x, mean, rstd, wt, b), K.norm_lrelu_reference(x, mean, rstd, wt, b),
                                   **tol)
        # the upsample-concat, plain and with the norm folded in
        torch.testing.assert_close(K.norm_lrelu_upsample_concat(x, mean, rstd, wt, b, lab, channels_multiple=8),
                                   K.norm_lrelu_upsample_concat_reference(x, mean, rstd, wt, b, lab), **tol)
    fs = x.detach().requires_grad_()
    out = K.upsample_concat(fs, lab)
    fr = x.detach().clone().requires_grad_()
    ref = K.upsample_concat_reference(fr, lab)
    torch.testing.assert_close(out, ref, **tol)
    dy = grad_like(out.shape).to(DEV)
    torch.testing.assert_close(torch.autograd.grad(out, fs, dy)[0], torch.autograd.grad(ref, fr, dy)[0],
                               **GRAD_TOL[torch.float32])
    # the layout pyramid; the fused convs (the layout's own conv, and conv1 before the upsampling)
    for got, want in zip(K.area_pyramid(lab, 2), K.area_pyramid_reference(lab, 2)):
        torch.testing.assert_close(got, want, **tol)
    conv_w = torch.randn(8, c, 3, 3, generator=g).to(DEV) / 8
    with torch.no_grad():
        got, m, r = K.conv_norm(x, K.pack_conv_weight(conv_w), None, (mean, rstd, wt, b))
    torch.testing.assert_close(got, K.conv_norm_reference(x, conv_w, None, (mean, rstd, wt, b)), atol=1e-4, rtol=1e-4)
    up_w = torch.randn(8, c + cl, 3, 3, generator=g).to(DEV) / 10
    with torch.no_grad():
        got = K.upsample_conv(x, lab, *K.pack_upsample_conv_weight(up_w, c), stats=False)
    torch.testing.assert_close(got, K.upsample_conv_reference(x, lab, up_w), atol=1e-4, rtol=1e-4)


def test_a_batch_beyond_the_grid_limit_runs_the_torch_path(monkeypatch):
    """Most kernels put the batch on a grid axis that CUDA limits to 65535: a larger batch takes
    every operator's torch path (the same values) instead of a launch that would fail. Here the
    limit is lowered to 2: a batch of 3 launches nothing and matches the references, forward and
    backward; a batch of 2 launches the kernels of every module (the upsampling's programs then walk
    every row, so that batch x row blocks fit)."""
    import importlib
    modules = ("layer_norm_lrelu", "upsample_concat", "area_pyramid", "conv_norm", "upsample_conv")
    launched = set()

    def spy(name, go):
        def launch(kernel, *args, **kw):
            launched.add(name)
            return go(kernel, *args, **kw)
        return launch
    for name in modules:
        mod = importlib.import_module(f"crn_fast.kernels.{name}")
        monkeypatch.setattr(mod, "launch", spy(name, mod.launch))
    monkeypatch.setattr(K._runtime, "MAX_GRID_BATCH", 2)
    g = torch.Generator().manual_seed(12)
    for n in (3, 2):
        launched.clear()
        x, lab = torch.randn(n, 6, 3, 5, generator=g).to(DEV), torch.rand(n, 4, 6, 10, generator=g).to(DEV)
        assert K._runtime.runs_kernel(x) == (n == 2)
        _every_operator_matches_its_reference(x, lab, g, lambda shape: torch.randn(shape, generator=g))
        assert launched == (set(modules) if n == 2 else set())
    cfg = CRNConfig(widths=(8, 8, 4), num_classes=5, k=2)
    layout = one_hot(torch.randint(0, 5, (3, 16, 32), generator=g), 5).to(DEV)
    eager = CRN(cfg).to(DEV)
    fast = CRN(cfg, backend="triton", fused_conv={0: "fused", 1: "split", 2: "lowres"}, fused_head=True).to(DEV)
    fast.load_state_dict(eager.state_dict())
    launched.clear()
    with torch.no_grad():
        torch.testing.assert_close(fast(layout), eager(layout), atol=2e-3, rtol=0)
    assert not launched


def test_an_empty_batch_gives_empty_outputs():
    """A batch of 0 (eager's ops return empty results for it): every operator returns the empty
    outputs of its torch path instead of planning a launch over nothing (it raised IndexError),
    and the triton generator matches eager in every conv mode, with and without grad."""
    x, lab, w, b = torch.zeros(0, 6, 3, 5, device=DEV), torch.zeros(0, 4, 6, 10, device=DEV), \
        torch.ones(6, device=DEV), torch.zeros(6, device=DEV)
    xs = x.clone().requires_grad_()
    y = K.layer_norm_lrelu(xs, w, b)
    y.sum().backward()
    assert y.shape == x.shape and xs.grad.shape == x.shape
    mean, rstd = K.layer_norm_stats(x)
    assert mean.shape == rstd.shape == (0,)
    assert K.norm_lrelu(x, mean, rstd, w, b).shape == x.shape
    fs = x.clone().requires_grad_()
    out = K.upsample_concat(fs, lab)
    out.sum().backward()
    assert out.shape == (0, 10, 6, 10) and fs.grad.shape == x.shape
    assert K.norm_lrelu_upsample_concat(x, mean, rstd, w, b, lab, channels_multiple=8).shape == (0, 10, 6, 10)
    assert [t.shape for t in K.area_pyramid(lab, 2)] == [(0, 4, 6, 10), (0, 4, 3, 5)]
    with torch.no_grad():
        yc, m, r = K.conv_norm(x, K.pack_conv_weight(torch.ones(8, 6, 3, 3, device=DEV)), None, (mean, rstd, w, b))
        assert yc.shape == (0, 8, 3, 5) and m.shape == r.shape == (0,)
        assert K.upsample_conv(x, lab, *K.pack_upsample_conv_weight(torch.ones(8, 10, 3, 3, device=DEV), 6),
                               stats=False).shape == (0, 8, 6, 10)
    cfg = CRNConfig(widths=(8, 8, 4), num_classes=5, k=2)
    layout = torch.zeros(0, 5, 16, 32, device=DEV)
    for modes in (False, {0: "fused", 1: "split", 2: "lowres"}):
        model = CRN(cfg, backend="triton", fused_conv=modes, fused_head=True).to(DEV)
        with torch.no_grad():
            assert model(layout).shape == (0, 6, 16, 32)
    out = model(layout)
    out.sum().backward()
    assert out.shape == (0, 6, 16, 32) and all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("family, cases, seed", [(f, 2, 3) for f in ("layer_norm", "upsample", "fused_upsample",
                                                                       "pyramid", "conv", "upsample_conv")] +
                         [("generator", 1, 0)])  # a generator case costs 1-10 s in the interpreter: a small one
def test_fuzz_smoke(family, cases, seed, capsys):
    """tests/fuzz_kernels.py (random shapes, dtypes, formats and strided views against the torch
    references) runs: a few cases of each family here; a failed case is reported with its draws."""
    assert fuzz_kernels.run(cases, seed=seed, device=DEV, families=(family,)) == 0, capsys.readouterr().out
    assert f"{cases} cases (seed {seed}" in capsys.readouterr().out


def test_synthesize_with_the_triton_backend(tmp_path):
    from PIL import Image as PILImage
    from crn_fast import save_generator
    from crn_fast.labels import PALETTE
    from crn_fast.synthesize import main
    eager, _ = tiny_pair(k=1)
    save_generator(eager, tmp_path / "m.ckpt")
    label = tmp_path / "00100027.png"  # a colour label drawn here (no authors' files needed)
    PILImage.fromarray(PALETTE[torch.randint(0, 19, (64, 128), generator=torch.Generator().manual_seed(5))
                               .numpy()]).save(label)
    for backend in ("eager", "triton"):
        assert main(["--ckpt", str(tmp_path / "m.ckpt"), "--labels", str(label), "--out", str(tmp_path / backend),
                     "--resolution", "16x32", "--backend", backend]) == 0
    import numpy as np
    from PIL import Image
    a = np.asarray(Image.open(tmp_path / "eager" / "00100027.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "triton" / "00100027.png")).astype(int)
    assert np.abs(a - b).max() <= 1  # uint8 rounding of outputs equal to ~1e-3


# ----------------------------------------------------------------------------- the operators
def _op_cases(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, w, b = ln_inputs((2, 6, 4, 8), torch.float32, channels_last, seed=11)
    lab = torch.rand(2, 3, 8, 16, device=DEV).contiguous(memory_format=fmt)
    mean, rstd = K.layer_norm_stats(x)
    xt, wt, bt = ln_inputs((1, 8, 2, 64), torch.bfloat16, True, seed=12)
    ops = torch.ops.crn_fast
    grad_in = (x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(),
               b.detach().clone().requires_grad_())
    return [
        (ops.layer_norm_lrelu.default, (*grad_in, 1e-12, 0.2, 2)),
        (ops.layer_norm_lrelu_backward.default, (torch.randn_like(x), x, w, b, mean, rstd, 0.2, None)),
        (ops.layer_norm_stats.default, (x, 1e-12, 3)),
        (ops.norm_lrelu.default, (x, mean, rstd, w, b, 0.2, 2)),
        (ops.upsample_concat.default, (grad_in[0], lab)),
        (ops.upsample_concat_backward.default, (torch.randn(2, 9, 8, 16, device=DEV), [2, 6, 4, 8])),
        (ops.norm_lrelu_upsample_concat.default, (x, mean, rstd, w, b, lab, 0.2, 16 if channels_last else 1)),
        (ops.area_pyramid.default, (lab, 3)),
        (ops.conv_norm.default, (x, K.pack_conv_weight(torch.randn(5, 6, 3, 3, device=DEV)), None, mean, rstd, w, b,
                                 0.2, 1e-12, True, False)),
        (ops.conv_norm.default, (x, K.pack_conv_weight(torch.randn(3, 6, 1, 1, device=DEV)),
                                 torch.randn(3, device=DEV), None, None, None, None, 0.2, 1e-12, False, True)),
        (ops.upsample_conv.default, (x, lab, *K.pack_upsample_conv_weight(torch.randn(4, 9, 3, 3, device=DEV), 6),
                                     1e-12, True)),
        # bf16 with 8 channels and rows of 64 pixels: the TMA kernel where it runs, traced as the pointer one
        (ops.conv_norm.default, (xt, K.pack_conv_weight(torch.randn(8, 8, 3, 3, device=DEV, dtype=torch.bfloat16)),
                                 None, *K.layer_norm_stats(xt), wt, bt, 0.2, 1e-12, True, False)),
    ]


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_operator_passes_opcheck(channels_last):
    """torch.library.opcheck: schema, autograd registration and fake-tensor (meta) implementation of
    each crn_fast:: operator. AOTAutograd tracing (test_aot_dispatch_dynamic) needs the compiled
    kernels (GPU); on CPU it runs in test_operators_trace_with_aot_autograd_on_their_torch_path."""
    utils = None if DEV == "cuda" else ("test_schema", "test_autograd_registration", "test_faketensor")
    for op, args in _op_cases(channels_last):
        result = torch.library.opcheck(op, args, test_utils=utils) if utils else torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def _dynamic_cuda_cases():
    """Every operator's host code on fake CUDA tensors whose batch is symbolic (a torch.SymInt), as
    torch.export's dynamic batch, torch.compile(dynamic=True) and opcheck's dynamic test trace it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    mode = FakeTensorMode(shape_env=ShapeEnv())
    n = mode.from_tensor(torch.empty(2), symbolic_context=StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC])).shape[0]
    cl, ops = torch.channels_last, torch.ops.crn_fast
    with mode:
        def e(*shape, fmt=torch.contiguous_format):
            return torch.empty(*shape, device="cuda", memory_format=fmt)
        x, lab, w, b, mean, rstd = e(n, 16, 8, 16, fmt=cl), e(n, 20, 16, 32, fmt=cl), e(16), e(16), e(n), e(n)
        yield mode, n, {
            "layer_norm_lrelu": lambda: ops.layer_norm_lrelu(x, w, b, 1e-12, 0.2, None),
            "layer_norm_stats": lambda: ops.layer_norm_stats(x, 1e-12, None),
            "norm_lrelu": lambda: ops.norm_lrelu(x, mean, rstd, w, b, 0.2, None),
            "upsample_concat": lambda: ops.upsample_concat(x, lab),
            "norm_lrelu_upsample_concat": lambda: ops.norm_lrelu_upsample_concat(x, mean, rstd, w, b, lab, 0.2, 8),
            "area_pyramid": lambda: ops.area_pyramid(lab, 3),
            "conv_norm": lambda: ops.conv_norm(x, e(9, 16, 8), None, mean, rstd, w, b, 0.2, 1e-12, True, False),
            "upsample_conv": lambda: ops.upsample_conv(x, lab, e(16, 72), e(9, 20, 8), 1e-12, True)}


def _as_an_h100(monkeypatch):
    """The facts the launch planning asks of the GPU (SM count, compute capability), as an H100's."""
    from types import SimpleNamespace
    props = SimpleNamespace(multi_processor_count=132, name="NVIDIA H100", major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))


def test_conv_tiles_are_untuned_where_the_batch_is_symbolic():
    """The conv kernels' tile choice keys on the shape; traced with a symbolic batch the key cannot
    be hashed (torch.SymInt), so the untuned tile runs instead of a TypeError at the lookup."""
    import importlib
    C, UC = (importlib.import_module(f"crn_fast.kernels.{m}") for m in ("conv_norm", "upsample_conv"))
    for mode, n, _ in _dynamic_cuda_cases():
        with mode:
            x = torch.empty(n, 16, 8, 16, device="cuda", memory_format=torch.channels_last)
            assert isinstance(n, torch.SymInt) and x.device.type == "cuda"
            key = (n, 16, 8, 8, 16, 9, x.dtype, False, True, False, False)
            assert C._choose(key, x, 16, 8, None, "not here") == C._heuristic(16, 8, x.dtype, 16, False)
            assert UC._tile((n, 16, 8, 20, 8, 16, 16, 32, x.dtype, True), x, 0.48, 8, None) == UC.TILES[0]


@pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="fake CUDA tensors need a CUDA build of torch")
def test_every_operator_traces_with_a_symbolic_batch_on_a_cuda_device(monkeypatch):
    """On a CUDA build (no GPU needed: the device's SM count is given), every operator runs its
    launch planning on fake CUDA tensors with a symbolic batch and returns outputs of that batch."""
    _as_an_h100(monkeypatch)
    for mode, n, cases in _dynamic_cuda_cases():
        for name, fn in cases.items():
            out = fn()
            outs = out if isinstance(out, (tuple, list)) else [out]
            assert all(o.shape[0] == n for o in outs if o.numel() or o.dim()), (name, [o.shape for o in outs])


@pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="fake CUDA tensors need a CUDA build of torch")
# the derived-weight cache keys on data_ptr(), which torch warns about for a FakeTensor: only this
# test calls the host code on fake tensors outside a trace (under torch.compile or torch.export,
# is_compiling() skips the cache)
@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor:UserWarning")
@pytest.mark.parametrize("preset, size", [("tiny", (32, 64)), ("1024p", (1024, 2048))])
def test_fast_path_host_code_runs_every_conv_mode_on_a_cuda_device(preset, size, monkeypatch):
    """The triton backend's no-grad forward on fake CUDA tensors (a CUDA build, no GPU; the kernels
    are not run): every conv mode and the fused head plan their launches (grids, tiles, padded
    buffers, derived weights) for the preset's real shapes, and launch the kernels they should."""
    import importlib
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call
    _as_an_h100(monkeypatch)
    monkeypatch.setattr(K, "triton_unavailable_reason", lambda: None)  # as on a GPU
    launched = []
    for name in ("conv_norm", "upsample_conv"):
        mod = importlib.import_module(f"crn_fast.kernels.{name}")
        monkeypatch.setattr(mod, "launch", lambda kernel, grid, *a, _real=mod.launch, **kw: (
            launched.append(kernel.__name__), _real(kernel, grid, *a, **kw)))
    model = CRN.from_preset(preset, backend="triton").eval()
    assert model.backend == "triton"
    for conv, head, kernels in ((False, False, set()), ("fused", False, {"_conv_kernel"}),
                                ("split", True, {"_conv_kernel"}), ("lowres", False, {"_upconv_kernel"}),
                                ("lowres", True, {"_upconv_kernel", "_conv_kernel"}),
                                ({0: "fused", 1: "lowres", 2: "split"}, False, {"_conv_kernel", "_upconv_kernel"})):
        model.fused_conv, model.fused_head = conv, head
        launched.clear()
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            params = {k: torch.empty_strided(v.shape, v.stride(), device="cuda", dtype=torch.bfloat16)
                      for k, v in model.state_dict().items()}
            x = torch.empty(1, 20, *size, device="cuda", dtype=torch.bfloat16, memory_format=torch.channels_last)
            y = functional_call(model, params, (x,))
        assert y.shape == (1, 3 * model.config.k, *size) and y.device.type == "cuda", (conv, head)
        assert set(launched) - {"_finalize_kernel"} == kernels, (conv, head, launched)


@pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="fake CUDA tensors need a CUDA build of torch")
def test_training_step_host_code_runs_on_a_cuda_device(monkeypatch):
    """The triton backend's training forward (with grad) on fake CUDA tensors at 1024p's shapes (the
    kernels are not run): the layout carries 4 zero channels down the cascade (every conv1 input a
    multiple of 8: 24, then C + 24); and the upsample backward that each concat's gradient gets
    gathers its exact 2x in pixel pairs, the gradient's pixel stride given as a multiple of 8 (the
    autograd engine needs a real device, so the backward operator is called on its own)."""
    import importlib
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call
    _as_an_h100(monkeypatch)
    monkeypatch.setattr(K, "triton_unavailable_reason", lambda: None)  # as on a GPU
    U = importlib.import_module("crn_fast.kernels.upsample_concat")
    launched = []
    monkeypatch.setattr(U, "launch", lambda kernel, grid, *a, _real=U.launch, **kw: (
        launched.append((kernel.__name__, kw)), _real(kernel, grid, *a, **kw)))
    model = CRN.from_preset("1024p", backend="triton").train()
    seen = []
    for mod in model.refine:
        mod.register_forward_pre_hook(lambda m, args: seen.append(args[1].shape))
    with FakeTensorMode(allow_non_fake_inputs=True):
        params = {k: torch.empty_strided(v.shape, v.stride(), device="cuda").requires_grad_()
                  for k, v in model.named_parameters()}
        x = torch.empty(1, 20, 1024, 2048, device="cuda", memory_format=torch.channels_last)
        y = functional_call(model, params, (x,))
        assert y.requires_grad and y.shape == (1, 3, 1024, 2048)
        assert [s[1] for s in seen] == [24] * 9
        launched.clear()
        for width, (_, _, h, w) in zip(model.config.widths, seen[1:]):
            grad = torch.empty(1, width + 24, h, w, device="cuda", memory_format=torch.channels_last)
            df = torch.ops.crn_fast.upsample_concat_backward(grad, [1, width, h // 2, w // 2])
            assert df.shape == (1, width, h // 2, w // 2) and df.is_contiguous(memory_format=torch.channels_last)
    assert len(launched) == 8 and all(name == "_bwd_cl_kernel" and kw["PAIRS_H"] and kw["PAIRS_W"] and
                                      kw["PIX"] == 8 for name, kw in launched), launched


def test_operators_trace_with_aot_autograd_on_their_torch_path():
    """Without Triton on the tensors (CPU, no interpreter) every operator runs its torch
    implementation: all four opcheck tests, dynamic shapes included, pass on it."""
    code = (
        "import torch, sys\n"
        "sys.path.insert(0, %r)\n"
        "from test_kernels import _op_cases\n"
        "for cl in (False, True):\n"
        "    for op, args in _op_cases(cl):\n"
        "        r = torch.library.opcheck(op, args)\n"
        "        assert all(v == 'SUCCESS' for v in r.values()), (op, r)\n"
        "print('ok')\n") % os.path.dirname(__file__)
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def _captured_ops(model, layout) -> set[str]:
    """The crn_fast:: operators Dynamo captures in model(layout), after asserting one graph and no
    graph break."""
    torch._dynamo.reset()
    explain = torch._dynamo.explain(model)(layout)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    return {str(n.target).split(".")[1] for g in explain.graphs for n in g.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("crn_fast.")}


def test_compiled_triton_generator_has_no_graph_break():
    """torch.compile(fullgraph=True) captures the whole triton generator, its crn_fast:: operators
    included (Dynamo traces them through their fake implementations), and the captured graph
    computes what eager does. The backend here is 'eager' because Inductor cannot run Triton on
    CPU tensors; on a GPU the same check runs with Inductor (benchmarks/gpu_session.sh)."""
    eager, fast = tiny_pair(k=1, seed=3)
    eager, fast = eager.to(DEV).eval(), fast.to(DEV).eval()
    layout = one_hot(torch.randint(0, 20, (1, 16, 32), generator=torch.Generator().manual_seed(2))).to(DEV)
    for grad, wanted in ((True, {"area_pyramid", "layer_norm_lrelu", "upsample_concat"}),
                         (False, {"area_pyramid", "layer_norm_lrelu", "layer_norm_stats", "norm_lrelu_upsample_concat"})):
        with torch.set_grad_enabled(grad):
            assert _captured_ops(fast, layout) == wanted, grad
    compiled = torch.compile(fast, fullgraph=True, backend="eager" if DEV == "cpu" else "inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(layout), eager(layout), atol=2e-3, rtol=1e-5)
    # every conv a crn_fast operator too, the weights packed inside the graph; split: + norm_lrelu;
    # lowres: conv1 of modules 1.. as upsample_conv (no upsample-concat), module 0 and conv2 cuDNN's
    fused_ops = {"area_pyramid", "conv_norm", "norm_lrelu_upsample_concat"}
    for mode, wanted in (("fused", fused_ops), ("split", fused_ops | {"norm_lrelu"}),
                         ("lowres", {"area_pyramid", "layer_norm_lrelu", "layer_norm_stats", "norm_lrelu",
                                     "upsample_conv"})):
        fast.fused_conv = mode
        with torch.no_grad():
            assert _captured_ops(fast, layout) == wanted, mode
            compiled = torch.compile(fast, fullgraph=True, backend="eager" if DEV == "cpu" else "inductor")
            torch.testing.assert_close(compiled(layout), eager(layout), atol=2e-3, rtol=1e-5)
