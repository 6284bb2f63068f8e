"""The CRN training objectives (Chen & Koltun 2017, Sec. 3.3 and 4).

Eq. 1  perceptual_loss  sum_l lambda_l * mean |Phi_l(I) - Phi_l(g(L))|, l = 0 the pixels
Eq. 2  hindsight_loss   min_u over the k outputs of the total loss
Eq. 3  diversity_loss   sum_p min_u sum_l lambda_l * mean(M_l^p * mean_c |Phi_l(I) - Phi_l(g_u(L))|),
                        trained as 0.999 * sum_p min_u + 0.001 * sum_p mean_u (the authors' code)
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import CRNError
from crn_fast.kernels.area_pyramid import area_pyramid_reference
from .vgg import FEATURE_STRIDES, VGG19Features

# The authors' hand-picked lambdas: pixels, conv1_2, conv2_2, conv3_2, conv4_2, conv5_2.
LAMBDA_PRESETS = {
    "1024p": (1.0, 1 / 2.6, 1 / 4.8, 1 / 3.7, 1 / 5.6, 10 / 1.5),
    "256p": (1.0, 1 / 1.6, 1 / 2.3, 1 / 1.8, 1 / 2.8, 10 / 0.8),
}
TERM_NAMES = ("pixel", "conv1_2", "conv2_2", "conv3_2", "conv4_2", "conv5_2")
LOSS_KINDS = ("perceptual", "hindsight", "diversity")


def layer_errors(fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
    """mean |Phi_l(I) - Phi_l(g)| per sample and layer: (N, L). ``real`` broadcasts over fake's batch
    when fake has k times more samples (grouped as sample-major, k outputs each)."""
    cols = []
    for f, r in zip(fake, real):
        k = f.shape[0] // r.shape[0]
        d = (f.view(r.shape[0], k, *f.shape[1:]) - r.unsqueeze(1)).abs()
        cols.append(d.mean((2, 3, 4)).flatten())  # not flatten(2): a copy of channels_last features
    return torch.stack(cols, 1)


def perceptual_loss(errors: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """Eq. 1: sum_l lambda_l * mean |Phi_l(I) - Phi_l(g(L))| for each sample. errors: (..., L)."""
    return (errors * lambdas.to(errors)).sum(-1)


def hindsight_loss(per_output: torch.Tensor) -> torch.Tensor:
    """Eq. 2: min over the k outputs (last dim) of each sample's loss, averaged over the batch."""
    return per_output.min(dim=-1).values.mean()


def class_layer_errors(fake: list[torch.Tensor], real: list[torch.Tensor], layout: torch.Tensor) -> torch.Tensor:
    """Per-class errors for Eq. 3: (N, k, P, L) with entry mean_hw(M_l^p * mean_c |Phi_l(I) - Phi_l(g_u)|),
    where M_l^p is layout channel p area-downsampled to layer l's size."""
    n = layout.shape[0]
    levels = area_pyramid_reference(layout, max(FEATURE_STRIDES).bit_length())  # finest first
    cols = []
    for f, r in zip(fake, real):
        k = f.shape[0] // n
        d = (f.view(n, k, *f.shape[1:]) - r.unsqueeze(1)).abs().mean(2)  # (N, k, h, w)
        mask = next(m for m in levels if m.shape[-2:] == f.shape[-2:])
        cols.append(torch.einsum("nkhw,nphw->nkp", d, mask.to(d)) / (d.shape[-1] * d.shape[-2]))
    return torch.stack(cols, -1)


def diversity_loss(per_class: torch.Tensor, min_weight: float = 0.999, mean_weight: float = 0.001) -> torch.Tensor:
    """Eq. 3 as the authors trained it: per_class (N, k, P) ->
    min_weight * sum_p min_u + mean_weight * sum_p mean_u, averaged over the batch."""
    best = per_class.min(dim=1).values.sum(-1)
    avg = per_class.mean(dim=1).sum(-1)
    return (min_weight * best + mean_weight * avg).mean()


