"""Whether Triton can run here (compiled on a CUDA device, or interpreted on CPU tensors when
TRITON_INTERPRET=1 was set before Triton was imported), and how kernels are launched from inside
the ``crn_fast::`` operators."""
from __future__ import annotations

import logging
import os

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    HAS_TRITON = True
except ImportError:  # triton is optional: the torch reference ops always work
    triton = tl = None
    HAS_TRITON = False
try:  # host-side tensor-memory-accelerator descriptors (Triton 3.4+)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


def triton_op(name: str, *, mutates_args):
    """``torch.library.triton_op``. Without Triton installed (the CPU install) torch logs "Triton not
    available, find_triton_kernels = []" for every operator it registers: nine warnings on every
    import of crn_fast.kernels, about a fact the operators handle (they run the torch reference).
    They are silenced here, at registration only."""
    from torch.library import triton_op as register

    def decorate(fn):
        torch_log = logging.getLogger("torch._library.triton")
        level = torch_log.level
        if not HAS_TRITON:
            torch_log.setLevel(logging.ERROR)
        try:
            return register(name, mutates_args=mutates_args)(fn)
        finally:
            torch_log.setLevel(level)
    return decorate


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def cuda_time(fn) -> float:
    """Best of 3 CUDA-event timings of fn() after one warm-up call, in ms (for choosing between
    implementations at run time: tile configs, fused or cuDNN convs)."""
    import torch
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


PRECOMPILE_ENV = "CRN_FAST_PRECOMPILE"


def precompile(items, compile_one) -> int:
    """Compile the kernels of several tuning candidates at once, before they are timed one by one:
    ``compile_one(item)`` calls the kernel's ``warmup`` (compile, no launch) inside Triton's
    ``AsyncCompileMode`` (Triton 3.4+) with a thread pool, so the compiles overlap (their LLVM and
    ptxas work runs outside the GIL) and tuning costs about the slowest compile instead of the sum.
    The timing launches then find the kernels compiled. Best effort: a candidate that fails to
    compile here fails again, with its error, when it is timed; ``CRN_FAST_PRECOMPILE=0`` turns it
    off. Returns how many candidates were submitted."""
    mode = getattr(triton, "AsyncCompileMode", None)
    if mode is None or len(items) < 2 or os.environ.get(PRECOMPILE_ENV, "1") == "0":
        return 0
    from concurrent.futures import ThreadPoolExecutor
    submitted = 0
    try:
        with ThreadPoolExecutor(min(len(items), os.cpu_count() or 1)) as pool, mode(pool, ignore_errors=True):
            for item in items:
                try:
                    compile_one(item)
                    submitted += 1
                except Exception as e:  # e.g. a config Triton rejects before compiling: timed (and kept) later
                    logging.getLogger("crn_fast.kernels").debug("precompile %s: %s", item, e)
    except Exception as e:  # never worse than compiling one by one
        logging.getLogger("crn_fast.kernels").debug("precompile: %s: %s", type(e).__name__, e)
    return submitted


