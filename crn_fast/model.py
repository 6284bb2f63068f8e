"""The Cascaded Refinement Network (Chen & Koltun, ICCV 2017), faithful to the authors' TF code.

    M_0 works on the layout at base size; each next module M_i
      1. upsamples M_{i-1}'s features bilinearly (align_corners=True) to its size,
      2. concatenates [features, layout at its size] (layout area-downsampled),
      3. applies twice: 3x3 conv (no bias) -> layer norm over (C,H,W) -> leaky ReLU 0.2.
    A 1x1 conv (with bias) maps the top features to 3k channels, then (x + 1) / 2 * 255.

The non-conv steps (the layout's area pyramid, upsample + concat, layer norm + leaky ReLU) go
through ``crn_fast.kernels``; ``backend`` picks torch ("eager") or the fused Triton kernels
("triton"). Both use the same parameters and state dict. With the triton backend and no grad,
forward runs fast_inference.py's path instead of the cascade below (fused norms, and with
``fused_conv`` / ``fused_head`` the convs and the head as Triton kernels that carry the norms).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import CRNConfig, get_preset
from .constants import LEAKY_SLOPE, LN_EPS, NUM_CLASSES
from .errors import CRNError
from .fast_inference import FastInference

BACKENDS = ("eager", "triton")
# Where the triton backend's cascade (training: with grad) appends zero channels to the layout, so
# that every conv1 takes a multiple of 8 input channels: cuDNN's convs run slower on 1044 / 532 / 148
# (the inference path pads them too: fast_inference.CUDNN_CHANNELS). oneDNN on CPU runs as fast either
# way (measured: a 148 vs 152-channel conv's forward + backward within 2%), so CPUs keep the layout.
PAD_LAYOUT_DEVICES = ("cuda",)
LAYOUT_CHANNELS_MULTIPLE = 8


def to_pixels(y: torch.Tensor) -> torch.Tensor:
    """The head's scaling (y + 1) / 2 * 255, from the 1x1 conv's output to the authors' 0..255.
    fp32 and fp64 compute it as written. A 16-bit y is scaled in fp32 and rounded once to its
    dtype, as Inductor's fused pointwise kernel and the fused head's epilogue do: three bf16 ops
    round three times (y + 1 alone to steps of 1/128, 1 on the 0..255 scale), and on CPU that
    raised the max error of random bf16 models against fp64 by 0-0.9 of 255. It is one pass,
    addcmul(c, y, c) = c + y * c with c = 127.5 (exact in bf16 and fp16): CPU and CUDA compute it
    in fp32 (CUDA as one FMA) and round once, the same bits as the fp32 formula for every bf16
    y (tests/test_model.py), where upcasting first would take four passes over the images."""
    if y.dtype in (torch.float16, torch.bfloat16):
        c = y.new_full((), 127.5)
        return torch.addcmul(c, y, c)
    return (y + 1.0) / 2.0 * 255.0


def layout_pyramid(layout: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The layout at every module's size, coarsest first: each level is the 2x2 area average of
    the level above (TF ``resize_area`` at exactly half size, applied recursively)."""
    from crn_fast.kernels.area_pyramid import area_pyramid_reference
    return area_pyramid_reference(layout, levels)[::-1]


def resolve_backend(backend: str) -> str:
    """The backend that will actually run. 'triton' without a usable Triton (no GPU and no
    TRITON_INTERPRET=1) falls back to eager with one warning."""
    if backend not in BACKENDS:
        raise CRNError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "triton":
        from crn_fast import kernels
        reason = kernels.triton_unavailable_reason()
        if reason:
            warnings.warn(f"backend='triton' requested but {reason}; using the eager torch reference ops",
                          RuntimeWarning, stacklevel=3)
            return "eager"
    return backend


def choose_backend(backend: str, device) -> str:
    """The command-line tools' ``--backend auto`` (their default): the Triton kernels on a CUDA
    device where Triton is installed, the torch ops anywhere else (on a CPU the kernels run only
    through Triton's interpreter, far slower than torch). Any other value is returned as given."""
    if backend != "auto":
        return backend
    from crn_fast import kernels
    return "triton" if torch.device(device).type == "cuda" and kernels.HAS_TRITON else "eager"


