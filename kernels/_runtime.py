"""Whether Triton can run here: compiled on a CUDA device, or interpreted on CPU tensors when
TRITON_INTERPRET=1 was set before Triton was imported."""
from __future__ import annotations

import os

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    HAS_TRITON = True
except ImportError:  # triton is optional: the torch reference ops always work
    triton = tl = None
    HAS_TRITON = False


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason() -> str | None:
    """None when Triton kernels can run on some tensor here, else why not."""
    if not HAS_TRITON:
        return "Triton is not installed (pip install 'crn_fast[gpu]')"
    if interpreter_enabled():
        return None
    import torch
    if torch.cuda.is_available():
        return None
    return "no CUDA device is available and TRITON_INTERPRET=1 is not set"


def can_run(t) -> bool:
    """Can a Triton kernel run on tensor ``t`` (CUDA, or CPU under the interpreter)?"""
    return HAS_TRITON and (t.is_cuda or (t.device.type == "cpu" and interpreter_enabled()))
