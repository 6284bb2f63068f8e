"""Where one training step's time goes, from torch.profiler: the step `crn_fast.train` runs
(`crn_fast.train.train_step`: the triton backend, bf16 autocast, the VGG-19 perceptual loss, fused
Adam on CUDA), by phase and stage.

    python benchmarks/profile_train.py --res 1024x2048                 # GPU: 1024p, bf16
    python benchmarks/profile_train.py --preset tiny --res 64x128      # CPU smoke (eager ops, fp32)

Phases are profiler ranges around the step's parts: generator (the forward), loss (VGG-19 on the
outputs and the targets, and Eq. 1), backward (the autograd engine's kernels: generator and VGG),
optimizer. Stages are profile_stages.stage_of's (conv, norm, upsample/concat, other: VGG's convs
are convs, its ReLUs norm-like pointwise ops, the loss's differences other). Every kernel (GPU) or
top-level op (CPU) is counted once; the 25 that take longest in all are listed with their phase.
Writes results/profile_train_<device>_<res>.{json,md}.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import device_label, machine_info, write_text_atomic  # noqa: E402
from profile_stages import (ANNOTATION, STAGES, add_shape_args, kernel_events, profiled, shape_from,  # noqa: E402
                            stage_of, stage_table)

from crn_fast import CRN  # noqa: E402
from crn_fast.labels import one_hot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("generator", "loss", "backward", "optimizer")


def training_step(config, size, device, checkpointing: bool):
    """crn_fast.train's own step (train.train_step, each part in a profiler range), and its amp dtype."""
    from torch.autograd.profiler import record_function
    from crn_fast.loss import CRNLoss
    from crn_fast.model import choose_backend
    from crn_fast.train import make_optimizer, train_step
    from crn_fast.vgg import load_vgg19
    cuda = device == "cuda"
    model = CRN(config, backend=choose_backend("auto", device), checkpointing=checkpointing).to(device).train()
    crit = CRNLoss(load_vgg19("random"), "perceptual").to(device)
    opt = make_optimizer(model.parameters(), 1e-4, device)
    scaler = torch.amp.GradScaler(device, enabled=False)  # bf16 needs no loss scaling; what training does
    layout = one_hot(torch.randint(0, 20, (1, *size), generator=torch.Generator().manual_seed(0))).to(device)
    target = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1)).to(device) * 255
    amp = torch.bfloat16 if cuda else None

    def step():
        train_step(model, crit, opt, scaler, layout, target, amp, phase=lambda name: record_function(ANNOTATION + name))
    return step, amp


def tables(events, phases):
    """({phase: {stage: ms}}, the 25 longest kernels summed by name: [name, phase, stage, ms, count])."""
    by_phase = {p: dict.fromkeys(STAGES, 0.0) for p in (*PHASES, "outside")}
    top = collections.defaultdict(lambda: [0.0, 0])
    for (_, name, ms), phase in zip(events, phases):
        by_phase.setdefault(phase, dict.fromkeys(STAGES, 0.0))[stage_of(name)] += ms
        top[(name, phase)][0] += ms
        top[(name, phase)][1] += 1
    longest = sorted(top.items(), key=lambda kv: -kv[1][0])[:25]
    return ({p: t for p, t in by_phase.items() if sum(t.values()) > 0},
            [[name, phase, stage_of(name), round(ms, 4), n] for (name, phase), (ms, n) in longest])


def markdown(title, by_phase, longest) -> str:
    return f"### One training step: {title}\n\n{stage_table('phase', by_phase)}" + \
        "#### The 25 longest (summed by name and phase)\n\n| kernel | phase | stage | ms | count |\n" \
        "|---|---|---|---:|---:|\n" + \
        "".join(f"| `{name[:110]}` | {phase} | {stage} | {ms:.3f} | {n} |\n" for name, phase, stage, ms, n in longest)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, "default: benchmarks/results/profile_train_<device>_<res>")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    args = ap.parse_args(argv)
    cuda, device, size, config = shape_from(ap, args)
    step, amp = training_step(config, size, device, args.checkpointing)
    for _ in range(2):  # warm-up: Triton's compiles, cuDNN's choices, the optimizer's state
        step()
    events, phases = kernel_events(profiled(step, cuda), cuda)
    by_phase, longest = tables(events, phases)
    title = (f"{config.name} at {size[0]}x{size[1]}, {'bf16 autocast' if amp else 'fp32'}, batch 1, "
             f"checkpointing {'on' if args.checkpointing else 'off'}, on {device_label(device)}")
    stem = Path(args.out or ROOT / "benchmarks" / "results" / f"profile_train_{device_label(device)}_{size[0]}x{size[1]}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = markdown(title, by_phase, longest)
    write_text_atomic(stem.with_suffix(".md"), md)
    write_text_atomic(stem.with_suffix(".json"), json.dumps(
        {"machine": machine_info(device), "title": title, "profile_ms": by_phase, "longest": longest}, indent=2))
    print(md)
    print(f"wrote {stem}.json/.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
