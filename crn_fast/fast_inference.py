"""The triton backend's inference path: what ``CRN.forward`` runs with ``backend="triton"`` and no
grad, beside the reference cascade in model.py, which it must match (tests/test_kernels.py,
tests/test_conv_norm.py).

Per module (``_inference_step``), fed the previous module's raw conv2 output and its layer norm's
statistics, so normalised features are never stored:
  * the norm + leaky ReLU is applied inside the upsample-concat kernel (``fuse_inference``);
  * the convs run per module in one of CONV_MODES (``fused_conv``): "cudnn", cuDNN convs (conv1's
    input channels zero-padded to CUDNN_CHANNELS) with the triton layer norm; "fused", both convs
    as the conv_norm kernel, which reduces its output to statistics in its epilogue, conv2
    normalising its input as it loads it; "split", conv1's output normalised once in between;
    "lowres" (modules 1..), conv1 as the upsample_conv kernel, its feature weights applied at the
    previous module's resolution before the upsampling (a quarter of the multiply-adds, and no
    upsample-concat tensor), then one apply pass and cuDNN's conv2; "auto" measures them per
    module at the first no-grad CUDA forward of each shape;
  * the head is one conv_norm kernel when the last module's convs are, or with ``fused_head``.

``FastInference`` is a mixin of CRN: the settings and the derived weights (packed and padded
copies, rebuilt when a weight changes, never copied or pickled) live on the model.
"""
from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .constants import LEAKY_SLOPE, LN_EPS
from .errors import CRNError

CUDNN_CHANNELS = 8  # conv1 inputs of the "cudnn" mode are zero-padded to a multiple of this many channels

# how a module of the triton inference path runs its convs (CRN.fused_conv): cuDNN convs with the
# triton layer norm; "fused": both convs as the conv_norm kernel, conv2 normalising its input as
# it loads it; "split": both as conv_norm, conv1's output normalised by one apply pass in between;
# "lowres": conv1 as upsample_conv (the feature weights before the upsampling, kernels/upsample_conv.py),
# an apply pass with the statistics its epilogue reduced, cuDNN's conv2 (modules 1..: module 0 has
# nothing to upsample and runs "cudnn")
CONV_MODES = ("cudnn", "fused", "split", "lowres")


