"""VGG-19 feature extractor for the perceptual loss, without torchvision.

The layer list and state-dict keys (``features.N.weight``) match torchvision's ``vgg19``, so its
``vgg19-*.pth`` loads directly; the authors' matconvnet ``imagenet-vgg-verydeep-19.mat`` loads
too. Pooling is average pooling, as in the authors' code. Weights come from a file the user
gives, or from an explicit seeded ``random`` initialisation (demos and tests); nothing is
downloaded and nothing falls back silently.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
from torch import nn

from .errors import CRNError

# torchvision's vgg19 "E" configuration; 'M' is a pooling layer.
_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
# Index (in `features`) of the ReLU after each layer the loss reads.
FEATURE_LAYERS = {"conv1_2": 3, "conv2_2": 8, "conv3_2": 13, "conv4_2": 22, "conv5_2": 31}
# Spatial stride of each of those layers relative to the input.
FEATURE_STRIDES = (1, 2, 4, 8, 16)
_MATCONVNET_MEAN = (123.68, 116.779, 103.939)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _matconvnet_names() -> list[str]:
    names, block, i = [], 1, 1
    for v in _CFG:
        if v == "M":
            block, i = block + 1, 1
        else:
            names.append(f"conv{block}_{i}")
            i += 1
    return names


class VGG19Features(nn.Module):
    """Returns the ReLU outputs at conv1_2, conv2_2, conv3_2, conv4_2, conv5_2 of an RGB image on
    the 0..255 scale, normalised the way the loaded weights expect (``normalization``)."""

    def __init__(self, normalization: str = "matconvnet"):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _CFG:
            if v == "M":
                layers.append(nn.AvgPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers)
        self.set_normalization(normalization)
        self.requires_grad_(False)
        self.source = "uninitialised"
        self.fingerprint = None  # load_vgg19 sets it: "random (seed N)" or a hash of the weights

    @property
    def memory_format(self) -> torch.memory_format:
        from crn_fast.kernels import memory_format_of
        return memory_format_of(self.features[0].weight)

    def set_normalization(self, normalization: str) -> None:
        if normalization == "matconvnet":
            mean, std = torch.tensor(_MATCONVNET_MEAN), torch.ones(3)
        elif normalization == "torchvision":
            mean, std = torch.tensor(_IMAGENET_MEAN) * 255, torch.tensor(_IMAGENET_STD) * 255
        else:
            raise CRNError(f"unknown VGG normalisation {normalization!r}; valid: matconvnet, torchvision")
        self.normalization = normalization
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        # the layers' memory format (load_vgg19: channels_last), whatever the image's: a conv whose
        # input and weights disagree converts one of them on every call
        x = x.contiguous(memory_format=self.memory_format)
        out, last = [], max(FEATURE_LAYERS.values())
        wanted = set(FEATURE_LAYERS.values())
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in wanted:
                out.append(x)
            if i == last:
                break
        return out


def load_vgg19(weights: str | os.PathLike | None, seed: int = 0) -> VGG19Features:
    """``weights``: a torchvision ``.pth`` state dict, the matconvnet ``.mat`` file, or 'random'.
    The network comes in channels_last, the conv layout cuDNN's tensor cores and oneDNN run
    fastest (on a 2-core CPU, VGG-19's forward + backward at 2x3x128x256 fp32 took 3-10% less time
    than in NCHW); its inputs are put in that format, so the loss is the same either way."""
    vgg = _load_vgg19(weights, seed)
    return vgg.to(memory_format=torch.channels_last)


def _load_vgg19(weights: str | os.PathLike | None, seed: int) -> VGG19Features:
    if weights is None:
        raise CRNError("no VGG-19 weights given: pass a torchvision vgg19-*.pth, the matconvnet "
                       "imagenet-vgg-verydeep-19.mat, or 'random' (seeded; for demos and tests)")
    if str(weights) == "random":
        vgg = VGG19Features("matconvnet")
        g = torch.Generator().manual_seed(seed)
        for m in vgg.features:
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * 9
                m.weight.data = torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5
                m.bias.data.zero_()
        # random filters on 0..255 inputs: scale the first layer so activations stay O(1)
        vgg.features[0].weight.data /= 64.0
        vgg.source = vgg.fingerprint = f"random (seed {seed})"  # the seed says them (a hash would vary with torch)
        return vgg
    path = Path(weights)
    if not path.is_file():
        raise CRNError(f"VGG-19 weights {path} not found (give {VGG_FILES}, or 'random')")
    if path.suffix == ".mat":
        vgg = _from_matconvnet(path)
    else:
        vgg = _from_torchvision(path)
    vgg.source = str(path)
    vgg.fingerprint = weights_fingerprint(vgg)
    return vgg


def weights_fingerprint(module: nn.Module) -> str:
    """A hash of a module's weights (names, shapes, dtypes and bytes): what a training state keeps
    of the frozen VGG-19 instead of its 80 MB of weights, so --resume can tell the same weights."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"blake2b-128:{h.hexdigest()}"


