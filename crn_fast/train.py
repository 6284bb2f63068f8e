"""Train a CRN generator.

    python -m crn_fast.train                      # tiny preset on built-in synthetic streets (CPU: ~3 min)
    python -m crn_fast.train --data cityscapes:/data/cityscapes --preset 256p --k 9 --loss diversity \
        --vgg-weights imagenet-vgg-verydeep-19.mat --amp bf16
    torchrun --nproc_per_node 8 -m crn_fast.train ...   # DDP: NCCL on GPUs, gloo on CPU

Outputs in --out: model.ckpt (crn_fast generator), train_state.pt (weights, optimizer, step, RNG:
the resume point; loaded with weights_only=True), metrics.jsonl, samples/*.png, and TensorBoard events when
tensorboard is installed. All files are written atomically; --resume continues exactly.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import load_generator, load_train_state, save_generator, save_train_state
from .config import get_preset, parse_resolution
from .constants import DTYPES
from .data import DATA_FORMS, make_dataset
from .errors import CRNError
from .images import sample_sheet, save_png
from .labels import one_hot
from .loss import LAMBDA_PRESETS, LOSS_KINDS, CRNLoss
from .model import BACKENDS, CRN
from .vgg import load_vgg19

DEFAULT_STEPS = 300


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m crn_fast.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--data", default="synthetic", help=f"training data: {DATA_FORMS} (default: synthetic)")
    a("--split", default="train", help="Cityscapes split (default: train)")
    a("--preset", default="tiny", help="architecture: tiny, 256p, 512p, 1024p, GTA (default: tiny)")
    a("--resolution", default=None, help="training HxW, a multiple of the preset's stride (default: the preset's)")
    a("--k", type=int, default=None, help="images per layout (default: the preset's; 9 for 256p/GTA)")
    a("--loss", default=None, choices=LOSS_KINDS,
      help="perceptual (Eq. 1), hindsight (Eq. 2) or diversity (Eq. 3); default: diversity if k > 1 else perceptual")
    a("--lambdas", default=None, help=f"layer weights: {', '.join(LAMBDA_PRESETS)}, auto, or 6 comma-separated "
      "numbers (default: 256p for diversity, else 1024p)")
    a("--vgg-weights", default="random", help="vgg19-*.pth (torchvision), imagenet-vgg-verydeep-19.mat, or random")
    a("--steps", type=int, default=None, help=f"optimizer steps (default {DEFAULT_STEPS} unless --epochs)")
    a("--epochs", type=float, default=None, help="passes over the data (instead of --steps)")
    a("--batch-size", type=int, default=4, help="global batch size, split over the ranks (default 4)")
    a("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4, as the paper)")
    a("--amp", default="off", choices=("bf16", "fp16", "off"), help="autocast precision (default off)")
    a("--backend", default="eager", choices=BACKENDS, help="eager torch ops or fused Triton kernels")
    a("--checkpointing", action="store_true", help="activation checkpointing per refinement module")
    a("--init-from", default=None, help="progressive training: copy every module of this lower-resolution "
      "crn_fast checkpoint; the new top module and head start fresh")
    a("--train-modules", default=None, help="train only these modules, e.g. '7,8,head' or '5-8,head' (default: all)")
    a("--out", default="runs/demo", help="output folder (default runs/demo)")
    a("--resume", action="store_true", help="continue from --out's model.ckpt and train_state.pt")
    a("--seed", type=int, default=0)
    a("--log-every", type=int, default=10, help="steps between metrics.jsonl lines (default 10)")
    a("--sample-every", type=int, default=100, help="steps between sample grids (default 100)")
    a("--save-every", type=int, default=100, help="steps between checkpoints (default 100; always at the end)")
    a("--workers", type=int, default=0, help="data-loading worker processes (default 0)")
    a("--skip-bad", action="store_true", help="skip (and report) bad data files instead of stopping")
    a("--unknown-colors", default="error", choices=("error", "void"),
      help="colour labels with colours outside the Cityscapes table: error, or void (the authors' rule)")
    a("--no-progress", action="store_true", help="no progress bar")
    return ap


class StepBatches(torch.utils.data.Sampler):
    """Global batch b of epoch e is a fixed slice of a permutation seeded by (seed, e); each rank
    takes its own contiguous part. The order does not depend on the number of ranks, and a run
    can start at any step (resume)."""

    def __init__(self, n, global_batch, rank, world, seed, start_step, total_steps):
        if global_batch % world:
            raise CRNError(f"--batch-size {global_batch} must be divisible by the number of ranks ({world})")
        if n < global_batch:
            raise CRNError(f"the dataset has {n} samples, fewer than --batch-size {global_batch}")
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
            raise CRNError(f"--train-modules: {part!r} is not a module index, range (5-8) or 'head'") from None
        if not 0 <= lo <= hi < n_modules:
            raise CRNError(f"--train-modules: {part!r} is outside modules 0..{n_modules - 1}")
        out |= {f"refine.{i}" for i in range(lo, hi + 1)}
    return out


def init_from(model: CRN, path: str) -> list[str]:
    """Copy every refinement module of a lower-resolution generator (progressive training)."""
    src = load_generator(path)
    if src.config.num_classes != model.config.num_classes:
        raise CRNError(f"--init-from {path}: it takes {src.config.num_classes} layout channels, the model "
                       f"{model.config.num_classes}")
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


def setup_distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    return rank, world, device


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def train(args) -> Path:
    rank, world, device = setup_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    out = Path(args.out)
    config = get_preset(args.preset)
    if args.k is not None:
        config = config.replace(k=args.k)
    resolution = parse_resolution(args.resolution) if args.resolution else config.resolution
    config.validate_input_size(*resolution)
    kind = args.loss or ("diversity" if config.k > 1 else "perceptual")
    lambdas = args.lambdas or ("256p" if kind == "diversity" else "1024p")
    if "," in lambdas:
        lambdas = [float(v) for v in lambdas.split(",")]
    torch.manual_seed(args.seed)

    dataset = make_dataset(args.data, resolution, args.seed, args.split, args.skip_bad, args.unknown_colors)
    for msg in dataset.skipped:
        log(f"skipped: {msg}")
    model = CRN(config, backend=args.backend, checkpointing=args.checkpointing)
    vgg = load_vgg19(args.vgg_weights, seed=args.seed)
    criterion = CRNLoss(vgg, kind, lambdas)
    start = 0
    if args.resume:
        # train_state.pt alone is the resume point (weights included): one atomic file, so a kill
        # between writing it and model.ckpt cannot pair weights and optimizer state of different steps
        state_path = out / "train_state.pt"
        if not state_path.is_file():
            raise CRNError(f"--resume: {out} has no train_state.pt to resume from")
        state = load_train_state(state_path)
        saved = {k: (tuple(v) if isinstance(v, list) else v) for k, v in state["config"].items() if k != "name"}
        wanted = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.to_dict().items() if k != "name"}
        if saved != wanted:
            raise CRNError(f"--resume: {state_path} is a {state['config']} model, but the options describe "
                           f"{config.to_dict()}")
        model.load_state_dict(state["model"])
        start = int(state["step"])
    elif args.init_from:
        copied = init_from(model, args.init_from)
        log(f"init-from {args.init_from}: copied {', '.join(copied)}")

    trainable = parse_train_modules(args.train_modules, config.num_modules)
    if trainable is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(t + ".") for t in trainable))
    model.to(device).train()
    criterion.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    if args.resume:
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"]) if state.get("scaler") else None
        criterion.load_state_dict(state["loss"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None) if world > 1 else model

    steps_per_epoch = len(dataset) // args.batch_size
    total = args.steps if args.steps is not None else \
        math.ceil(args.epochs * steps_per_epoch) if args.epochs is not None else DEFAULT_STEPS
    sampler = StepBatches(len(dataset), args.batch_size, rank, world, args.seed, start, total)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    amp_dtype = DTYPES[args.amp] if args.amp != "off" else None
    n_params = sum(p.numel() for p in params)

    log(f"crn_fast.train: device {device}" + (f" x {world} ranks (DDP)" if world > 1 else "") +
        f", backend {model.backend}, amp {args.amp}")
    log(f"  model  {config.name} {list(config.widths)} k={config.k}, {n_params / 1e6:.2f} M trainable params, "
        f"training at {resolution[0]}x{resolution[1]}")
    log(f"  data   {dataset.describe()}, global batch {args.batch_size}, steps {start}->{total}")
    log(f"  loss   {kind}, lambdas {lambdas}, VGG-19 weights: {vgg.source}")
    log(f"  out    {out}")

    writer = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(exist_ok=True)
        (out / "config.json").write_text(json.dumps({**vars(args), "backend_used": model.backend,
                                                        "model": config.to_dict()}, indent=2))
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out / "tb"))
        except Exception:  # tensorboard not installed
            writer = None
    fixed = [dataset[i] for i in range(min(4, len(dataset)))]
    fixed_ids = torch.stack([f[0] for f in fixed]).to(device)
    fixed_img = torch.stack([f[1] for f in fixed])

    def checkpoint(step):
        save_generator(model, out / "model.ckpt", extra={"step": step})
        save_train_state(out / "train_state.pt", {
            "step": step, "config": config.to_dict(),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "loss": criterion.state_dict(), "rng": rng_state(device)})

    def samples(step):
        model.eval()
        with torch.no_grad():
            outs = model(one_hot(fixed_ids, config.num_classes))
        model.train()
        sheet = sample_sheet(fixed_ids, fixed_img, outs)
        save_png(sheet, out / "samples" / f"step_{step:06d}.png")
        save_png(sheet, out / "samples" / "latest.png")

    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None
    t_last, seen, step = time.perf_counter(), 0, start
    for ids, target in loader:
        ids, target = ids.to(device, non_blocking=True), target.to(device, non_blocking=True)
        layout = one_hot(ids, config.num_classes)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = ddp(layout)
            loss, terms = criterion(output.float(), target, layout)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        step += 1
        seen += ids.shape[0] * world
        if dist.is_initialized():
            loss_val = loss.detach().clone()
            dist.all_reduce(loss_val)
            loss_val = float(loss_val) / world
        else:
            loss_val = float(loss.detach())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}")
        if rank == 0 and (step % args.log_every == 0 or step == total):
            now = time.perf_counter()
            rec = {"step": step, "loss": loss_val, **{f"loss_{k}": v for k, v in terms.items()},
                   "images_per_s": seen / max(now - t_last, 1e-9), "peak_memory_mb": peak_memory_mb(device),
                   "lr": args.lr}
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            if writer is not None:
                for key, v in rec.items():
                    if key != "step":
                        writer.add_scalar(key, v, step)
            t_last, seen = now, 0
        if rank == 0 and (step % args.sample_every == 0 or step == total):
            samples(step)
        if rank == 0 and (step % args.save_every == 0 or step == total):
            checkpoint(step)
    if bar is not None:
        bar.close()
    if rank == 0:
        metrics.close()
        if writer is not None:
            writer.close()
        if step == start:  # nothing to do (already at --steps): still leave the files in place
            checkpoint(step)
            samples(step)
        log(f"done: {out / 'model.ckpt'}, samples in {out / 'samples'}, metrics in {out / 'metrics.jsonl'}")
    if dist.is_initialized():
        spread = ranks_spread(model)
        if rank == 0:
            log(f"ranks in sync: max |weight difference| between ranks = {spread:g}")
            (out / "ddp.json").write_text(json.dumps({"world_size": world, "max_weight_spread": spread}))
        dist.barrier()
    return out


def ranks_spread(model) -> float:
    """Largest difference of any weight between ranks (0 when DDP kept them identical)."""
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except CRNError as e:
        print(f"crn_fast.train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
