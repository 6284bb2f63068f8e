"""What every crn_fast command line tool shares: exit codes, one-line errors, logging, options.

Exit codes (the same for crn-train, crn-synthesize, crn-export, crn-convert-tf, benchmarks/run.py):
    0  done                       1  runtime error (bad file, no GPU, disk full, ...)
    2  usage error (bad option)   3  verification failed (crn-export)
    128 + N  crn-train or crn-synthesize stopped by signal N (SIGTERM 143, Ctrl-C 130), its work kept
Errors are one line on stderr, ``<prog>: error: <what is wrong and what would be valid>``.
"""
from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import warnings

from .constants import EXIT_RUNTIME, EXIT_USAGE
from .errors import CRNError, RankStopped, RunStopped, UsageError

log = logging.getLogger("crn_fast")


def add_logging_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    g.add_argument("-v", "--verbose", action="store_true", help="debug messages too")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted, not the stream it was at setup: a
    CLI main() called in-process (a notebook, a test harness that swaps sys.stderr) never writes
    to a stream that has since been replaced or closed."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it
        pass


def setup_logging(args) -> None:
    """The command line tools' messages: crn_fast's log records and Python warnings (a fallback
    to the reference ops, a deprecation) as plain lines on stderr; -q keeps warnings, -v adds
    debug messages and says where each warning was raised."""
    level = logging.WARNING if getattr(args, "quiet", False) else \
        logging.DEBUG if getattr(args, "verbose", False) else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    verbose = level == logging.DEBUG
    shown = set()

    def show_warning(message, category, filename, lineno, file=None, line=None):
        # one line for the user, as the tool's other messages, once (Python's own once-per-place
        # registry is reset whenever any code changes the warning filters); where it came from with -v
        if (category, str(message)) in shown:
            return
        shown.add((category, str(message)))
        where = f" ({category.__name__} at {filename}:{lineno})" if verbose else ""
        log.warning(f"warning: {message}{where}")
    warnings.showwarning = show_warning


# what each tool can change when memory runs out (the key: its name, "python -m crn_fast.x" as crn-x)
OUT_OF_MEMORY_HINTS = {
    "crn-train": "lower --batch-size or --res, or add --checkpointing and --amp bf16",
    "crn-synthesize": "lower --batch-size or --res",
    "crn-export": "lower --res, --max-res or --max-batch",
    "run.py": "lower --batch-size or --res",
}
_tool = ""  # the tool run_tool is running: describe_failure's hint for running out of memory


def run_tool(prog: str, fn, *args) -> int:
    """Call ``fn(*args)`` and turn every expected failure into one line and an exit code."""
    global _tool
    _tool = prog.replace("python -m crn_fast.", "crn-")
    try:
        rc = fn(*args)
        return 0 if rc is None else int(rc)
    except RunStopped as e:  # a signal stopped a run, which kept its work (training: its state saved)
        if not e.quiet:
            say(f"{prog}: {e}")
        return 128 + e.signum
    except RankStopped as e:  # another rank failed: rank 0 names it, the rest say nothing more
        if not e.quiet:
            say(f"{prog}: error: {e}")
        return e.exit_code
    except (CRNError, OSError) as e:
        code, message = describe_failure(e)
        say(f"{prog}: error: {message}")
        return code
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise  # a bug: its traceback
        say(f"{prog}: error: {describe_failure(e)[1]}")
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        say(f"{prog}: interrupted")
        return 130


