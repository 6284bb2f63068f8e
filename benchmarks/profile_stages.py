"""Where one forward's time goes, per refinement module and stage, from torch.profiler.

    python benchmarks/profile_stages.py --res 1024x2048 --dtype bf16          # GPU: triton and the best compile mode
    python benchmarks/profile_stages.py --preset tiny --res 64x128 --variants eager   # CPU smoke

Every device kernel (GPU) or top-level aten / crn_fast op (CPU) of one profiled forward is put in
a stage by its name: conv (cuDNN / CUTLASS / oneDNN convolutions and GEMMs), norm (layer-norm
statistics, apply, Inductor's reductions), upsample/concat (the bilinear gather, cat, Inductor's
fused upsample kernels) or other (casts, copies, the head's epilogue).

Modules: crn_fast's own variants (eager, triton*) run each refinement module, and the head conv,
inside a profiler range (``crn_module_<i>``, ``crn_module_head``; hooks added here, nothing in the
model): a kernel is charged to the innermost range around the op that launched it (torch links
each kernel to that op), so a module's upsample-concat is charged to the module that reads its
output, and the fused conv's head lands in the last module; "outside" is the layout's cast and
area pyramid and the head's 0..255 epilogue (eager). Compiled graphs have no module
boundaries left: their kernels are charged to the module of the most recent convolution (every
module runs exactly two convs, then the head one; a run of consecutive conv kernels counts as
one). Inductor's pointwise/reduction kernels are named after the ops they read
(``triton_red_fused_convolution_...``): only its templates (``triton_tem_``) count as convs.
Writes results/profile_<device>_<res>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import (context_broken, device_label, error_text, fresh_process, inject_fault,  # noqa: E402
                   machine_info, write_text_atomic)

from crn_fast import CRN  # noqa: E402
from crn_fast.config import get_preset, parse_resolution, preset_for_resolution  # noqa: E402
from crn_fast.constants import DTYPES  # noqa: E402
from crn_fast.errors import CRNError  # noqa: E402
from crn_fast.labels import one_hot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("conv", "norm", "upsample/concat", "other")
_CONV = re.compile(r"conv|cudnn|xmma|cutlass|gemm|implicit|sm\d+_|wgrad|dgrad|fprop|mkldnn", re.I)
_NORM = re.compile(r"layer_norm|group_norm|_stats|_apply|_finalize|var_mean|native_group|red_fused|per_fused"
                   r"|welford|mean|rsqrt|leaky|relu", re.I)
_UP = re.compile(r"upsample|_fwd_cl_kernel|_fwd_kernel|cat|interp|bilinear|avg_pool|pyramid", re.I)


def stage_of(name: str) -> str:
    inductor_fused = name.startswith(("triton_poi", "triton_red", "triton_per"))
    if _CONV.search(name) and not inductor_fused:
        return "conv"
    if _UP.search(name):
        return "upsample/concat"
    if _NORM.search(name):
        return "norm"
    return "other"


VARIANTS = ("eager", "triton", "triton-fusedconv", "triton-splitconv", "triton-lowresconv", "triton-autoconv", "compile",
            "compile-max-autotune", "compile-max-autotune-no-cudagraphs", "compile-reduce-overhead")
FUSED_CONV = {"triton": False, "triton-fusedconv": "fused", "triton-splitconv": "split", "triton-lowresconv": "lowres",
              "triton-autoconv": "auto"}


ANNOTATION = "crn_module_"


def annotate_modules(model: CRN) -> CRN:
    """Run each refinement module (eager path: RefinementModule.forward; triton inference path:
    FastInference._inference_step) and the head conv inside a profiler range named ANNOTATION + index/head."""
    from torch.autograd.profiler import record_function

    def ranged(label, fn):
        def call(*args, **kwargs):
            with record_function(f"{ANNOTATION}{label}"):
                return fn(*args, **kwargs)
        return call
    for i, module in enumerate(model.refine):
        module.forward = ranged(i, module.forward)
    model.head.forward = ranged("head", model.head.forward)
    step = model._inference_step
    model._inference_step = lambda i, *args, **kwargs: ranged(i, step)(i, *args, **kwargs)
    return model


def build(variant, config, device, dtype):
    m = CRN(config).to(device, dtype).eval()
    if variant == "eager":
        return annotate_modules(m)
    if variant in FUSED_CONV:  # conv_norm kernels carry the norms: "conv" includes them ("auto": tuned by
        m.fused_conv = FUSED_CONV[variant]  # the warm-up calls, per module the fastest of cuDNN, fused, split)
        return annotate_modules(m.set_backend("triton"))
    from crn_fast.export import compile_generator
    mode = variant.removeprefix("compile-") if variant != "compile" else "default"
    return compile_generator(m, mode=mode, freezing=True)


_OPS = ("aten::", "crn_fast::")


def profile_once(fn, x, cuda):
    """(events, modules): events = [(start, name, ms)] of every kernel (GPU) or top-level op (CPU),
    in order; modules = the module label of each event from the profiler ranges, or None when the
    forward has none (compiled graphs)."""
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        return kernel_events(profiled(lambda: fn(x), cuda), cuda)


def profiled(run, cuda):
    """torch.profiler's record of one call of run() (warmed up by the caller), the GPU idle after."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    return prof


