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
import json
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import atomic_path, load_generator, save_generator, save_train_state
from .cli import Progress, StopSignals, add_logging_options, cores_per_rank, count_or_auto, \
    ignore_stop_signals, log, non_negative_int, positive_float, positive_int, resolution, run_tool, setup_logging
from .config import get_preset
from .constants import DTYPES
from .data import DATA_FORMS, SCAN_AUTO_LIMIT, SCAN_MODES, device_batch, in_threads, make_dataset
from .distributed import setup_distributed, shutdown
from .errors import CRNError, RunStopped, UsageError
from .images import sample_sheet
from .labels import one_hot
from .loss import LAMBDA_PRESETS, LOSS_KINDS, TERM_NAMES, CRNLoss
from .model import BACKENDS, CRN, choose_backend
from .run_folder import SampleWriter, TensorBoardLog, check_out, load_resume_point, prepare_out, \
    restore_training_state, rng_state, truncate_metrics
from .train_config import AMP_MODES, COMPILE_MODES, DEFAULT_STEPS, TrainConfig, describe_options, settled_loss, \
    total_steps, with_run_options
from .vgg import load_vgg19

# This file is the command line and the loop. A run's options are train_config.py's TrainConfig;
# its folder (what a run is made of, how a run takes, resumes and fills it) is run_folder.py's.


# ----------------------------------------------------------------------------- the command line
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
    a("--amp", default="off", choices=AMP_MODES, help="autocast precision (default off)")
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


def given_options(argv) -> set[str]:
    """The TrainConfig fields given on the command line ``argv``, rather than left at their defaults."""
    ap = build_parser()
    for action in ap._actions:
        action.default = argparse.SUPPRESS
    return set(vars(ap.parse_args(argv)))


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
        res = cfg.res or config.resolution  # cfg.res checked by cfg.validate()
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