VGG_FILES = "a torchvision vgg19-*.pth, its state dict as .safetensors, or the matconvnet imagenet-vgg-verydeep-19.mat"


def _read_state(path: Path) -> dict:
    """A state dict from a torch.save file (weights only: nothing pickled runs) or a safetensors
    file, with errors that name what the file is instead."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[8:10] == b'{"':  # safetensors: an 8-byte header length, then the JSON header
        from safetensors import SafetensorError, safe_open
        from .checkpoint import FORMAT
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, state = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CRNError(f"{path} is not a readable safetensors file: {' '.join(str(e).split())[:200]}") from None
        if meta.get("format") == FORMAT:
            raise CRNError(f"{path} is a crn_fast generator, not VGG-19 weights (give {VGG_FILES})")
        return state
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds; each becomes one line
        pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if pickled:  # torch.save(model) rather than torch.save(model.state_dict())
            raise CRNError(f"{path} holds a pickled {pickled.group(1)}, not a state dict: crn_fast loads weights "
                           f"only, never pickled code (save the model's state_dict() instead)") from None
        why = "" if "Weights only load failed" in str(e) else f": {type(e).__name__} {str(e).splitlines()[0][:200]}"
        raise CRNError(f"{path} is not a torch state dict or safetensors file{why} (give {VGG_FILES})") from None


def _from_torchvision(path: Path) -> VGG19Features:
    state = _read_state(path)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    vgg = VGG19Features("torchvision")
    feats = {k: v for k, v in state.items() if k.startswith("features.")} if isinstance(state, dict) else {}
    missing = set(vgg.state_dict()) - set(feats)
    if missing:
        raise CRNError(f"{path} is not a torchvision vgg19 state dict: missing {sorted(missing)[:4]}...")
    try:
        vgg.load_state_dict(feats, strict=True)
    except RuntimeError as e:
        raise CRNError(f"{path}: VGG-19 weights have the wrong shapes: {str(e).splitlines()[1][:200]}") from None
    return vgg


def _from_matconvnet(path: Path) -> VGG19Features:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise CRNError("reading the matconvnet .mat file needs scipy: pip install scipy") from None
    try:
        layers = loadmat(str(path))["layers"][0]
    except Exception as e:
        raise CRNError(f"{path} is not a matconvnet VGG-19 .mat file: {str(e)[:200]}") from None
    by_name = {}
    for layer in layers:
        entry = layer[0][0]
        name = str(entry["name"][0]) if "name" in entry.dtype.names else ""
        if name.startswith("conv"):
            w, b = entry["weights"][0][0], entry["weights"][0][1]
            by_name[name] = (w, b)
    vgg = VGG19Features("matconvnet")
    convs = [m for m in vgg.features if isinstance(m, nn.Conv2d)]
    for name, conv in zip(_matconvnet_names(), convs):
        if name not in by_name:
            raise CRNError(f"{path}: layer {name} not found; is this imagenet-vgg-verydeep-19.mat?")
        w, b = by_name[name]
        w = torch.from_numpy(w.astype("float32")).permute(3, 2, 0, 1)  # [h,w,in,out] -> [out,in,h,w]
        if tuple(w.shape) != tuple(conv.weight.shape):
            raise CRNError(f"{path}: {name} has shape {tuple(w.shape)}, expected {tuple(conv.weight.shape)}")
        conv.weight.data.copy_(w)
        conv.bias.data.copy_(torch.from_numpy(b.astype("float32")).reshape(-1))
    return vgg
