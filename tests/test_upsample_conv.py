"""conv1 with the feature weights applied before the upsampling (kernels/upsample_conv.py) against
the direct conv of the upsample-concat, and the generator's "lowres" mode built on it against eager.
On CPU through Triton's interpreter (small shapes).

Tolerances: fp32 1e-4 relative to the output's magnitude (another summation order); bf16/fp16
within 2 ulps of it: the GEMM's result g is rounded once to the input's dtype, the output once
(measured: ~1.8 output ulps against the direct bf16 conv's ~1). Statistics: those of y as stored.
"""
import importlib

import pytest
import torch

pytest.importorskip("triton")
from crn_fast import CRN, CRNConfig, CRNError  # noqa: E402
from crn_fast import kernels as K  # noqa: E402
from crn_fast.labels import one_hot  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not K.can_run(torch.empty(0, device=DEV)), reason="Triton cannot run here")


def inputs(n, cf, cl, cout, h, w, dtype, seed=0, channels_last=True):
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    f = torch.randn(n, cf, h, w, generator=g).to(DEV, dtype).contiguous(memory_format=fmt)
    lab = torch.rand(n, cl, 2 * h, 2 * w, generator=g).to(DEV, dtype).contiguous(memory_format=fmt)
    wt = (torch.randn(cout, cf + cl, 3, 3, generator=g) / ((cf + cl) * 9) ** 0.5).to(DEV, dtype)
    return f, lab, wt