def memory_format_of(x):
    """channels_last for a 4-D tensor dense in that format (and not also NCHW-contiguous), else
    contiguous_format: the format a kernel's output should keep."""
    import torch
    return torch.channels_last if x.dim() == 4 and not x.is_contiguous() and \
        x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def check_norm_args(op: str, x, weight=None, bias=None, mean=None, rstd=None) -> None:
    """A ValueError naming ``op`` unless x is a 4-D floating-point (N, C, H, W) tensor, and each of
    weight and bias given is (C,) and each of mean and rstd (N,): a short weight would otherwise be
    read past its end by the kernels (on a GPU: garbage or an illegal address), and an integer x
    normalised as if it were float. Shapes and dtypes only: nothing is read from the device."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{op} expects a 4-D (N, C, H, W) floating-point tensor, got shape {tuple(x.shape)} of "
                         f"{x.dtype}")
    n, c = x.shape[:2]
    wrong = [f"{name} {tuple(t.shape)}" for name, t, want in (("weight", weight, (c,)), ("bias", bias, (c,)),
                                                              ("mean", mean, (n,)), ("rstd", rstd, (n,)))
             if t is not None and tuple(t.shape) != want]
    if wrong:
        raise ValueError(f"{op}: x {tuple(x.shape)} needs weight and bias of shape ({c},)" +
                         (f" and mean and rstd of shape ({n},)" if mean is not None or rstd is not None else "") +
                         f", got {', '.join(wrong)}")


def symbolic(key) -> bool:
    """Whether a shape key holds symbolic sizes (torch.SymInt: tracing with dynamic shapes, as
    torch.export's dynamic batch, torch.compile(dynamic=True) and opcheck's dynamic test do). Such
    a key cannot be hashed, so it is never tuned or looked up: the untuned tile runs."""
    import torch
    return any(isinstance(v, torch.SymInt) for v in key)


TUNE_ENV = "CRN_FAST_CONV_TUNE"  # "0": the conv kernels keep their untuned tiles


def tuning_allowed(t) -> bool:
    """May a kernel tune its tile on t now: tuning not turned off (CRN_FAST_CONV_TUNE=0) and
    can_time(t)."""
    return os.environ.get(TUNE_ENV, "1") != "0" and can_time(t)


def can_time(t) -> bool:
    """May we time kernels on t's device now: a real, non-empty CUDA tensor, outside torch.compile
    tracing and CUDA graph capture (a choice made by timing is then cached for those; a batch of 0
    runs no kernel, so there is nothing to time)."""
    import torch
    from torch._subclasses.fake_tensor import is_fake
    return t.is_cuda and not torch.compiler.is_compiling() and not is_fake(t) and \
        not torch.cuda.is_current_stream_capturing() and t.numel() > 0


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


MAX_GRID_BATCH = 65535  # CUDA's limit on a grid's y and z axes, where most kernels put the batch


def runs_kernel(t) -> bool:
    """Does an operator launch its Triton kernel for input ``t`` (batch first)? Where it can run
    (can_run), ``t`` is not empty (for a batch of 0 there is nothing to launch over, and the
    operator's torch path returns the empty results that eager gives), and its batch fits a grid
    axis: beyond MAX_GRID_BATCH samples the launch would fail, so the torch path computes the same
    values (slower). The same rule under the interpreter, which has no such limit, so that CPU
    tests take the GPU's paths. A symbolic batch (torch.compile(dynamic=True), torch.export) is
    not compared, which would add a guard: a graph traced with one launches its kernels for any
    batch, and CUDA rejects a batch over the limit there."""
    if not (can_run(t) and t.numel() > 0):
        return False
    n = t.shape[0]
    return not isinstance(n, int) or n <= MAX_GRID_BATCH


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch a @triton.jit kernel from inside a ``torch.library.triton_op``.

    ``wrap_triton`` makes the launch visible to torch.compile / torch.export (a higher-order op
    with a no-op fake implementation). Under TRITON_INTERPRET=1 the interpreted function is
    launched directly (torch 2.13's wrap_triton hands it back, 2.11's refuses it). It would try
    to run on fake tensors while an operator's output metadata is computed (opcheck's fake-tensor
    test, Dynamo tracing on CPU): there the launch is skipped.
    AOTAutograd would bake such a skipped launch into its graph, so tracing the interpreter
    there is an error instead of silently wrong outputs.
    """
    from torch.library import wrap_triton
    if interpreter_enabled():
        from torch._subclasses.fake_tensor import is_fake
        from torch._subclasses.functional_tensor import FunctionalTensor
        if any(isinstance(a, FunctionalTensor) for a in args):
            raise RuntimeError(
                "Triton's interpreter (TRITON_INTERPRET=1) cannot be traced by AOTAutograd: compile the "
                "crn_fast operators on a CUDA device, or trace them on CPU without TRITON_INTERPRET "
                "(they then run their torch implementation)")
        tensors = [getattr(a, "base", a) for a in args]  # a TensorDescriptor's tensor is its base
        if any(is_fake(a) for a in tensors if hasattr(a, "device")):
            return
        kernel[grid](*args, **kwargs)  # torch <= 2.11's wrap_triton refuses an interpreted function
        return
    wrap_triton(kernel)[grid](*args, **kwargs)
