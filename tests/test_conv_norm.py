"""The fused conv (kernels/conv_norm.py) against its torch reference, and the generator path built
on it (CRN(fused_conv=True)) against eager. On CPU through Triton's interpreter (small shapes).

Tolerances: fp32 1e-4 absolute on O(1..10) outputs (IEEE products, different summation order);
bf16/fp16 within 2 ulps of the output's magnitude (the kernel rounds once, from fp32 accumulators;
the reference is fp32 evaluated on the same rounded inputs). Statistics: fp32 rounding of the
merge, relative 1e-5 (fp32) or of y's rounding (bf16).
"""
import importlib
import os

import pytest
import torch

triton = pytest.importorskip("triton")
from crn_fast import CRN, CRNConfig  # noqa: E402
from crn_fast import kernels as K  # noqa: E402
from crn_fast.labels import one_hot  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not K.can_run(torch.empty(0, device=DEV)), reason="Triton cannot run here")


def inputs(n, cin, cout, h, w, k, dtype, seed=0, pad_to=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).to(DEV, dtype)
    if pad_to:  # a channel slice of a wider channels_last buffer, as the upsample-concat writes it
        buf = torch.randn(n, h, w, pad_to, generator=g).to(DEV, dtype).permute(0, 3, 1, 2)
        buf[:, :cin] = x
        x = buf[:, :cin]
    else:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(DEV, dtype)
    norm = (torch.randn(n, generator=g).to(DEV) * 0.3, (torch.rand(n, generator=g) + 0.5).to(DEV),
            (torch.randn(cin, generator=g) * 0.5 + 1).to(DEV, dtype),
            (torch.randn(cin, generator=g) * 0.3).to(DEV, dtype))
    bias = (torch.randn(cout, generator=g) * 0.1).to(DEV, dtype)
    return x, wt, norm, bias


