"""TensorRT engines for CRN generators (TensorRT 10.12 up to, not including, 12), built from
crn_fast's ONNX export.

Build: a strongly typed network (the STRONGLY_TYPED creation flag: required on 10.x, where weak
typing is deprecated since 10.12; accepted and always on in 11.x, which removed the weak-typing
flags FP16, BF16 and OBEY/PREFER_PRECISION_CONSTRAINTS). Precision therefore comes from the ONNX
graph itself: ``crn-export --dtype fp16|bf16`` writes Conv/AveragePool/Resize/LeakyRelu in
fp16/bf16 and each layer norm in fp32 (export/onnx.py), and TensorRT runs exactly those types.
No precision flag is set; TF32 is switched off (fp32 engines must match eager fp32). One
optimisation profile covers the requested (batch, height, width) range; a persisted timing
cache and a builder optimisation level.

Run: :class:`TensorRTGenerator` executes the engine on torch CUDA tensors (no pycuda), with
optional CUDA graph capture per input shape.

Every TensorRT name crn_fast uses is listed once, in :data:`TENSORRT_API`;
tests/test_tensorrt_api.py checks the list against the compiled bindings of TensorRT 10.x and
11.x (the ``tensorrt-cu12-bindings`` wheels, which install without TensorRT's libraries). The
libraries themselves cannot be installed on this project's CI or GPU machines, so no engine is
built in the tests: this module is written against the documented 10.12+/11.x API.

TensorRT is imported lazily: everything here that needs it raises :class:`TensorRTUnavailable`
with what is missing and how to install it.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from crn_fast.errors import CRNError, UsageError, need_file

from .onnx import INPUT_NAME, OUTPUT_NAME, onnx_dtype

SUPPORTED = ((10, 12), (12, 0))  # 10.12 <= TensorRT < 12
SUPPORTED_TEXT = "10.12 <= TensorRT < 12"
INSTALL_HINT = "pip install 'tensorrt>=10.12,<12' (needs an NVIDIA GPU and driver)"

# Every TensorRT attribute, enum member and method crn_fast touches: {owner: names}. "tensorrt" is
# the module; the other owners are the classes (as the bindings name them) whose members are used.
TENSORRT_API = {
    "tensorrt": ("__version__", "Logger", "Builder", "OnnxParser", "Runtime", "NetworkDefinitionCreationFlag",
                 "BuilderFlag", "MemoryPoolType", "float32", "float16", "bfloat16", "int32"),
    "Logger": ("WARNING",),
    "NetworkDefinitionCreationFlag": ("STRONGLY_TYPED",),
    "BuilderFlag": ("TF32",),
    "MemoryPoolType": ("WORKSPACE",),
    "Builder": ("create_network", "create_builder_config", "create_optimization_profile",
                "build_serialized_network"),
    "OnnxParser": ("parse", "num_errors", "get_error"),
    "IBuilderConfig": ("set_memory_pool_limit", "builder_optimization_level", "clear_flag", "add_optimization_profile",
                       "create_timing_cache", "set_timing_cache", "get_timing_cache"),
    "IOptimizationProfile": ("set_shape",),
    "ITimingCache": ("serialize",),
    "Runtime": ("deserialize_cuda_engine",),
    "ICudaEngine": ("create_execution_context", "get_tensor_dtype"),
    "IExecutionContext": ("set_input_shape", "get_tensor_shape", "set_tensor_address", "execute_async_v3"),
}
# Names of the weak-typing API that 11.x removed: crn_fast must not use them.
REMOVED_IN_11 = ("FP16", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS")


class TensorRTUnavailable(CRNError):
    """TensorRT or a CUDA device is missing, or the TensorRT version is outside the supported range."""


def tensorrt_missing_reason() -> str | None:
    """None when an engine can be built and run here, else what is missing."""
    if importlib.util.find_spec("tensorrt") is None:
        return f"TensorRT is not installed ({INSTALL_HINT})"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and none is available"
    return None


def check_version(version: str) -> None:
    """One line naming the supported range when ``version`` is outside it."""
    try:
        v = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        raise TensorRTUnavailable(f"TensorRT {version!r}: cannot read the version; crn_fast supports "
                                  f"{SUPPORTED_TEXT}") from None
    if not SUPPORTED[0] <= v < SUPPORTED[1]:
        raise TensorRTUnavailable(f"TensorRT {version} is not supported: crn_fast supports {SUPPORTED_TEXT} "
                                  f"({INSTALL_HINT})")


def _trt():
    reason = tensorrt_missing_reason()
    if reason:
        raise TensorRTUnavailable(reason)
    import tensorrt as trt
    check_version(trt.__version__)
    return trt


@dataclass(frozen=True)
class Profile:
    """min/opt/max (N, C, H, W) of the layout input."""
    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    def check(self, shape) -> None:
        """A CRNError unless the layout ``shape`` (N, C, H, W) lies within the profile, which an
        engine runs only inside, naming the range and how to build an engine for the shape."""
        shape = tuple(shape)
        if len(shape) == 4 and all(lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max)):
            return
        (n0, c, h0, w0), (n1, _, h1, w1) = self.min, self.max
        raise CRNError(f"layout {'x'.join(map(str, shape))} is outside the engine's profile: batch {n0}-{n1}, "
                       f"{c} channels, {h0}x{w0} to {h1}x{w1}; build an engine for it with crn-export --trt "
                       f"(--min-res, --max-res, --max-batch), or --res to resize the layouts")

    def check_size(self, channels: int, hw) -> None:
        """check() for a layout of this size at the profile's smallest batch."""
        self.check((self.min[0], channels, *hw))


