r"""Train a CRN generator.

    python -m crn_fast.train                      # tiny preset on built-in synthetic streets (2-core CPU: 70-150 s)
    python -m crn_fast.train --data cityscapes:/data/cityscapes --preset 256p --k 9 --loss diversity \
        --vgg-weights imagenet-vgg-verydeep-19.mat --amp bf16
    python -m crn_fast.train --data pairs:labels,images --classes my_classes.json --preset 512p ...
    python -m crn_fast.train ... --val-data cityscapes:/data/cityscapes   # + a validation loss (its val split)
    python -m crn_fast.train ... --compile        # the generator and the loss through torch.compile
    torchrun --nproc_per_node 8 -m crn_fast.train ...   # DDP: NCCL on GPUs, gloo on CPU

From Python:  crn_fast.train.train(TrainConfig(preset="tiny", steps=100, out="runs/x"))

Outputs in --out: model.ckpt (crn_fast generator), train_state.pt (weights, optimizer, step, RNG,
the run's options: the resume point; loaded with weights_only=True), metrics.jsonl (with
--val-data, validation lines too), samples/*.png,
and TensorBoard events when tensorboard is installed. Every file is written atomically.

An existing run is never replaced silently: continue it with --resume (exactly where it
stopped: every option not given is the run's own, so --out runs/x --resume alone continues it;
options given may differ from the run's only for --steps/--epochs, the logging/sample/save
intervals, --workers, --skip-bad, --checkpointing, --compile and --no-progress) or start over with
--overwrite.
SIGTERM or a first Ctrl-C stops the run after its step, saved there (exit status 143 / 130).
Exit status: 0 done, 1 runtime error, 2 usage error.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import atomic_path, load_generator, load_train_state, remove_stale_temporaries, \
    save_generator, save_train_state, writing_into
from .cli import Progress, StopSignals, add_logging_options, cores_per_rank, count_or_auto, \
    ignore_stop_signals, log, non_negative_int, positive_float, positive_int, resolution, run_tool, setup_logging
from .config import CRNConfig, get_preset
from .constants import DTYPES
from .data import DATA_FORMS, SCAN_AUTO_LIMIT, SCAN_MODES, device_batch, in_threads, make_dataset
from .distributed import setup_distributed, shutdown
from .errors import CheckpointError, CRNError, RunStopped, UsageError
from .images import OrderedWrites, sample_sheet, save_png_copies
from .labels import ClassSet, one_hot, read_classes
from .loss import LAMBDA_PRESETS, LOSS_KINDS, TERM_NAMES, CRNLoss
from .model import BACKENDS, CRN, choose_backend
from .vgg import load_vgg19

DEFAULT_STEPS = 300
RUN_FILES = ("model.ckpt", "train_state.pt", "metrics.jsonl", "config.json", "ddp.json")
# --compile: torch.compile's modes that suit a training step (the CUDA-graph modes, reduce-overhead and
# max-autotune, do not: a step's graphs would hold the optimizer's and DDP's buffers across replays)
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """Everything a training run is, as plain values (the CLI fills it from its options)."""
    data: str = "synthetic"
    split: str = "train"
    classes: str | ClassSet = "cityscapes"
    preset: str = "tiny"
    res: tuple[int, int] | None = None
    k: int | None = None
    loss: str | None = None
    lambdas: str | tuple[float, ...] | None = None
    vgg_weights: str = "random"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 4
    lr: float = 1e-4
    amp: str = "off"
    backend: str = "auto"
    checkpointing: bool = False
    compile: str = "off"  # a COMPILE_MODES entry: torch.compile's mode for the generator and the loss
    init_from: str | None = None
    train_modules: str | None = None
    out: str = "runs/demo"
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    log_every: int = 10
    sample_every: int = 100
    save_every: int = 100
    workers: int | None = None  # None: loader_workers() decides
    skip_bad: bool = False
    unknown_colors: str = "error"
    scan_labels: str = "auto"
    progress: bool = True
    val_data: str | None = None  # held-out data for the validation loss (same forms as data)
    val_every: int = 1000
    val_samples: int = 100

    # what may differ when a run is resumed: bookkeeping, not the trajectory
    # (--classes: the file's path may change; the classes themselves are the model's, compared as such;
    # --compile: the same steps, rounded as Inductor's kernels round)
    RESUMABLE = ("steps", "epochs", "out", "resume", "overwrite", "log_every", "sample_every", "save_every",
                 "workers", "skip_bad", "checkpointing", "compile", "progress", "init_from", "classes", "val_data",
                 "val_every", "val_samples")

    def validate(self) -> "TrainConfig":
        """UsageError naming the first option whose value cannot work."""
        for name in ("batch_size", "log_every", "sample_every", "save_every", "val_every", "val_samples"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps {self.steps}: must be >= 1")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise UsageError(f"--epochs {self.epochs}: must be > 0")
        if self.steps is not None and self.epochs is not None:
            raise UsageError("--steps and --epochs both given: choose one")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr {self.lr}: must be > 0")
        if self.k is not None and self.k < 1:
            raise UsageError(f"--k {self.k}: must be >= 1")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"--seed {self.seed}: must be an integer >= 0")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers {self.workers}: must be >= 0")
        for name, valid in (("amp", ("off", *DTYPES)), ("backend", ("auto", *BACKENDS)),
                            ("unknown_colors", ("error", "void")), ("scan_labels", SCAN_MODES),
                            ("compile", COMPILE_MODES)):
            if getattr(self, name) not in valid:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: valid: {', '.join(valid)}")
        if self.loss is not None and self.loss not in LOSS_KINDS:
            raise UsageError(f"--loss {self.loss!r}: valid: {', '.join(LOSS_KINDS)}")
        if self.split != "train" and not str(self.data).startswith("cityscapes:"):
            raise UsageError(f"--split {self.split}: only --data cityscapes:ROOT has splits (--data {self.data})")
        if self.val_data in ("none", ""):
            self.val_data = None
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite contradict each other: choose one")
        try:
            get_preset(self.preset)
            self.class_set()
        except CRNError as e:
            raise UsageError(str(e)) from None
        self.lambdas = parse_lambdas(self.lambdas)
        return self

    def class_set(self) -> ClassSet:
        """--classes, read: cityscapes, a count or a classes file (labels.read_classes)."""
        return self.classes if isinstance(self.classes, ClassSet) else read_classes(self.classes)

    def identity(self) -> dict:
        """The options that define the run's trajectory (compared on --resume)."""
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if k not in self.RESUMABLE}