def ulps(ref: torch.Tensor, dtype) -> float:
    return {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k, with_norm, head", [(3, False, False), (3, True, False), (1, True, True)])
def test_conv_norm_matches_reference(dtype, k, with_norm, head):
    x, wt, norm, bias = inputs(2, 20, 24, 5, 7, k, dtype)
    norm = norm if with_norm else None
    bias = bias if head else None
    y, mean, rstd = K.conv_norm(x, K.pack_conv_weight(wt), bias, norm, head=head)
    ref = K.conv_norm_reference(x, wt, bias, norm, head=head)
    assert y.dtype == dtype and y.shape == (2, 24, 5, 7) and y.is_contiguous(memory_format=torch.channels_last)
    assert (y.float() - ref).abs().max().item() <= ulps(ref, dtype)
    # statistics of y as stored, merged over its tiles
    yf = y.float()
    want_mean = yf.mean(dim=(1, 2, 3))
    want_rstd = torch.rsqrt((yf - want_mean.view(-1, 1, 1, 1)).square().mean(dim=(1, 2, 3)) + 1e-12)
    torch.testing.assert_close(mean, want_mean, atol=1e-5 * max(1.0, yf.abs().max().item()), rtol=1e-5)
    torch.testing.assert_close(rstd, want_rstd, atol=0, rtol=1e-4)


def test_padded_pixel_stride_reads_only_the_real_channels():
    """The upsample-concat output of the fused path: 20 channels in 32-channel pixel rows whose pad
    channels hold garbage (here random values; in the model, uninitialised memory)."""
    x, wt, norm, _ = inputs(1, 20, 16, 6, 9, 3, torch.float32, seed=1, pad_to=32)
    assert x.stride() == (6 * 9 * 32, 1, 9 * 32, 32)
    y, mean, rstd = K.conv_norm(x, K.pack_conv_weight(wt), None, norm)
    torch.testing.assert_close(y, K.conv_norm_reference(x.contiguous(), wt, None, norm), atol=1e-4, rtol=1e-5)


def test_statistics_merge_many_tiles_with_a_large_offset():
    """Partials of 40 tiles around a mean of 1e3 with a spread of 0.1: merged relative to a
    tile mean and never as E[y^2]-E[y]^2, the rstd stays within 1e-3 of the fp64 value."""
    g = torch.Generator().manual_seed(2)
    x = torch.ones(1, 16, 20, 32).contiguous(memory_format=torch.channels_last).to(DEV)
    wt = torch.zeros(16, 16, 1, 1)
    wt[:, 0] = 1000.0
    wt += torch.randn(16, 16, 1, 1, generator=g) * 0.01
    x = x + torch.randn(x.shape, generator=g).to(DEV) * 0.1
    x = x.contiguous(memory_format=torch.channels_last)
    y, mean, rstd = K.conv_norm(x, K.pack_conv_weight(wt.to(DEV)))
    yd = y.double()
    exact_mean = yd.mean()
    exact_rstd = 1 / (yd - exact_mean).square().mean().sqrt()
    assert abs(mean.item() - exact_mean.item()) < 1e-3
    assert abs(rstd.item() / exact_rstd.item() - 1) < 1e-3


def test_conv_norm_rejects_mismatched_shapes():
    x, wt, _, _ = inputs(1, 8, 8, 4, 4, 3, torch.float32)
    with pytest.raises(ValueError, match=r"\(k\*k, Cin, Cout\).*\(1, 8, 4, 4\) and \(9, 6, 8\)"):
        K.conv_norm(x, K.pack_conv_weight(wt[:, :6]))
    with pytest.raises(ValueError, match="k 1 or 3"):
        K.pack_conv_weight(torch.zeros(4, 4, 5, 5))
    assert torch.equal(K.unpack_conv_weight(K.pack_conv_weight(wt)), wt)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k, with_norm, head", [(3, False, False), (3, True, False), (1, True, True)])
def test_tma_kernel_matches_reference(dtype, k, with_norm, head):
    """The TMA kernel (16-bit, 16-byte strides): batch 2, rows of 40 pixels in 16-pixel boxes (the
    last one partly past the row: the hardware's zero fill and the masked store), Cin 40 in 16-wide
    blocks, Cout 24 in 16-wide tiles, a padded pixel stride, every border tap."""
    x, wt, norm, bias = inputs(2, 40, 24, 5, 40, k, dtype, seed=11, pad_to=48)
    assert K.tma_unavailable_reason(x, K.pack_conv_weight(wt)) is None
    norm = norm if with_norm else None
    bias = bias if head else None
    with K.pinned_config((16, 16, 16, 4, 1, True)):
        y, mean, _ = K.conv_norm(x, K.pack_conv_weight(wt), bias, norm, head=head)
    ref = K.conv_norm_reference(x, wt, bias, norm, head=head)
    assert y.shape == (2, 24, 5, 40) and y.is_contiguous(memory_format=torch.channels_last)
    assert (y.float() - ref).abs().max().item() <= ulps(ref, dtype)
    torch.testing.assert_close(mean, y.float().mean(dim=(1, 2, 3)), atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("k", [3, 1])
def test_tma_norm_reads_bf16_channel_pairs_exactly(k, monkeypatch):
    """In bf16 the TMA kernel's input norm reads x, gamma and beta as int32 pairs of channels and
    unpacks them with a shift and a mask (BF16_PAIRS): the same bits as the per-element
    conversion; a padded pixel stride, partial K blocks and both border branches included. An odd
    channel count, or a gamma that is not dense, keeps the per-element path."""
    C = importlib.import_module("crn_fast.kernels.conv_norm")
    flags = []
    real_launch = C.launch
    monkeypatch.setattr(C, "launch", lambda kernel, *a, **kw: (flags.append(kw.get("BF16_PAIRS")),
                                                              real_launch(kernel, *a, **kw)))
    x, wt, norm, _ = inputs(2, 40, 24, 5, 40, k, torch.bfloat16, seed=13, pad_to=48)
    packed = K.pack_conv_weight(wt)
    with K.pinned_config((16, 16, 16, 4, 1, True)):
        paired = K.conv_norm(x, packed, None, norm)
        monkeypatch.setattr(C, "PAIRS", False)
        single = K.conv_norm(x, packed, None, norm)
    assert flags == [True, None, False, None]  # each conv, then its statistics' finalize
    for a, b in zip(paired, single):
        assert torch.equal(a, b)
    gamma = torch.stack([norm[2], norm[2]], 1)[:, 0]  # strided: not one run of pairs
    assert not C._bf16_pairs(x, gamma, norm[3]) and not C._bf16_pairs(x[:, :39], norm[2][:39], norm[3][:39])
    monkeypatch.setattr(C, "PAIRS", True)
    assert C._bf16_pairs(x, norm[2], norm[3]) and not C._bf16_pairs(x.half(), norm[2], norm[3])


def test_tma_kernel_is_the_untuned_choice_where_it_can_run(monkeypatch):
    """Where the TMA kernel can run, the untuned choice (the interpreter's small tile on CPU, the
    heuristic's on a GPU) launches it; rows narrower than every TMA tile, and 32-bit inputs, keep
    the pointer kernel."""
    C = importlib.import_module("crn_fast.kernels.conv_norm")
    monkeypatch.setenv("CRN_FAST_CONV_TUNE", "0")
    launched = []
    real_launch = C.launch
    monkeypatch.setattr(C, "launch", lambda kernel, *a, **kw: (launched.append(kernel.__name__),
                                                              real_launch(kernel, *a, **kw)))
    wide = 32 if DEV == "cpu" else 128  # as wide as the smallest TMA tile for 16 output channels
    for w, dtype, kernel in ((wide, torch.bfloat16, "_conv_tma_kernel"), (8, torch.bfloat16, "_conv_kernel"),
                             (wide, torch.float32, "_conv_kernel")):
        x, wt, norm, _ = inputs(1, 32, 16, 4, w, 3, dtype, seed=12)
        launched.clear()
        y = K.conv_norm(x, K.pack_conv_weight(wt), None, norm)[0]
        ref = K.conv_norm_reference(x, wt, None, norm)
        assert (y.float() - ref).abs().max().item() <= ulps(ref, dtype)
        assert launched == [kernel, "_finalize_kernel"], (w, dtype, launched)
    assert C._heuristic(1044, 1024, torch.bfloat16, 2048, tma=True).tma
    assert not C._heuristic(1044, 1024, torch.bfloat16, 2048, tma=False).tma
    assert not C._heuristic(148, 32, torch.bfloat16, 32, tma=True).tma  # rows narrower than every TMA tile


@pytest.mark.parametrize("case, reason", [
    ("fp32", "float32 input"), ("stride", r"strides \(1320, 1, 264, 44\).*not 16-byte multiples"),
    ("offset", "offset 4"), ("cout", "Cout 12 is not a multiple of 8"),
    ("slope", r"negative_slope 1.5 is outside \[0, 1\]"), ("off", "CRN_FAST_CONV_TMA=0 turns the TMA kernel off")])
def test_tma_kernel_says_why_it_cannot_run(case, reason, monkeypatch):
    """Each condition of a tensor map, named, and the switch that turns the TMA kernel off; a
    pinned TMA tile there is that error, not a silent fallback to pointer loads."""
    if case == "off":
        monkeypatch.setenv("CRN_FAST_CONV_TMA", "0")
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    cout, pad = 12 if case == "cout" else 16, 44 if case == "stride" else 48
    x, wt, _, _ = inputs(1, 40, cout, 5, 6, 3, dtype, seed=13, pad_to=pad)
    if case == "offset":
        x, wt = x[:, 4:], wt[:, 4:]
    packed = K.pack_conv_weight(wt)
    slope = 1.5 if case == "slope" else 0.2
    why = K.tma_unavailable_reason(x, packed, slope)
    import re
    assert why is not None and re.search(reason, why), why
    norm = (torch.zeros(1, device=DEV), torch.ones(1, device=DEV), torch.ones(x.shape[1], device=DEV, dtype=dtype),
            torch.zeros(x.shape[1], device=DEV, dtype=dtype))
    with pytest.raises(ValueError, match="the TMA kernel cannot run this conv: .*" + reason):
        with K.pinned_config((16, 16, 16, 4, 1, True)):
            K.conv_norm(x, packed, norm=norm, negative_slope=slope)
    y = K.conv_norm(x, packed, norm=norm, negative_slope=slope)[0]  # untuned: the pointer kernel
    ref = K.conv_norm_reference(x, wt, norm=norm, negative_slope=slope)
    assert (y.float() - ref).abs().max().item() <= ulps(ref, dtype)


def test_upsample_concat_pads_the_pixel_stride_on_request():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(1, 6, 4, 8, generator=g).to(DEV).contiguous(memory_format=torch.channels_last)
    lab = torch.rand(1, 5, 8, 16, generator=g).to(DEV).contiguous(memory_format=torch.channels_last)
    mean, rstd = K.layer_norm_stats(f)
    w, b = torch.ones(6, device=DEV), torch.zeros(6, device=DEV)
    plain = K.norm_lrelu_upsample_concat(f, mean, rstd, w, b, lab)
    padded = K.norm_lrelu_upsample_concat(f, mean, rstd, w, b, lab, channels_multiple=16)
    assert padded.shape == plain.shape == (1, 11, 8, 16)
    assert padded.stride() == (8 * 16 * 16, 1, 16 * 16, 16)
    assert torch.equal(padded, plain)


def _pair(dtype, k=2, seed=0, widths=(12, 10, 8)):
    torch.manual_seed(seed)
    eager = CRN(CRNConfig(widths=widths, k=k)).eval()
    with torch.no_grad():  # non-trivial norm parameters
        for p in eager.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast = CRN(eager.config, backend="triton", fused_conv=True).eval()
    fast.load_state_dict(eager.state_dict())
    return eager, fast.to(DEV, dtype)


@pytest.mark.parametrize("mode", ["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_conv_generator_matches_eager(dtype, mode, monkeypatch):
    """At most eager's own error in that dtype (bf16: ~5 on 0..255) against the fp64 model; fp32 to 2e-3.
    In bf16 the convs of the module with 8 channels and rows of 32 pixels run the TMA kernel.
    "split": conv1's output normalised by one norm_lrelu pass, conv2 without an input norm."""
    C = importlib.import_module("crn_fast.kernels.conv_norm")
    launched = []
    real_launch = C.launch
    monkeypatch.setattr(C, "launch", lambda kernel, *a, **kw: (launched.append(kernel.__name__),
                                                              real_launch(kernel, *a, **kw)))
    eager, fast = _pair(dtype)
    fast.fused_conv = mode
    layout = one_hot(torch.randint(0, 20, (1, 16, 32), generator=torch.Generator().manual_seed(1)))
    with torch.no_grad(), torch.profiler.profile() as prof:
        ours = fast(layout.to(DEV)).double().cpu()
    names = [e.name for e in prof.events()]
    assert names.count("crn_fast::conv_norm") == 7 and "aten::convolution" not in names, names
    assert names.count("crn_fast::norm_lrelu") == (3 if mode == "split" else 0), names
    with torch.no_grad():
        exact = eager.double()(layout.double())
        theirs = eager.to(dtype)(layout.to(dtype)).double()
    if DEV == "cpu":  # TMA: both bf16 convs of the last module (8 channels, rows of 32 pixels)
        assert launched.count("_conv_tma_kernel") == 2 * (dtype == torch.bfloat16), launched
    assert ours.shape == (1, 6, 16, 32)
    err = (ours - exact).abs().max().item()
    if dtype == torch.float32:
        assert err < 2e-3, err
    else:
        assert err <= max(1.0, (theirs - exact).abs().max().item()), err


def assert_same_images(a, b):
    """Two paths' 0..255 outputs: on CPU bit for bit; compiled, within a bf16 ulp of 0..255 (2)."""
    if DEV == "cpu":
        assert torch.equal(a, b)
    else:
        assert (a.float() - b.float()).abs().max().item() <= 2.0


def test_tma_and_pointer_kernels_give_the_same_generator():
    """A bf16 generator with 16/16/8 channels: on CPU four of its convs run the TMA kernel by
    default (a GPU's TMA tiles are wider than these rows); pinned to the pointer kernel, the output
    is the same (on CPU bit for bit: same products, same K order; compiled, within a bf16 ulp of
    the 0..255 output)."""
    _, fast = _pair(torch.bfloat16, widths=(16, 16, 8))
    layout = one_hot(torch.randint(0, 20, (1, 16, 32), generator=torch.Generator().manual_seed(1))).to(DEV)
    with torch.no_grad():
        tma = fast(layout)
        with K.pinned_config((32, 16, 16, 4, 1)):
            pointer = fast(layout)
    assert_same_images(tma, pointer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_and_fused_modules_give_the_same_generator(dtype):
    """"split" stores conv1's normalised output once (norm_lrelu) where "fused" normalises it on
    every load: the same values reach conv2 (on CPU bit for bit, batch 2, both dtypes; compiled,
    the TMA kernel's folded scale and shift may round differently: within a bf16 ulp of 0..255)."""
    _, fast = _pair(dtype, widths=(16, 16, 8))
    layout = one_hot(torch.randint(0, 20, (2, 8, 16), generator=torch.Generator().manual_seed(1))).to(DEV, dtype)
    with torch.no_grad():
        fast.fused_conv = "fused"
        fused = fast(layout)
        fast.fused_conv = "split"
        split = fast(layout)
    assert_same_images(fused, split)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_fused_head_matches_eager(memory_format):
    """fused_head with cuDNN convs: the last norm + leaky ReLU, the 1x1 head and the 0..255 scaling
    are one conv_norm kernel (batch 2, either memory format); its result is eager's, and the head
    is no longer a convolution of its own."""
    from torch.profiler import profile
    eager, fast = _pair(torch.float32)
    fast.fused_conv, fast.fused_head = False, True
    fast = fast.to(memory_format=memory_format)
    assert "fused_head=True" in repr(fast)
    layout = one_hot(torch.randint(0, 20, (2, 16, 32), generator=torch.Generator().manual_seed(4))).to(DEV)
    with torch.no_grad(), profile() as prof:
        ours = fast(layout)
    names = [e.name for e in prof.events()]
    assert names.count("aten::convolution") == 6 and names.count("crn_fast::conv_norm") == 1, names
    with torch.no_grad():
        torch.testing.assert_close(ours, eager.to(DEV)(layout), atol=2e-3, rtol=1e-5)


def test_fused_conv_repacks_after_a_weight_change_and_trains_on_the_reference_path():
    eager, fast = _pair(torch.float32, k=1, seed=4)
    layout = one_hot(torch.randint(0, 20, (1, 16, 32), generator=torch.Generator().manual_seed(2))).to(DEV)
    with torch.no_grad():
        before = fast(layout)
        for m in (eager, fast):
            m.head.weight.mul_(-1.0)  # in place: same storage, new version
        after = fast(layout)
        torch.testing.assert_close(after, eager.to(DEV)(layout), atol=2e-3, rtol=1e-5)
    assert not torch.allclose(before, after)
    assert len(fast._packed_weights) == 7  # one packed copy per conv, none for replaced versions
    import copy
    assert len(copy.deepcopy(fast)._packed_weights) == 0  # copies never carry them
    fast.double().float()  # moves and casts drop them
    assert len(fast._packed_weights) == 0
    out = fast.train()(layout)  # with grad: the differentiable triton path, not the fused convs
    out.mean().backward()
    assert fast.refine[0].conv1.weight.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("cin, cout, h, w", [(1044, 1024, 16, 32), (532, 128, 128, 256), (148, 32, 256, 512)])
def test_gpu_real_module_shapes(cin, cout, h, w):
    """1024p's conv shapes compiled and tuned on CUDA, bf16, against an fp32 cuDNN reference (no TF32)."""
    x, wt, norm, _ = inputs(1, cin, cout, h, w, 3, torch.bfloat16, pad_to=-(-cin // 16) * 16)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        ref = K.conv_norm_reference(x, wt, None, norm)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    y, mean, _ = K.conv_norm(x, K.pack_conv_weight(wt), None, norm)
    assert (y.float() - ref).abs().max().item() <= ulps(ref, torch.bfloat16)
    torch.testing.assert_close(mean, y.float().mean(dim=(1, 2, 3)), atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_gpu_second_process_reads_its_tiles_from_the_tuning_file(tmp_path):
    """Two fresh processes with CRN_FAST_CONV_TUNING set: the first tunes a conv (times its
    candidates) and stores the tile; the second takes the stored tile without timing any."""
    import subprocess
    import sys
    code = ("import torch\n"
            "from crn_fast import kernels as K\n"
            "x = torch.randn(1, 64, 32, 128, device='cuda', dtype=torch.bfloat16)"
            ".contiguous(memory_format=torch.channels_last)\n"
            "K.conv_norm(x, K.pack_conv_weight(torch.randn(64, 64, 3, 3, device='cuda', dtype=torch.bfloat16)))\n"
            "torch.cuda.synchronize()\n"
            "print(len(K.tuned_configs()), len(K.tuned_configs(timings=True)))\n")
    env = {**os.environ, "CRN_FAST_CONV_TUNING": str(tmp_path / "tiles.json"), "CRN_FAST_CONV_TUNE": "1"}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    assert [r.stdout.split()[-2:] for r in runs] == [["1", "1"], ["1", "0"]], [r.stdout for r in runs]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fused", "split"])
def test_gpu_fused_conv_1024p_generator_is_as_accurate_as_eager_bf16(mode):
    """Every module's convs as conv_norm kernels (on sm_90 the TMA kernel, its bf16 input norm
    reading channel pairs; "split": with the norm_lrelu pass), at 1024p's widths."""
    from crn_fast.config import get_preset
    torch.manual_seed(0)
    eager = CRN(get_preset("1024p")).to(DEV).eval()
    fast = CRN(get_preset("1024p"), backend="triton", fused_conv=mode).to(DEV).eval()
    fast.load_state_dict(eager.state_dict())
    layout = one_hot(torch.randint(0, 20, (1, 256, 512), generator=torch.Generator().manual_seed(1))).to(DEV)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            exact = eager(layout).double()
            eager_bf16 = (eager.bfloat16()(layout).double() - exact).abs().max().item()
            fused_bf16 = (fast.bfloat16()(layout).double() - exact).abs().max().item()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert fused_bf16 <= 1.5 * eager_bf16 + 1.0, (fused_bf16, eager_bf16)


def test_fused_conv_in_an_nchw_model_with_a_batch():
    """An NCHW model: the fused path still runs channels_last inside (the layout is converted once
    by conv_norm); two different layouts in one batch keep their own statistics."""
    eager, fast = _pair(torch.float32, k=1, seed=5)
    fast = fast.to(memory_format=torch.contiguous_format)
    ids = torch.randint(0, 20, (2, 16, 32), generator=torch.Generator().manual_seed(6))
    layout = one_hot(ids).contiguous()
    with torch.no_grad():
        ours = fast(layout.to(DEV)).cpu()
        theirs = eager(layout)
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-5)
    assert not torch.allclose(ours[0], ours[1])


@pytest.mark.parametrize("modules", [{1}, {0, 2}, {0: "split", 2: "fused"}, {1: "split", 2: "split"}])
def test_some_modules_fused_match_eager(modules):
    """Any mix of fused, split and cuDNN modules: the norm of a fused module's output is applied in
    a cuDNN module's upsample and the other way round; the head is fused with the last module."""
    eager, fast = _pair(torch.float32, k=1, seed=7)
    fast.fused_conv = modules
    assert fast.conv_plan() == (modules if isinstance(modules, dict) else dict.fromkeys(modules, "fused"))
    layout = one_hot(torch.randint(0, 20, (1, 16, 32), generator=torch.Generator().manual_seed(8)))
    with torch.no_grad():
        torch.testing.assert_close(fast(layout.to(DEV)).cpu(), eager(layout), atol=2e-3, rtol=1e-5)


def test_auto_picks_the_faster_variant_per_module_and_uses_it():
    """fused_conv='auto': tune_fused_conv times each module three ways (here with a given timer:
    "split" 'wins' at module 1, "fused" at module 2, cuDNN at module 0) and forward then runs that
    mix, equal to eager. Unmeasured shapes on CPU run the cuDNN convs (nothing to time there)."""
    eager, fast = _pair(torch.float32, k=1, seed=9)
    fast.fused_conv = "auto"
    layout = one_hot(torch.randint(0, 20, (1, 8, 16), generator=torch.Generator().manual_seed(10))).to(DEV)
    calls = []
    from crn_fast import CRNError
    fastest = {1: "split", 2: "fused"}

    def timer(fn, module, mode):
        fn()
        calls.append((module, mode))
        return 1.0 if fastest.get(module, "cudnn") == mode else 2.0
    assert fast.tune_fused_conv(layout, timer=timer) == fastest
    assert calls == [(0, m) for m in ("cudnn", "fused", "split")] + \
        [(i, m) for i in (1, 2) for m in ("cudnn", "fused", "split", "lowres")]  # lowres: modules 1..
    assert fast.fused_conv_choices == {(1, 8, 16, torch.float32, layout.device): fastest}
    assert fast.conv_plan(layout) == fastest and fast.conv_plan(layout[:, :, :4, :8]) == {}
    with pytest.raises(CRNError, match="chooses per layout size; pass the layout"):
        fast.conv_plan()
    with torch.no_grad():
        with torch.profiler.profile() as prof:
            ours = fast(layout)
        torch.testing.assert_close(ours, eager.to(DEV)(layout), atol=2e-3, rtol=1e-5)
        names = [e.name for e in prof.events()]  # module 0: cuDNN convs
        assert names.count("aten::convolution") == 2 and names.count("crn_fast::norm_lrelu") == 1, names
        other = one_hot(torch.randint(0, 20, (1, 16, 32), generator=torch.Generator().manual_seed(11))).to(DEV)
        fast(other)  # not measured: cuDNN everywhere, no choice recorded on CPU
    assert len(fast.fused_conv_choices) == (2 if DEV == "cuda" else 1)
    assert "fused_conv='auto'" in repr(fast)
    assert fast.tune_fused_conv(layout, timer=timer, modes=("cudnn", "fused")) == {2: "fused"}


def test_auto_skips_a_mode_that_fails_here_with_a_warning():
    """A Triton mode that raises on this GPU (here: "split" at module 1, from the timer) is not
    chosen and says so; the other modes are still compared. cuDNN failing is raised."""
    _, fast = _pair(torch.float32, k=1, seed=9)
    layout = one_hot(torch.randint(0, 20, (1, 16, 32), generator=torch.Generator().manual_seed(10))).to(DEV)

    def timer(fn, module, mode):
        if mode == "split" and module == 1:
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        return {"cudnn": 2.0, "fused": 3.0, "split": 1.0, "lowres": 4.0}[mode]
    with pytest.warns(RuntimeWarning, match="module 1 cannot run 'split' convs here.*OutOfResources"):
        assert fast.tune_fused_conv(layout, timer=timer) == {0: "split", 2: "split"}

    def broken(fn, module, mode):
        raise RuntimeError("cuDNN is broken")
    with pytest.raises(RuntimeError, match="cuDNN is broken"):
        fast.tune_fused_conv(layout, timer=broken)


def test_tile_tuning_skips_tiles_this_gpu_cannot_run():
    """The tile tuner times every candidate; one that Triton cannot launch here (OutOfResources:
    more shared memory than the SM has; a ptxas error) is skipped with its error kept, as Triton's
    autotuner does, instead of failing the forward. If every candidate fails, the first error is
    raised."""
    C = importlib.import_module("crn_fast.kernels.conv_norm")
    tiles = [C.Tile(256, 128, 64, 8, 3, True), C.Tile(128, 128, 64, 8, 3, True), C.Tile(64, 64, 64, 4, 3)]

    def run(tile):
        if tile.block_m == 256:
            raise triton.runtime.errors.OutOfResources(270336, 232448, "shared memory")
        return tile
    tune = importlib.import_module("crn_fast.kernels._tuning").tune
    best, timed, failed = tune("conv_norm", tiles, run, lambda fn: float(fn().block_n))
    assert best == tiles[2] and timed == {tiles[1]: 128.0, tiles[2]: 64.0}
    assert list(failed) == [tiles[0]] and "OutOfResources" in failed[tiles[0]] and "shared memory" in failed[tiles[0]]
    with pytest.raises(triton.runtime.errors.OutOfResources):
        tune("conv_norm", tiles[:1], run, lambda fn: fn())


def test_precompile_submits_every_candidate_and_never_fails_the_tuning(monkeypatch):
    """Before timing tiles one by one, the tuner compiles them all at once (Triton's
    AsyncCompileMode with a thread pool; on a GPU, each candidate's kernel.warmup). Best effort:
    a candidate that raises is left to fail when it is timed; CRN_FAST_PRECOMPILE=0 turns it off.
    The overlap itself needs a GPU driver (the GPU session's tuning rows)."""
    from crn_fast.kernels._runtime import PRECOMPILE_ENV, precompile
    if not hasattr(triton, "AsyncCompileMode"):
        pytest.skip("Triton < 3.4 has no AsyncCompileMode")
    seen = []

    def compile_one(item):
        assert triton.runtime._async_compile.active_mode.get() is not None  # inside the mode
        if item == "bad":
            raise ValueError("rejected before compiling")
        seen.append(item)
    assert precompile(["a", "bad", "b"], compile_one) == 2 and seen == ["a", "b"]
    assert triton.runtime._async_compile.active_mode.get() is None  # the mode is left behind
    assert precompile(["only"], compile_one) == 0  # nothing to overlap
    monkeypatch.setenv(PRECOMPILE_ENV, "0")
    assert precompile(["a", "b"], compile_one) == 0 and seen == ["a", "b"]


def test_tuned_tiles_persist_in_the_tuning_file(tmp_path, monkeypatch, caplog):
    """CRN_FAST_CONV_TUNING=FILE: each tile tuned on a GPU is added to the file (merged with what
    other processes stored, replaced atomically), and a later process reads it instead of tuning
    again, per GPU model and Triton version. A corrupt, foreign or unwritable file is one warning,
    never a failed forward; an entry that is not a tile of the kernel is ignored."""
    import json
    C = importlib.import_module("crn_fast.kernels.conv_norm")
    T = importlib.import_module("crn_fast.kernels._tuning")
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(T.TUNING_FILE_ENV, str(path))
    monkeypatch.setattr(T, "_FILES", {})
    monkeypatch.setattr(T, "_WARNED", set())
    monkeypatch.setattr(T, "device_tag", lambda device: device)  # "devices" named by their tags here
    key = (1, 532, 128, 512, 1024, 9, torch.bfloat16, True, True, False, True)
    h100, h200 = "NVIDIA H100 80GB HBM3 | triton 3.6.0", "NVIDIA H200 | triton 3.6.0"

    def stored(key, tag):
        return T.stored_tile("conv_norm", key, tag, C._parse_tile)
    T.store_tile("conv_norm", key, h100, C.Tile(128, 128, 64, 8, 3, True))
    T.store_tile("conv_norm", key[:1] + (148,) + key[2:], h100, C.Tile(64, 64, 64, 4, 3))
    T.store_tile("conv_norm", key, h200, C.Tile(256, 128, 64, 8, 3, True))
    data = json.loads(path.read_text())
    assert data["format"] == 1 and len(data["devices"][h100]) == 2
    # the file's first keys keep their text: files written before other kernels stored tiles still read
    assert data["devices"][h100]["1|532|128|512|1024|9|torch.bfloat16|True|True|False|True"] == [128, 128, 64, 8, 3,
                                                                                                 True]
    monkeypatch.setattr(T, "_FILES", {})  # a new process
    assert stored(key, h100) == C.Tile(128, 128, 64, 8, 3, True)
    assert stored(key, h200) == C.Tile(256, 128, 64, 8, 3, True)
    assert stored(key, "NVIDIA A100 | triton 3.6.0") is None
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind
    data["devices"][h100]["1|532|128|512|1024|9|torch.bfloat16|True|True|False|True"] = [128, 128, 64]
    path.write_text(json.dumps(data))
    monkeypatch.setattr(T, "_FILES", {})
    assert stored(key, h100) is None and stored(key, h200) is not None  # not a conv_norm tile: tuned again
    for bad, what in (("{not json", "cannot be read"), ('{"format": 0, "devices": {}}', "is not a crn_fast conv")):
        path.write_text(bad)
        monkeypatch.setattr(T, "_FILES", {})
        monkeypatch.setattr(T, "_WARNED", set())
        with caplog.at_level("WARNING", logger="crn_fast.kernels"):
            caplog.clear()
            assert stored(key, h100) is None and stored(key, h100) is None
        assert [r.getMessage() for r in caplog.records if what in r.getMessage()] and len(caplog.records) == 1
    monkeypatch.setenv(T.TUNING_FILE_ENV, str(tmp_path / "missing_dir" / "t.json"))
    with caplog.at_level("WARNING", logger="crn_fast.kernels"):
        caplog.clear()
        T.store_tile("conv_norm", key, h100, C.Tile(64, 64, 64, 4, 3))  # cannot be written: a warning, no exception
    assert "cannot be written" in caplog.text


@pytest.mark.parametrize("bad, msg", [("fast", "True, False, 'auto', 'fused', 'split', 'lowres', module indices 0..2"),
                                      ({0, 3}, r"module indices must be in 0..2, got \[0, 3\]"),
                                      ({3: "split"}, r"module indices must be in 0..2, got \[3\]"),
                                      ({0: "fast"}, r"unknown mode in \{0: 'fast'\}; the modes are cudnn, fused, "
                                                    "split, lowres"),
                                      (1.5, "got 1.5")])
def test_bad_fused_conv_setting_is_one_clear_error(bad, msg):
    from crn_fast import CRNError
    with pytest.raises(CRNError, match=msg):
        CRN(CRNConfig(widths=(4, 4, 4)), fused_conv=bad)
    with pytest.raises(CRNError, match="modes must be a non-empty subset of"):
        CRN(CRNConfig(widths=(4, 4, 4)), backend="triton").tune_fused_conv(torch.zeros(1, 20, 16, 32), modes=("x",))
