"""A training run's folder (--out): what a run is made of (RUN_FILES), how a run takes its folder
(check_out before anything is built, prepare_out once it is, holding the folder alone), how a
stopped run is resumed from it exactly (its training state, and metrics.jsonl cut back to the
resume step), and the writers that fill it while training goes on (sample sheets, TensorBoard)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import atomic_path, load_train_state, read_generator_file, remove_stale_temporaries, writing_into
from .cli import log
from .config import CRNConfig
from .errors import CheckpointError, CRNError, UsageError
from .images import OrderedWrites, save_png_copies

if TYPE_CHECKING:
    from .train_config import TrainConfig

RUN_FILES = ("model.ckpt", "train_state.pt", "metrics.jsonl", "config.json", "ddp.json")


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def check_out(cfg: TrainConfig) -> None:
    """Before anything is built: refuse to replace a run silently, and check that --out can be
    written (in the folder it will be made in, if it is not there yet). Nothing is created or
    removed: a run stopped by a bad option or bad data leaves the disk as it was (prepare_out)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if out.is_dir():  # a run still going there: say so now, not that a run is there to --resume or --overwrite
        with writing_into(out, "--out", alone=True):
            pass
    found = [f for f in RUN_FILES if (out / f).exists()]
    if found and not (cfg.resume or cfg.overwrite) and not never_stepped(out):
        what = describe_run(out)
        raise UsageError(f"{out} already holds a run ({what}); continue it with --resume, or replace it with "
                         f"--overwrite")
    where = out.absolute()
    while not where.exists():
        where = where.parent
    try:
        if not where.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{where} is a file")
        probe = where / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CRNError(f"cannot write to --out {out}: {e.strerror or e}") from None


def prepare_out(cfg: TrainConfig, hold: contextlib.ExitStack) -> None:
    """Once the run is set up (model, data, loss: any bad option or file has stopped it by then):
    make the folder and hold it alone for the rest of the run (``hold``: a second run into the same
    --out, started by mistake while this one goes on, stops in one line instead of taking this
    one's files); then, with --overwrite, remove the old run, and clean our stale temporaries."""
    out = Path(cfg.out)
    hold.enter_context(writing_into(out, "--out", alone=True))  # made, and held before anything there is removed
    if not cfg.overwrite and not cfg.resume and never_stepped(out):
        log.info(f"{out}: the run there stopped before its first step (no checkpoint, no metrics): starting "
                 f"it again in its place")
        for f in [out / "config.json", out / "metrics.jsonl", *(out / "tb").glob("events.out.tfevents.*")]:
            f.unlink(missing_ok=True)  # only what such a run writes: no sheet was written before step 1
    if cfg.overwrite:
        import shutil
        for f in RUN_FILES:
            (out / f).unlink(missing_ok=True)
        for d in ("samples", "tb"):
            shutil.rmtree(out / d, ignore_errors=True)
    try:
        (out / "samples").mkdir(exist_ok=True)
    except OSError as e:
        raise CRNError(f"cannot write to --out {out}: {e.strerror or e}") from None
    for path in remove_stale_temporaries(out) + remove_stale_temporaries(out / "samples"):
        log.info(f"removed {path} (a temporary file left by an interrupted run)")


def never_stepped(out: Path) -> bool:
    """Does ``out`` hold only what a run that stopped before its first step leaves (config.json,
    an empty metrics.jsonl, sample and event folders: say it ran out of memory, or torch.compile
    failed, at step 1)? Nothing there is worth keeping, so a new run may take its place without
    --overwrite. Its config.json must be a run's: a folder without one is no run at all."""
    if any((out / f).exists() for f in ("model.ckpt", "train_state.pt", "ddp.json")):
        return False
    try:
        options = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    metrics = out / "metrics.jsonl"
    return isinstance(options, dict) and {"model", "data", "backend_used"} <= options.keys() and (
        not metrics.exists() or metrics.is_file() and metrics.stat().st_size == 0)


