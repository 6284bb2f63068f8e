import os
from pathlib import Path

import pytest

# Triton kernels run on CPU tensors through the interpreter; it must be on before triton is imported.
try:
    import torch
    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # The equality tests compare fp32 paths: TF32 convs (cuDNN's default) round inputs to 10-bit
    # mantissas, so 1e-7 differences upstream become ~1e-3 relative ones (measured on an H100).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

# Under pytest-xdist each worker gets its share of the cores for torch's threads, and so do the
# processes its tests start (OMP_NUM_THREADS): two workers of two threads each on two cores spin
# in OpenMP's barriers (the demo run took 64 s instead of 38, a SIGTERM test 23 s instead of 6).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    _threads = max(1, len(os.sched_getaffinity(0)) // _workers if hasattr(os, "sched_getaffinity") else 1)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    try:
        torch.set_num_threads(_threads)
    except NameError:  # pragma: no cover (no torch)
        pass

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "crn_reference"
FIXTURES = Path(__file__).parent / "fixtures"


def _interpreter_problem():
    """Triton 3.6's interpreter (torch 2.11's) turns a program id into a Python int with int() of a
    1-element array, which NumPy 2.4 refuses: every kernel test would fail with a TypeError deep in
    Triton. One interpreted loop over range(program_id, ...) tells; None when it runs."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _probe(out):
        p = tl.program_id(0)
        for i in range(p, p + 1):
            tl.store(out + i, i + 1)
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _probe[(1,)](out)
    except Exception as e:  # noqa: BLE001  (any failure here is the interpreter's, reported once)
        import numpy
        return (f"Triton {triton.__version__}'s interpreter cannot run here with NumPy {numpy.__version__} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Install numpy<2.4 (or a Triton whose "
                f"interpreter supports it, 3.9 does): python -m pip install 'numpy<2.4'")
    return None


def _interpreter_rounds_bf16_like_gpus() -> bool:
    """Triton's interpreter converts fp32 to bf16 by truncation (``InterpreterBuilder.cast_impl``
    calls ``_convert_float`` without a rounding mode, in Triton 3.6 and 3.9 alike); GPUs round to
    nearest even (``cvt.rn.bf16.f32``). Every bf16 value a kernel stored under the interpreter was
    then up to an ulp low, a bias that accumulates through a generator and made CPU accuracy
    comparisons unfair to the kernels. The tests compare numbers, so they run the interpreter with
    the GPU's rounding: the cast is replaced by round-to-nearest-even on the fp32 bits (NaN stays
    NaN, overflow rounds to inf, as cvt.rn does). False where this Triton has no such builder."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    cast = getattr(builder, "cast_impl", None)
    if cast is None:
        return False
    if getattr(cast, "rounds_to_nearest_even", False):
        return True

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.asarray(src.data, dtype=np.float32)
            bits = data.view(np.uint32)
            with np.errstate(over="ignore"):
                rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
            quiet_nan = ((bits >> 16) | np.uint32(0x40)).astype(np.uint16)
            return interpreter.TensorHandle(np.where(np.isnan(data), quiet_nan, rounded), dst_type.scalar)
        return cast(self, src, dst_type)
    cast_impl.rounds_to_nearest_even = True
    builder.cast_impl = cast_impl
    return True


def pytest_configure(config):
    # pytest-benchmark (for benchmarks/, a separate suite) would print at the start of every -n run
    # that xdist disables it; these tests use no benchmark fixture, so it is skipped quietly
    if hasattr(config.option, "benchmark_skip") and not config.getoption("benchmark_only"):
        config.option.benchmark_skip = True
    if not _cuda and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        problem = _interpreter_problem()
        if problem:
            pytest.exit(problem, returncode=4)
        _interpreter_rounds_bf16_like_gpus()


def _logger_state():
    import logging
    log = logging.getLogger("crn_fast")
    return log.handlers[:], log.level, log.propagate


_LOGGER_AT_START = _logger_state()  # before any test or fixture runs a CLI


@pytest.fixture(autouse=True)
def _restore_crn_fast_logger():
    """A CLI main() run in-process (crn_fast.cli.setup_logging), in a test or in a module-scoped
    fixture, gives the "crn_fast" logger its own handler and stops propagation; each test starts
    from the state the session began with, so caplog sees the package's warnings whatever order
    the tests run in."""
    import logging
    log = logging.getLogger("crn_fast")
    log.handlers[:], log.level, log.propagate = _LOGGER_AT_START[0][:], *_LOGGER_AT_START[1:]
    yield


@pytest.fixture(scope="session")
def shared():
    if not SHARED.is_dir():
        pytest.skip(f"the authors' reference files are not at {SHARED}")
    return SHARED


def pytest_collection_modifyitems(config, items):
    import importlib.util
    has_cuda = _cuda
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if has_cuda and item.fspath.basename in ("test_kernels.py", "test_conv_norm.py", "test_conv_tiles.py"):
            item.add_marker(pytest.mark.gpu)  # on a GPU machine they run compiled: `pytest -m gpu` selects them
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA device (pip install tensorrt)"))
