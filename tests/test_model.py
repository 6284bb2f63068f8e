"""The reference generator: architecture, semantics, input validation, FLOPs, checkpoint files."""
import struct

import pytest
import torch
import torch.nn.functional as F

from crn_fast import CRN, CheckpointError, CRNConfig, CRNError, PRESETS, layout_pyramid, load_generator, \
    save_generator
from crn_fast.flops import crn_flops
from crn_fast.labels import one_hot


def random_layout(n, h, w, classes=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return one_hot(torch.randint(0, classes, (n, h, w), generator=g), classes)


def slow_crn(model, layout):
    """The CRN written out directly from the paper/authors' code, one op at a time."""
    n_mod = len(model.refine)
    levels = [layout]
    for _ in range(n_mod - 1):  # TF resize_area at half size: mean of each 2x2 block
        l = levels[-1]
        levels.append(l.unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2)))
    levels = levels[::-1]
    x = None
    for i, m in enumerate(model.refine):
        lab = levels[i]
        if x is not None:
            x = torch.cat([F.interpolate(x, size=lab.shape[-2:], mode="bilinear", align_corners=True), lab], 1)
        else:
            x = lab
        for conv, norm in ((m.conv1, m.norm1), (m.conv2, m.norm2)):
            y = F.conv2d(x, conv.weight, padding=1)
            mu = y.mean((1, 2, 3), keepdim=True)
            var = ((y - mu) ** 2).mean((1, 2, 3), keepdim=True)
            y = (y - mu) / torch.sqrt(var + 1e-12) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
            x = torch.maximum(0.2 * y, y)
    return (F.conv2d(x, model.head.weight, model.head.bias) + 1) / 2 * 255


def test_forward_matches_direct_implementation():
    torch.manual_seed(0)
    model = CRN(CRNConfig(widths=(8, 6, 5), k=2))
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    layout = random_layout(2, 16, 24)
    out = model(layout)
    assert out.shape == (2, 6, 16, 24)
    torch.testing.assert_close(out, slow_crn(model, layout), atol=1e-3, rtol=1e-5)