def say(line: str) -> None:
    """One line on stderr in one write, so that the lines of torchrun's ranks, which share the
    stream, never interleave mid-line (print writes the text and its newline apart when unbuffered)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def describe_failure(e: Exception) -> tuple[int, str]:
    """The exit status and the one line a tool prints for ``e``; for anything else (a bug, whose
    traceback is shown where it happened) its type and message."""
    if isinstance(e, RankStopped):
        return e.exit_code, str(e)
    if isinstance(e, UsageError):
        return EXIT_USAGE, str(e)
    if isinstance(e, CRNError):
        return EXIT_RUNTIME, str(e)
    if isinstance(e, OSError):
        return EXIT_RUNTIME, describe_os_error(e)
    if out_of_memory(e):
        return EXIT_RUNTIME, describe_out_of_memory(e)
    return EXIT_RUNTIME, f"{type(e).__name__}: {e}"


def out_of_memory(e: BaseException) -> bool:
    """Did an allocation fail: on a GPU (torch.OutOfMemoryError), in torch's CPU allocator (a
    RuntimeError), or in numpy or Python (MemoryError)?"""
    return isinstance(e, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__) or \
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e)


def describe_out_of_memory(e: BaseException) -> str:
    """One line: what could not be allocated, where, and what the running tool can lower."""
    text = " ".join(str(e).split())
    cpu = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", text)
    if cpu:
        what = f"the CPU allocator could not allocate {int(cpu.group(1)) / 2 ** 30:.2f} GiB"
    elif isinstance(e, MemoryError):
        what = text or "the host ran out of memory"
    else:  # torch's CUDA message: what it tried, and the device's capacity and free memory, then advice
        what = " ".join(re.split(r"(?<=\.) ", text)[:3]).rstrip(".")
    hint = OUT_OF_MEMORY_HINTS.get(_tool)
    return f"out of memory: {what}" + (f"; {hint}" if hint else "")


def describe_os_error(e: OSError) -> str:
    where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return f"the disk is full (no space left on device){where}; free space and run again"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded{where}; free space and run again"
    return f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else "")


# ----------------------------------------------------------------------------- stopping on a signal
class StopSignals:
    """SIGTERM (a scheduler's preemption; torchrun passes its own on) or a first Ctrl-C asks a tool
    to stop at its next safe point: training after the step it is in, with its state saved
    (--resume continues it), synthesis after the batch it is in, every image written whole
    (--skip-existing finishes it). A second Ctrl-C stops it at once. Rank 0 says so in one line,
    ``what`` happens next. Handlers are set only in the main thread, and put back on leaving. The
    data loader's worker processes ignore both: the main process ends them (ignore_stop_signals)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, rank: int = 0, what: str = "stopping at the next safe point (Ctrl-C again: stop at once)"):
        self.rank, self.what, self.signum, self.previous = rank, what, 0, {}
        self.agreed = 0  # the signal the ranks agreed on at the last Ranks.together(signals) (0: none)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = signum
            if self.rank == 0:
                log.warning(f"{signal.Signals(signum).name}: {self.what}")

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id: int) -> None:
    """A data loader worker's start: SIGTERM and Ctrl-C are for the main process, which stops the
    run between steps and then ends its workers (a worker killed first would fail the run)."""
    for s in StopSignals.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


# ----------------------------------------------------------------------------- option types
def cpu_cores() -> int:
    """The cores this process may run on (its affinity, which a batch scheduler sets), at least 1."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def cores_per_rank() -> int:
    """This process's share of its cores when torchrun runs several ranks on the node (LOCAL_WORLD_SIZE)."""
    return max(1, cpu_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _int_at_least(lowest: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lowest:
            raise argparse.ArgumentTypeError(f"{v} must be >= {lowest}")
        return v
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def count_or_auto(text: str) -> int | None:
    """--workers: a count >= 0, or auto (None: the tool's default), e.g. to undo a resumed run's count."""
    if text == "auto":
        return None
    try:
        return non_negative_int(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (or auto)") from None


def non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return v


def positive_float(text: str) -> float:
    v = non_negative_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return v


def resolution(text: str) -> tuple[int, int]:
    from .config import parse_resolution
    try:
        return parse_resolution(text)
    except CRNError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def torch_device(text: str):
    """A device that exists here: cpu, cuda, cuda:N (N < the GPU count)."""
    import torch
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; valid: cpu, cuda, cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise argparse.ArgumentTypeError(f"{text!r}: crn_fast runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available here; use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


# ----------------------------------------------------------------------------- progress
class Progress:
    """A progress report that suits where stderr goes. On a terminal: a tqdm bar. On a pipe or a
    file (a batch job's log, ``nohup``, CI): no carriage-return redraws, which would fill the log
    with ~10 redraws a second for the whole run, but one log line at most every ``every_s``
    seconds and one at the end, each with the count, the rate, the time left and the latest
    values given to ``update``. ``enabled=False`` reports nothing."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True,
                 every_s: float = 30.0, terminal: bool | None = None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.start_n = self.n = initial
        self.postfix: dict = {}
        self._clock = time.perf_counter
        self.t0 = self.t_line = self._clock()
        self.bar = None
        self.lines = False
        if not enabled:
            return
        if terminal is None:
            try:
                terminal = sys.stderr.isatty()
            except (AttributeError, ValueError):  # replaced or closed stderr
                terminal = False
        if terminal:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)
        else:
            self.lines = True

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if postfix:  # the latest values stay until new ones come
            self.postfix = postfix
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(**postfix)
        elif self.lines and self.n < self.total and self._clock() - self.t_line >= self.every_s:
            self._line()

    def _line(self) -> None:
        self.t_line = now = self._clock()
        elapsed = now - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        left = f", {_hms((self.total - self.n) / rate)} left" if rate > 0 and self.n < self.total else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        log.info(f"{self.desc}: {self.n}/{self.total} {self.unit}s, {rate:.3g} {self.unit}/s, "
                 f"{_hms(elapsed)} elapsed{left}{extra}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.lines:
            if self.n > self.start_n:
                self._line()
            self.lines = False


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
