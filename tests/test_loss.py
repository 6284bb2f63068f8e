"""Eq. 1-3 against direct, slow implementations written here; VGG-19 loading."""
import numpy as np
import pytest
import torch

from crn_fast.errors import CRNError
from crn_fast.labels import one_hot
from crn_fast.loss import LAMBDA_PRESETS, CRNLoss, diversity_loss, hindsight_loss, layer_errors
from crn_fast.vgg import FEATURE_LAYERS, VGG19Features, load_vgg19


@pytest.fixture(scope="module")
def vgg():
    return load_vgg19("random", seed=3)


def feats(vgg, img):
    return [img] + vgg(img)


def slow_layer_loss(vgg, fake, real, lam):
    """Eq. 1 for one image pair: sum_l lambda_l * mean|Phi_l(I) - Phi_l(g)|."""
    total = 0.0
    for l, (a, b) in enumerate(zip(feats(vgg, fake[None]), feats(vgg, real[None]))):
        total = total + lam[l] * (a - b).abs().mean()
    return total


def test_perceptual_loss_eq1(vgg):
    torch.manual_seed(0)
    out, target = torch.rand(2, 3, 32, 48) * 255, torch.rand(2, 3, 32, 48) * 255
    loss, terms = CRNLoss(vgg, "perceptual", "1024p")(out, target)
    lam = LAMBDA_PRESETS["1024p"]
    expect = (slow_layer_loss(vgg, out[0], target[0], lam) + slow_layer_loss(vgg, out[1], target[1], lam)) / 2
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-5)
    assert set(terms) == {"pixel", "conv1_2", "conv2_2", "conv3_2", "conv4_2", "conv5_2"}
    # 0-d tensors, detached, left on the device: reading them (a wait for a GPU) is the logger's choice
    assert all(v.shape == () and not v.requires_grad and v.device == loss.device for v in terms.values())
    torch.testing.assert_close(torch.stack(list(terms.values())).sum(), expect, rtol=1e-4, atol=1e-4)


def test_hindsight_loss_eq2(vgg):
    torch.manual_seed(1)
    k = 3
    out, target = torch.rand(2, 3 * k, 32, 32) * 255, torch.rand(2, 3, 32, 32) * 255
    loss, _ = CRNLoss(vgg, "hindsight", "256p")(out, target)
    lam = LAMBDA_PRESETS["256p"]
    per = [[slow_layer_loss(vgg, out[n, 3 * u:3 * u + 3], target[n], lam) for u in range(k)] for n in range(2)]
    expect = sum(min(p) for p in per) / 2
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-5)


def test_diversity_loss_eq3(vgg):
    torch.manual_seed(2)
    k, h, w = 2, 32, 32
    out, target = torch.rand(1, 3 * k, h, w) * 255, torch.rand(1, 3, h, w) * 255
    layout = one_hot(torch.randint(0, 20, (1, h, w)))
    loss, _ = CRNLoss(vgg, "diversity", "256p")(out, target, layout)
    lam = LAMBDA_PRESETS["256p"]
    # direct: for each class p, mask = layout channel area-downsampled to each layer's size
    real = feats(vgg, target)
    per = torch.zeros(k, 20)
    for u in range(k):
        fake = feats(vgg, out[:, 3 * u:3 * u + 3])
        for l, (a, b) in enumerate(zip(fake, real)):
            d = (a - b).abs().mean(1)[0]  # mean over channels
            s = layout.shape[-1] // d.shape[-1]
            mask = torch.nn.functional.avg_pool2d(layout, s)[0] if s > 1 else layout[0]
            for p in range(20):
                per[u, p] += lam[l] * (mask[p] * d).mean()
    expect = 0.999 * per.min(0).values.sum() + 0.001 * per.mean(0).sum()
    torch.testing.assert_close(loss, expect, rtol=1e-4, atol=1e-4)


def test_min_gives_gradient_only_to_the_best_output():
    per_class = torch.tensor([[[1.0, 5.0, 2.0], [3.0, 1.0, 9.0]]], requires_grad=True)  # (N=1, k=2, P=3)
    diversity_loss(per_class, min_weight=1.0, mean_weight=0.0).backward()
    assert per_class.grad.tolist() == [[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]]
    per_output = torch.tensor([[4.0, 2.0, 3.0]], requires_grad=True)
    hindsight_loss(per_output).backward()
    assert per_output.grad.tolist() == [[0.0, 1.0, 0.0]]