def describe_run(out: Path) -> str:
    """What is in a run folder, for messages: the step of its training state or model file."""
    try:
        return f"train_state.pt at step {int(load_train_state(out / 'train_state.pt', mmap=True)['step'])}"
    except (CRNError, KeyError, TypeError, ValueError):
        pass
    if (out / "model.ckpt").is_file():
        try:
            step = read_generator_file(out / "model.ckpt", weights=False)[2].get("step")
            no_state = "" if (out / "train_state.pt").exists() else ", no train_state.pt"
            return f"model.ckpt at step {step}{no_state}"
        except CRNError:
            return "an unreadable model.ckpt"
    return ", ".join(f for f in RUN_FILES if (out / f).exists())


def check_resume_state(state: dict, path: Path, cfg: TrainConfig, config) -> None:
    need = {"step", "config", "model", "optimizer", "loss", "rng"}
    if not isinstance(state, dict) or not need <= set(state):
        missing = sorted(need - set(state)) if isinstance(state, dict) else "everything"
        raise CheckpointError(f"--resume: {path} is not a crn_fast training state (missing {missing})")
    saved = {k: (tuple(v) if isinstance(v, list) else v) for k, v in state["config"].items() if k != "name"}
    wanted = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.to_dict().items() if k != "name"}
    if saved != wanted:
        run_classes = CRNConfig.from_dict(state["config"]).class_set
        run = {**state["config"], "classes": run_classes.describe()}  # a class set by its name, not its every class
        differ = ", ".join(f"classes: {run_classes.difference(config.class_set)}" if k == "classes" else
                           f"{k} {saved.get(k)} (now {wanted.get(k)})"
                           for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k))
        name = state["config"].get("name")
        hint = ([f"--preset {name} --k {saved.get('k')}"] if name else []) + \
            ([f"--classes giving {run['classes']}"] if saved.get("classes") != wanted.get("classes") else [])
        raise UsageError(f"--resume: {path} holds a different model ({run}): {differ}; resume with the run's model "
                         f"options" + (f" ({', '.join(hint)})" if hint else "") + ", or start a new run in another "
                         "--out")
    old = state.get("options")
    if old is not None:
        new = cfg.identity()
        differ = [k for k in new if k in old and old[k] != new[k]]
        if differ:
            raise UsageError("--resume continues a run exactly, but these options differ from it: " +
                             ", ".join(f"--{k.replace('_', '-')} {old[k]!r} (now {new[k]!r})" for k in differ) +
                             "; use the run's values, or start a new run in another --out")


def load_resume_point(cfg: TrainConfig, config, model) -> dict:
    """train_state.pt of cfg.out, checked against the options; the model gets its weights."""
    out = Path(cfg.out)
    state_path = out / "train_state.pt"
    if not state_path.is_file():
        what = describe_run(out) if out.is_dir() else "nothing"
        if never_stepped(out) and what:
            raise CRNError(f"--resume: the run in {out} stopped before its first step ({what}): nothing to resume; "
                           f"start it again without --resume")
        raise CRNError(f"--resume: {out} has no train_state.pt to resume from ({what or 'empty folder'}); "
                       f"start again with --overwrite" + (f", or keep the weights with --overwrite --init-from "
                                                          f"{out / 'model.ckpt'}"
                                                          if (out / 'model.ckpt').is_file() else ""))
    state = load_train_state(state_path)
    check_resume_state(state, state_path, cfg, config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"--resume: {state_path}: {str(e).splitlines()[0]}") from None
    return state