def kernel_events(prof, cuda):
    """profile_once's (events, modules) from a profiler record: the ranges are those named
    ANNOTATION + label, each event's label the innermost range open when its op started (on any
    thread: the autograd engine's ops too)."""
    cpu = torch.autograd.DeviceType.CPU
    all_events = prof.events()
    ranges = [(e.time_range.start, e.time_range.end, e.name[len(ANNOTATION):]) for e in all_events
              if e.device_type == cpu and e.name.startswith(ANNOTATION)]

    def module_at(t):  # the innermost range open at time t (the latest to start)
        inside = [r for r in ranges if r[0] <= t <= r[1]]
        return max(inside)[2] if inside else "outside"
    events, modules = [], []
    if cuda:
        for e in all_events:  # a kernel is linked to the innermost op that launched it
            if e.device_type == cpu and e.kernels:
                modules += [module_at(e.time_range.start)] * len(e.kernels)
                events += [(e.time_range.start, k.name, k.duration / 1e3) for k in e.kernels]
        kernels = sorted((e.time_range.start, e.name, e.device_time / 1e3) for e in all_events
                         if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(ANNOTATION)
                         and not getattr(e, "is_user_annotation", False))
        if not ranges:  # compiled: order kernels by their own device start time instead
            events = kernels
        else:  # kernels torch linked to no op are counted, not hidden
            missing = sum(ms for *_, ms in kernels) - sum(ms for *_, ms in events)
            if missing > 1e-3:
                events.append((float("inf"), "kernels linked to no op", missing))
                modules.append("unlinked")
    else:  # top-level ops (no parent op), in order
        for e in all_events:
            if e.name.startswith(_OPS) and (e.cpu_parent is None or not e.cpu_parent.name.startswith(_OPS)):
                events.append((e.time_range.start, e.name, e.cpu_time_total / 1e3))
                modules.append(module_at(e.time_range.start))
    order = sorted(range(len(events)), key=lambda i: events[i][0])
    events = [events[i] for i in order]
    return events, ([modules[i] for i in order] if ranges else None)


def attribute_by_module(events, modules, n_modules):
    """{module: {stage: ms}} from each event's module label (profile_once), modules in order."""
    labels = [str(i) for i in range(n_modules)] + ["head"]
    table = {}
    for (_, name, ms), mod in zip(events, modules):
        table.setdefault(mod, dict.fromkeys(STAGES, 0.0))[stage_of(name)] += ms
    return {k: table[k] for k in labels + sorted(set(table) - set(labels)) if k in table}


def attribute(events, n_modules):
    """{module: {stage: ms}} with modules 0..n-1 and 'head', by counting convolutions (compiled
    graphs). A run of consecutive conv kernels is one convolution (cuDNN may launch a layout
    transform, the GEMM and a split-K reduction for one conv); a CRN never runs two convs without
    a norm between them."""
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


def stage_table(label: str, table: dict) -> str:
    """A markdown table of {row label: {stage: ms}}, a total column and an **all** row; the
    non-conv total after it."""
    out = [f"| {label} | " + " | ".join(f"{s} ms" for s in STAGES) + " | total ms |\n|---|" +
           "---:|" * (len(STAGES) + 1) + "\n"]
    totals = dict.fromkeys(STAGES, 0.0)
    for name, row in table.items():
        for s in STAGES:
            totals[s] += row[s]
        out.append(f"| {name} | " + " | ".join(f"{row[s]:.3f}" for s in STAGES) + f" | {sum(row.values()):.3f} |\n")
    out.append("| **all** | " + " | ".join(f"**{totals[s]:.3f}**" for s in STAGES) +
               f" | **{sum(totals.values()):.3f}** |\n\nnon-conv: {sum(totals.values()) - totals['conv']:.3f} ms\n\n")
    return "".join(out)


def markdown(results) -> str:
    return "".join(f"#### {variant}\n\n{stage_table('module', table)}" for variant, table in results.items())


def add_shape_args(ap, out_help: str):
    """The options both profilers share: --res, --preset, --out."""
    ap.add_argument("--res", default="1024x2048")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--out", default=None, help=out_help)


