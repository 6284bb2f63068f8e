"""The Cascaded Refinement Network (Chen & Koltun, ICCV 2017), faithful to the authors' TF code.

    M_0 works on the layout at base size; each next module M_i
      1. upsamples M_{i-1}'s features bilinearly (align_corners=True) to its size,
      2. concatenates [features, layout at its size] (layout area-downsampled),
      3. applies twice: 3x3 conv (no bias) -> layer norm over (C,H,W) -> leaky ReLU 0.2.
    A 1x1 conv (with bias) maps the top features to 3k channels, then (x + 1) / 2 * 255.

The two non-conv steps go through ``crn_fast.kernels``; ``backend`` picks torch ("eager") or the
fused Triton kernels ("triton"). Both use the same parameters and state dict. With the triton
backend and no grad, ``fused_conv=True`` also runs the convs as Triton kernels that carry the layer
norms (kernels/conv_norm.py).
"""
from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import CRNConfig, get_preset
from .constants import LEAKY_SLOPE, LN_EPS, NUM_CLASSES
from .errors import CRNError

BACKENDS = ("eager", "triton")


def layout_pyramid(layout: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The layout at every module's size, coarsest first: each level is the 2x2 area average of
    the level above (TF ``resize_area`` at exactly half size, applied recursively)."""
    pyramid = [layout]
    for _ in range(levels - 1):
        pyramid.append(F.avg_pool2d(pyramid[-1], 2))
    return pyramid[::-1]


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
        x = ops.layer_norm_lrelu(self.conv1(x), self.norm1.weight, self.norm1.bias, LN_EPS, LEAKY_SLOPE)
        return ops.layer_norm_lrelu(self.conv2(x), self.norm2.weight, self.norm2.bias, LN_EPS, LEAKY_SLOPE)


class CRN(nn.Module):
    """Cascaded Refinement Network generator.

    forward(layout): (N, num_classes, H, W) float -> (N, 3k, H, W) on the authors' 0..255 scale,
    unclipped and image-major (image i is channels 3i..3i+2, RGB). H and W must be multiples of
    ``config.stride``. The layout is cast to the model's dtype and memory format (channels_last
    unless the model was moved to another) once, at the start.
    """

    def __init__(self, config: CRNConfig | None = None, *, widths=None, num_classes: int | None = None,
                 k: int | None = None, base_size=None, backend: str = "eager", checkpointing: bool = False,
                 fuse_inference: bool = True, fused_conv: bool = False,
                 memory_format: torch.memory_format = torch.channels_last):
        super().__init__()
        self._packed_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # conv -> (key, packed)
        shape = {n: v for n, v in (("widths", widths), ("num_classes", num_classes), ("k", k),
                                   ("base_size", base_size)) if v is not None}
        if config is None:
            if widths is None:
                raise CRNError("CRN needs a config or widths (e.g. CRN.from_preset('tiny'))")
            config = CRNConfig(widths=tuple(widths),
                               num_classes=NUM_CLASSES + 1 if num_classes is None else num_classes,
                               k=1 if k is None else k, base_size=tuple((4, 8) if base_size is None else base_size))
        elif shape:  # never silently drop a shape argument
            raise CRNError(f"CRN got a config and {', '.join(shape)}: give one, e.g. CRN(config.replace(k=3)) "
                           f"or CRN.from_preset(name, k=3)")
        self.config = config
        self.refine = nn.ModuleList(RefinementModule(config.in_channels(i), w) for i, w in enumerate(config.widths))
        self.head = nn.Conv2d(config.widths[-1], 3 * config.k, 1, bias=True)
        # channels_last by default: faster convs on GPUs (cuDNN, 1044 input channels) and CPUs (oneDNN),
        # and the Triton kernels' coalesced path; model.to(memory_format=...) switches it
        self.to(memory_format=memory_format)
        self.checkpointing = checkpointing
        # triton backend, no grad: fuse each module's last norm + lrelu into the next module's upsample
        self.fuse_inference = fuse_inference
        # triton backend, no grad: the convs too are Triton kernels with the layer norms folded in
        # (kernels/conv_norm.py); off until it beats cuDNN on the GPU (benchmarks/run.py, triton-fusedconv)
        self.fused_conv = fused_conv
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
        """Swap in another implementation of the two module ops: the ONNX exporter's
        LayerNormalization pattern is the one user (the Triton ones are ``torch.ops.crn_fast``
        operators that torch.compile and torch.export see through)."""
        self._ops = ops
        return self

    @property
    def memory_format(self) -> torch.memory_format:
        """channels_last after ``model.to(memory_format=torch.channels_last)``, else contiguous."""
        w = self.refine[0].conv1.weight
        cl = w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        return torch.channels_last if cl else torch.contiguous_format

    def check_input(self, layout: torch.Tensor) -> None:
        c = self.config
        if not isinstance(layout, torch.Tensor) or layout.dim() != 4:
            shape = tuple(layout.shape) if isinstance(layout, torch.Tensor) else type(layout).__name__
            raise CRNError(f"layout must be a 4-D (N, {c.num_classes}, H, W) tensor, got {shape}")
        if layout.shape[1] != c.num_classes:
            raise CRNError(f"layout has {layout.shape[1]} channels but this CRN takes {c.num_classes} "
                           f"(one-hot classes plus void)")
        if not layout.is_floating_point():
            raise CRNError(f"layout must be a float tensor (one-hot), got {layout.dtype}")
        c.validate_input_size(layout.shape[2], layout.shape[3])

    def forward(self, layout: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.check_input(layout)
        # the model's dtype and one memory format end to end (a one-hot layout is exact in any float)
        layout = layout.to(dtype=self.refine[0].conv1.weight.dtype, memory_format=self.memory_format)
        levels = layout_pyramid(layout, len(self.refine))
        if self.backend == "triton" and self.fused_conv and not torch.is_grad_enabled():
            return self._forward_fused_conv(levels)
        if self.backend == "triton" and self.fuse_inference and not torch.is_grad_enabled():
            x = self._features_fused(levels)
        else:
            x = None
            for module, level in zip(self.refine, levels):
                if self.checkpointing and torch.is_grad_enabled():
                    x = checkpoint(module, x, level, self._ops, use_reentrant=False)
                else:
                    x = module(x, level, self._ops)
        return (self.head(x) + 1.0) / 2.0 * 255.0

    def _features_fused(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """Inference path of the triton backend: module i's second layer norm is reduced to its
        statistics, and its apply + leaky ReLU happen inside module i+1's upsample-concat kernel,
        so the normalised features are never written at full precision."""
        from crn_fast.kernels import layer_norm_stats, norm_lrelu_upsample_concat
        ops, pending, last = self._ops, None, len(self.refine) - 1
        for i, (m, level) in enumerate(zip(self.refine, levels)):
            x = level if pending is None else norm_lrelu_upsample_concat(*pending, level, LEAKY_SLOPE)
            x = ops.layer_norm_lrelu(m.conv1(x), m.norm1.weight, m.norm1.bias, LN_EPS, LEAKY_SLOPE)
            h = m.conv2(x)
            if i == last:
                return ops.layer_norm_lrelu(h, m.norm2.weight, m.norm2.bias, LN_EPS, LEAKY_SLOPE)
            pending = (h, *layer_norm_stats(h, LN_EPS), m.norm2.weight, m.norm2.bias)

    def _forward_fused_conv(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """Inference path of the triton backend with ``fused_conv``: each conv is an implicit-GEMM
        Triton kernel that normalises its input on load (the previous layer's norm + leaky ReLU) and
        reduces its own output to per-tile statistics; the head applies the last norm the same way
        and scales to 0..255. Only raw conv outputs and upsample-concat outputs are ever stored."""
        from crn_fast.kernels import conv_norm, norm_lrelu_upsample_concat
        h = norm = None
        for m, level in zip(self.refine, levels):
            # channels padded to 16 in memory: 16-byte aligned pixel rows for the conv's loads
            x = level if h is None else norm_lrelu_upsample_concat(h, *norm, level, LEAKY_SLOPE, channels_multiple=16)
            h, mean, rstd = conv_norm(x, self._packed(m.conv1), eps=LN_EPS)
            h, mean, rstd = conv_norm(h, self._packed(m.conv2), None,
                                      (mean, rstd, m.norm1.weight, m.norm1.bias), LEAKY_SLOPE, LN_EPS)
            norm = (mean, rstd, m.norm2.weight, m.norm2.bias)
        return conv_norm(h, self._packed(self.head), self.head.bias, norm, LEAKY_SLOPE, stats=False, head=True)

    def _packed(self, conv: nn.Conv2d) -> torch.Tensor:
        """conv's weight as the fused conv's (taps, Cin, Cout) operand, packed once per weight
        version (re-packed after an optimizer step, a load or a move); traced as-is when compiling."""
        from crn_fast.kernels import pack_conv_weight
        w = conv.weight
        if torch.compiler.is_compiling():
            return pack_conv_weight(w)
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        hit = self._packed_weights.get(conv)
        if hit is None or hit[0] != key:
            hit = self._packed_weights[conv] = (key, pack_conv_weight(w.detach()))
        return hit[1]

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): packed copies of old weights go
        self._packed_weights.clear()
        return super()._apply(fn, recurse)

    def __getstate__(self):  # copies and pickles never carry packed weights
        return {k: v for k, v in self.__dict__.items() if k != "_packed_weights"}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._packed_weights = weakref.WeakKeyDictionary()

    def images(self, layout: torch.Tensor) -> torch.Tensor:
        """forward() reshaped to (N, k, 3, H, W)."""
        out = self(layout)
        return out.view(out.shape[0], self.config.k, 3, *out.shape[2:])

    def extra_repr(self) -> str:
        return f"config={self.config}, backend={self.backend!r}" + (", fused_conv=True" if self.fused_conv else "")