def make_profile(num_classes: int, stride: int, res, min_res=None, max_res=None, batch: int = 1,
                 min_batch: int | None = None, max_batch: int | None = None) -> Profile:
    """The optimisation profile for the CLI options; every size must be a multiple of ``stride``."""
    opt = tuple(res)
    lo, hi = tuple(min_res or opt), tuple(max_res or opt)
    for name, (h, w) in (("--min-res", lo), ("--opt-res", opt), ("--max-res", hi)):
        if h % stride or w % stride or h < stride or w < stride:
            raise UsageError(f"{name} {h}x{w}: height and width must be positive multiples of {stride}")
    if not (lo[0] <= opt[0] <= hi[0] and lo[1] <= opt[1] <= hi[1]):
        raise UsageError(f"resolutions must satisfy --min-res <= --opt-res <= --max-res, got "
                         f"{lo[0]}x{lo[1]} / {opt[0]}x{opt[1]} / {hi[0]}x{hi[1]}")
    bmin, bmax = min_batch or batch, max_batch or batch
    if not 1 <= bmin <= batch <= bmax:
        raise UsageError(f"batch sizes must satisfy 1 <= --min-batch <= --batch <= --max-batch, got "
                         f"{bmin} / {batch} / {bmax}")
    return Profile((bmin, num_classes, *lo), (batch, num_classes, *opt), (bmax, num_classes, *hi))


def build_engine(onnx_path, engine_path, profile: Profile, workspace_gib: float = 8.0,
                 timing_cache: str | Path | None = None, optimization_level: int = 3) -> dict:
    """Build and serialise a strongly typed engine from a crn_fast ONNX model; returns build facts
    for the sidecar. The engine's precision is the ONNX model's (see the module docstring)."""
    trt = _trt()
    if not 0 <= int(optimization_level) <= 5:
        raise CRNError(f"--opt-level {optimization_level}: valid levels are 0..5")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CRNError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = int(optimization_level)
    config.clear_flag(trt.BuilderFlag.TF32)  # fp32 parts (layer norms, fp32 engines) stay IEEE fp32
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
    return {"tensorrt_version": trt.__version__, "strongly_typed": True, "precision_from": "onnx graph",
            "dtype": onnx_dtype(onnx_path), "tf32": False, "optimization_level": int(optimization_level),
            "workspace_gib": workspace_gib, "timing_cache": str(timing_cache) if timing_cache else None}


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
        need_file(engine_path, "a TensorRT engine (.engine)")
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
        self.config, self.profile = _from_sidecar(engine_path)

    def _run(self, layout: torch.Tensor, stream) -> torch.Tensor:
        trt, ctx = self._trt, self.context
        if not ctx.set_input_shape(INPUT_NAME, tuple(layout.shape)):  # False: outside the engine's profile
            raise CRNError(f"TensorRT refused the layout shape {tuple(layout.shape)} (outside the engine's profile)")
        out_shape = tuple(ctx.get_tensor_shape(OUTPUT_NAME))
        out = torch.empty(out_shape, device=self.device,
                          dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(OUTPUT_NAME)))
        ctx.set_tensor_address(INPUT_NAME, layout.data_ptr())
        ctx.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out

    def __call__(self, layout: torch.Tensor) -> torch.Tensor:
        if self.profile is not None:  # before TensorRT logs its own error
            self.profile.check(layout.shape)
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


def _from_sidecar(engine_path):
    """(model config, Profile) from the JSON crn-export writes beside an engine; each None when
    the sidecar or its entry is missing or unreadable."""
    from .sidecar import read_sidecar, sidecar_config
    try:
        facts = read_sidecar(engine_path)
    except CRNError:
        return None, None
    try:
        config = sidecar_config(engine_path, facts)
    except CRNError:
        config = None
    try:
        profile = Profile(*(tuple(int(d) for d in facts["profile"][k]) for k in ("min", "opt", "max")))
    except (KeyError, ValueError, TypeError):
        profile = None
    return config, profile
