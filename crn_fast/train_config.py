"""The options of a training run: ``TrainConfig`` (one dataclass: crn-train's options fill it, or
Python gives it to ``crn_fast.train.train``), what a run trains with when an option is left out,
and how ``--resume`` takes a run's own options from its folder."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import load_train_state
from .config import PRESETS, get_preset
from .data import SCAN_MODES
from .errors import CRNError, UsageError
from .labels import ClassSet, read_classes
from .loss import LAMBDA_PRESETS, LOSS_KINDS, TERM_NAMES
from .model import BACKENDS

DEFAULT_STEPS = 300
# --compile: torch.compile's modes that suit a training step (the CUDA-graph modes, reduce-overhead and
# max-autotune, do not: a step's graphs would hold the optimizer's and DDP's buffers across replays)
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs")
AMP_MODES = ("off", "bf16", "fp16")  # --amp: autocast's precision, or none


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

    # the fields' kinds, checked first (Python callers may give "10" for 10); None: left to the default
    INTS = ("batch_size", "log_every", "sample_every", "save_every", "val_every", "val_samples", "seed", "steps", "k",
            "workers")
    NUMBERS = ("lr", "epochs")
    FLAGS = ("checkpointing", "resume", "overwrite", "skip_bad", "progress")
    OPTIONAL = ("steps", "k", "workers", "epochs")

    def validate(self) -> "TrainConfig":
        """UsageError naming the first option whose value cannot work."""
        for names, kind, kind_of in ((self.INTS, "an integer", numbers.Integral),
                                     (self.NUMBERS, "a number", numbers.Real), (self.FLAGS, "True or False", bool)):
            for name in names:
                v = getattr(self, name)
                if v is None and name in self.OPTIONAL:
                    continue
                if not isinstance(v, kind_of) or isinstance(v, bool) and kind_of is not bool:  # True is no count
                    raise UsageError(f"--{name.replace('_', '-')} {v!r}: must be {kind}" +
                                     (" or None (the default)" if name in self.OPTIONAL else ""))
        if self.res is not None and self.preset in PRESETS:  # (H, W), or "HxW" as on the command line
            try:
                self.res = get_preset(self.preset).input_size(self.res, "--res")
            except CRNError as e:
                raise UsageError(str(e)) from None
        for name in ("batch_size", "log_every", "sample_every", "save_every", "val_every", "val_samples"):
            if getattr(self, name) < 1:
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
        if self.seed < 0:
            raise UsageError(f"--seed {self.seed}: must be an integer >= 0")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers {self.workers}: must be >= 0")
        for name, valid in (("amp", AMP_MODES), ("backend", ("auto", *BACKENDS)),
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
