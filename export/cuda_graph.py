"""Whole-generator CUDA graphs: one capture per (batch, H, W, dtype, device), replayed after.

    from crn_fast.export import cuda_graph
    run = cuda_graph(model, example_layout)      # captures now (warm-up on a side stream first)
    images = run(layout)                         # copy in, replay, return the static output

A CRN forward at 1024x2048 launches ~75 kernels, and its small modules are launch-bound (each
layer norm there costs far more time than its bytes need); a replayed graph launches them all
at once. The runner holds a reference to the model, so the weights the graph reads stay alive as
long as the runner does (a graph whose model was freed reads freed memory). The returned tensor
is the graph's static output, overwritten by the next replay of that shape: clone it to keep it.
"""
from __future__ import annotations

import torch

from crn_fast.errors import CRNError


class CUDAGraphGenerator:
    """Called like the generator; captures a CUDA graph per input (shape, dtype, device) on first use."""

    def __init__(self, model, warmup: int = 2):
        if not torch.cuda.is_available():
            raise CRNError("CUDA graphs need a CUDA GPU and none is available")
        self.model = model.eval()  # kept alive: the captured graphs read its weights in place
        self.config = getattr(model, "config", None)
        self.warmup = warmup
        self._graphs: dict[tuple, tuple] = {}

    def capture(self, layout: torch.Tensor) -> None:
        if not layout.is_cuda:
            raise CRNError(f"CUDA graphs run on CUDA tensors; the layout is on {layout.device}")
        key = (tuple(layout.shape), layout.dtype, layout.device)
        if key in self._graphs:
            return
        static_in = layout.clone()
        side = torch.cuda.Stream(layout.device)
        side.wait_stream(torch.cuda.current_stream(layout.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(self.warmup):  # lazy init, autotuning and allocator warm-up stay outside the graph
                self.model(static_in)
        torch.cuda.current_stream(layout.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = self.model(static_in)
        self._graphs[key] = (graph, static_in, static_out)

    def __call__(self, layout: torch.Tensor) -> torch.Tensor:
        key = (tuple(layout.shape), layout.dtype, layout.device)
        if key not in self._graphs:
            self.capture(layout)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(layout)
        graph.replay()
        return static_out


def cuda_graph(model, example: torch.Tensor | None = None, warmup: int = 2) -> CUDAGraphGenerator:
    """A :class:`CUDAGraphGenerator` for ``model`` (on its CUDA device), captured now for ``example``."""
    runner = CUDAGraphGenerator(model, warmup)
    if example is not None:
        runner.capture(example)
    return runner
