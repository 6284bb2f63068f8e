"""Where one forward's time goes, per refinement module and stage, from torch.profiler.

    python benchmarks/profile_stages.py --res 1024x2048 --dtype bf16          # GPU: triton and the best compile mode
    python benchmarks/profile_stages.py --preset tiny --res 64x128 --variants eager   # CPU smoke

Every device kernel (GPU) or top-level aten op (CPU) of one profiled forward is put in a stage by
its name: conv (cuDNN / CUTLASS / oneDNN convolutions and GEMMs), norm (layer-norm statistics,
apply, Inductor's reductions), upsample/concat (the bilinear gather, cat, Inductor's fused
upsample kernels) or other (casts, copies, the head's epilogue). Each kernel is charged to the
module of the most recent convolution (every module runs exactly two convs, then the head one; a
run of consecutive conv kernels counts as one), so a module's upsample-concat is charged to the
module that reads its output, and Inductor's fused kernels land where they run. Inductor's
pointwise/reduction kernels are named after the ops they read (``triton_red_fused_convolution_...``):
only its templates (``triton_tem_``) count as convs. Writes results/profile_<device>_<res>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import device_label, machine_info, write_text_atomic  # noqa: E402

from crn_fast import CRN  # noqa: E402
from crn_fast.config import get_preset, parse_resolution, preset_for_resolution  # noqa: E402
from crn_fast.constants import DTYPES  # noqa: E402
from crn_fast.labels import one_hot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("conv", "norm", "upsample/concat", "other")
_CONV = re.compile(r"conv|cudnn|xmma|cutlass|gemm|implicit|sm\d+_|wgrad|dgrad|fprop|mkldnn", re.I)
_NORM = re.compile(r"layer_norm|group_norm|_stats|_apply|_finalize|var_mean|native_group|red_fused|per_fused"
                   r"|welford|mean|rsqrt|leaky|relu", re.I)
_UP = re.compile(r"upsample|_fwd_cl_kernel|_fwd_kernel|cat|interp|bilinear|avg_pool", re.I)


def stage_of(name: str) -> str:
    inductor_fused = name.startswith(("triton_poi", "triton_red", "triton_per"))
    if _CONV.search(name) and not inductor_fused:
        return "conv"
    if _UP.search(name):
        return "upsample/concat"
    if _NORM.search(name):
        return "norm"
    return "other"


VARIANTS = ("eager", "triton", "triton-fusedconv", "compile", "compile-max-autotune", "compile-max-autotune-no-cudagraphs",
            "compile-reduce-overhead")


def build(variant, config, device, dtype):
    m = CRN(config).to(device, dtype).eval()
    if variant == "eager":
        return m
    if variant in ("triton", "triton-fusedconv"):
        m.fused_conv = variant == "triton-fusedconv"  # its convs carry the norms: "conv" includes them
        return m.set_backend("triton")
    from crn_fast.export import compile_generator
    mode = variant.removeprefix("compile-") if variant != "compile" else "default"
    return compile_generator(m, mode=mode, freezing=True)


def profile_once(fn, x, cuda):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=acts) as prof:
            fn(x)
            if cuda:
                torch.cuda.synchronize()
    events = []
    if cuda:
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                events.append((e.time_range.start, e.name, e.device_time / 1e3))
    else:  # top-level aten ops (no parent op), in order
        for e in prof.events():
            if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")):
                events.append((e.time_range.start, e.name, e.cpu_time_total / 1e3))
    return sorted(events)


def attribute(events, n_modules):
    """{module: {stage: ms}} with modules 0..n-1 and 'head'. A run of consecutive conv kernels is
    one convolution (cuDNN may launch a layout transform, the GEMM and a split-K reduction for one
    conv); a CRN never runs two convs without a norm between them."""
    table, convs, prev = {}, 0, None
    for _, name, ms in events:
        stage = stage_of(name)
        if stage == "conv" and prev != "conv":
            convs += 1
        prev = stage
        k = max(convs - 1, 0) // 2
        mod = "head" if k >= n_modules else str(k)
        table.setdefault(mod, dict.fromkeys(STAGES, 0.0))[stage] += ms
    return table


def markdown(results) -> str:
    out = []
    for variant, table in results.items():
        out.append(f"#### {variant}\n\n| module | " + " | ".join(f"{s} ms" for s in STAGES) + " | total ms |\n"
                   "|---|" + "---:|" * (len(STAGES) + 1) + "\n")
        totals = dict.fromkeys(STAGES, 0.0)
        for mod, row in table.items():
            for s in STAGES:
                totals[s] += row[s]
            out.append(f"| {mod} | " + " | ".join(f"{row[s]:.3f}" for s in STAGES) + f" | {sum(row.values()):.3f} |\n")
        out.append("| **all** | " + " | ".join(f"**{totals[s]:.3f}**" for s in STAGES) +
                   f" | **{sum(totals.values()):.3f}** |\n\nnon-conv: {sum(totals.values()) - totals['conv']:.3f} ms\n\n")
    return "".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", default="1024x2048")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)} "
                    "(default: triton,compile-max-autotune-no-cudagraphs on GPU, eager on CPU)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/profile_<device>_<res>")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    size = parse_resolution(args.res)
    config = get_preset(args.preset) if args.preset else preset_for_resolution(*size)
    config.validate_input_size(*size)
    dtype = DTYPES[args.dtype] if cuda else torch.float32
    variants = (args.variants or ("triton,compile-max-autotune-no-cudagraphs" if cuda else "eager")).split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: {', '.join(bad)} unknown; choose from {', '.join(VARIANTS)}")
    x = one_hot(torch.randint(0, 20, (1, *size), generator=torch.Generator().manual_seed(0))).to(device, dtype)
    title = f"{config.name} at {size[0]}x{size[1]}, {args.dtype if cuda else 'fp32'}, batch 1, on {device_label(device)}"
    stem = Path(args.out or ROOT / "benchmarks" / "results" / f"profile_{device_label(device)}_{size[0]}x{size[1]}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    results, errors, kernels = {}, {}, {}
    for v in variants:  # saved after each: a run cut short by a time limit keeps the variants it finished
        try:
            fn = build(v, config, device, dtype)
            events = profile_once(fn, x, cuda)
            results[v] = attribute(events, config.num_modules)
            # the kernel sequence itself (name, stage, ms), so a wrong module split can be traced
            kernels[v] = [[name, stage_of(name), round(ms, 5)] for _, name, ms in events]
        except Exception as e:  # one variant that breaks is recorded, the others still run
            errors[v] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"{v}: {errors[v]}", file=sys.stderr)
        fn = None
        md = f"### Per-module profile: {title}\n\n{markdown(results)}" + \
            "".join(f"\n{v}: not profiled ({e})\n" for v, e in errors.items())
        done = len(results) + len(errors) == len(variants)
        write_text_atomic(stem.with_suffix(".md"), md)  # first: a JSON on disk always has its table
        write_text_atomic(stem.with_suffix(".json"), json.dumps(
            {"machine": machine_info(device), "title": title, "profile_ms": results, "errors": errors,
             "kernels": kernels, **({} if done else {"partial": True})}, indent=2))
    print(md)
    print(f"wrote {stem}.json/.md", file=sys.stderr)
    return 1 if errors and not results else 0


if __name__ == "__main__":
    sys.exit(main())
