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
        if has_cuda and item.fspath.basename in ("test_kernels.py", "test_conv_norm.py"):
            item.add_marker(pytest.mark.gpu)  # on a GPU machine they run compiled: `pytest -m gpu` selects them
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA device (pip install tensorrt)"))
