"""TensorRT engines for CRN generators (TensorRT 10 or later), built from crn_fast's ONNX export.

Build: explicit-batch network from the ONNX file, one optimisation profile covering the requested
(batch, height, width) range, FP16/BF16 flags where asked, normalisation layers pinned to fp32
(compute precision, layer precision and output type, with OBEY_PRECISION_CONSTRAINTS) so the
variance of a (C,H,W) row cannot overflow in reduced precision, a persisted timing cache and
a builder optimisation level.

Run: :class:`TensorRTGenerator` executes the engine on torch CUDA tensors (no pycuda), with
optional CUDA graph capture per input shape.

TensorRT is imported lazily: everything here that needs it raises :class:`TensorRTUnavailable`
with what is missing and how to install it.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from crn_fast.errors import CRNError

from .onnx import INPUT_NAME, OUTPUT_NAME

INSTALL_HINT = "pip install tensorrt (TensorRT 10+, needs an NVIDIA GPU and driver)"


class TensorRTUnavailable(CRNError):
    """TensorRT or a CUDA device is missing."""


def tensorrt_missing_reason() -> str | None:
    """None when an engine can be built and run here, else what is missing."""
    if importlib.util.find_spec("tensorrt") is None:
        return f"TensorRT is not installed ({INSTALL_HINT})"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and none is available"
    return None


def _trt():
    reason = tensorrt_missing_reason()
    if reason:
        raise TensorRTUnavailable(reason)
    import tensorrt as trt
    if int(trt.__version__.split(".")[0]) < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old: crn_fast needs 10 or later ({INSTALL_HINT})")
    return trt


@dataclass(frozen=True)
class Profile:
    """min/opt/max (N, C, H, W) of the layout input."""
    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def make_profile(num_classes: int, stride: int, res, min_res=None, max_res=None, batch: int = 1,
                 min_batch: int | None = None, max_batch: int | None = None) -> Profile:
    """The optimisation profile for the CLI options; every size must be a multiple of ``stride``."""
    opt = tuple(res)
    lo, hi = tuple(min_res or opt), tuple(max_res or opt)
    for name, (h, w) in (("--min-res", lo), ("--opt-res", opt), ("--max-res", hi)):
        if h % stride or w % stride or h < stride or w < stride:
            raise CRNError(f"{name} {h}x{w}: height and width must be positive multiples of {stride}")
    if not (lo[0] <= opt[0] <= hi[0] and lo[1] <= opt[1] <= hi[1]):
        raise CRNError(f"resolutions must satisfy min <= opt <= max, got {lo} / {opt} / {hi}")
    bmin, bmax = min_batch or batch, max_batch or batch
    if not 1 <= bmin <= batch <= bmax:
        raise CRNError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {bmin} / {batch} / {bmax}")
    return Profile((bmin, num_classes, *lo), (batch, num_classes, *opt), (bmax, num_classes, *hi))


def precision_flags(dtype: str) -> list[str]:
    """BuilderFlag names for --dtype (TF32 stays off: fp32 engines must match eager fp32)."""
    table = {"fp32": [], "fp16": ["FP16"], "bf16": ["BF16"]}
    if dtype not in table:
        raise CRNError(f"--dtype {dtype!r}: valid: {', '.join(table)}")
    return table[dtype]


def build_engine(onnx_path, engine_path, profile: Profile, dtype: str = "fp32", workspace_gib: float = 8.0,
                 timing_cache: str | Path | None = None, optimization_level: int = 3, log=print) -> dict:
    """Build and serialise an engine; returns build facts for the sidecar."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CRNError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = int(optimization_level)
    config.clear_flag(trt.BuilderFlag.TF32)
    for flag in precision_flags(dtype):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    pinned = 0
    if dtype != "fp32":
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.NORMALIZATION:
                if hasattr(layer, "compute_precision"):
                    layer.compute_precision = trt.float32
                layer.precision = trt.float32
                layer.set_output_type(0, trt.float32)
                pinned += 1
    prof = builder.create_optimization_profile()
    prof.set_shape(INPUT_NAME, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(prof)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CRNError("TensorRT failed to build the engine (see the TensorRT log above)")
    Path(engine_path).write_bytes(bytes(serialized))
    if timing_cache:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt_version": trt.__version__, "flags": precision_flags(dtype), "normalization_layers_fp32": pinned,
            "optimization_level": int(optimization_level), "workspace_gib": workspace_gib,
            "timing_cache": str(timing_cache) if timing_cache else None}



def _torch_dtype(trt, dt):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32}
    return table[dt]


class TensorRTGenerator:
    """Runs a serialised engine on torch CUDA tensors; called like the eager generator.

    cuda_graph=True captures one CUDA graph per input shape on first use and replays it after.
    The output tensor of a graph is reused between calls of that shape: clone it to keep it.
    """

    def __init__(self, engine_path, device: str | int = "cuda", cuda_graph: bool = False):
        trt = _trt()
        self._trt = trt
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        data = Path(engine_path).read_bytes()
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise CRNError(f"{engine_path} is not a TensorRT engine for this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, tuple] = {}
        self.config = _config_from_sidecar(engine_path)

    def _run(self, layout: torch.Tensor, stream) -> torch.Tensor:
        trt, ctx = self._trt, self.context
        ctx.set_input_shape(INPUT_NAME, tuple(layout.shape))
        out_shape = tuple(ctx.get_tensor_shape(OUTPUT_NAME))
        out = torch.empty(out_shape, device=self.device,
                          dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(OUTPUT_NAME)))
        ctx.set_tensor_address(INPUT_NAME, layout.data_ptr())
        ctx.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out

    def __call__(self, layout: torch.Tensor) -> torch.Tensor:
        layout = layout.to(self.device, torch.float32).contiguous()
        stream = torch.cuda.current_stream(self.device)
        if not self.cuda_graph:
            return self._run(layout, stream)
        key = tuple(layout.shape)
        if key not in self._graphs:
            static_in = layout.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                self._run(static_in, side)  # warm-up outside the capture (shape-dependent setup)
            stream.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                static_out = self._run(static_in, side)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(layout)
        graph.replay()
        return static_out


def _config_from_sidecar(engine_path):
    import json
    from crn_fast.config import CRNConfig
    side = Path(str(engine_path) + ".json")
    if side.is_file():
        try:
            return CRNConfig.from_dict(json.loads(side.read_text())["model"])
        except (KeyError, ValueError):
            return None
    return None
