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


def pytest_configure(config):
    if not _cuda and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        problem = _interpreter_problem()
        if problem:
            pytest.exit(problem, returncode=4)


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