class FastInference:
    """The triton backend's no-grad forward, mixed into CRN (which provides refine, head, _ops,
    backend and memory_format)."""

    def _init_fast_inference(self, fuse_inference: bool, fused_conv, fused_head: bool) -> None:
        # conv -> {kind: (weight version key, derived weight)}: the fused conv's packed operand and
        # cuDNN's channel-padded conv1 weight, rebuilt when the weight changes
        self._packed_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # fuse each module's last norm + lrelu into the next module's upsample
        self.fuse_inference = fuse_inference
        # which modules run their convs as Triton kernels with the layer norms folded in
        # (kernels/conv_norm.py), and how: False, True (all "fused"), module indices ("fused"),
        # {module: mode}, or "auto" (measured)
        self.fused_conv = fused_conv
        self.fused_conv_choices: dict[tuple, dict] = {}  # "auto": (N, H, W, dtype, device) -> {module: mode}
        # cuDNN convs in the last module: its last norm + leaky ReLU, the
        # head's 1x1 conv and the 0..255 scaling as one Triton kernel (conv_norm, head=True) that
        # normalises h as it loads it, from layer_norm_stats(h): h is read twice (statistics,
        # head) instead of the apply pass's read + write + cuDNN's read, and to_pixels' pass over
        # the images goes (the same one rounding, in the epilogue). Off until a GPU measures it.
        self.fused_head = fused_head

    @property
    def fused_conv(self):
        """How the triton backend's no-grad forward runs each module's convs (CONV_MODES): False
        (cuDNN everywhere), True or "fused" (every module "fused"), "split" or "lowres" (every
        module so; "lowres" from module 1), a frozenset of module indices (those "fused"), a
        {module: mode} dict, or "auto": per module whichever of CONV_MODES measured fastest at
        the first no-grad CUDA forward of each (batch, H, W, dtype, device), and kept in the
        CRN_FAST_CONV_TUNING file when one is set (later processes read it instead of timing); see
        tune_fused_conv."""
        return self._fused_conv

    @fused_conv.setter
    def fused_conv(self, value):
        n = len(self.refine)
        valid = f"True, False, 'auto', 'fused', 'split', 'lowres', module indices 0..{n - 1} or {{module: mode}} " \
            f"with modes {CONV_MODES}"
        if isinstance(value, str):
            if value not in ("auto", *CONV_MODES[1:]):
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
        if isinstance(value, dict) and value.get(0) == "lowres":
            raise CRNError("fused_conv: module 0 cannot run 'lowres' (it reads the layout alone: there is nothing "
                           "to upsample); give it 'cudnn', 'fused' or 'split'")
        self._fused_conv = value

    def _runs_fast_inference(self) -> bool:
        return self.backend == "triton" and not torch.is_grad_enabled() and \
            bool(self.fuse_inference or self.fused_conv or self.fused_head)

    def _fast_forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """The images from the layout pyramid (coarsest first), module by module."""
        plan, out = self._conv_plan(levels), None
        for i, level in enumerate(levels):
            out = self._inference_step(i, out, level, plan.get(i, "cudnn"))
        return out

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
        with the triton layer norm. "lowres": _lowres_step. The head is fused when the last
        module's convs are.
        """
        from crn_fast.kernels import conv_norm, norm_lrelu, norm_lrelu_upsample_concat
        m, last = self.refine[i], i == len(self.refine) - 1
        if mode == "lowres" and pending is not None:
            return self._lowres_step(i, pending, level)
        fused = mode in ("fused", "split")
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
        h = m.conv2(self._ops.layer_norm_lrelu(self._conv1_padded(m.conv1, x), m.norm1.weight, m.norm1.bias, LN_EPS,
                                               LEAKY_SLOPE))
        return self._cudnn_tail(i, h)

    def _lowres_step(self, i: int, pending, level: torch.Tensor):
        """Module i in "lowres" mode: the previous module's output normalised once (one apply pass at
        its resolution), conv1 as upsample_conv (its epilogue reduces the statistics of conv1's
        output), one apply pass with them, cuDNN's conv2; the tail as in "cudnn" mode."""
        from crn_fast.kernels import norm_lrelu, upsample_conv
        m = self.refine[i]
        f = norm_lrelu(*pending, LEAKY_SLOPE)
        y, mean, rstd = upsample_conv(f, level, *self._lowres_weights(m.conv1, f.shape[1]), eps=LN_EPS)
        return self._cudnn_tail(i, m.conv2(norm_lrelu(y, mean, rstd, m.norm1.weight, m.norm1.bias, LEAKY_SLOPE)))

    def _cudnn_tail(self, i: int, h: torch.Tensor):
        """After module i's cuDNN conv2 (output h): the pending tuple for module i+1 (h and its
        layer norm's statistics), or, after the last module, the images."""
        from crn_fast.kernels import conv_norm, layer_norm_stats
        from crn_fast.model import to_pixels
        m, last, ops = self.refine[i], i == len(self.refine) - 1, self._ops
        if last and self.fused_head:
            return conv_norm(h, self._packed(self.head), self.head.bias,
                             (*layer_norm_stats(h, LN_EPS), m.norm2.weight, m.norm2.bias), LEAKY_SLOPE, stats=False,
                             head=True)
        if last:
            return to_pixels(self.head(ops.layer_norm_lrelu(h, m.norm2.weight, m.norm2.bias, LN_EPS, LEAKY_SLOPE)))
        return h, *layer_norm_stats(h, LN_EPS), m.norm2.weight, m.norm2.bias

    def conv_plan(self, layout: torch.Tensor | None = None) -> dict[int, str]:
        """{module: "fused" | "split" | "lowres"} that a no-grad triton forward runs (the other
        modules: cuDNN convs). With fused_conv="auto" it is the choice measured for this layout's batch, size,
        dtype and device, {} while none is (nothing is measured here)."""
        if self.fused_conv != "auto":
            return dict(self._conv_plan([]))
        if layout is None:
            raise CRNError("conv_plan: fused_conv='auto' chooses per layout size; pass the layout")
        key = (layout.shape[0], *layout.shape[2:], self.refine[0].conv1.weight.dtype, layout.device)
        return dict(self.fused_conv_choices.get(key, {}))

    def _conv_plan(self, levels: list[torch.Tensor]) -> dict[int, str]:
        """{module: "fused" | "split" | "lowres"} for this forward; modules not in it run cuDNN convs."""
        setting, n = self.fused_conv, len(self.refine)
        if setting is True or setting in ("fused", "split"):
            return dict.fromkeys(range(n), "fused" if setting is True else setting)
        if setting == "lowres":
            return dict.fromkeys(range(1, n), setting)
        if isinstance(setting, frozenset):
            return dict.fromkeys(setting, "fused")
        if setting != "auto":
            return setting or {}
        key = self._choice_key(levels[-1])
        if key not in self.fused_conv_choices:
            from crn_fast.kernels._runtime import can_time
            if not can_time(levels[-1]):
                return {}  # unmeasured (CPU, tracing, capturing): cuDNN convs
            from crn_fast.kernels._tuning import store_tile, stored_tile
            file_key = self._stored_choice_key(levels)
            stored = stored_tile("conv_modes", file_key, levels[-1].device, self._parse_modes)
            if stored is not None:
                self.fused_conv_choices[key] = {i: m for i, m in enumerate(stored) if m != "cudnn"}
            else:
                chosen = self.tune_fused_conv(levels=levels)
                store_tile("conv_modes", file_key, levels[-1].device,
                           [CONV_MODES.index(chosen.get(i, "cudnn")) for i in range(len(self.refine))])
        return self.fused_conv_choices[key]

    def _stored_choice_key(self, levels: list[torch.Tensor]) -> tuple:
        """What "auto"'s choice is kept under in the CRN_FAST_CONV_TUNING file (beside the kernels'
        tiles, per GPU model and Triton version): the layout's batch, size and dtype, the model's
        widths and classes, the modes timed."""
        layout = levels[-1]
        widths = "-".join(str(m.conv2.weight.shape[0]) for m in self.refine)
        return (layout.shape[0], *layout.shape[1:], layout.dtype, widths, "+".join(CONV_MODES))

    def _parse_modes(self, values: list):
        """"auto"'s stored choice (each module's index in CONV_MODES) as mode names, None for values
        that are not one for this model (module 0 cannot be "lowres")."""
        ok = len(values) == len(self.refine) and all(type(v) is int and 0 <= v < len(CONV_MODES) for v in values) \
            and CONV_MODES[values[0]] != "lowres"
        return [CONV_MODES[v] for v in values] if ok else None

    @staticmethod
    def _choice_key(layout: torch.Tensor) -> tuple:
        return (layout.shape[0], *layout.shape[2:], layout.dtype, layout.device)

    def tune_fused_conv(self, layout: torch.Tensor | None = None, timer=None, levels=None,
                        modes=CONV_MODES) -> dict[int, str]:
        """Measure, module by module, each of ``modes`` (CONV_MODES: cuDNN convs + the triton layer
        norm, the "fused" and the "split" conv_norm kernels, "lowres" from module 1) on this layout's
        shapes (each step timed with its own upsample-concat; the last with the head), and record the fastest for
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
                    if mode == "lowres" and pending is None:
                        continue  # module 0: nothing to upsample
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

    def _lowres_weights(self, conv: nn.Conv2d, feature_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """conv1's weight as upsample_conv's two operands (pack_upsample_conv_weight)."""
        from crn_fast.kernels import pack_upsample_conv_weight
        return self._derived_weight(conv, ("lowres", feature_channels),
                                    lambda w: pack_upsample_conv_weight(w, feature_channels))

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