def test_no_conv_bias_and_head_bias():
    model = CRN.from_preset("tiny")
    assert all(m.conv1.bias is None and m.conv2.bias is None for m in model.refine)
    assert model.head.bias is not None and model.head.kernel_size == (1, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_head_scaling_rounds_once(dtype):
    """(y + 1) / 2 * 255 of the head's output: as written in fp32; a 16-bit y is scaled in fp32 and
    rounded once (three 16-bit ops would round y + 1 to steps of 1/128 in bf16 first)."""
    torch.manual_seed(0)
    model = CRN(CRNConfig(widths=(8, 6), k=1)).to(dtype)
    heads = []
    model.head.register_forward_hook(lambda mod, args, out: heads.append(out))
    with torch.no_grad():
        out = model(random_layout(1, 8, 16).to(dtype))
    y = heads[0]
    assert out.dtype == dtype
    expect = ((y.float() + 1.0) / 2.0 * 255.0).to(dtype)
    assert torch.equal(out, expect)
    if dtype == torch.bfloat16:  # on this scale the difference is visible: whole steps at 128..255
        assert not torch.equal(out, (y + 1.0) / 2.0 * 255.0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_head_scaling_is_the_fp32_formula_rounded_once_for_every_16_bit_value(device):
    """to_pixels' one-pass form (addcmul) gives the bits of ((y + 1) / 2 * 255 in fp32, rounded
    once) for every finite bf16 value in [-4, 4] and a dense sweep of fp16, on CPU and CUDA, in
    channels_last as the head's output comes."""
    from crn_fast.model import to_pixels
    every_bf16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for y in (every_bf16[torch.isfinite(every_bf16) & (every_bf16.abs() <= 4)],
              torch.linspace(-4, 4, 300001).to(torch.float16)):
        y = y[: y.numel() // 6 * 6].reshape(1, 3, 2, -1).to(device).contiguous(memory_format=torch.channels_last)
        out = to_pixels(y)
        assert out.dtype == y.dtype and out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, ((y.float() + 1.0) / 2.0 * 255.0).to(y.dtype)), y.dtype


def test_auto_backend_is_triton_on_cuda_and_eager_elsewhere():
    """The CLIs' default: Triton's kernels where they run compiled, torch's ops on CPUs (where the
    kernels would only run through the interpreter); an explicit backend is never overridden."""
    from crn_fast import kernels
    from crn_fast.model import choose_backend
    assert choose_backend("auto", "cpu") == "eager" and choose_backend("auto", torch.device("cpu")) == "eager"
    assert choose_backend("auto", torch.device("cuda", 1)) == ("triton" if kernels.HAS_TRITON else "eager")
    assert choose_backend("eager", "cuda") == "eager" and choose_backend("triton", "cpu") == "triton"


def test_layout_pyramid_is_recursive_2x2_average():
    x = torch.rand(1, 3, 8, 16)
    pyr = layout_pyramid(x, 4)
    assert [p.shape[-1] for p in pyr] == [2, 4, 8, 16]
    assert torch.equal(pyr[-1], x)
    torch.testing.assert_close(pyr[0], x.view(1, 3, 1, 8, 2, 8).mean((3, 5)))


def test_use_ops_names_what_an_ops_namespace_lacks():
    from types import SimpleNamespace
    from crn_fast.kernels import REFERENCE_OPS
    m = CRN.from_preset("tiny")
    partial = SimpleNamespace(layer_norm_lrelu=REFERENCE_OPS.layer_norm_lrelu, upsample_concat=REFERENCE_OPS.upsample_concat)
    with pytest.raises(CRNError, match="has no area_pyramid; it needs layer_norm_lrelu, upsample_concat and area_pyramid"):
        m.use_ops(partial)
    assert m.use_ops(REFERENCE_OPS) is m


@pytest.mark.parametrize("name,params", [("1024p", 98.67e6), ("512p", 98.62e6), ("256p", 97.88e6)])
def test_preset_parameter_counts(name, params):
    n = sum(p.numel() for p in CRN.from_preset(name).parameters())
    assert abs(n - params) / params < 1e-3


def test_flop_counts_match_the_stated_numbers():
    assert round(crn_flops(PRESETS["1024p"], 1024, 2048) / 1e12, 3) == 3.161
    assert round(crn_flops(PRESETS["256p"], 256, 512) / 1e12, 2) == 2.15
    # doubling the batch doubles it; halving H and W quarters the conv part
    c = PRESETS["tiny"]
    assert crn_flops(c, 64, 128, batch=2) == 2 * crn_flops(c, 64, 128)


def test_flop_count_matches_conv_shapes_by_hooks():
    model = CRN.from_preset("tiny")
    flops = []

    def hook(mod, inp, out):
        flops.append(2 * out.numel() * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1])
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    model(random_layout(1, 32, 64))
    assert sum(flops) == crn_flops(model.config, 32, 64)


@pytest.mark.parametrize("bad,msg", [
    (torch.zeros(20, 64, 128), "4-D"),
    (torch.zeros(1, 19, 64, 128), "19 channels"),
    (torch.zeros(1, 20, 60, 128), r"multiples of 2\^4 = 16 .*; the nearest valid size is 64x128\.$"),
    (torch.zeros(1, 20, 8, 8), "multiples .* the nearest valid size is 16x16"),
    (torch.zeros(1, 20, 1023, 2040), "the nearest valid size is 1024x2048"),
    (torch.zeros(1, 20, 64, 128, dtype=torch.long), "float"),
    (torch.zeros(1, 64, 128, dtype=torch.long), r"label ids\? one-hot them with crn_fast.labels.one_hot\(ids, 20\)"),
    (torch.zeros(1, 1, 64, 128, dtype=torch.uint8),
     r"has 1 channel but .*: label ids of torch.uint8\? one-hot them with crn_fast.labels.one_hot\(ids, 20\)"),
])
def test_bad_input_raises_one_clear_error(bad, msg):
    with pytest.raises(CRNError, match=msg):
        CRN.from_preset("tiny")(bad)


def test_a_config_holds_whole_numbers_only():
    """widths, base_size, num_classes and k are whole numbers: numpy's are taken as ints; a float
    (2.0, or 8.7 that int() truncated to 8), a string or a bool is a CRNError naming the field."""
    import numpy as np
    c = CRNConfig(widths=np.array([8, 8]), k=np.int32(2), base_size=[2, 4])
    assert c.widths == (8, 8) and type(c.k) is int and c.base_size == (2, 4)
    for kw, msg in [({"widths": (8, 8.7)}, r"widths must be a list of integers, got \(8, 8.7\)"),
                    ({"widths": "88"}, "widths must be a list of integers, got '88'"),
                    ({"widths": (8,), "k": 2.0}, "k must be an integer, got 2.0"),
                    ({"widths": (8,), "num_classes": True}, "num_classes must be an integer, got True"),
                    ({"widths": (8,), "base_size": (4, "8")}, "base_size must be a list of integers")]:
        with pytest.raises(CRNError, match=msg):
            CRNConfig(**kw)
    with pytest.raises(CRNError, match="k must be an integer, got '3'"):
        CRN.from_preset("tiny", k="3")


@pytest.mark.parametrize("config,msg", [
    ("tiny", r"got str 'tiny'; a preset by name: CRN.from_preset\(name\)$"),
    ({"widths": [8]}, r"got dict .*; from a dict: CRN\(CRNConfig.from_dict\(d\)\)$")])
def test_a_config_that_is_not_one_is_a_clear_error(config, msg):
    with pytest.raises(CRNError, match="CRN's config must be a CRNConfig, " + msg):
        CRN(config)


def test_any_multiple_of_the_stride_runs():
    model = CRN.from_preset("tiny")
    assert model(random_layout(1, 16, 16)).shape == (1, 3, 16, 16)
    assert model(random_layout(1, 48, 80)).shape == (1, 3, 48, 80)


def test_save_load_roundtrip(tmp_path):
    model = CRN(CRNConfig(widths=(8, 4), k=3, name="mine"))
    for p in model.parameters():
        p.data.normal_()
    path = save_generator(model, tmp_path / "m.ckpt")
    loaded = load_generator(path)
    assert loaded.config == model.config
    x = random_layout(1, 8, 16)
    assert torch.equal(loaded(x), model(x))
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_checkpoint_file_holds_no_pickle(tmp_path):
    path = save_generator(CRN.from_preset("tiny"), tmp_path / "m.ckpt")
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert b'"config"' in path.read_bytes()[8:8 + header_len]  # safetensors JSON header with our config


def test_corrupt_truncated_and_foreign_checkpoints(tmp_path):
    path = save_generator(CRN.from_preset("tiny"), tmp_path / "m.ckpt")
    data = path.read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.ckpt").write_bytes(b"\x00\x01garbage" * 10)
    torch.save({"a": torch.zeros(2)}, tmp_path / "torch.pt")
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    for name, msg in [("trunc.ckpt", "not a readable"), ("garbage.ckpt", "not a readable"),
                      ("torch.pt", r"a PyTorch file \(torch.save\), not a crn_fast generator"), ("other.safetensors", "not a crn_fast generator"),
                      ("missing.ckpt", "does not exist")]:
        with pytest.raises(CheckpointError, match=msg):
            load_generator(tmp_path / name)


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CRNError, match="cannot write"):
        save_generator(CRN.from_preset("tiny"), blocker / "sub" / "m.ckpt")