def parse_lambdas(value):
    """None, a preset name, 'auto', six numbers, or their comma-separated text."""
    if value is None or (isinstance(value, str) and (value in LAMBDA_PRESETS or value == "auto")):
        return value
    try:
        numbers = tuple(float(v) for v in (value.split(",") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise UsageError(f"--lambdas {value!r}: give {', '.join(LAMBDA_PRESETS)}, auto, or {len(TERM_NAMES)} "
                         f"comma-separated numbers ({', '.join(TERM_NAMES)})") from None
    if len(numbers) != len(TERM_NAMES):
        raise UsageError(f"--lambdas {value!r}: needs {len(TERM_NAMES)} numbers ({', '.join(TERM_NAMES)}), "
                         f"got {len(numbers)}")
    bad = [f"{name} {v:g}" for name, v in zip(TERM_NAMES, numbers) if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise UsageError(f"--lambdas {value!r}: each weight must be a finite number >= 0, not {', '.join(bad)}")
    return numbers


def build_parser() -> argparse.ArgumentParser:
    prog = "crn-train" if Path(sys.argv[0]).name == "crn-train" else "python -m crn_fast.train"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--data", default="synthetic", help=f"training data: {DATA_FORMS} (default: synthetic)")
    a("--split", default="train", help="Cityscapes split (default: train)")
    a("--classes", default="cityscapes",
      help="the labels' classes: cityscapes (default: its 19, as the authors'), a count N (greyscale labels, ids "
           "0..N-1, void 255), or a JSON classes file (names, ids, colours; see the README). The model, its "
           "checkpoints and exports keep them: crn-synthesize reads labels in them")
    a("--preset", default="tiny", help="architecture: tiny, 256p, 512p, 1024p, GTA (default: tiny)")
    a("--res", "--resolution", dest="res", type=resolution, default=None,
      help="training HxW, a multiple of the preset's stride (default: the preset's)")
    a("--k", type=positive_int, default=None, help="images per layout (default: the preset's; 9 for 256p/GTA)")
    a("--loss", default=None, choices=LOSS_KINDS,
      help="perceptual (Eq. 1), hindsight (Eq. 2) or diversity (Eq. 3); default: diversity if k > 1 else perceptual")
    a("--lambdas", default=None, help=f"layer weights: {', '.join(LAMBDA_PRESETS)}, auto, or 6 comma-separated "
      "numbers (default: 256p for diversity, else 1024p)")
    a("--vgg-weights", default="random", help="vgg19-*.pth (torchvision), imagenet-vgg-verydeep-19.mat, or random")
    a("--steps", type=positive_int, default=None, help=f"optimizer steps (default {DEFAULT_STEPS} unless --epochs)")
    a("--epochs", type=positive_float, default=None, help="passes over the data (instead of --steps)")
    a("--batch-size", "--batch", dest="batch_size", type=positive_int, default=4,
      help="global batch size, split over the ranks (default 4)")
    a("--lr", type=positive_float, default=1e-4, help="Adam learning rate (default 1e-4, as the paper)")
    a("--amp", default="off", choices=("bf16", "fp16", "off"), help="autocast precision (default off)")
    a("--backend", default="auto", choices=("auto", *BACKENDS),
      help="eager torch ops or fused Triton kernels; auto: triton on a CUDA device, eager elsewhere (default)")
    a("--checkpointing", action=argparse.BooleanOptionalAction, default=False,
      help="activation checkpointing per refinement module (--no-checkpointing: off, e.g. resuming a run that "
           "had it)")
    a("--compile", nargs="?", const="default", default="off", choices=COMPILE_MODES, metavar="MODE",
      help="the generator and the loss through torch.compile (Inductor): --compile alone is its default mode; "
           "max-autotune-no-cudagraphs also tunes its matmul/conv choices; off (default). The first step "
           "compiles (tens of seconds); checkpoints are the same files")
    a("--init-from", default=None, help="progressive training: copy every module of this lower-resolution "
      "generator (a crn_fast model.ckpt or the authors' TF checkpoint prefix); the new top module and head start "
      "fresh")
    a("--train-modules", default=None, help="train only these modules, e.g. '7,8,head' or '5-8,head' (default: all)")
    a("--out", default="runs/demo", help="output folder (default runs/demo)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out (deletes its checkpoints, "
                   "metrics and samples)")
    a("--seed", type=non_negative_int, default=0,
      help="seeds the weights, the data order, the synthetic scenes and a random VGG (default 0)")
    a("--log-every", type=positive_int, default=10, help="steps between metrics.jsonl lines (default 10)")
    a("--sample-every", type=positive_int, default=100, help="steps between sample grids (default 100)")
    a("--save-every", type=positive_int, default=100, help="steps between checkpoints (default 100; always at the end)")
    a("--workers", type=count_or_auto, default=None,
      help="data-loading worker processes (default auto: on a GPU one a core, the node's ranks sharing them, at "
           "most 8; on a CPU 0, as training uses every core)")
    a("--skip-bad", action=argparse.BooleanOptionalAction, default=False,
      help="leave out (and report) bad data files instead of stopping")
    a("--unknown-colors", default="error", choices=("error", "void"),
      help="label colours and greyscale values that are not the classes' (for Cityscapes: its colours, train ids "
           "0-18, void 19 or 255): error, or void (the authors' rule for colours)")
    a("--scan-labels", default="auto", choices=SCAN_MODES,
      help=f"decode every label before training to find bad files and colours: auto (datasets of up to "
           f"{SCAN_AUTO_LIMIT} pairs), always, never (default auto)")
    a("--val-data", default=None,
      help="held-out data for a validation loss (the training loss, in eval mode, with no gradients), in "
           "--data's forms; cityscapes:ROOT reads its val split, synthetic draws other scenes; none: no "
           "validation, e.g. resuming a run that had it (default: none)")
    a("--val-every", type=positive_int, default=1000, help="steps between validations (default 1000; and at the "
      "end)")
    a("--val-samples", type=positive_int, default=100,
      help="validation layouts, spread evenly over --val-data's sorted files (default 100)")
    a("--no-progress", dest="progress", action="store_false",
      help="no progress report (a bar on a terminal; in a log file or pipe, a line every 30 s)")
    add_logging_options(ap)
    return ap


def config_from_args(args) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def settled_loss(loss: str | None, lambdas, k: int) -> tuple[str, object]:
    """The loss a run trains with when --loss or --lambdas is left out: diversity for k > 1, else
    perceptual; the 256p lambdas for diversity, else 1024p's."""
    kind = loss or ("diversity" if k > 1 else "perceptual")
    return kind, lambdas or ("256p" if kind == "diversity" else "1024p")


def total_steps(steps: int | None, epochs: float | None, pairs: int, batch_size: int) -> int:
    """The step a run ends at: --steps, else --epochs over ``pairs`` in global batches, else the default."""
    if steps is not None:
        return steps
    return math.ceil(epochs * (pairs // batch_size)) if epochs is not None else DEFAULT_STEPS


def given_options(argv) -> set[str]:
    """The TrainConfig fields given on the command line ``argv``, rather than left at their defaults."""
    ap = build_parser()
    for action in ap._actions:
        action.default = argparse.SUPPRESS
    return set(vars(ap.parse_args(argv)))


# never the run's: where it is, what to do with it, and how this terminal shows it
NOT_FROM_THE_RUN = ("out", "resume", "overwrite", "progress", "init_from")


def with_run_options(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, dict]:
    """``--resume`` on the command line: every option not given is the run's own (its config.json),
    so ``--out runs/x --resume`` alone continues it; options given are compared with the run's as
    before. The classes are the model's, from the run, so the classes file need not be at hand.
    Returns the config and the options taken from the run that differ from the defaults."""
    path = Path(cfg.out) / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict):  # gone, or cut by a crash of an older version: the resume point's own
        path = Path(cfg.out) / "train_state.pt"
        try:
            state = load_train_state(path, mmap=True)
            saved = {**state["options"], "model": state["config"]}
        except (CRNError, KeyError, TypeError):  # no run here, or not a readable one: load_resume_point says which
            return cfg, {}
    taken = {}
    for f in dataclasses.fields(TrainConfig):
        name = f.name
        if name in given or name in NOT_FROM_THE_RUN or name not in saved:
            continue
        if name in ("steps", "epochs") and given & {"steps", "epochs"}:
            continue  # the length given, either way, is the run's new length
        value = saved[name]
        if name == "classes":
            model_classes = saved.get("model", {}).get("classes") if isinstance(saved.get("model"), dict) else None
            try:
                value = ClassSet.from_dict(model_classes, str(path)) if model_classes else "cityscapes"
            except CRNError:
                continue  # then --classes is read as given, and the model's are compared as ever
        elif isinstance(value, list):
            value = tuple(value)
        taken[name] = value
    new = dataclasses.replace(cfg, **taken)
    if new.val_data in (None, "none", ""):  # no validation: its interval and size say nothing
        taken = {k: v for k, v in taken.items() if k not in ("val_every", "val_samples")}
    return new, {k: v for k, v in taken.items() if v != getattr(cfg, k)}  # cfg: the defaults, for these


def describe_options(options: dict) -> str:
    """TrainConfig values as the command-line options that give them."""
    words = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "")
        elif isinstance(value, ClassSet):
            words.append(f"{flag} {value.describe()!r} (the model's)")
        elif value is not None:
            text = "x".join(map(str, value)) if name == "res" else \
                ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            words.append(f"{flag} {text}")
    return " ".join(w for w in words if w)


# ----------------------------------------------------------------------------- helpers
class StepBatches(torch.utils.data.Sampler):
    """Global batch b of epoch e is a fixed slice of a permutation seeded by (seed, e); each rank
    takes its own contiguous part. The order does not depend on the number of ranks, and a run
    can start at any step (resume)."""

    def __init__(self, n, global_batch, rank, world, seed, start_step, total_steps):
        if global_batch % world:
            raise UsageError(f"--batch-size {global_batch} must be divisible by the number of ranks ({world})")
        if n < global_batch:
            raise UsageError(f"the dataset has {n} samples, fewer than --batch-size {global_batch}")
        self.n, self.gb, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.start, self.total = start_step, total_steps
        self.per_epoch = n // global_batch

    def __len__(self):
        return self.total - self.start

    def __iter__(self):
        per_rank = self.gb // self.world
        for step in range(self.start, self.total):
            epoch, b = divmod(step, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            batch = perm[b * self.gb:(b + 1) * self.gb]
            yield batch[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()


def parse_train_modules(spec: str | None, n_modules: int) -> set[str] | None:
    """'5-8,head' -> {'refine.5', ..., 'refine.8', 'head'}."""
    if not spec:
        return None
    out = set()
    for part in spec.split(","):
        part = part.strip()
        if part == "head":
            out.add("head")
            continue
        try:
            lo, _, hi = part.partition("-")
            lo, hi = int(lo), int(hi or lo)
        except ValueError:
            raise UsageError(f"--train-modules: {part!r} is not a module index, range (5-8) or 'head'") from None
        if not 0 <= lo <= hi < n_modules:
            raise UsageError(f"--train-modules: {part!r} is outside modules 0..{n_modules - 1}")
        out |= {f"refine.{i}" for i in range(lo, hi + 1)}
    return out


def init_from(model: CRN, path: str) -> list[str]:
    """Copy every refinement module of a lower-resolution generator (progressive training)."""
    src = load_generator(path)
    if src.config.class_set.names != model.config.class_set.names:  # (colours may be fixed along the way)
        raise CRNError(f"--init-from {path}: its classes are {src.config.class_set.describe()}, the model's "
                       f"{model.config.class_set.describe()} ({src.config.class_set.difference(model.config.class_set)}"
                       f"); train with the --classes it was trained with")
    if src.config.num_modules > model.config.num_modules:
        raise CRNError(f"--init-from {path}: it has {src.config.num_modules} modules, more than the "
                       f"{model.config.num_modules} being trained")
    copied = []
    for i, m in enumerate(src.refine):
        if src.config.widths[i] != model.config.widths[i]:
            raise CRNError(f"--init-from {path}: module {i} is {src.config.widths[i]} wide, the model's "
                           f"{model.config.widths[i]}")
        model.refine[i].load_state_dict(m.state_dict())
        copied.append(f"refine.{i}")
    if src.config.num_modules == model.config.num_modules and src.config.k == model.config.k:
        model.head.load_state_dict(src.head.state_dict())
        copied.append("head")
    return copied


def make_optimizer(params, lr: float, device) -> torch.optim.Adam:
    """The paper's Adam. On CUDA PyTorch's fused Adam (one kernel per step over all parameters,
    where the default multi-tensor path makes several passes over ~99M parameters' four fp32
    states at 1024p); elsewhere the default."""
    return torch.optim.Adam(params, lr=lr, fused=True if torch.device(device).type == "cuda" else None)


def _no_profiler_range_warning(record: logging.LogRecord) -> bool:
    """DDP's forward marks profiler ranges, which Dynamo leaves out of the graph with a warning on
    every rank: nothing about the user's run."""
    return not str(record.msg).startswith("Profiler record function")


def compile_for_training(model, criterion, mode: str):
    """--compile: the generator (DDP-wrapped under torchrun, whose graph Dynamo splits at DDP's
    gradient buckets, so the all-reduces still overlap the backward) and the loss through
    torch.compile; ``off`` returns them as they are. The modules themselves are untouched: their
    state dicts, and so the checkpoints, are the same, and validation and the sample sheets call them
    uncompiled (eval mode, no gradients), so nothing recompiles for them."""
    if mode == "off":
        return model, criterion
    if mode not in COMPILE_MODES:
        raise UsageError(f"--compile {mode!r}: valid: {', '.join(COMPILE_MODES)}")
    logging.getLogger("torch._dynamo.variables.ctx_manager").addFilter(_no_profiler_range_warning)  # once
    return torch.compile(model, mode=mode), torch.compile(criterion, mode=mode)


def compile_failure(e: BaseException) -> bool:
    """Did torch.compile fail (Dynamo tracing, or Inductor's code generation and its compiler)?"""
    return any(c.__module__.startswith(("torch._dynamo", "torch._inductor")) for c in type(e).__mro__)


def _no_phase(name: str):
    return contextlib.nullcontext()


def train_step(model, criterion, opt, scaler, layout, target, amp_dtype, phase=_no_phase):
    """One optimizer step as crn_fast.train takes it (the benchmark's training rows and
    benchmarks/profile_train.py time this). Returns the loss and its terms, detached and still on
    the device: reading them waits for it. ``phase(name)`` is a context manager around each part
    ("generator", "loss", "backward", "optimizer"): the profile's ranges; none by default."""
    with torch.autocast(layout.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        with phase("generator"):
            output = model(layout)
        with phase("loss"):
            loss, terms = criterion(output.float(), target, layout)
            value = loss.detach()
    opt.zero_grad(set_to_none=True)
    with phase("backward"):
        scaler.scale(loss).backward()
    with phase("optimizer"):
        scaler.step(opt)
        scaler.update()
    return value, terms


def make_val_set(cfg: "TrainConfig", res, classes):
    """--val-data as a dataset of at most --val-samples layouts, evenly spread, its files not yet
    checked (the caller checks them as the training data's, each rank a share, but each label and
    image decoded whole). Cityscapes' val split; synthetic scenes drawn from another seed than the
    training scenes."""
    try:
        val = make_dataset(cfg.val_data, res, cfg.seed + 1, "val", cfg.skip_bad, cfg.unknown_colors, "always",
                           check=False, classes=classes, option="--val-data")
    except CRNError as e:  # a file's own error (a missing folder, say): which option gave it
        if str(e).startswith(("--val-data", "unknown --val-data")):
            raise
        raise type(e)(f"--val-data {cfg.val_data}: {e}") from None
    val.subset(cfg.val_samples)
    val.decode_images = True  # a few files: each decoded whole up front, so none fails mid-run
    return val


def validate(model, criterion, val, batch_size: int, device, amp_dtype, num_classes: int, rank: int = 0,
             world: int = 1, threads: int = 1) -> torch.Tensor:
    """The training loss on this rank's share of the validation set (every world-th layout), in
    eval mode with no gradients: the sums (float64, on the device) of [layouts, loss, each term]
    over its layouts, for the caller to add up over the ranks (val_scores gives the means). Nothing
    a training step depends on changes (auto lambdas are not updated in eval mode, no random
    number is drawn), so a run with validation trains exactly as one without."""
    was_training = model.training
    model.eval()
    criterion.eval()
    sums = torch.zeros(2 + len(TERM_NAMES), dtype=torch.float64, device=device)  # count, loss, terms
    share = list(range(rank, len(val), world))
    cuda = torch.device(device).type == "cuda"
    try:
        with torch.no_grad():
            for first in range(0, len(share), batch_size):
                # a batch decoded at a time, in threads: at 1024x2048 a decoded layout and photograph
                # take 8 MB, so reading all 100 ahead would hold 800 MB. Nothing here waits for the
                # device (pinned copies, the count added as a number), so on a GPU the next batch
                # decodes while this one runs; the caller's read of the sums is the one wait.
                batch = list(in_threads(val.__getitem__, share[first:first + batch_size], threads))
                ids, target = device_batch(*((torch.stack(t).pin_memory() if cuda else torch.stack(t))
                                             for t in zip(*batch)), device, non_blocking=cuda)
                layout = one_hot(ids, num_classes)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, terms = criterion(model(layout).float(), target, layout)
                n = ids.shape[0]
                sums[0] += n
                sums[1:] += torch.stack([loss.double(), *(t.double() for t in terms.values())]) * n
    finally:
        model.train(was_training)
        criterion.train(was_training)
    return sums


def val_scores(sums: torch.Tensor) -> dict:
    """validate()'s sums, added up over the ranks, as the metrics.jsonl record's means."""
    count, loss, *terms = sums.tolist()
    return {"val_loss": loss / count, **{f"val_loss_{k}": v / count for k, v in zip(TERM_NAMES, terms)},
            "val_images": int(count)}


class FirstNonFinite:
    """The first step whose loss is NaN or inf, noted on the device (no wait each step) and read
    back by ``check``, which stops the run naming that step."""

    def __init__(self, device):
        self.step = torch.zeros((), dtype=torch.int64, device=device)  # 0: none yet
        self.value = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        new = (self.step == 0) & ~torch.isfinite(loss)
        self.step = torch.where(new, step, self.step)
        self.value = torch.where(new, loss.float(), self.value)

    def check(self, step: int, last_good: Path) -> None:
        bad, value = torch.stack([self.step.double(), self.value.double()]).tolist()
        if bad:
            later = f", noticed at step {step}" if int(bad) != step else ""
            saved = f"the last good checkpoint is {last_good}" if last_good.exists() else "no checkpoint was saved yet"
            raise CRNError(f"the loss is {value} at step {int(bad)}{later} (NaN/inf in the data, the weights or the "
                           f"precision); {saved}; try a lower --lr or --amp off")


def images_per_s(images: int, seconds: float, compiling: tuple[float, int] | None = None) -> float:
    """A log window's throughput. With --compile the first window leaves out the first step, which
    compiled (``compiling``: its seconds and images), unless that step is the whole window."""
    if compiling is not None and images > compiling[1]:
        images, seconds = images - compiling[1], seconds - compiling[0]
    return images / max(seconds, 1e-9)


def loader_workers(workers: int | None, device) -> int:
    """--workers, or its default: on a GPU the data loads in worker processes, one a core shared by
    the node's ranks (torchrun's LOCAL_WORLD_SIZE), at most 8, so that decoding the next batches
    overlaps the steps (a 2048x1024 Cityscapes-format pair took 60-113 ms to load on a 2-core CPU,
    about what a 1024p step took on an H100); on a CPU 0: the step's own threads use every core."""
    if workers is not None:
        return workers
    if torch.device(device).type != "cuda":
        return 0
    return min(8, cores_per_rank())


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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
        from .checkpoint import read_generator_file
        try:
            step = read_generator_file(out / "model.ckpt", weights=False)[2].get("step")
            return f"model.ckpt at step {step}" + ("" if (out / "train_state.pt").exists() else
                                                    ", no train_state.pt")
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
    from .checkpoint import atomic_path
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))


def batches(loader):
    """The loader's batches; an error raised in a worker process comes out as its one-line message."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except CRNError as e:
            text = str(e)
            if "Original Traceback" in text:  # DataLoader wraps a worker's exception with its traceback
                last = [line for line in text.strip().splitlines() if line.strip()][-1]
                text = last.split(": ", 1)[1] if ": " in last else last
            raise type(e)(text) from None
        yield batch


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


# ----------------------------------------------------------------------------- the run
def train(cfg: TrainConfig) -> Path:
    """Train a generator as ``cfg`` says; returns the output folder. Rank 0 holds --out alone from
    its first write there to the end of the run, however the run ends (prepare_out)."""
    with contextlib.ExitStack() as hold:
        return _train(cfg, hold)


def _train(cfg: TrainConfig, hold: contextlib.ExitStack) -> Path:
    # --- setup: distributed, output folder, model, data, loss, optimizer -------------------------
    # Under torchrun, whatever can fail on one rank alone runs in ranks.together(): if it fails on
    # any rank, every rank stops there, in one line, with the disk as it was (crn_fast.distributed).
    ranks = setup_distributed()
    rank, world, device = ranks.rank, ranks.world, ranks.device
    with ranks.together():  # the options, and the output folder (rank 0)
        cfg.validate()
        # "auto" is settled here, so the run's options (and what --resume compares) name what ran
        cfg = dataclasses.replace(cfg, backend=choose_backend(cfg.backend, device))
        if rank == 0:
            check_out(cfg)
        config = get_preset(cfg.preset) if cfg.k is None else get_preset(cfg.preset).replace(k=cfg.k)
        config = config.with_classes(cfg.class_set())
        res = cfg.res or config.resolution
        try:
            config.validate_input_size(*res)
        except CRNError as e:
            raise UsageError(f"--res: {e}") from None
    out = Path(cfg.out)
    kind, lambdas = settled_loss(cfg.loss, cfg.lambdas, config.k)
    torch.manual_seed(cfg.seed)

    with ranks.together():  # what every rank builds: model, resume point, data and its share of the data's check
        model = CRN(config, backend=cfg.backend, checkpointing=cfg.checkpointing)
        state = load_resume_point(cfg, config, model) if cfg.resume else None
        start = int(state["step"]) if state else 0
        if cfg.init_from and not cfg.resume:
            copied = init_from(model, cfg.init_from)
            if rank == 0:
                log.info(f"init-from {cfg.init_from}: copied {', '.join(copied)}")
        trainable = parse_train_modules(cfg.train_modules, config.num_modules)
        if trainable is not None:
            for name, p in model.named_parameters():
                p.requires_grad_(any(name.startswith(t + ".") for t in trainable))
        dataset = make_dataset(cfg.data, res, cfg.seed, cfg.split, cfg.skip_bad, cfg.unknown_colors,
                               cfg.scan_labels, check=False, classes=config.class_set)
        found = dataset.check(cores_per_rank(), rank, world)  # every world-th file, with this rank's cores
        val = make_val_set(cfg, res, config.class_set) if cfg.val_data else None
        val_found = val.check(cores_per_rank(), rank, world) if val is not None else []

    with ranks.together():  # the data as checked by all, then the loss and optimizer
        dataset.keep(sum(ranks.gather(found), []))  # the same on every rank: the first bad file, or all left out
        for msg in dataset.skipped if rank == 0 else ():
            log.warning(f"skipped: {msg}")
        if val is not None:
            try:
                val.keep(sum(ranks.gather(val_found), []))
            except CRNError as e:  # e.g. every file left out by --skip-bad
                raise type(e)(f"--val-data {e}" if str(e).startswith(f"{cfg.val_data}:") else str(e)) from None
            for msg in val.skipped if rank == 0 else ():
                log.warning(f"skipped (--val-data): {msg}")
        if dataset.warning and rank == 0:
            log.warning(dataset.warning)
        data_id = {"pairs": len(dataset), "fingerprint": dataset.fingerprint()}
        if state is not None and rank == 0 and state.get("data", data_id) != data_id:
            log.warning(f"--resume: the data now holds {len(dataset)} samples, the run had {state['data']['pairs']}"
                        + ("" if len(dataset) != state["data"]["pairs"] else " but other files") +
                        f" (added, removed, renamed or skipped since): the batches from step {start} on differ "
                        f"from the run's own")
        vgg = load_vgg19(cfg.vgg_weights, seed=cfg.seed)
        total = total_steps(cfg.steps, cfg.epochs, len(dataset), cfg.batch_size)
        if start >= total:  # a finished run resumed with its own length, or less: nothing would train
            length = f"--steps {cfg.steps}" if cfg.steps is not None else f"--epochs {cfg.epochs:g} ({total} steps)" \
                if cfg.epochs is not None else f"the default {DEFAULT_STEPS} steps"
            raise UsageError(f"--resume: the run is already at step {start}, and {length} ends there: nothing to "
                             f"train; give a longer --steps (e.g. --steps {2 * start}) or --epochs")
        sampler = StepBatches(len(dataset), cfg.batch_size, rank, world, cfg.seed, start, total)
        criterion = CRNLoss(vgg, kind, lambdas)
        model.to(device).train()
        criterion.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, cfg.lr, device)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        if state is not None:
            restore_training_state(state, opt, scaler, criterion, device)

    workers = loader_workers(cfg.workers, device)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False,
                                         worker_init_fn=ignore_stop_signals if workers else None)
    amp_dtype = DTYPES[cfg.amp] if cfg.amp != "off" else None

    with ranks.together():  # only now, with every rank set up, is --overwrite's old run removed
        if rank == 0:
            fixed = [dataset[i] for i in range(min(4, len(dataset)))]  # the sample sheets' layouts and images
            fixed_ids = torch.stack([f[0] for f in fixed]).to(device)
            fixed_img = torch.stack([f[1] for f in fixed])
            if val is not None:  # the validation sheets': up to 4 of the validation layouts, spread
                shown = [val[i * len(val) // min(4, len(val))] for i in range(min(4, len(val)))]
                val_ids, val_img = torch.stack([f[0] for f in shown]).to(device), torch.stack([f[1] for f in shown])
            prepare_out(cfg, hold)
            log.info(f"crn_fast.train: device {device}" + (f" x {world} ranks (DDP)" if world > 1 else "") +
                     f", backend {model.backend}, amp {cfg.amp}" +
                     ("" if cfg.compile == "off" else f", torch.compile ({cfg.compile}; the first step compiles)"))
            log.info(f"  model  {config.name} {list(config.widths)} k={config.k}, "
                     f"{sum(p.numel() for p in params) / 1e6:.2f} M trainable params, training at {res[0]}x{res[1]}"
                     + ("" if config.classes is None else f", classes {config.class_set.describe()}"))
            log.info(f"  data   {dataset.describe()}, global batch {cfg.batch_size}, steps {start}->{total}, "
                     f"{workers} loader worker(s)")
            if val is not None:
                log.info(f"  val    {val.describe()}, every {cfg.val_every} steps and at the end")
            log.info(f"  loss   {kind}, lambdas {lambdas}, VGG-19 weights: {vgg.source}")
            log.info(f"  out    {out}" + (f" (resumed at step {start})" if cfg.resume else ""))
            with atomic_path(out / "config.json") as tmp:  # what a --resume reads the run's options from
                Path(tmp).write_text(json.dumps({**dataclasses.asdict(cfg), "backend_used": model.backend,
                                                 "model": config.to_dict()}, indent=2))
            if cfg.resume:
                truncate_metrics(out / "metrics.jsonl", start)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None) if world > 1 else model
    forward, loss_fn = compile_for_training(ddp, criterion, cfg.compile)
    tensorboard = TensorBoardLog(out) if rank == 0 else None

    def checkpoint(step):
        save_train_state(out / "train_state.pt", {
            "step": step, "config": config.to_dict(), "options": cfg.identity(), "data": data_id,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "loss": criterion.resume_state(), "rng": rng_state(device)})
        save_generator(model, out / "model.ckpt", extra={"step": step})

    sheets = SampleWriter(tensorboard)

    def samples(step, ids=None, images=None, name="step", tag="samples"):
        """A sample sheet (layout | target | output) of the fixed training layouts, or of others."""
        ids, images = (fixed_ids, fixed_img) if ids is None else (ids, images)
        model.eval()
        with torch.no_grad():
            outs = model(one_hot(ids, config.num_classes))
        model.train()
        sheet = sample_sheet(ids, images, outs, config.class_set)
        latest = "latest.png" if name == "step" else f"{name}_latest.png"
        sheets.write(sheet, [out / "samples" / f"{name}_{step:06d}.png", out / "samples" / latest], step, tag)

    # --- the loop: one optimizer step per global batch -------------------------------------------
    bar = Progress(total, "train", "step", initial=start, enabled=rank == 0 and cfg.progress)
    t_last, seen, step = time.perf_counter(), 0, start
    compiling = None  # --compile: the first step's (seconds, images), left out of the first images/s
    watch = FirstNonFinite(device)
    loading = batches(loader)
    # metrics.jsonl is closed at the end, or by the with on an error (its lines are flushed as written)
    with StopSignals(rank, "stopping after this step, with the run saved (Ctrl-C again: stop at once, losing "
                     "the steps since the last checkpoint)") as signals, \
            open(out / "metrics.jsonl", "a") if rank == 0 else contextlib.nullcontext() as metrics:
        while True:
            # every rank, every step: a bad file in one rank's share of the data, or a signal that
            # reached one rank, stops all of them here
            with ranks.together(signals):
                batch = next(loading, None) if not signals.signum else None
            if batch is None or signals.agreed:
                break
            # Nothing in a step reads a value back from the device, so on a GPU the host queues the
            # next step (and loads its batch) while this one runs. The loop waits only when it reports.
            ids, target = device_batch(*batch, device, non_blocking=True)  # 8-bit through the copy
            t_step = time.perf_counter()
            try:
                loss, terms = train_step(forward, loss_fn, opt, scaler, one_hot(ids, config.num_classes), target,
                                         amp_dtype)
            except Exception as e:  # torch.compile fails at the first step, where it compiles
                if cfg.compile == "off" or not compile_failure(e):
                    raise
                log.debug("torch.compile's error", exc_info=True)
                first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
                raise CRNError(f"--compile {cfg.compile}: torch.compile failed at step {step + 1} "
                               f"({type(e).__name__}: {first.strip()[:300]}); train without it (--compile off; "
                               f"-v shows torch's traceback)") from None
            if step == start and cfg.compile != "off" and rank == 0:  # the compile's cost, once
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                compiling = (time.perf_counter() - t_step, ids.shape[0] * world)
                log.info(f"compiled: the first step took {compiling[0]:.1f} s")
            step += 1
            seen += ids.shape[0] * world
            if dist.is_initialized():  # the mean over ranks: every rank sees the same loss, and stops together
                dist.all_reduce(loss)
                loss = loss / world
            if not scaler.is_enabled():  # fp16 scaling skips such steps itself
                watch.update(loss, step)
            due = [step % every == 0 or step == total for every in (cfg.log_every, cfg.sample_every, cfg.save_every)]
            loss_val = None
            if any(due):
                with ranks.together():  # a NaN, or rank 0's failed write, stops every rank
                    # on every rank, before anything is logged or saved: the last good state stays
                    watch.check(step, out / "train_state.pt")
                    logs, sample, save = (d and rank == 0 for d in due)
                    if logs:
                        loss_val, *term_vals = torch.stack([loss.float(), *terms.values()]).tolist()  # one wait
                        now = time.perf_counter()
                        rec = {"step": step, "loss": loss_val, **{f"loss_{k}": v for k, v in zip(terms, term_vals)},
                               "images_per_s": images_per_s(seen, now - t_last, compiling),
                               "peak_memory_mb": peak_memory_mb(device), "lr": cfg.lr}
                        metrics.write(json.dumps(rec) + "\n")
                        metrics.flush()
                        if tensorboard is not None:
                            tensorboard.scalars({k: v for k, v in rec.items() if k != "step"}, step)
                        t_last, seen, compiling = now, 0, None
                    if sample:
                        samples(step)
                    if save:
                        checkpoint(step)
            if val is not None and (step % cfg.val_every == 0 or step == total):
                with ranks.together():  # every rank its share of the layouts: a bad file on one stops all
                    sums = validate(model, criterion, val, max(1, cfg.batch_size // world), device, amp_dtype,
                                    config.num_classes, rank, world, max(1, min(4, cores_per_rank())))
                if world > 1:  # outside together(): every rank gets here
                    dist.all_reduce(sums)
                scores = val_scores(sums)
                with ranks.together():  # rank 0's failed write stops every rank
                    if rank == 0:
                        metrics.write(json.dumps({"step": step, **scores}) + "\n")
                        metrics.flush()
                        if tensorboard is not None:
                            tensorboard.scalars({k: v for k, v in scores.items() if k != "val_images"}, step)
                        n = scores["val_images"]
                        log.info(f"validation at step {step}: loss {scores['val_loss']:.5g} over {n} "
                                 f"layout{'s' if n != 1 else ''}")
                        samples(step, val_ids, val_img, "val", "val_samples")  # unseen layouts' sheet
            bar.update(1, **({} if loss_val is None else {"loss": f"{loss_val:.3f}"}))

        # --- the end (or a stop: the resume point saved where the run stopped) ---------------------
        bar.close()
        stopped = signals.agreed if step < total else 0  # a signal after the last step changes nothing
        with ranks.together():
            if stopped:  # as at a checkpoint: a NaN since the last check is not saved
                watch.check(step, out / "train_state.pt")
            if rank == 0:
                metrics.close()
                if step == start or stopped and step % cfg.save_every:  # this step is not saved yet
                    checkpoint(step)
                if step == start and not stopped:  # nothing to do (already at --steps): the files still there
                    samples(step)
                sheets.close()  # the last sheet written (and given to TensorBoard), or its error raised
                if tensorboard is not None:
                    tensorboard.close()
                if not stopped:
                    log.info(f"done: {out / 'model.ckpt'}, samples in {out / 'samples'}, metrics in "
                             f"{out / 'metrics.jsonl'}")
        if world > 1:
            spread = ranks.weight_spread(model)
            if rank == 0:
                log.info(f"ranks in sync: max |weight difference| between ranks = {spread:g}")
                (out / "ddp.json").write_text(json.dumps({"world_size": world, "max_weight_spread": spread}))
            dist.barrier()
    if stopped:
        name = signal.Signals(stopped).name
        raise RunStopped(f"stopped by {name} at step {step} of {total}; its state is saved in "
                         f"{out / 'train_state.pt'}: continue with --resume", stopped, quiet=rank != 0)
    return out


def main(argv=None) -> int:
    ap = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = ap.parse_args(argv)
    setup_logging(args)

    def run():
        cfg = config_from_args(args)
        if cfg.resume:
            cfg, taken = with_run_options(cfg, given_options(argv))
            if taken and int(os.environ.get("RANK", "0")) == 0:
                log.info(f"--resume: the run's own options: {describe_options(taken)}")
        train(cfg)

    try:
        return run_tool(ap.prog, run)
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
