"""torch.compile and AOTInductor for CRN generators.

``compile_generator`` returns the torch.compile'd model (the benchmarks use it).
``export_aoti`` writes an AOTInductor package (torch.export -> aoti_compile_and_package) that a
fresh process loads with ``torch._inductor.aoti_load_package`` alone, without crn_fast:

    import torch
    runner = torch._inductor.aoti_load_package("generator.pt2")
    images = runner(layout)          # (N, num_classes, H, W) float32 -> (N, 3k, H, W) float32
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compile_generator(model, mode: str | None = "default", dynamic: bool | None = False, fullgraph: bool = True):
    """torch.compile of the generator (eager ops; mode 'default', 'max-autotune', 'reduce-overhead')."""
    m = copy.deepcopy(model).eval()
    m.set_backend("eager")
    return torch.compile(m, mode=None if mode == "default" else mode, dynamic=dynamic, fullgraph=fullgraph)


class CastingGenerator(torch.nn.Module):
    """fp32 layout in, fp32 images out; the generator itself runs in ``dtype``."""

    def __init__(self, model, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model.to(dtype), dtype

    def forward(self, layout):
        return self.model(layout.to(self.dtype)).float()


def export_aoti(model, path: str | Path, size: tuple[int, int], batch: int = 1, dtype: str = "fp32",
                device: str = "cpu", min_size=None, max_size=None, max_batch: int | None = None) -> Path:
    """Compile an AOTInductor package for the given shape (or a range when min/max are given)."""
    from torch.export import Dim
    from .verify import verification_layouts
    m = copy.deepcopy(model).eval().to(device)
    m.set_backend("eager")
    if dtype != "fp32":
        m = CastingGenerator(m, DTYPES[dtype]).eval()
    cfg = model.config
    dynamic_batch = bool(max_batch and max_batch > batch)
    # A realistic layout: with an all-void example and the casting wrapper, Inductor (torch 2.13,
    # CPU) produced a package that was wrong on other inputs (max error 94 on 0..255). A dynamic
    # batch needs an example batch of 2 or more (torch.export specialises sizes 0 and 1).
    example = verification_layouts(tuple(size), cfg.num_classes, count=max(batch, 2 if dynamic_batch else 1))
    example = example.to(device)
    dynamic = None
    if min_size or max_size or dynamic_batch:
        s = cfg.stride
        lo, hi = min_size or size, max_size or size
        dims = {}
        if dynamic_batch:
            dims[0] = Dim("batch", min=1, max=max_batch)
        if lo != hi:
            dims[2] = s * Dim("h", min=lo[0] // s, max=hi[0] // s)
            dims[3] = s * Dim("w", min=lo[1] // s, max=hi[1] // s)
        dynamic = {"layout": dims} if dims else None
    with torch.no_grad():
        program = torch.export.export(m, (example,), dynamic_shapes=dynamic)
        out = torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return Path(out)


def load_aoti(path: str | Path):
    return torch._inductor.aoti_load_package(str(path))