@pytest.mark.parametrize("mean, std", [(1e4, 0.0), (1e3, 0.1), (1e5, 1e-3)])
def test_eager_layer_norm_is_accurate_for_large_means(mean, std):
    """TF's order (mean first, then the centred variance): plain F.group_norm on CPU is off by 2 for
    a constant 1e4 and by ~2000 at mean 1e5, std 1e-3; the reference stays at fp32 rounding."""
    from crn_fast.kernels import layer_norm_lrelu_reference
    g = torch.Generator().manual_seed(0)
    x = mean + std * torch.randn(2, 8, 16, 16, generator=g)
    w, b = torch.ones(8), torch.linspace(-1, 1, 8)
    exact = layer_norm_lrelu_reference(x.double(), w.double(), b.double())
    assert (layer_norm_lrelu_reference(x, w, b).double() - exact).abs().max() < 1e-4


def test_preset_fields_override_and_config_conflicts_are_refused():
    """from_preset('tiny', k=3) builds 3 images (it once silently built 1); a config together with
    a shape argument is one clear error instead of a silently ignored argument."""
    m = CRN.from_preset("tiny", k=3)
    assert m.config.k == 3 and m.head.out_channels == 9 and m.config.widths == CRN.from_preset("tiny").config.widths
    with pytest.raises(CRNError, match=r"CRN got a config and num_classes, k: give one"):
        CRN(m.config, num_classes=21, k=2)
    assert CRN(widths=(4, 4), k=2).config.num_classes == 20
