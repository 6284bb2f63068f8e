"""torch.compile and AOTInductor for CRN generators.

``compile_generator`` returns the torch.compile'd model (the benchmarks use it).
``export_aoti`` writes an AOTInductor package (torch.export -> aoti_compile_and_package) that a
fresh process loads with ``torch._inductor.aoti_load_package`` alone, without crn_fast:

    import torch
    runner = torch._inductor.aoti_load_package("generator.pt2")
    images = runner(layout.contiguous())   # (N, num_classes, H, W) float32 -> (N, 3k, H, W) float32

The package takes a contiguous NCHW layout (crn_fast.labels.one_hot returns channels_last strides:
call .contiguous()); AOTInductor does not check input strides. Nor, unless AOTI_RUNTIME_CHECK_INPUTS=1
is set, input sizes: a package exported for one shape, given another, returns images of its own
shape without an error (measured: a 1x20x64x128 package given 2 layouts returned one image; given a
32x64 layout, a 64x128 image read from memory beyond it). ``load_aoti``'s runner checks every layout against the shapes in
the package's sidecar (``PackageShapes``) and splits or pads batches to the batch sizes it runs.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from crn_fast.constants import DTYPES
from crn_fast.errors import CRNError, need_file


def compile_generator(model, mode: str | None = "default", dynamic: bool | None = False, fullgraph: bool = True,
                      freezing: bool = False, backend: str | None = None):
    """torch.compile of a copy of the generator for inference.

    mode: 'default', 'max-autotune', 'max-autotune-no-cudagraphs' or 'reduce-overhead'.
    backend: the generator's ops, 'eager' (stock torch ops: Inductor generates the norm kernels) or
    'triton' (crn_fast's kernels, which Inductor keeps as torch.ops.crn_fast operators); default:
    the model's own. freezing: Inductor folds the weights in as constants (inference only; the
    compiled model must then run under torch.no_grad()).
    """
    m = copy.deepcopy(model).eval()
    if backend is not None:
        m.set_backend(backend)
    torch._dynamo.reset()  # a fresh cache: many compiled copies of CRN.forward would hit the recompile limit
    compiled = torch.compile(m, mode=None if mode == "default" else mode, dynamic=dynamic, fullgraph=fullgraph)
    if not freezing:
        return compiled

    def run(*args, **kwargs):
        with _freezing():
            return compiled(*args, **kwargs)
    run.model = compiled  # keeps the compiled module (and its weights) alive with the callable
    return run


@contextlib.contextmanager
def _freezing():
    import torch._inductor.config as inductor_config
    with inductor_config.patch(freezing=True):
        yield


@contextlib.contextmanager
def quiet_torch_export():
    """torch.export and torch.onnx.export without two kinds of log noise that say nothing about the
    user's model: torch.onnx's registry warns once per torchvision op when torchvision is not
    installed (crn_fast never uses it), and torch's own pytree code raises a FutureWarning about
    its LeafSpec API while it exports. Every other warning and error passes."""
    import logging
    import warnings
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        registry.setLevel(level)


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
    cfg = model.config
    size = cfg.input_size(size, "size")
    min_size = None if min_size is None else cfg.input_size(min_size, "min_size")
    max_size = None if max_size is None else cfg.input_size(max_size, "max_size")
    for lo, hi, names in ((min_size or size, size, "min_size <= size"), (size, max_size or size, "size <= max_size")):
        if lo[0] > hi[0] or lo[1] > hi[1]:
            raise CRNError(f"{names} is needed on each side, got {lo[0]}x{lo[1]} and {hi[0]}x{hi[1]}")
    m = copy.deepcopy(model).eval().to(device)
    if not str(device).startswith("cuda"):
        m.set_backend("eager")  # a CPU package cannot hold Triton kernels; on CUDA the crn_fast:: kernels go in
    if dtype != "fp32":
        m = CastingGenerator(m, DTYPES[dtype]).eval()
    dynamic_batch = bool(max_batch and max_batch > batch)
    dynamic, trace = None, list(size)
    if min_size or max_size or dynamic_batch:
        s = cfg.stride
        lo, hi = min_size or size, max_size or size
        dims = {}
        if dynamic_batch:
            dims[0] = Dim("batch", min=1, max=max_batch)
        for i, name in enumerate("hw"):  # a side whose range holds one size stays static
            if lo[i] != hi[i]:
                dims[2 + i] = s * Dim(name, min=lo[i] // s, max=hi[i] // s)
                # traced at 2 strides or more: at one stride the coarsest level is 1 pixel high or wide,
                # a size torch.export specialises (the package would then refuse every other size)
                trace[i] = max(size[i], min(2 * s, hi[i]))
        dynamic = {"layout": dims} if dims else None
    # A realistic layout: with an all-void example and the casting wrapper, Inductor (torch 2.13,
    # CPU) produced a package that was wrong on other inputs (max error 94 on 0..255). A dynamic
    # batch needs an example batch of 2 or more (torch.export specialises sizes 0 and 1).
    example = verification_layouts(tuple(trace), cfg.class_set, count=max(batch, 2 if dynamic_batch else 1))
    # AOTInductor bakes the example's strides into the package without a runtime check: an input with
    # other strides is read wrongly (measured: max error 150 on 0..255 for a channels_last-strided
    # one_hot layout fed to a package exported from a contiguous one). The package takes contiguous
    # NCHW layouts, as the sidecar says; load_aoti's runner makes its input contiguous.
    example = example.to(device).contiguous()
    with torch.no_grad(), quiet_torch_export():
        program = torch.export.export(m, (example,), dynamic_shapes=dynamic)
        out = torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return Path(out)


@dataclass(frozen=True)
class PackageShapes:
    """The layouts an AOTInductor package runs, from the sidecar crn-export writes beside it: batch
    sizes ``batch`` (lo, hi), ``channels`` classes, and H, W from ``min_hw`` to ``max_hw`` in steps of
    ``stride`` (one size when the package is static)."""
    batch: tuple[int, int]
    channels: int
    min_hw: tuple[int, int]
    max_hw: tuple[int, int]
    stride: int

    @classmethod
    def from_sidecar(cls, facts: dict, stride: int) -> "PackageShapes":
        """From the sidecar's ``shapes`` (the traced layout) and ``dynamic`` (export_aoti's ranges)."""
        n, c, h, w = (int(d) for d in facts["shapes"]["layout"])
        dyn = facts.get("dynamic") or {}
        lo, hi = (tuple(int(d) for d in dyn.get(k) or (h, w)) for k in ("min_res", "max_res"))
        top = int(dyn.get("max_batch") or n)
        return cls((1, top) if top > n else (n, n), c, lo, hi, stride)

    def describe(self) -> str:
        (h0, w0), (h1, w1) = self.min_hw, self.max_hw
        sizes = f"{h0}x{w0}" if (h0, w0) == (h1, w1) else f"{h0}x{w0} to {h1}x{w1} (multiples of {self.stride})"
        return f"{self.channels} classes at {sizes}"

    def check(self, shape) -> None:
        """A CRNError unless a layout of ``shape`` (N, C, H, W) is one the package runs (any batch:
        the runner splits or pads it), naming its sizes and how to export a package for it."""
        _, c, h, w = tuple(shape)
        if c == self.channels and all(lo <= d <= hi and d % self.stride == 0
                                      for lo, d, hi in zip(self.min_hw, (h, w), self.max_hw)):
            return
        raise CRNError(f"layout {'x'.join(map(str, shape))} is not a shape this AOTInductor package runs: it takes "
                       f"{self.describe()}; export one for it with crn-export --compile --res HxW (--min-res and "
                       f"--max-res for a range), or --res to resize the layouts")

    def check_size(self, channels: int, hw) -> None:
        """check() for a layout of this size (any batch runs)."""
        self.check((1, channels, *hw))


def package_metadata(path: str | Path) -> dict:
    """What AOTInductor records in a package about where it runs (AOTI_DEVICE_KEY, AOTI_PLATFORM,
    AOTI_MACHINE, AOTI_CPU_ISA, AOTI_COMPUTE_CAPABILITY), read from the archive without loading its
    library; {} for a package that records none. A file that is no such archive is a CRNError."""
    import json
    import zipfile
    need_file(path, "an AOTInductor package (.pt2)")
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("wrapper_metadata.json")]
            return json.loads(z.read(names[0])) if names else {}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CRNError(f"{path}: not an AOTInductor package ({type(e).__name__}: {e})") from None


def best_cpu_isa() -> str:
    """The widest x86 vector ISA this CPU has, as AOTInductor names it (AVX512: avx512f, dq, vl and
    bw, as Inductor's own check; AVX2; DEFAULT), from /proc/cpuinfo, which ATEN_CPU_CAPABILITY does
    not lower; elsewhere ATen's capability."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration, IndexError):
        return torch.backends.cpu.get_cpu_capability()
    return "AVX512" if {"avx512f", "avx512dq", "avx512vl", "avx512bw"} <= flags else \
        "AVX2" if "avx2" in flags else "DEFAULT"


def cannot_run_here(meta: dict, device: torch.device | None = None) -> str | None:
    """Why a package with this metadata cannot run on this machine (on ``device``, for a CUDA
    package), else None. Loaded anyway, a package for another CPU's vector ISA can stop the process
    with an illegal instruction, and one for another GPU fails in its first kernel."""
    import platform
    import sys
    where = meta.get("AOTI_DEVICE_KEY") or "cpu"
    if meta.get("AOTI_PLATFORM") and meta["AOTI_PLATFORM"] != sys.platform:
        return f"it was compiled on {meta['AOTI_PLATFORM']}, and this is {sys.platform}"
    if meta.get("AOTI_MACHINE") and meta["AOTI_MACHINE"] != platform.machine():
        return f"it was compiled for {meta['AOTI_MACHINE']} CPUs, and this one is {platform.machine()}"
    if where == "cuda":
        if not torch.cuda.is_available():
            return "it was compiled for a CUDA GPU, and this machine has none"
        cc = str(meta.get("AOTI_COMPUTE_CAPABILITY") or "")  # Inductor's major * 10 + minor, e.g. "90"
        major, minor = torch.cuda.get_device_capability(device if device is not None and device.type == "cuda"
                                                        else None)
        if cc and cc != f"{major}{minor}":
            return (f"it was compiled for GPUs of compute capability {cc[:-1]}.{cc[-1]}, and this one's is "
                    f"{major}.{minor}")
        return None
    levels = ("DEFAULT", "AVX2", "AVX512")  # x86's vector ISAs, in order; others are not compared
    isa = set(str(meta.get("AOTI_CPU_ISA") or "").split())
    have = best_cpu_isa()
    need = max((levels.index(i) for i in isa if i in levels), default=0)
    if have in levels and levels.index(have) < need:
        return f"it was compiled for CPUs with {levels[need]}, and this one's best is {have}"
    return None


class AOTIGenerator:
    """An AOTInductor package, called like the generator: any layout is made contiguous NCHW first.
    With its sidecar (crn-export writes one), every layout's shape is checked against the shapes
    the package runs (it checks none itself), and a batch it does not run is split, or padded with
    empty layouts whose images are dropped. ``config`` is the model's, from the sidecar."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None):
        path = Path(path)
        self.path, self.config, self.shapes = path, None, None
        meta = package_metadata(path)  # first: a file of another kind is named as such
        device = None if device is None else torch.device(device)
        why = cannot_run_here(meta, device)
        if why:
            raise CRNError(f"{path} cannot run here: {why}. Export it on this machine (crn-export --compile)")
        if Path(f"{path}.json").exists():
            from .sidecar import read_sidecar, sidecar_config
            facts = read_sidecar(path)
            self.config = sidecar_config(path, facts)
            try:
                self.shapes = PackageShapes.from_sidecar(facts, self.config.stride)
            except (KeyError, TypeError, ValueError) as e:
                raise CRNError(f"{path}.json: not a sidecar of an AOTInductor package ({type(e).__name__}: {e})"
                               ) from None
        index = -1  # a CPU package, or the current GPU
        if device is not None and device.type == "cuda" and meta.get("AOTI_DEVICE_KEY") == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            package = torch._inductor.aoti_load_package(str(path), device_index=index)
        except Exception as e:  # a file of another kind, a package for another machine: torch's own words
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise CRNError(f"{path}: cannot load it as an AOTInductor package ({first.strip()[:300]})") from None
        self.package = package
        self.device = torch.device(meta.get("AOTI_DEVICE_KEY") or "cpu")  # what it was compiled for
        if self.device.type == "cuda":
            self.device = device if device is not None and device.type == "cuda" else \
                torch.device("cuda", torch.cuda.current_device())

    def __call__(self, layout: torch.Tensor) -> torch.Tensor:
        if self.shapes is None:
            return self.package(layout.contiguous())
        self.shapes.check(layout.shape)
        n, (lo, hi) = layout.shape[0], self.shapes.batch
        if n > hi:
            return torch.cat([self(part) for part in layout.split(hi)])
        if n < lo:  # a static batch: empty layouts after these, their images dropped
            pad = layout.new_zeros((lo - n, *layout.shape[1:]))
            return self.package(torch.cat([layout, pad]).contiguous())[:n]
        return self.package(layout.contiguous())


def load_aoti(path: str | Path, device: str | torch.device | None = None) -> AOTIGenerator:
    return AOTIGenerator(path, device)