def ulps(ref: torch.Tensor, dtype) -> float:
    return {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, cf, cl, cout, h, w", [(2, 24, 20, 24, 3, 5), (1, 8, 3, 40, 2, 9), (1, 16, 20, 8, 4, 4)])
def test_upsample_conv_matches_the_direct_conv(dtype, n, cf, cl, cout, h, w):
    """y = conv(cat(up(f), label)) with the feature half applied at the low resolution: odd sizes,
    output channels past a channel block (40), fewer than a dot's 16 (8), 3 classes; and the
    statistics of y as stored, per sample."""
    f, lab, wt = inputs(n, cf, cl, cout, h, w, dtype)
    y, mean, rstd = K.upsample_conv(f, lab, *K.pack_upsample_conv_weight(wt, cf))
    ref = K.upsample_conv_reference(f, lab, wt)
    assert y.shape == (n, cout, 2 * h, 2 * w) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert (y.float() - ref).abs().max().item() <= ulps(ref, dtype)
    var, mu = torch.var_mean(y.double(), dim=(1, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mu, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(var + 1e-12), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, cf, cl, cout, h, w", [(2, 24, 20, 24, 3, 5), (1, 16, 20, 40, 4, 13)])
def test_the_blend_on_tensor_cores_matches_the_direct_conv(monkeypatch, dtype, n, cf, cl, cout, h, w):
    """A dot tile (KW > 0): each tap's bilinear blend as [segment, KW source columns] x [KW, Cout]
    dots, the weights rounded to the input's dtype; within the same 2 ulps as the gathers, at odd
    sizes, with a segment past the image's right edge (13 -> 26 columns, 16-pixel segments) and
    channels past a block. fp32 keeps the gathers (its dots would run on CUDA cores)."""
    U = importlib.import_module("crn_fast.kernels.upsample_conv")
    monkeypatch.setattr(U, "_INTERPRETER_TILE", (16, 16, 4, 16))
    assert U._fits(U._INTERPRETER_TILE, dtype, (w - 1) / (2 * w - 1), cout)
    assert not U._fits(U._INTERPRETER_TILE, torch.float32, 0.5, cout) and not U._fits((16, 16, 4, 8), dtype, 0.5)
    with monkeypatch.context() as m:
        m.setenv(U.DOT_ENV, "0")  # the switch that rules the dots out
        assert not U._fits(U._INTERPRETER_TILE, dtype, 0.5, cout) and U._fits(U.TILES[0], dtype, 0.5, cout)
    f, lab, wt = inputs(n, cf, cl, cout, h, w, dtype, seed=3)
    y, mean, rstd = K.upsample_conv(f, lab, *K.pack_upsample_conv_weight(wt, cf))
    ref = K.upsample_conv_reference(f, lab, wt)
    assert (y.float() - ref).abs().max().item() <= ulps(ref, dtype)
    torch.testing.assert_close(mean.double(), y.double().mean(dim=(1, 2, 3)), atol=1e-6, rtol=1e-5)
    f32 = K.upsample_conv(f.float(), lab.float(), *K.pack_upsample_conv_weight(wt.float(), cf), stats=False)
    assert (f32 - ref).abs().max().item() <= ulps(ref, torch.float32)  # the gathers


def test_upsample_conv_takes_nchw_inputs_and_any_layout_strides_and_skips_the_statistics():
    """Features and layout in NCHW, and a layout whose pixels are not dense runs of its classes (a
    channel slice of a channels_last tensor): the kernel's strided layout loads, where a dense
    channels_last layout (the other tests) takes the vector loads of a compile-time run length."""
    f, lab, wt = inputs(1, 6, 20, 16, 3, 4, torch.float32, channels_last=False)
    assert lab.is_contiguous()
    wide = torch.zeros(1, 24, 6, 8, device=DEV).contiguous(memory_format=torch.channels_last)
    wide[:, 2:22] = lab
    for label in (lab, wide[:, 2:22]):
        y = K.upsample_conv(f, label, *K.pack_upsample_conv_weight(wt, 6), stats=False)
        torch.testing.assert_close(y, K.upsample_conv_reference(f, lab, wt), atol=1e-4, rtol=1e-4)


def test_upsample_conv_weight_packing_round_trips_and_bad_shapes_are_one_error():
    from crn_fast.kernels.upsample_conv import _unpack
    wt = torch.randn(5, 7, 3, 3)
    wg, wl = K.pack_upsample_conv_weight(wt, 4)
    assert wg.shape == (4, 45) and wl.shape == (9, 3, 5) and torch.equal(_unpack(wg, wl), wt)
    assert torch.equal(wg[:, 5 * 4:5 * 5], wt[:, :4, 1, 1].t())  # tap 4 is the centre (dy = dx = 0)
    with pytest.raises(ValueError, match="0 < Cf < Cf \\+ CL"):
        K.pack_upsample_conv_weight(wt, 7)
    with pytest.raises(ValueError, match="upsample_conv: features \\(N, Cf, h, w\\)"):
        K.upsample_conv(torch.zeros(1, 3, 2, 2, device=DEV), torch.zeros(1, 3, 4, 4, device=DEV),
                        *(t.to(DEV) for t in (wg, wl)))


def _pair(dtype, widths=(12, 10, 8), seed=0):
    torch.manual_seed(seed)
    eager = CRN(CRNConfig(widths=widths, k=2)).eval()
    with torch.no_grad():  # non-trivial norm parameters
        for p in eager.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast = CRN(eager.config, backend="triton", fused_conv="lowres").eval()
    fast.load_state_dict(eager.state_dict())
    return eager, fast.to(DEV, dtype)


@pytest.mark.parametrize("dtype, tile", [(torch.float32, None), (torch.bfloat16, None),
                                         (torch.bfloat16, (16, 16, 4, 16))])
def test_lowres_generator_matches_eager(monkeypatch, dtype, tile):
    """fused_conv="lowres": modules 1.. run conv1 as upsample_conv (no upsample-concat), module 0
    the cuDNN convs; with the gathers, and with the blend on the tensor cores (a dot tile). At most
    eager's own error in that dtype against the fp64 model; fp32 to 2e-3."""
    if tile:
        monkeypatch.setattr(importlib.import_module("crn_fast.kernels.upsample_conv"), "_INTERPRETER_TILE", tile)
    eager, fast = _pair(dtype)
    assert fast.conv_plan() == {1: "lowres", 2: "lowres"} and "fused_conv='lowres'" in repr(fast)
    layout = one_hot(torch.randint(0, 20, (2, 16, 32), generator=torch.Generator().manual_seed(1)))
    with torch.no_grad(), torch.profiler.profile() as prof:
        ours = fast(layout.to(DEV)).double().cpu()
    names = [e.name for e in prof.events()]
    assert names.count("crn_fast::upsample_conv") == 2 and "crn_fast::norm_lrelu_upsample_concat" not in names, names
    with torch.no_grad():
        exact = eager.double()(layout.double())
        theirs = eager.to(dtype)(layout.to(dtype)).double()
    assert ours.shape == (2, 6, 16, 32) and not torch.allclose(ours[0], ours[1])
    err = (ours - exact).abs().max().item()
    if dtype == torch.float32:
        assert err < 2e-3, err
    else:
        assert err <= max(1.0, (theirs - exact).abs().max().item()), err


@pytest.mark.parametrize("modules", [{1: "lowres"}, {0: "fused", 1: "lowres", 2: "split"}, {2: "lowres"}])
def test_lowres_mixes_with_the_other_modes(modules):
    eager, fast = _pair(torch.float32, seed=3)
    fast.fused_conv = modules
    assert fast.conv_plan() == modules
    layout = one_hot(torch.randint(0, 20, (1, 16, 32), generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        torch.testing.assert_close(fast(layout.to(DEV)).cpu(), eager(layout), atol=2e-3, rtol=1e-5)


def test_module_0_cannot_be_lowres():
    with pytest.raises(CRNError, match="module 0 cannot run 'lowres'.*give it 'cudnn', 'fused' or 'split'"):
        CRN(CRNConfig(widths=(4, 4, 4)), backend="triton", fused_conv={0: "lowres"})


def test_auto_times_lowres_from_module_1_and_uses_it():
    eager, fast = _pair(torch.float32, seed=5)
    fast.fused_conv = "auto"
    layout = one_hot(torch.randint(0, 20, (1, 16, 32), generator=torch.Generator().manual_seed(6))).to(DEV)
    calls = []

    def timer(fn, module, mode):
        fn()
        calls.append((module, mode))
        return 1.0 if mode == "lowres" else 2.0
    assert fast.tune_fused_conv(layout, timer=timer, modes=("cudnn", "lowres")) == {1: "lowres", 2: "lowres"}
    assert calls == [(0, "cudnn"), (1, "cudnn"), (1, "lowres"), (2, "cudnn"), (2, "lowres")]  # module 0: no lowres
    with torch.no_grad():
        torch.testing.assert_close(fast(layout), eager.to(DEV)(layout), atol=2e-3, rtol=1e-5)


def test_auto_choice_persists_in_the_tuning_file(tmp_path, monkeypatch):
    """fused_conv="auto" keeps its per-module choice in the CRN_FAST_CONV_TUNING file beside the
    tiles (per GPU model, layout shape and dtype, model widths): a later process runs the stored
    modes without timing any, so it runs what the first one measured. (The CPU stands in for the
    GPU: timing and the device's name are faked; the modes run through the interpreter.)"""
    import json
    R = importlib.import_module("crn_fast.kernels._runtime")
    T = importlib.import_module("crn_fast.kernels._tuning")
    path = tmp_path / "tiles.json"
    monkeypatch.setenv(T.TUNING_FILE_ENV, str(path))
    monkeypatch.setattr(T, "_FILES", {})
    monkeypatch.setattr(T, "device_tag", lambda d: "NVIDIA H200 | triton 3.6.0")
    monkeypatch.setattr(R, "can_time", lambda t: True)
    # per module, the modes in CONV_MODES order (module 0 without lowres): 0 cudnn, 1 lowres, 2 split
    clock = iter([1.0, 2.0, 3.0, 4.0, 4.0, 4.0, 1.0, 4.0, 4.0, 1.0, 4.0])
    monkeypatch.setattr(R, "cuda_time", lambda fn: (fn(), next(clock))[1])
    eager, fast = _pair(torch.float32, widths=(4, 4, 4), seed=7)
    fast.fused_conv = "auto"
    layout = one_hot(torch.randint(0, 20, (1, 8, 16), generator=torch.Generator().manual_seed(8))).to(DEV)
    with torch.no_grad():
        first = fast(layout)
    assert fast.conv_plan(layout) == {1: "lowres", 2: "split"} and next(clock, None) is None
    stored = json.loads(path.read_text())["devices"]["NVIDIA H200 | triton 3.6.0"]
    assert stored["conv_modes|1|20|8|16|torch.float32|4-4-4|cudnn+fused+split+lowres"] == [0, 3, 2], stored

    monkeypatch.setattr(T, "_FILES", {})  # a new process: nothing is timed
    monkeypatch.setattr(R, "cuda_time", lambda fn: pytest.fail("timed although the choice is stored"))
    again = CRN(eager.config, backend="triton", fused_conv="auto").eval().to(DEV)
    again.load_state_dict(eager.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(layout), first, atol=0, rtol=0)
    assert again.conv_plan(layout) == {1: "lowres", 2: "split"}
    with torch.no_grad():
        torch.testing.assert_close(first.cpu(), eager(layout.cpu()), atol=2e-3, rtol=1e-5)
    # another model (widths), or a stored choice that is not one for this model: measured again
    other = CRN(CRNConfig(widths=(4, 4, 2), k=2), backend="triton", fused_conv="auto").eval().to(DEV)
    assert other._stored_choice_key([layout])[-2] == "4-4-2"
    assert again._parse_modes([3, 0, 0]) is None and again._parse_modes([0, 3]) is None
    assert again._parse_modes([2, 3, 1]) == ["split", "lowres", "fused"]


def test_tuned_tiles_persist_in_the_tuning_file(tmp_path, monkeypatch):
    """The kernel's tile, timed per shape on a GPU, is kept in the CRN_FAST_CONV_TUNING file beside
    conv_norm's: a later process reads it instead of timing the candidates; a stored value that is
    not one of today's tiles is timed again. (A meta tensor stands for the GPU's: the lookup is the
    point here, the GPU session times real tiles.)"""
    import json
    U = importlib.import_module("crn_fast.kernels.upsample_conv")
    T = importlib.import_module("crn_fast.kernels._tuning")
    path = tmp_path / "tiles.json"
    monkeypatch.setenv(T.TUNING_FILE_ENV, str(path))
    monkeypatch.setattr(T, "_FILES", {})
    monkeypatch.setattr(U, "_TUNED", {})
    monkeypatch.setattr(U, "tuning_allowed", lambda t: True)
    monkeypatch.setattr(T, "device_tag", lambda d: "NVIDIA H200 | triton 3.6.0")
    monkeypatch.setattr(T, "cuda_time", lambda fn: fn())
    timed = []
    scale = (1024 - 1) / (2048 - 1)
    fit = [t for t in U.TILES if U._fits(t, torch.bfloat16, scale, 32)]  # module 8: 32 channels out
    assert fit == [(32, 32, 4, 0), (64, 32, 8, 0), (128, 32, 8, 0)], fit  # no 128-channel dot tile

    def run(tile):
        timed.append(tile)
        return 1.0 if tile == fit[-1] else 2.0
    key, gpu = (1, 128, 32, 20, 512, 1024, 1024, 2048, torch.bfloat16, True), torch.empty(0, device="meta",
                                                                                         dtype=torch.bfloat16)
    assert U._tile(key, gpu, scale, 32, run) == fit[-1] and timed == fit
    stored = json.loads(path.read_text())["devices"]["NVIDIA H200 | triton 3.6.0"]
    assert stored == {"upsample_conv|1|128|32|20|512|1024|1024|2048|torch.bfloat16|True": list(fit[-1])}
    timed.clear()
    monkeypatch.setattr(T, "_FILES", {})  # a new process
    monkeypatch.setattr(U, "_TUNED", {})
    assert U._tile(key, gpu, scale, 32, run) == fit[-1] and timed == []
    for old in ([32, 32, 4], [32, 128, 8, 32]):  # an older kernel's tile; a tile that does not fit this conv
        path.write_text(json.dumps({"format": 1, "devices": {"NVIDIA H200 | triton 3.6.0": {
            "upsample_conv|1|128|32|20|512|1024|1024|2048|torch.bfloat16|True": old}}}))
        monkeypatch.setattr(T, "_FILES", {})
        monkeypatch.setattr(U, "_TUNED", {})
        timed.clear()
        assert U._tile(key, gpu, scale, 32, run) == fit[-1] and timed == fit


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("cf, cout, h, w", [(1024, 512, 64, 128), (512, 128, 256, 512), (128, 32, 512, 1024)])
def test_gpu_real_module_shapes(monkeypatch, cf, cout, h, w):
    """conv1 of 1024p's modules 5, 7 and 8 (bf16), with the untuned gather tile and every tensor-core
    blend tile that fits the shape: within 2 ulps of the direct conv in fp32, statistics those of y.
    (The other gather tiles run the same code; each compiles in tests/gpu_compile_check.py.)"""
    U = importlib.import_module("crn_fast.kernels.upsample_conv")
    f, lab, wt = inputs(1, cf, 20, cout, h, w, torch.bfloat16, seed=2)
    ref = K.upsample_conv_reference(f, lab, wt)
    tiles = [t for t in U.TILES if t == U.TILES[0] or t[3] and U._fits(t, torch.bfloat16, (w - 1) / (2 * w - 1), cout)]
    assert len(tiles) == {512: 4, 128: 3, 32: 1}[cout], tiles
    for tile in tiles:
        monkeypatch.setattr(U, "_tile", lambda *args: tile)
        y, mean, _ = K.upsample_conv(f, lab, *K.pack_upsample_conv_weight(wt, cf))
        assert (y.float() - ref).abs().max().item() <= ulps(ref, torch.bfloat16), tile
        torch.testing.assert_close(mean, y.float().mean(dim=(1, 2, 3)), atol=1e-3, rtol=1e-3)