def test_vgg_is_frozen_and_real_features_take_no_grad(vgg):
    crit = CRNLoss(vgg, "perceptual")
    out = (torch.rand(1, 3, 32, 32) * 255).requires_grad_()
    target = (torch.rand(1, 3, 32, 32) * 255).requires_grad_()
    loss, _ = crit(out, target)
    loss.backward()
    assert out.grad is not None and target.grad is None
    assert all(p.grad is None and not p.requires_grad for p in crit.vgg.parameters())
    crit.train()
    assert not crit.vgg.training


def test_auto_lambdas_balance_terms(vgg):
    crit = CRNLoss(vgg, "perceptual", "auto").train()
    out, target = torch.rand(1, 3, 32, 32) * 255, torch.rand(1, 3, 32, 32) * 255
    _, terms = crit(out, target)
    # after the first step each term is divided by its own magnitude: all ~1
    assert all(abs(float(v) - 1) < 1e-4 for v in terms.values()), terms
    first = crit.running.clone()
    out2 = torch.rand(1, 3, 32, 32) * 255
    errors = layer_errors(crit._features(out2), crit._features(target))
    crit(out2, target)  # then a running mean, momentum 0.99
    torch.testing.assert_close(crit.running, 0.99 * first + 0.01 * errors[0])


def test_unknown_options_are_clear_errors(vgg):
    with pytest.raises(CRNError, match="valid: perceptual"):
        CRNLoss(vgg, "style")
    with pytest.raises(CRNError, match="6 values"):
        CRNLoss(vgg, "perceptual", (1.0, 2.0))
    with pytest.raises(CRNError, match="no VGG-19 weights"):
        load_vgg19(None)


@pytest.mark.parametrize("kind", ["perceptual", "diversity"])
def test_mismatched_shapes_are_clear_errors_not_broadcasts(vgg, kind):
    """A target batch of 1 for 2 outputs was broadcast silently (every output trained toward one
    image); a target of another size, in HWC, or an output that is not 3k channels failed deep in
    torch. Each is now one CRNError naming the shape needed."""
    loss = CRNLoss(vgg, kind, "1024p")
    lay = one_hot(torch.randint(0, 19, (2, 16, 32), generator=torch.Generator().manual_seed(0)))
    out, target = torch.rand(2, 6, 16, 32) * 255, torch.rand(2, 3, 16, 32) * 255
    loss(out, target, lay)  # k = 2: fine
    for args, msg in [((out, target[:1], lay),
                       r"target must be \(N, 3, H, W\) = \(2, 3, 16, 32\) .* got \(1, 3, 16, 32\)$"),
                      ((out, target[..., :8, :16], lay), r"got \(2, 3, 8, 16\)$"),
                      ((out, target.permute(0, 2, 3, 1), lay), r"got \(2, 16, 32, 3\): channels last\? "
                                                               r"target.permute\(0, 3, 1, 2\)$"),
                      ((out[:, :4], target, lay), r"output must be the generator's \(N, 3k, H, W\) images, got shape "
                                                  r"\(2, 4, 16, 32\)$"),
                      ((out, target, lay[:1]), r"layout must be .* N, H, W = 2, 16, 32; got \(1, 20, 16, 32\)$")]:
        with pytest.raises(CRNError, match=msg):
            loss(*args)


def test_vgg_keys_match_torchvision_and_load(tmp_path):
    vgg = VGG19Features()
    keys = list(vgg.state_dict())
    assert keys[0] == "features.0.weight" and keys[-1] == "features.34.bias" and len(keys) == 32
    assert FEATURE_LAYERS == {"conv1_2": 3, "conv2_2": 8, "conv3_2": 13, "conv4_2": 22, "conv5_2": 31}
    state = {k: torch.randn_like(v) for k, v in vgg.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's file has the classifier too
    torch.save(state, tmp_path / "vgg19-dcbb9e9d.pth")
    loaded = load_vgg19(tmp_path / "vgg19-dcbb9e9d.pth")
    assert loaded.normalization == "torchvision"
    assert torch.equal(loaded.features[0].weight, state["features.0.weight"])
    assert isinstance(loaded.features[4], torch.nn.AvgPool2d)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CRNError, match="not a torchvision vgg19"):
        load_vgg19(tmp_path / "bad.pth")