class CRNLoss(nn.Module):
    """Eq. 1, 2 or 3 on generator output (N, 3k, H, W) and target (N, 3, H, W), both 0..255.

    lambdas: a preset name ("1024p", "256p"), six numbers, or "auto": each term is divided by a
    running mean of its own magnitude (momentum 0.99), which is how the authors chose theirs by hand.
    Returns (loss, {term: value}): the terms are detached 0-d tensors on the loss's device, for logging.
    Nothing here reads a value back to the host, so a training step never waits for the GPU; call
    float() on a term (which does wait) only when you log it.
    """

    def __init__(self, vgg: VGG19Features, kind: str = "perceptual", lambdas="1024p", momentum: float = 0.99):
        super().__init__()
        if kind not in LOSS_KINDS:
            raise CRNError(f"unknown loss {kind!r}; valid: {', '.join(LOSS_KINDS)}")
        self.vgg = vgg.eval().requires_grad_(False)
        self.kind, self.auto, self.momentum = kind, lambdas == "auto", momentum
        if self.auto:
            values = (1.0,) * len(TERM_NAMES)
        elif isinstance(lambdas, str):
            if lambdas not in LAMBDA_PRESETS:
                raise CRNError(f"unknown lambda preset {lambdas!r}; valid: {', '.join(LAMBDA_PRESETS)}, auto")
            values = LAMBDA_PRESETS[lambdas]
        else:
            values = tuple(float(v) for v in lambdas)
            if len(values) != len(TERM_NAMES):
                raise CRNError(f"lambdas needs {len(TERM_NAMES)} values ({', '.join(TERM_NAMES)}), got {len(values)}")
        self.register_buffer("lambdas", torch.tensor(values))
        self.register_buffer("running", torch.zeros(len(TERM_NAMES)))  # auto mode: EMA of term magnitudes

    def train(self, mode: bool = True):
        super().train(mode)
        self.vgg.eval()  # frozen, always
        return self

    def resume_state(self) -> dict:
        """What a training state keeps of the loss: its lambdas and running magnitudes, and the
        VGG-19's fingerprint rather than its 80 MB of frozen weights, which --vgg-weights gives again."""
        return {"lambdas": self.lambdas.detach().cpu(), "running": self.running.detach().cpu(),
                "vgg": getattr(self.vgg, "fingerprint", None)}

    def load_resume_state(self, state: dict) -> None:
        """Restore resume_state(). A training state written before it (which holds the VGG's
        weights themselves) restores those, as it always did."""
        if any(k.startswith("vgg.") for k in state):
            self.load_state_dict(state)
            return
        if state.get("vgg") != getattr(self.vgg, "fingerprint", None):
            raise CRNError(f"the VGG-19 weights {self.vgg.source} are not the ones the run was trained with "
                           f"(fingerprint {getattr(self.vgg, 'fingerprint', None)}, the run's {state.get('vgg')}): "
                           f"the perceptual loss would change mid-run; give the weights file the run used")
        self.lambdas.copy_(state["lambdas"])
        self.running.copy_(state["running"])

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [images] + self.vgg(images)

    def current_lambdas(self, errors: torch.Tensor) -> torch.Tensor:
        if not self.auto:
            return self.lambdas
        if self.training:
            mag = errors.detach().reshape(-1, errors.shape[-1]).mean(0).float()
            first = (self.running == 0).all()  # decided on the device: no wait for the GPU
            self.running.copy_(torch.where(first, mag, self.running * self.momentum + mag * (1 - self.momentum)))
        return 1.0 / self.running.clamp_min(1e-8)

    def check_inputs(self, output: torch.Tensor, target: torch.Tensor, layout: torch.Tensor | None) -> None:
        """Shapes only (nothing read back from the device): a CRNError naming the tensor and the
        shape it needs, where torch would broadcast a smaller batch silently or fail in a reshape."""
        if output.dim() != 4 or output.shape[1] % 3:
            raise CRNError(f"loss: output must be the generator's (N, 3k, H, W) images, got shape "
                           f"{tuple(output.shape)}")
        n, _, h, w = output.shape
        if tuple(target.shape) != (n, 3, h, w):
            hwc = target.dim() == 4 and target.shape[-1] == 3 and tuple(target.shape[1:3]) == (h, w)
            hint = ": channels last? target.permute(0, 3, 1, 2)" if hwc else ""
            raise CRNError(f"loss: target must be (N, 3, H, W) = {(n, 3, h, w)} images on 0..255 (the output's N, H "
                           f"and W), got {tuple(target.shape)}{hint}")
        if layout is not None and (layout.dim() != 4 or layout.shape[0] != n or tuple(layout.shape[2:]) != (h, w)):
            raise CRNError(f"loss: layout must be the (N, classes, H, W) one-hot the output was made from, with N, H, "
                           f"W = {n}, {h}, {w}; got {tuple(layout.shape)}")

    def forward(self, output: torch.Tensor, target: torch.Tensor, layout: torch.Tensor | None = None):
        self.check_inputs(output, target, layout)
        n, ch, h, w = output.shape
        k = ch // 3
        fake = self._features(output.reshape(n * k, 3, h, w))
        with torch.no_grad():
            real = self._features(target.detach().to(output.dtype))
        if self.kind == "diversity":
            if layout is None:
                raise CRNError("the diversity loss needs the layout (per-class masks)")
            errs = class_layer_errors(fake, real, layout)  # (N, k, P, L)
            lam = self.current_lambdas(errs.sum(2))
            loss = diversity_loss(perceptual_loss(errs, lam))
            term_src = errs.sum(2)
        else:
            errs = layer_errors(fake, real).view(n, k, -1)  # (N, k, L)
            lam = self.current_lambdas(errs)
            per_output = perceptual_loss(errs, lam)  # (N, k)
            loss = hindsight_loss(per_output) if self.kind == "hindsight" else per_output.mean()
            term_src = errs
        terms = dict(zip(TERM_NAMES, (term_src.detach() * lam).mean((0, 1)).unbind()))
        return loss, terms
