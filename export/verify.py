"""Does an artefact compute the same images as the eager fp32 generator?

Errors are measured on the authors' 0..255 output scale (unclipped): max abs, mean abs and PSNR
(peak 255). Default max-abs tolerances (documented in the README):

    fp32   0.5    fp32 artefacts differ from eager only in summation order (measured: < 0.01)
    fp16   8.0    ~11-bit mantissas through 9 modules; a visible change starts around 10
    bf16  16.0    ~8-bit mantissas
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch

from crn_fast.data import decode_label, label_files, label_kind, resize_pair
from crn_fast.errors import CRNError
from crn_fast.labels import ClassSet, one_hot
from crn_fast.synthetic import render_scene

DEFAULT_TOLERANCE = {"fp32": 0.5, "fp16": 8.0, "bf16": 16.0}


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    if tuple(out.shape) != tuple(ref.shape):  # never a broadcast: an artefact of another k or size fails here
        raise CRNError(f"compare: the artefact's output is {tuple(out.shape)}, eager's {tuple(ref.shape)}")
    diff = (out.detach().double().cpu() - ref.detach().double().cpu()).abs()
    mse = float((diff ** 2).mean())
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "psnr_db": float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)}


def verification_layouts(size: tuple[int, int], classes: ClassSet, layouts_dir: str | None = None,
                         count: int = 2) -> torch.Tensor:
    """(count, layout channels, H, W): real label maps of ``classes`` from ``layouts_dir`` resized, else
    synthetic scenes (in Cityscapes' classes; for other classes renumbered onto theirs, each channel
    still a region of the scene)."""
    if layouts_dir:
        files = label_files(Path(layouts_dir))[:count]
        ids = [resize_pair(decode_label(f, label_kind(f, classes), "void", classes), None, size)[0] for f in files]
    else:
        ids = [render_scene(*size, seed=1234, index=i)[0] for i in range(count)]
        if not classes.is_cityscapes:
            ids = [i % classes.layout_channels for i in ids]
    return one_hot(torch.from_numpy(np.stack(ids).astype(np.int64)), classes.layout_channels)


def verify(run, model, sizes, layouts_dir=None, tolerance: float = 0.5, device="cpu", batch: int = 1) -> dict:
    """Run ``run`` (artefact) and eager fp32 ``model`` at each size; pass if every max_abs <= tolerance.
    The caller's model is left as it was: a copy runs where it is not fp32 on ``device`` already,
    and its train/eval mode is restored."""
    results = []
    weight = next(model.parameters())
    if weight.dtype != torch.float32 or weight.device != torch.device(device):
        model = copy.deepcopy(model).float().to(device)
    mode = model.training
    model.eval()
    try:
        for size in sizes:
            layout = verification_layouts(tuple(size), model.config.class_set, layouts_dir, count=batch)
            with torch.no_grad():
                ref = model(layout.to(device))
                out = run(layout.to(device))
            results.append({"size": list(size), **compare(out, ref)})
    finally:
        model.train(mode)
    worst = max(r["max_abs"] for r in results)
    return {"passed": bool(worst <= tolerance), "tolerance_max_abs": tolerance, "max_abs": worst,
            "layouts": str(layouts_dir) if layouts_dir else "synthetic", "results": results}