def test_vgg_weights_as_safetensors_load_and_wrong_files_are_named(tmp_path):
    """The same state dict as .safetensors loads as the .pth does; a crn_fast generator, a pickled
    module (torch.save(model)) and a file of another kind each get one line saying what they are."""
    from safetensors.torch import save_file
    from crn_fast import CRN, CRNConfig, save_generator
    state = {k: torch.randn_like(v) for k, v in VGG19Features().state_dict().items()}
    save_file(state, str(tmp_path / "vgg19.safetensors"))
    loaded = load_vgg19(tmp_path / "vgg19.safetensors")
    assert loaded.normalization == "torchvision" and torch.equal(loaded.features[0].weight, state["features.0.weight"])
    save_generator(CRN(CRNConfig(widths=(8, 8), k=1)), tmp_path / "model.ckpt")
    torch.save(torch.nn.Conv2d(1, 1, 1), tmp_path / "module.pth")
    (tmp_path / "notes.pth").write_text("hello")
    for name, msg in [("model.ckpt", "is a crn_fast generator, not VGG-19 weights (give a torchvision vgg19-*.pth"),
                      ("module.pth", "holds a pickled torch.nn.modules.conv.Conv2d, not a state dict: crn_fast "
                                     "loads weights only, never pickled code (save the model's state_dict() instead)"),
                      ("notes.pth", "is not a torch state dict or safetensors file")]:
        with pytest.raises(CRNError) as e:
            load_vgg19(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name} {msg}") and "\n" not in str(e.value), str(e.value)
        assert "weights_only" not in str(e.value)


def test_matconvnet_mat_loads(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    from crn_fast.vgg import _matconvnet_names
    rng = np.random.default_rng(0)
    vgg = VGG19Features()
    convs = [m for m in vgg.features if isinstance(m, torch.nn.Conv2d)]
    layers = np.empty((1, len(convs) + 1), dtype=object)
    dt = [("name", object), ("type", object), ("weights", object)]
    ref = {}
    for i, (name, conv) in enumerate(zip(_matconvnet_names(), convs)):
        w = rng.standard_normal((3, 3, conv.in_channels, conv.out_channels)).astype(np.float32)
        b = rng.standard_normal((conv.out_channels, 1)).astype(np.float32)
        ws = np.empty((1, 2), dtype=object)
        ws[0, 0], ws[0, 1] = w, b
        s = np.zeros((1, 1), dtype=dt)
        s[0, 0] = (np.array([name]), np.array(["conv"]), ws)
        layers[0, i] = s
        ref[name] = (w, b)
    s = np.zeros((1, 1), dtype=dt)
    s[0, 0] = (np.array(["relu1_1"]), np.array(["relu"]), np.zeros((1, 0)))
    layers[0, -1] = s
    scipy_io.savemat(tmp_path / "imagenet-vgg-verydeep-19.mat", {"layers": layers})
    loaded = load_vgg19(tmp_path / "imagenet-vgg-verydeep-19.mat")
    assert loaded.normalization == "matconvnet"
    w, b = ref["conv3_2"]
    conv = [m for m in loaded.features if isinstance(m, torch.nn.Conv2d)][5]
    np.testing.assert_array_equal(conv.weight.numpy(), w.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(conv.bias.numpy(), b.ravel())


def test_vgg_runs_channels_last_and_computes_the_same_features():
    """load_vgg19 gives the network in channels_last (cuDNN's and oneDNN's faster conv layout) and
    puts any input in it: the features are those of the NCHW network, in channels_last, whatever
    the image's format."""
    vgg = load_vgg19("random", seed=4)
    assert vgg.memory_format == torch.channels_last
    img = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 255
    cl = vgg(img)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in cl)
    assert all(torch.equal(a, b) for a, b in zip(cl, vgg(img.contiguous(memory_format=torch.channels_last))))
    vgg.to(memory_format=torch.contiguous_format)
    assert vgg.memory_format == torch.contiguous_format
    for a, b in zip(cl, vgg(img)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