class ChannelAffine(nn.Module):
    """Per-channel scale and shift of a layer norm (TF slim.layer_norm's gamma and beta)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))


class RefinementModule(nn.Module):
    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.norm1 = ChannelAffine(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm2 = ChannelAffine(width)

    def forward(self, features: torch.Tensor | None, layout: torch.Tensor, ops) -> torch.Tensor:
        x = layout if features is None else ops.upsample_concat(features, layout)
        x = ops.layer_norm_lrelu(self._conv1(x), self.norm1.weight, self.norm1.bias, LN_EPS, LEAKY_SLOPE)
        return ops.layer_norm_lrelu(self.conv2(x), self.norm2.weight, self.norm2.bias, LN_EPS, LEAKY_SLOPE)

    def _conv1(self, x: torch.Tensor) -> torch.Tensor:
        """conv1; an input with zero channels after the layout's (CRN.layout_pad) meets zero weights
        for them: the same sums (the weight keeps its shape; its gradient is the padded one's first
        channels)."""
        extra = x.shape[1] - self.conv1.in_channels
        if extra == 0:
            return self.conv1(x)
        from crn_fast.kernels import memory_format_of
        w = self.conv1.weight
        wp = F.pad(w, (0, 0, 0, 0, 0, extra)).contiguous(memory_format=memory_format_of(w))
        return F.conv2d(x, wp, None, self.conv1.stride, self.conv1.padding)


class CRN(FastInference, nn.Module):
    """Cascaded Refinement Network generator.

    forward(layout): (N, num_classes, H, W) float -> (N, 3k, H, W) on the authors' 0..255 scale,
    unclipped and image-major (image i is channels 3i..3i+2, RGB). H and W must be multiples of
    ``config.stride``. The layout is cast to the model's dtype and memory format (channels_last
    unless the model was moved to another) once, at the start.
    """

    def __init__(self, config: CRNConfig | None = None, *, widths=None, num_classes: int | None = None,
                 k: int | None = None, base_size=None, backend: str = "eager", checkpointing: bool = False,
                 fuse_inference: bool = True, fused_conv: bool = False, fused_head: bool = False,
                 memory_format: torch.memory_format = torch.channels_last):
        super().__init__()
        shape = {n: v for n, v in (("widths", widths), ("num_classes", num_classes), ("k", k),
                                   ("base_size", base_size)) if v is not None}
        if config is None:
            if widths is None:
                raise CRNError("CRN needs a config or widths (e.g. CRN.from_preset('tiny'))")
            config = CRNConfig(widths=tuple(widths),
                               num_classes=NUM_CLASSES + 1 if num_classes is None else num_classes,
                               k=1 if k is None else k, base_size=tuple((4, 8) if base_size is None else base_size))
        elif not isinstance(config, CRNConfig):
            raise CRNError(f"CRN's config must be a CRNConfig, got {type(config).__name__} {config!r}"[:200] +
                           ("; a preset by name: CRN.from_preset(name)" if isinstance(config, str) else
                            "; from a dict: CRN(CRNConfig.from_dict(d))" if isinstance(config, dict) else ""))
        elif shape:  # never silently drop a shape argument
            raise CRNError(f"CRN got a config and {', '.join(shape)}: give one, e.g. CRN(config.replace(k=3)) "
                           f"or CRN.from_preset(name, k=3)")
        self.config = config
        self.refine = nn.ModuleList(RefinementModule(config.in_channels(i), w) for i, w in enumerate(config.widths))
        self.head = nn.Conv2d(config.widths[-1], 3 * config.k, 1, bias=True)
        self._init_fast_inference(fuse_inference, fused_conv, fused_head)  # the triton backend's no-grad path
        # channels_last by default: faster convs on GPUs (cuDNN, 1044 input channels) and CPUs (oneDNN),
        # and the Triton kernels' coalesced path; model.to(memory_format=...) switches it
        self.to(memory_format=memory_format)
        self.checkpointing = checkpointing
        self.set_backend(backend)

    @classmethod
    def from_preset(cls, name: str, **kw) -> "CRN":
        """The named preset; widths / num_classes / k / base_size given here override its fields."""
        fields = {f: kw.pop(f) for f in ("widths", "num_classes", "k", "base_size") if kw.get(f) is not None}
        config = get_preset(name)
        return cls(config.replace(**fields) if fields else config, **kw)

    def set_backend(self, backend: str) -> "CRN":
        from crn_fast import kernels
        self.requested_backend = backend
        self.backend = resolve_backend(backend)
        self._ops = kernels.ops_for(self.backend)
        return self

    def use_ops(self, ops) -> "CRN":
        """Swap in another implementation of the non-conv ops (a namespace with layer_norm_lrelu,
        upsample_concat and area_pyramid, like ``crn_fast.kernels.REFERENCE_OPS``): the ONNX
        exporter's LayerNormalization pattern is the one user (the Triton ones are
        ``torch.ops.crn_fast`` operators that torch.compile and torch.export see through)."""
        missing = [f for f in ("layer_norm_lrelu", "upsample_concat", "area_pyramid") if not hasattr(ops, f)]
        if missing:
            raise CRNError(f"use_ops: the ops namespace has no {', '.join(missing)}; it needs layer_norm_lrelu, "
                           f"upsample_concat and area_pyramid (see crn_fast.kernels.REFERENCE_OPS)")
        self._ops = ops
        return self

    @property
    def memory_format(self) -> torch.memory_format:
        """channels_last after ``model.to(memory_format=torch.channels_last)``, else contiguous."""
        from crn_fast.kernels import memory_format_of
        return memory_format_of(self.refine[0].conv1.weight)

    def check_input(self, layout: torch.Tensor) -> None:
        c = self.config
        if not isinstance(layout, torch.Tensor) or layout.dim() != 4:
            shape = tuple(layout.shape) if isinstance(layout, torch.Tensor) else type(layout).__name__
            ids = isinstance(layout, torch.Tensor) and layout.dim() == 3 and not layout.is_floating_point()
            raise CRNError(f"layout must be a 4-D (N, {c.num_classes}, H, W) tensor, got {shape}" +
                           (f" of {layout.dtype}: label ids? one-hot them with crn_fast.labels.one_hot(ids, "
                            f"{c.num_classes})" if ids else ""))
        if layout.shape[1] != c.num_classes:
            ids = layout.shape[1] == 1 and not layout.is_floating_point()  # (N, 1, H, W) label ids
            raise CRNError(f"layout has {layout.shape[1]} channel{'s' if layout.shape[1] != 1 else ''} but this "
                           f"CRN takes {c.num_classes} (one-hot classes plus void)" +
                           (f": label ids of {layout.dtype}? one-hot them with crn_fast.labels.one_hot(ids, "
                            f"{c.num_classes})" if ids else ""))
        if not layout.is_floating_point():
            raise CRNError(f"layout must be a float tensor (one-hot), got {layout.dtype}: crn_fast.labels.one_hot "
                           f"gives float32, or convert it with .float()")
        c.validate_input_size(layout.shape[2], layout.shape[3])

    def forward(self, layout: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.check_input(layout)
        # the model's dtype and one memory format end to end (a one-hot layout is exact in any float)
        layout = layout.to(dtype=self.refine[0].conv1.weight.dtype, memory_format=self.memory_format)
        pad = self.layout_pad(layout)
        if pad:  # zero channels, carried down the pyramid and through every concat to conv1
            layout = F.pad(layout, (0, 0, 0, 0, 0, pad)).contiguous(memory_format=self.memory_format)
        levels = self._ops.area_pyramid(layout, len(self.refine))[::-1]  # coarsest first
        if self._runs_fast_inference():  # backend="triton", no grad: fast_inference.py
            return self._fast_forward(levels)
        x = None
        for module, level in zip(self.refine, levels):
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(module, x, level, self._ops, use_reentrant=False)
            else:
                x = module(x, level, self._ops)
        return to_pixels(self.head(x))

    def layout_pad(self, layout: torch.Tensor) -> int:
        """Zero channels the forward appends to the layout on the triton backend's cascade (with
        grad, i.e. training; or with every fusion off) on a device in PAD_LAYOUT_DEVICES: enough
        that every conv1 takes a multiple of LAYOUT_CHANNELS_MULTIPLE input channels (20 classes:
        4, so 1044 -> 1048, 532 -> 536, 148 -> 152), where every width is a multiple of it; else 0.
        Each conv1 gives them zero weights (RefinementModule._conv1): the same sums, parameters and
        gradients, within the convs' rounding. The fused no-grad path pads on its own
        (fast_inference.CUDNN_CHANNELS)."""
        m = LAYOUT_CHANNELS_MULTIPLE
        if self.backend != "triton" or layout.device.type not in PAD_LAYOUT_DEVICES or \
                self._runs_fast_inference() or any(w % m for w in self.config.widths):
            return 0
        return -self.config.num_classes % m

    def images(self, layout: torch.Tensor) -> torch.Tensor:
        """forward() reshaped to (N, k, 3, H, W)."""
        out = self(layout)
        return out.view(out.shape[0], self.config.k, 3, *out.shape[2:])

    def extra_repr(self) -> str:
        fc = self.fused_conv
        return f"config={self.config}, backend={self.backend!r}" + \
            (f", fused_conv={sorted(fc) if isinstance(fc, frozenset) else fc!r}" if fc else "") + \
            (", fused_head=True" if self.fused_head else "")