def restore_training_state(state: dict, opt, scaler, criterion, device) -> None:
    """Optimizer, loss scaler, loss (auto lambdas) and RNG exactly as they were at the saved step."""
    try:
        opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        criterion.load_resume_state(state["loss"])
    except CRNError as e:  # the VGG-19 file changed since: a bad file, not a bad option
        raise CRNError(f"--resume: {e}") from None
    except (ValueError, KeyError, RuntimeError) as e:
        raise UsageError(f"--resume: the saved optimizer does not fit these options ({str(e).splitlines()[0]}); "
                         f"was --train-modules different?") from None
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines after ``step`` (written after the checkpoint a resume starts from),
    and lines that do not parse: a run killed while writing one leaves it cut."""
    if not path.is_file():
        return
    keep, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            record = None
        at = record.get("step", 0) if isinstance(record, dict) else None
        if isinstance(at, int):
            if at <= step:
                keep.append(line)
        elif line.strip():
            torn += 1
    if torn:
        log.warning(f"{path}: left out {torn} unreadable line(s) (a write cut when the run was stopped)")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))


class SampleWriter(OrderedWrites):
    """Sample sheets encoded and written by one background thread, so that training goes on while
    a PNG encodes (a 1024p sheet is 6144x4096: 3.3 s to encode on a 2-core CPU, about 36 steps of
    the H100's 1024p training). Each sheet is encoded once for its step file, latest.png and
    TensorBoard. At most one sheet waits: the next write waits for the one before, whose error (a
    full disk) stops the run there or at ``close``. On any other error the process still lets the
    last write finish (atomic: whole or absent) and does not print its error."""

    def __init__(self, tensorboard: "TensorBoardLog | None" = None):
        super().__init__(1, 1, name="crn-samples")
        self.tensorboard = tensorboard

    def write(self, sheet, paths, step: int, tag: str = "samples") -> None:
        super().write(self._write, sheet, paths, step, tag)

    def wait(self) -> None:
        self.drain()

    def _write(self, sheet, paths, step: int, tag: str) -> None:
        data = save_png_copies(sheet, paths)
        if self.tensorboard is not None:
            self.tensorboard.png(tag, data, sheet.shape, step)


class TensorBoardLog:
    """TensorBoard scalars and sample grids beside metrics.jsonl, when tensorboard is installed.

    TensorBoard writes from its own thread; an error there (a full disk, a vanished folder) would
    print that thread's traceback and reach training only at TensorBoard's next call. Here the
    thread's traceback is not printed (``_quiet_tensorboard_thread``) and the error is handled at
    that next call: a full disk or quota stops the run, as any other write would, naming the
    TensorBoard folder; anything else is one warning, and training goes on with metrics.jsonl."""

    def __init__(self, out: Path):
        self.dir, self.writer, self.lock = out / "tb", None, threading.Lock()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("  tensorboard not installed: metrics go to metrics.jsonl only (pip install tensorboard)")
            return
        _quiet_tensorboard_thread()
        try:
            self.writer = SummaryWriter(str(self.dir))
        except Exception as e:  # a broken install or an unwritable folder: say so, keep training
            log.warning(f"  TensorBoard disabled: {type(e).__name__}: {e}")

    def _call(self, fn) -> None:
        """fn(writer), unless TensorBoard stopped; its errors handled as the class says."""
        with self.lock:  # the loop's scalars and SampleWriter's thread's images
            if self.writer is None:
                return
            try:
                fn(self.writer)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    self.writer = None
                    raise OSError(e.errno, e.strerror, str(self.dir)) from None
                self._stop(e)
            except Exception as e:  # noqa: BLE001  (TensorBoard is a side channel: never the end of a run)
                self._stop(e)

    def _stop(self, e: Exception) -> None:
        self.writer = None
        log.warning(f"TensorBoard stopped writing to {self.dir} ({type(e).__name__}: {e}); "
                    f"metrics go on to metrics.jsonl")

    def scalars(self, values: dict, step: int) -> None:
        for key, v in values.items():
            self._call(lambda w: w.add_scalar(key, v, step))

    def png(self, name: str, data: bytes, shape, step: int) -> None:
        """An image from its encoded PNG (the sample sheet's own bytes): TensorBoard's add_image
        would encode it again."""
        if self.writer is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary
        image = Summary.Image(height=shape[0], width=shape[1], colorspace=shape[2], encoded_image_string=data)
        summary = Summary(value=[Summary.Value(tag=name, image=image)])
        self._call(lambda w: w._get_file_writer().add_summary(summary, step))  # add_image's own route

    def close(self) -> None:
        self._call(lambda w: w.close())


def _quiet_tensorboard_thread() -> None:
    """Leave TensorBoard's writer thread's exceptions to TensorBoardLog: the writer keeps the
    exception and raises it at its next call. Other threads keep the hook they had."""
    previous = threading.excepthook
    if getattr(previous, "crn_fast_tensorboard", False):
        return

    def hook(args):
        if not type(args.thread).__module__.startswith("tensorboard."):
            previous(args)
    hook.crn_fast_tensorboard = True
    threading.excepthook = hook