def shape_from(ap, args):
    """(cuda, device, (H, W), config) from add_shape_args' options: the preset named, else the one
    for that resolution; the size checked against it. A bad one is ap's one-line usage error (exit 2)."""
    cuda = torch.cuda.is_available()
    try:
        size = parse_resolution(args.res)
        config = get_preset(args.preset) if args.preset else preset_for_resolution(*size)
        config.validate_input_size(*size)
    except CRNError as e:
        ap.error(str(e))
    return cuda, "cuda" if cuda else "cpu", size, config


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, "default: benchmarks/results/profile_<device>_<res>")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)} "
                    "(default: triton,compile-max-autotune-no-cudagraphs on GPU, eager on CPU)")
    args = ap.parse_args(argv)
    cuda, device, size, config = shape_from(ap, args)
    dtype = DTYPES[args.dtype] if cuda else torch.float32
    variants = (args.variants or ("triton,compile-max-autotune-no-cudagraphs" if cuda else "eager")).split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: {', '.join(bad)} unknown; choose from {', '.join(VARIANTS)}")
    x = one_hot(torch.randint(0, 20, (1, *size), generator=torch.Generator().manual_seed(0))).to(device, dtype)
    title = f"{config.name} at {size[0]}x{size[1]}, {args.dtype if cuda else 'fp32'}, batch 1, on {device_label(device)}"
    stem = Path(args.out or ROOT / "benchmarks" / "results" / f"profile_{device_label(device)}_{size[0]}x{size[1]}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    res = {"machine": machine_info(device), "title": title, "profile_ms": {}, "conv_modes": {}, "errors": {},
           "error_details": {}, "kernels": {}, "fresh_process_after": {}}
    results, errors, kernels, modes = res["profile_ms"], res["errors"], res["kernels"], res["conv_modes"]

    def save(done=False):  # after each variant: a run cut short by a time limit keeps the variants it finished
        md = f"### Per-module profile: {title}\n\n{markdown(results)}" + \
            "".join(f"{v}: conv modes by module {m}\n" for v, m in modes.items()) + \
            "".join(f"\n{v}: not profiled ({e})\n" for v, e in errors.items()) + \
            "".join(f"\n{v}: profiled in a fresh process after {a}'s CUDA fault\n"
                    for v, a in res["fresh_process_after"].items())
        write_text_atomic(stem.with_suffix(".md"), md)  # first: a JSON on disk always has its table
        write_text_atomic(stem.with_suffix(".json"), json.dumps({**res, **({} if done else {"partial": True})},
                                                                indent=2))
        return md
    for k, v in enumerate(variants):
        try:
            inject_fault(v)
            fn = build(v, config, device, dtype)
            events, modules = profile_once(fn, x, cuda)
            results[v] = attribute(events, config.num_modules) if modules is None else \
                attribute_by_module(events, modules, config.num_modules)
            # the kernel sequence itself (name, stage, ms, module), so the split can be checked
            kernels[v] = [[name, stage_of(name), round(ms, 5), *([] if modules is None else [modules[i]])]
                          for i, (_, name, ms) in enumerate(events)]
            if isinstance(fn, CRN) and fn.fused_conv:  # which modules ran conv_norm kernels, and how
                plan = fn.conv_plan(x)
                modes[v] = {str(i): plan[i] for i in sorted(plan)}
        except Exception as e:  # one variant that breaks is recorded, the others still run
            errors[v], res["error_details"][v] = error_text(e)
            print(f"{v}: {errors[v]}", file=sys.stderr)
        fn = None
        rest = variants[k + 1:]
        if v in errors and rest and context_broken(device, v):
            # a CUDA fault is sticky: every later call of this process fails; the variants left
            # are profiled by a fresh process, and the files say which
            errors[v] += " (the GPU was unusable after it: the variants after it ran in a fresh process)"
            save()
            complete = variants_in_a_fresh_process(args, rest, stem, res, after=v)
            break
        save()
    else:
        complete = True
    md = save(done=complete)  # still partial if the fresh process was cut short
    print(md)
    print(f"wrote {stem}.json/.md", file=sys.stderr)
    return 1 if errors and not results else 0


def variants_in_a_fresh_process(args, variants, stem: Path, res: dict, after: str) -> bool:
    """Profile ``variants`` in a new profile_stages.py process (same size, preset and dtype) and merge
    its results into ``res``, each variant marked with the one whose fault made it necessary (its
    own faults recurse the same way). Returns whether that process finished."""
    out = stem.with_name(f"{stem.name}.after-{after}")
    argv = [str(Path(__file__).resolve()), "--res", args.res, "--dtype", args.dtype, "--variants", ",".join(variants),
            "--out", str(out)] + (["--preset", args.preset] if args.preset else [])
    print(f"profiling the variants left ({', '.join(variants)}) in a fresh process", file=sys.stderr)
    got, ended = fresh_process(argv, out.with_suffix(".json"), timeout=3600)
    if got is None:
        for v in variants:
            res["errors"][v] = f"the fresh process for the variants after {after}'s CUDA fault ended with {ended} " \
                               "and no results"
        return True
    for key in ("profile_ms", "conv_modes", "errors", "error_details", "kernels"):
        res[key].update(got.get(key, {}))
    res["fresh_process_after"].update({v: got.get("fresh_process_after", {}).get(v, after) for v in variants})
    for f in (out.with_suffix(".json"), out.with_suffix(".md")):
        f.unlink(missing_ok=True)
    return "partial" not in got


if __name__ == "__main__":
    sys.exit(main())
