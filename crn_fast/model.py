"""The Cascaded Refinement Network (Chen & Koltun, ICCV 2017), faithful to the authors' TF code.

    M_0 works on the layout at base size; each next module M_i
      1. upsamples M_{i-1}'s features bilinearly (align_corners=True) to its size,
      2. concatenates [features, layout at its size] (layout area-downsampled),
      3. applies twice: 3x3 conv (no bias) -> layer norm over (C,H,W) -> leaky ReLU 0.2.
    A 1x1 conv (with bias) maps the top features to 3k channels, then (x + 1) / 2 * 255.

The non-conv steps (the layout's area pyramid, upsample + concat, layer norm + leaky ReLU) go
through ``crn_fast.kernels``; ``backend`` picks torch ("eager") or the fused Triton kernels
("triton"). Both use the same parameters and state dict. With the triton backend and no grad,
``fused_conv`` also runs the convs as Triton kernels that carry the layer norms
(kernels/conv_norm.py), per module ("fused" or "split", CONV_MODES), and ``fused_head=True``
the last norm with the head.
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

CUDNN_CHANNELS = 8  # conv1 inputs of the triton inference path are zero-padded to this many channels

BACKENDS = ("eager", "triton")
# how a module of the triton inference path runs its convs (CRN.fused_conv): cuDNN convs with the
# triton layer norm; "fused": both convs as the conv_norm kernel, conv2 normalising its input as
# it loads it; "split": both as conv_norm, conv1's output normalised by one apply pass in between
CONV_MODES = ("cudnn", "fused", "split")


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
                 fuse_inference: bool = True, fused_conv: bool = False, fused_head: bool = False,
                 memory_format: torch.memory_format = torch.channels_last):
        super().__init__()
        # conv -> {kind: (weight version key, derived weight)}: the fused conv's packed operand and
        # cuDNN's channel-padded conv1 weight, rebuilt when the weight changes
        self._packed_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
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
        # triton backend, no grad: which modules run their convs as Triton kernels with the layer norms
        # folded in (kernels/conv_norm.py), and how: False, True (all "fused"), module indices
        # ("fused"), {module: mode}, or "auto" (measured)
        self.fused_conv = fused_conv
        self.fused_conv_choices: dict[tuple, dict] = {}  # "auto": (N, H, W, dtype, device) -> {module: mode}
        # triton backend, no grad, cuDNN convs in the last module: its last norm + leaky ReLU, the
        # head's 1x1 conv and the 0..255 scaling as one Triton kernel (conv_norm, head=True) that
        # normalises h as it loads it, from layer_norm_stats(h): h is read twice (statistics,
        # head) instead of the apply pass's read + write + cuDNN's read, and to_pixels' pass over
        # the images goes (the same one rounding, in the epilogue). Off until a GPU measures it.
        self.fused_head = fused_head
        self.set_backend(backend)

    @property
    def fused_conv(self):
        """How the triton backend's no-grad forward runs each module's convs (CONV_MODES): False
        (cuDNN everywhere), True or "fused" (every module "fused"), "split" (every module split),
        a frozenset of module indices (those "fused"), a {module: mode} dict, or "auto": per
        module whichever of cuDNN, "fused" and "split" measured fastest at the first no-grad CUDA
        forward of each (batch, H, W, dtype, device); see tune_fused_conv."""
        return self._fused_conv

    @fused_conv.setter
    def fused_conv(self, value):
        n = len(self.refine)
        valid = f"True, False, 'auto', 'fused', 'split', module indices 0..{n - 1} or {{module: mode}} with modes " \
            f"{CONV_MODES}"
        if isinstance(value, str):
            if value not in ("auto", "fused", "split"):
                raise CRNError(f"fused_conv must be {valid}, got {value!r}")
        elif isinstance(value, dict):
            bad = {k: v for k, v in value.items() if v not in CONV_MODES}
            if bad:
                raise CRNError(f"fused_conv: unknown mode in {bad}; the modes are {', '.join(CONV_MODES)}")
            try:
                value = {int(i): m for i, m in value.items() if m != "cudnn"}
            except (TypeError, ValueError):
                raise CRNError(f"fused_conv must be {valid}, got {value!r}") from None
        elif not isinstance(value, bool):
            try:
                value = frozenset(int(i) for i in value)
            except (TypeError, ValueError):
                raise CRNError(f"fused_conv must be {valid}, got {value!r}") from None
        if isinstance(value, (dict, frozenset)) and any(not 0 <= i < n for i in value):
            raise CRNError(f"fused_conv: module indices must be in 0..{n - 1}, got {sorted(value)}")
        self._fused_conv = value

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
        levels = self._ops.area_pyramid(layout, len(self.refine))[::-1]  # coarsest first
        if self.backend == "triton" and not torch.is_grad_enabled() and \
                (self.fuse_inference or self.fused_conv or self.fused_head):
            plan, out = self._conv_plan(levels), None
            for i, level in enumerate(levels):
                out = self._inference_step(i, out, level, plan.get(i, "cudnn"))
            return out
        x = None
        for module, level in zip(self.refine, levels):
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(module, x, level, self._ops, use_reentrant=False)
            else:
                x = module(x, level, self._ops)
        return to_pixels(self.head(x))

    def _inference_step(self, i: int, pending, level: torch.Tensor, mode: str):
        """Module i of the triton backend's inference path (the head too, after the last module).

        ``pending`` is module i-1's raw conv2 output with its layer norm's (mean, rstd, weight,
        bias): the norm + leaky ReLU is applied inside module i's upsample-concat kernel, so
        normalised features are never stored. Returns module i's pending tuple, or the images.
        ``mode`` (CONV_MODES): "fused", both convs are the conv_norm kernel, which reduces its
        output to statistics in its epilogue, and conv2 normalises conv1's output as it loads it
        (each element once per tap); "split", the same but conv1's output is normalised once by an
        apply pass (norm_lrelu) that conv2 reads; in both the upsample-concat output has its pixel
        rows padded to 16 channels, 16-byte aligned for the kernel's loads. "cudnn": cuDNN convs
        with the triton layer norm. The head is fused when the last module's convs are.
        """
        from crn_fast.kernels import conv_norm, layer_norm_stats, norm_lrelu, norm_lrelu_upsample_concat
        m, last, fused = self.refine[i], i == len(self.refine) - 1, mode != "cudnn"
        x = level if pending is None else \
            norm_lrelu_upsample_concat(*pending, level, LEAKY_SLOPE, channels_multiple=16 if fused else CUDNN_CHANNELS)
        if fused:
            h, mean, rstd = conv_norm(x, self._packed(m.conv1), eps=LN_EPS)
            norm1 = (mean, rstd, m.norm1.weight, m.norm1.bias)
            if mode == "split":
                h, mean, rstd = conv_norm(norm_lrelu(h, *norm1, LEAKY_SLOPE), self._packed(m.conv2), eps=LN_EPS)
            else:
                h, mean, rstd = conv_norm(h, self._packed(m.conv2), None, norm1, LEAKY_SLOPE, LN_EPS)
            if last:
                return conv_norm(h, self._packed(self.head), self.head.bias, (mean, rstd, m.norm2.weight, m.norm2.bias),
                                 LEAKY_SLOPE, stats=False, head=True)
            return h, mean, rstd, m.norm2.weight, m.norm2.bias
        ops = self._ops
        h = m.conv2(ops.layer_norm_lrelu(self._conv1_padded(m.conv1, x), m.norm1.weight, m.norm1.bias, LN_EPS,
                                         LEAKY_SLOPE))
        if last and self.fused_head:
            return conv_norm(h, self._packed(self.head), self.head.bias,
                             (*layer_norm_stats(h, LN_EPS), m.norm2.weight, m.norm2.bias), LEAKY_SLOPE, stats=False,
                             head=True)
        if last:
            return to_pixels(self.head(ops.layer_norm_lrelu(h, m.norm2.weight, m.norm2.bias, LN_EPS, LEAKY_SLOPE)))
        return h, *layer_norm_stats(h, LN_EPS), m.norm2.weight, m.norm2.bias

    def conv_plan(self, layout: torch.Tensor | None = None) -> dict[int, str]:
        """{module: "fused" | "split"} that a no-grad triton forward runs (the other modules: cuDNN
        convs). With fused_conv="auto" it is the choice measured for this layout's batch, size,
        dtype and device, {} while none is (nothing is measured here)."""
        if self.fused_conv != "auto":
            return dict(self._conv_plan([]))
        if layout is None:
            raise CRNError("conv_plan: fused_conv='auto' chooses per layout size; pass the layout")
        key = (layout.shape[0], *layout.shape[2:], self.refine[0].conv1.weight.dtype, layout.device)
        return dict(self.fused_conv_choices.get(key, {}))

    def _conv_plan(self, levels: list[torch.Tensor]) -> dict[int, str]:
        """{module: "fused" | "split"} for this forward; modules not in it run cuDNN convs."""
        setting, n = self.fused_conv, len(self.refine)
        if setting is True or setting in ("fused", "split"):
            return dict.fromkeys(range(n), "fused" if setting is True else setting)
        if isinstance(setting, frozenset):
            return dict.fromkeys(setting, "fused")
        if setting != "auto":
            return setting or {}
        key = self._choice_key(levels[-1])
        if key not in self.fused_conv_choices:
            from crn_fast.kernels._runtime import can_time
            if not can_time(levels[-1]):
                return {}  # unmeasured (CPU, tracing, capturing): cuDNN convs
            self.tune_fused_conv(levels=levels)
        return self.fused_conv_choices[key]

    @staticmethod
    def _choice_key(layout: torch.Tensor) -> tuple:
        return (layout.shape[0], *layout.shape[2:], layout.dtype, layout.device)

    def tune_fused_conv(self, layout: torch.Tensor | None = None, timer=None, levels=None,
                        modes=CONV_MODES) -> dict[int, str]:
        """Measure, module by module, each of ``modes`` (CONV_MODES: cuDNN convs + the triton layer
        norm, the "fused" and the "split" conv_norm kernels) on this layout's shapes (each step
        timed with its own upsample-concat; the last with the head), and record the fastest for
        ``fused_conv="auto"``. ``timer(fn, module, mode) -> ms`` defaults to CUDA events (best of
        3 after a warm-up that also tunes the kernel's tiles). ``levels``: the layout pyramid,
        when forward has built it already. A Triton mode that fails on this GPU is skipped with a
        RuntimeWarning naming the module and the error (cuDNN's failure is raised). Returns
        {module: mode} for the modules that do not run cuDNN convs."""
        if not modes or any(m not in CONV_MODES for m in modes):
            raise CRNError(f"tune_fused_conv: modes must be a non-empty subset of {CONV_MODES}, got {modes!r}")
        if self.backend != "triton":
            raise CRNError("tune_fused_conv needs backend='triton' (the fused conv is a Triton kernel)")
        if levels is None:
            layout = layout.to(dtype=self.refine[0].conv1.weight.dtype, memory_format=self.memory_format)
            levels = self._ops.area_pyramid(layout, len(self.refine))[::-1]
        if timer is None:
            from crn_fast.kernels._runtime import cuda_time

            def timer(fn, module, mode):
                return cuda_time(fn)
        chosen, pending = {}, None
        with torch.no_grad():
            for i, level in enumerate(levels):
                ms, error = {}, None
                for mode in modes:
                    try:
                        ms[mode] = timer(lambda: self._inference_step(i, pending, level, mode), i, mode)
                    except Exception as e:  # a Triton mode that cannot run here is not chosen, loudly
                        if mode == "cudnn" or len(modes) == 1:
                            raise
                        error = e
                        warnings.warn(f"tune_fused_conv: module {i} cannot run {mode!r} convs here, so it is not "
                                      f"chosen: {type(e).__name__}: {str(e)[:300]}", RuntimeWarning, stacklevel=2)
                if not ms:
                    raise CRNError(f"tune_fused_conv: module {i} could run none of the modes {modes}") from error
                best = min(ms, key=ms.get)  # ties: the first of modes
                if best != "cudnn":
                    chosen[i] = best
                pending = self._inference_step(i, pending, level, best)
        self.fused_conv_choices[self._choice_key(levels[-1])] = chosen
        return dict(chosen)

    def _derived_weight(self, conv: nn.Conv2d, kind, make) -> torch.Tensor:
        """make(conv.weight), computed once per weight version (again after an optimizer step, a
        load or a move); traced as-is when compiling."""
        w = conv.weight
        if torch.compiler.is_compiling():
            return make(w)
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        cache = self._packed_weights.setdefault(conv, {})
        hit = cache.get(kind)
        if hit is None or hit[0] != key:
            hit = cache[kind] = (key, make(w.detach()))
        return hit[1]

    def _packed(self, conv: nn.Conv2d) -> torch.Tensor:
        """conv's weight as the fused conv's (taps, Cin, Cout) operand."""
        from crn_fast.kernels import pack_conv_weight
        return self._derived_weight(conv, "packed", pack_conv_weight)

    def _conv1_padded(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """cuDNN's conv1 on the upsample-concat output with its input channels zero-padded to a
        multiple of CUDNN_CHANNELS (1044 -> 1048, 532 -> 536, 148 -> 152) and zero weights for
        them: the same sums, and on an H100 the 19 bf16 channels_last convs took 6.73 ms instead
        of 9.46 ms (benchmarks/results/memory_format_h100.json). x must come from
        norm_lrelu_upsample_concat with channels_multiple=CUDNN_CHANNELS, which writes the pad
        channels' zeros; anything else (module 0's layout, channel counts already a multiple,
        NCHW, traced graphs) takes the plain conv."""
        n, c, h, w = x.shape
        cs = -(-c // CUDNN_CHANNELS) * CUDNN_CHANNELS
        if cs == c or torch.compiler.is_compiling() or x.stride() != (h * w * cs, 1, w * cs, cs):
            return conv(x)
        full = x.as_strided((n, cs, h, w), x.stride())  # the whole buffer: the kernel wrote zero pad channels

        def pad(wt):
            out = wt.new_zeros(wt.shape[0], cs, *wt.shape[2:]).contiguous(memory_format=torch.channels_last)
            out[:, :c] = wt
            return out
        return F.conv2d(full, self._derived_weight(conv, ("padded", cs), pad), None, conv.stride, conv.padding)

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
        fc = self.fused_conv
        return f"config={self.config}, backend={self.backend!r}" + \
            (f", fused_conv={sorted(fc) if isinstance(fc, frozenset) else fc!r}" if fc else "") + \
            (", fused_head=True" if self.fused_head else "")


