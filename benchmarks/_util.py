"""Shared by the benchmark scripts: timing, memory, machine facts and the measured compute peak."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def error_text(e: BaseException, limit: int = 4000) -> tuple[str, str]:
    """(summary, detail) of a failed row: the type and first line, plus the last line that names
    an error when the message is a nested traceback (Inductor's SubprocException carries its
    worker's traceback: the first line alone says only that a subprocess failed); the detail is
    the whole formatted exception, its last ``limit`` characters."""
    import traceback
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    summary = f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
    cause = next((ln for ln in reversed(lines[1:]) if "Error" in ln or "Exception" in ln), None)
    if cause and cause != lines[0]:
        summary += f" ... {cause[:300]}"
    detail = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return summary, detail[-limit:]


FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}  # the memory formats raced

# tests: the benchmark's units of work named here (comma-separated: a run.py backend, a kernels.py
# part "FORMAT:DTYPE:mMODULE" or "conv:DTYPE:mMODULE", a profile_stages.py variant) fail as a sticky
# CUDA fault would: with an error, and the process's GPU counted unusable after it
FAULT_ENV = "CRN_BENCH_FAULT"


def _faulty(label: str) -> bool:
    return bool(label) and label in os.environ.get(FAULT_ENV, "").split(",")


def inject_fault(label: str) -> None:
    """Raise what a crashing kernel raises, when FAULT_ENV names this unit of work (tests only)."""
    if _faulty(label):
        raise RuntimeError(f"CUDA error: an illegal memory access was encountered ({FAULT_ENV} test)")


def context_broken(device, label: str = "") -> bool:
    """Whether this process can still use the GPU. A CUDA fault (an illegal address, a trap) is
    sticky: after it every CUDA call of the process fails, so the work left must run in a fresh
    process (fresh_process)."""
    if _faulty(label):
        return True
    if torch.device(device).type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
        (torch.ones(1, device=device) + 1).item()
        return False
    except Exception:
        return True


def fresh_process(argv: list[str], out, timeout: float) -> tuple[dict | None, str]:
    """Run ``python argv`` (a benchmark script given the work left after a CUDA fault, writing its
    results to the JSON file ``out``), its output on this process's stderr. Returns (its results,
    even if it was cut short; None if it wrote none) and how it ended ("status 0", "a time-out")."""
    try:
        r = subprocess.run([sys.executable, *map(str, argv)], stdout=sys.stderr, stderr=sys.stderr,
                           timeout=max(timeout, 1.0))
        ended = f"status {r.returncode}"
    except subprocess.TimeoutExpired:
        ended = "a time-out"
    try:
        return json.loads(open(out).read()), ended
    except (OSError, ValueError):
        return None, ended


def results_folder_error(path) -> str | None:
    """Why results cannot be written at ``path`` (its folder made if missing), or None: checked before
    any measuring, so that minutes of it are not lost to a path that fails at the end."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"cannot write results to {folder}: {e.strerror or e}"
    return None


def results_path(ap, path) -> Path:
    """``path`` once results can be written there (results_folder_error), else ``ap.error``: a usage
    line (exit 2) before any measuring."""
    if (problem := results_folder_error(path)) is not None:
        ap.error(problem)
    return Path(path)


def write_text_atomic(path, text: str) -> None:
    """Results written after every row: a reader (or a time limit's kill) never sees half a file."""
    from crn_fast.checkpoint import atomic_path
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, warmup: int, iters: int, max_seconds: float | None = None) -> list[float]:
    """Per-call latencies in ms: CUDA events on GPU, wall clock on CPU. Stops early at max_seconds."""
    cuda = torch.device(device).type == "cuda"
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
        if max_seconds and time.perf_counter() - start > max_seconds:
            break
    sync(device)
    out = []
    for _ in range(max(1, iters)):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
        if max_seconds and time.perf_counter() - start > max_seconds:
            break
    return out


def summarize(ms: list[float]) -> dict:
    s = sorted(ms)
    p90 = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
    return {"min_ms": s[0], "median_ms": statistics.median(s), "p90_ms": p90, "iters": len(s)}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class PeakMemory:
    """Peak memory during a block: torch.cuda.max_memory_allocated on GPU, sampled RSS on CPU."""

    def __init__(self, device):
        self.device, self.peak = torch.device(device), 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self.peak = _rss_bytes()

            def poll():
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak, _rss_bytes())
            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def mib(self) -> float:
        return self.peak / 2 ** 20


def machine_info(device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": _cpu_name(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device)}
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), sms=p.multi_processor_count,
                    cuda=torch.version.cuda)
    for mod in ("triton", "onnx", "onnxruntime", "tensorrt", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(device) -> str:
    """Short name for result files: e.g. 'h100', 'cpu-2core'."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key in ("h200", "h100", "a100", "l40s", "l4", "a10", "4090", "3090"):
            if key in name:
                return key
        return name.replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def matmul_peak_tflops(device, dtype: torch.dtype, n: int | None = None, repeats: int = 3) -> float:
    """Best-of-``repeats`` TFLOP/s of an n^3 matmul: the machine's measured compute peak. On CPU
    n=2048 reaches the peak of n=4096 (0.094 against 0.095 TFLOP/s, one thread of a 2-core EPYC)
    in 0.8 s instead of 6.2 s, which every benchmark process on CPU pays."""
    cuda = torch.device(device).type == "cuda"
    n = n or (8192 if cuda else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    (a @ b)
    ms = time_fn(lambda: a @ b, device, warmup=1 if cuda else 0, iters=repeats * (5 if cuda else 1))
    return 2 * n ** 3 / (min(ms) / 1e3) / 1e12


def conv_configs() -> list[dict]:
    """The fused conv's tile configs tuned so far in this process, per shape key (N, Cin, Cout, H,
    W, taps, dtype, norm in, stats, bias, TMA possible), with every candidate's measured ms and the
    candidates that could not run on this GPU (with their errors)."""
    from crn_fast.kernels import tuned_configs
    timings, failures = tuned_configs(timings=True), tuned_configs(failures=True)
    return [{"key": [str(v) for v in k], "chosen": c._asdict(),
             "candidates_ms": [{**cfg._asdict(), "ms": ms} for cfg, ms in sorted(timings.get(k, {}).items(),
                                                                            key=lambda t: t[1])],
             "failed": [{**cfg._asdict(), "error": err} for cfg, err in failures.get(k, {}).items()]}
            for k, c in tuned_configs().items()]
