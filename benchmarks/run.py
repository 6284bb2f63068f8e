"""crn_fast's scoreboard: every backend side by side, speed and correctness, against the hardware limit.

    python benchmarks/run.py --res 1024x2048               # all available backends
    python benchmarks/run.py --preset tiny --res 64x128 --iters 1    # smoke (runs in the test suite)
    python benchmarks/run.py --train --preset tiny --res 64x128      # one training step per variant

One row per backend x dtype x memory format (the model is moved to the format and fed a layout in
that format; format-agnostic backends run once, as nchw): latency (min / median / p90; CUDA events on GPU, wall clock on CPU),
images/s, peak memory (torch.cuda.max_memory_allocated on GPU, sampled RSS on CPU), build time,
max abs error and PSNR against eager fp32 on the same layout (0..255 scale), achieved TFLOP/s from
the exact FLOP count of the config (crn_fast.flops), and % of the machine's peak, measured in the
same run as a large matmul in the same dtype. Unavailable backends get a row with the reason.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import (FORMATS, PeakMemory, context_broken, conv_configs, device_label, error_text,  # noqa: E402
                   fresh_process, inject_fault, machine_info, matmul_peak_tflops, results_path, summarize,
                   sync, time_fn, write_text_atomic)

from crn_fast import CRN  # noqa: E402
from crn_fast.cli import non_negative_int, positive_float, positive_int  # noqa: E402
from crn_fast.config import get_preset, parse_resolution, preset_for_resolution  # noqa: E402
from crn_fast.constants import DTYPES  # noqa: E402
from crn_fast.errors import CRNError  # noqa: E402
from crn_fast.export.verify import compare  # noqa: E402
from crn_fast.fast_inference import CONV_MODES  # noqa: E402
from crn_fast.flops import crn_flops  # noqa: E402
from crn_fast.labels import one_hot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_LABELS = ROOT.parent / "shared" / "crn_reference" / "labels"
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
ALL_BACKENDS = ("convs-only", "eager", "eager-cudagraph", "triton", "triton-unfused", "triton-cudagraph",
                "triton-fusedconv", "triton-fusedconv-cudagraph", "triton-splitconv", "triton-splitconv-cudagraph",
                "triton-autoconv", "triton-autoconv-cudagraph", "triton-lowresconv", "triton-lowresconv-cudagraph",
                "triton-fusedhead-cudagraph",
                "triton-compile-reduce-overhead",
                *(f"compile-{m}" if m != "default" else "compile" for m in COMPILE_MODES), "aoti", "onnxruntime",
                "onnxruntime-cuda", "tensorrt")
FORMAT_AGNOSTIC = ("aoti", "onnxruntime", "onnxruntime-cuda", "tensorrt")  # take any input; run once
TRAIN_BACKENDS = ("eager", "triton", "compile", "triton-compile")


class Skip(Exception):
    """This backend x dtype cannot run here; the message says why."""


def load_layout(args, config, size, device) -> torch.Tensor:
    from crn_fast.data import decode_label, resize_pair
    from crn_fast.synthetic import render_scene
    if args.layout:
        ids, source = decode_label(Path(args.layout), unknown_colors="void"), args.layout
    else:
        candidates = sorted(SHARED_LABELS.glob("cityscapes_1024/*.png")) if SHARED_LABELS.is_dir() else []
        if candidates:
            ids, source = decode_label(candidates[0], unknown_colors="void"), str(candidates[0])
        else:
            ids, source = render_scene(*size, seed=0, index=0)[0], "synthetic"
    ids, _ = resize_pair(ids, None, size)
    ids = torch.from_numpy(np.repeat(ids[None], args.batch, 0).astype(np.int64))
    return one_hot(ids, config.num_classes).to(device).contiguous(), source


# ----------------------------------------------------------------------------- backends
# Each returns (callable taking the fp32 layout, build seconds). Raise Skip(reason) when unavailable.
def _model(model, dtype, device, ctx, backend="eager", fused_conv=False, fused_head=False):
    """A copy of the model in the row's dtype and memory format (fused_conv: the triton backend's
    Triton convs with the layer norms folded in, CRN.fused_conv's setting, "auto" measured now on
    the row's layout; the row records each module's mode; fused_head: the last norm, the head and
    its scaling as one kernel)."""
    m = copy.deepcopy(model).to(device, dtype).eval().to(memory_format=ctx["format"])
    m.set_backend(backend).fused_conv = fused_conv
    m.fused_head = fused_head
    plan = m.tune_fused_conv(ctx["layout"].to(dtype)) if fused_conv == "auto" else m.conv_plan()
    if fused_conv:
        ctx["conv_modes"] = {str(i): plan[i] for i in sorted(plan)}
    return m


def b_eager(model, dtype, device, ctx):
    if dtype != torch.float32 and ctx["device"].type != "cuda":
        raise Skip("reduced-precision eager rows are for GPUs (CPU bf16 convs are not a deployment path)")
    m = _model(model, dtype, device, ctx)
    return (lambda x: m(x.to(dtype))), 0.0


def _need_triton(ctx):
    from crn_fast.kernels import triton_unavailable_reason
    if ctx["device"].type != "cuda":
        raise Skip("the Triton kernels are timed compiled on a GPU (on CPU only the interpreter runs, for tests)")
    reason = triton_unavailable_reason()
    if reason:
        raise Skip(reason)


def _cudagraph(backend, fused_conv=False, fused_head=False):
    """The whole generator in one CUDA graph (crn_fast.export.cuda_graph keeps the model alive)."""
    def build(model, dtype, device, ctx):
        from crn_fast.export import cuda_graph
        if ctx["device"].type != "cuda":
            raise Skip("CUDA graphs need a GPU")
        if backend == "triton":
            _need_triton(ctx)
        t0 = time.perf_counter()  # includes "auto"'s measurement and the kernels' tile tuning
        run = cuda_graph(_model(model, dtype, device, ctx, backend, fused_conv, fused_head), ctx["layout"].to(dtype))
        return (lambda x: run(x.to(dtype))), time.perf_counter() - t0
    return build


def _triton(fuse: bool, fused_conv=False):
    """fuse: module i's last norm + lrelu inside module i+1's upsample-concat (the triton default);
    fused_conv: the convs as Triton kernels with the norms folded in (tuned on the first call), in
    every module (True) or where measured faster ("auto")."""
    def build(model, dtype, device, ctx):
        _need_triton(ctx)
        t0 = time.perf_counter()
        m = _model(model, dtype, device, ctx, "triton", fused_conv)
        m.fuse_inference = fuse
        if fused_conv:  # its first call tunes the conv tiles per shape: build time, not latency
            m(ctx["layout"].to(dtype))
            sync(device)
        return (lambda x: m(x.to(dtype))), time.perf_counter() - t0
    return build


def b_convs_only(model, dtype, device, ctx):
    """Only the 19 convolutions of one forward, on inputs prepared in advance: the floor today's
    conv library (cuDNN / oneDNN) sets for any backend that keeps them as library calls."""
    m = _model(model, dtype, device, ctx)
    n, (h, w), cfg = ctx["batch"], ctx["size"], model.config
    fmt, calls = ctx["format"], []
    for i, mod in enumerate(m.refine):
        s = 2 ** (cfg.num_modules - 1 - i)
        for conv, cin in ((mod.conv1, cfg.in_channels(i)), (mod.conv2, cfg.widths[i])):
            x = torch.randn(n, cin, h // s, w // s, device=device, dtype=dtype).contiguous(memory_format=fmt)
            calls.append((conv, x))
    calls.append((m.head, torch.randn(n, cfg.widths[-1], h, w, device=device, dtype=dtype)
                  .contiguous(memory_format=fmt)))

    def run(_):
        for conv, x in calls:
            conv(x)
        return None
    return run, 0.0


def _compiled(mode, backend="eager"):
    """torch.compile of the generator in the row's memory format, with Inductor's freezing (weights
    folded as constants: inference only). backend 'eager' is stock torch.compile; 'triton' keeps
    crn_fast's kernels as operators inside the compiled graph."""
    def build(model, dtype, device, ctx):
        from crn_fast.export import compile_generator
        if backend == "triton":
            _need_triton(ctx)
        if mode != "default" and ctx["device"].type != "cuda":
            raise Skip(f"{mode} tunes GPU kernels or captures CUDA graphs; on CPU it is the default mode")
        if dtype != torch.float32 and ctx["device"].type != "cuda":
            raise Skip("reduced precision is benchmarked on GPUs")
        m = compile_generator(_model(model, dtype, device, ctx, backend), mode=mode, freezing=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            m(ctx["layout"].to(dtype))  # compile now: build time, not latency
        sync(device)
        return (lambda x: m(x.to(dtype))), time.perf_counter() - t0
    return build


def b_aoti(model, dtype, device, ctx):
    from crn_fast.constants import DTYPE_NAMES
    from crn_fast.export import export_aoti, load_aoti
    name = DTYPE_NAMES[dtype]
    if dtype != torch.float32 and ctx["device"].type != "cuda":
        raise Skip("reduced precision is benchmarked on GPUs")
    t0 = time.perf_counter()
    path = export_aoti(model, Path(ctx["tmp"]) / f"gen_{name}.pt2", tuple(ctx["size"]), ctx["batch"], name,
                       str(device))
    runner = load_aoti(path)
    return runner, time.perf_counter() - t0


def _onnx_file(model, dtype, ctx) -> Path:
    """crn_fast's ONNX model in the row's precision (fp32, or fp16/bf16 mixed precision), once per run."""
    from crn_fast.constants import DTYPE_NAMES
    from crn_fast.export.onnx import export_onnx
    name = DTYPE_NAMES[dtype]
    path = Path(ctx["tmp"]) / f"gen_{name}.onnx"
    if not path.exists():
        export_onnx(model, path, tuple(ctx["size"]), max_size=tuple(ctx["size"]), dtype=name)
    return path


def _onnx(provider_device):
    """onnxruntime on the CPU provider (fp32) or the CUDA provider (fp32 and the mixed-precision
    fp16/bf16 models that crn-export --dtype writes)."""
    def build(model, dtype, device, ctx):
        try:
            import onnxruntime  # noqa: F401  (only checking it is there)
        except ImportError:
            raise Skip("onnxruntime is not installed (pip install 'crn_fast[export]')") from None
        from crn_fast.export.onnx import ONNXGenerator, onnxruntime_providers
        if dtype != torch.float32 and provider_device == "cpu":
            raise Skip("onnxruntime's CPU provider is benchmarked in fp32 (it has no bf16 Conv)")
        try:
            onnxruntime_providers(provider_device)
        except RuntimeError as e:
            raise Skip(str(e)) from None
        t0 = time.perf_counter()
        run = ONNXGenerator(_onnx_file(model, dtype, ctx), device=provider_device, runtime="onnxruntime")
        return run, time.perf_counter() - t0
    return build


def b_tensorrt(model, dtype, device, ctx):
    from crn_fast.export.tensorrt import TensorRTGenerator, build_engine, make_profile, tensorrt_missing_reason
    reason = tensorrt_missing_reason()
    if reason:
        raise Skip(reason)
    t0 = time.perf_counter()
    onnx_path = _onnx_file(model, dtype, ctx)
    cfg = model.config
    profile = make_profile(cfg.num_classes, cfg.stride, tuple(ctx["size"]), batch=ctx["batch"])
    engine = onnx_path.with_suffix(".engine")
    build_engine(onnx_path, engine, profile, timing_cache=Path(ctx["tmp"]) / "timing.cache")
    run = TensorRTGenerator(engine, cuda_graph=True)
    return run, time.perf_counter() - t0


BUILDERS = {"convs-only": b_convs_only, "eager": b_eager, "eager-cudagraph": _cudagraph("eager"),
            "triton": _triton(True), "triton-unfused": _triton(False), "triton-cudagraph": _cudagraph("triton"),
            "triton-fusedconv": _triton(True, True), "triton-fusedconv-cudagraph": _cudagraph("triton", True),
            "triton-splitconv": _triton(True, "split"), "triton-splitconv-cudagraph": _cudagraph("triton", "split"),
            "triton-autoconv": _triton(True, "auto"), "triton-autoconv-cudagraph": _cudagraph("triton", "auto"),
            "triton-lowresconv": _triton(True, "lowres"),
            "triton-lowresconv-cudagraph": _cudagraph("triton", "lowres"),
            "triton-fusedhead-cudagraph": _cudagraph("triton", fused_head=True),
            "triton-compile-reduce-overhead": _compiled("reduce-overhead", "triton"),
            **{(f"compile-{m}" if m != "default" else "compile"): _compiled(m) for m in COMPILE_MODES},
            "aoti": b_aoti, "onnxruntime": _onnx("cpu"), "onnxruntime-cuda": _onnx("cuda"), "tensorrt": b_tensorrt}


def run_inference(args, model, device, layout, size, peak, flops, on_row=lambda rows: None):
    with torch.no_grad(), no_tf32():  # the reference is true fp32
        ref = model.to(device).float().eval()(layout).float().cpu()
    with tempfile.TemporaryDirectory(prefix="crn-bench-") as tmp:  # exported .pt2/.onnx/.engine files
        return _race(args, model, device, layout, size, peak, ref, flops, tmp, on_row)


def _race(args, model, device, layout, size, peak, ref, flops, tmp, on_row):
    rows = []
    start = time.perf_counter()
    combos = args.rows or [(b, d, f) for f in args.formats for b in args.backends for d in args.dtypes
                           if not (b in FORMAT_AGNOSTIC and f != args.formats[0])]
    for i, (backend, dname, fname) in enumerate(combos):
        fmt = FORMATS[fname]
        ctx = {"device": torch.device(device), "layout": layout.contiguous(memory_format=fmt), "size": size,
               "batch": args.batch, "tmp": tmp, "format": fmt}
        row = {"backend": backend, "dtype": dname, "format": "any" if backend in FORMAT_AGNOSTIC else fname}
        left = args.max_seconds - (time.perf_counter() - start)
        print(f"[{i + 1}/{len(combos)}] {backend} {dname} {row['format']} ...", end=" ", flush=True, file=sys.stderr)
        if left <= 0:
            row["skipped"] = f"--max-seconds {args.max_seconds:g} budget used up"
            rows.append(row)
            print("skipped (time budget)", file=sys.stderr)
            continue
        try:
            inject_fault(backend)
            dtype = DTYPES[dname]
            x = ctx["layout"]
            with torch.no_grad():
                with PeakMemory(device) as mem:  # build inside: a captured graph's pool counts
                    run, build_s = BUILDERS[backend](model, dtype, device, ctx)
                    out = run(x)
                    sync(device)
                # copied before the timed calls: a CUDA graph's static output (ours, and torch.compile's
                # cudagraph trees, which refuse access to an output a later replay overwrote) is reused
                out = out.float().cpu() if out is not None else None
                ms = time_fn(lambda: run(x), device, args.warmup, args.iters, max_seconds=max(left, 1e-3))
            err = compare(out, ref) if out is not None else {"max_abs": None, "psnr_db": None}
            stats = summarize(ms)
            tflops = flops / (stats["median_ms"] / 1e3) / 1e12
            row.update(stats, images_per_s=args.batch / (stats["median_ms"] / 1e3), peak_memory_mib=mem.mib,
                       build_s=build_s, max_abs_err=err["max_abs"], psnr_db=err["psnr_db"], tflops=tflops,
                       pct_of_peak=100 * tflops / peak[dname] if peak.get(dname) else None)
            if "conv_modes" in ctx:
                row["conv_modes"] = ctx["conv_modes"]
            print(f"{stats['median_ms']:.2f} ms", file=sys.stderr)
        except Skip as e:
            row["skipped"] = str(e)
            print(f"skipped: {e}", file=sys.stderr)
        except Exception as e:  # a backend that breaks gets a row with the reason, never a crash
            row["error"], row["error_detail"] = error_text(e)
            print(f"error: {row['error']}", file=sys.stderr)
        finally:
            run = out = None  # frees the row's model (and any graph) before the next row
            broken = "error" in row and context_broken(device, backend)
            if torch.device(device).type == "cuda" and not broken:
                torch.cuda.empty_cache()
        rows.append(row)
        if broken and combos[i + 1:]:
            # a CUDA fault (an illegal address, a trap) is sticky: every later CUDA call of this
            # process fails. The rows left run in a fresh process, on the same model and layout
            row["error"] += " (the CUDA context was unusable after it: the rows after it ran in a fresh process)"
            on_row(rows)
            left = args.max_seconds - (time.perf_counter() - start)
            rows += rows_in_a_fresh_process(args, combos[i + 1:], left, tmp, after=f"{backend}:{dname}:{fname}")
            on_row(rows)
            return rows
        on_row(rows)
    return rows


def rows_in_a_fresh_process(args, combos, seconds_left: float, tmp: str, after: str) -> list[dict]:
    """The rows ``combos`` measured by a new run.py process (same preset, size, batch, layout, device,
    warm-up, iterations and TF32 setting; so the same model and reference), each marked with the
    row whose fault made it necessary. Its own faults recurse the same way."""
    out = Path(tmp) / f"rest-{len(combos)}.json"
    cmd = [str(Path(__file__).resolve()), "--res", f"{args.size[0]}x{args.size[1]}",
           "--preset", args.config.name, "--batch", str(args.batch), "--device", str(args.device),
           "--warmup", str(args.warmup), "--iters", str(args.iters), "--max-seconds", f"{max(seconds_left, 1.0):.0f}",
           "--rows", ",".join(":".join(c) for c in combos), "--json", str(out)]
    cmd += (["--layout", str(args.layout)] if args.layout else []) + (["--allow-tf32"] if args.allow_tf32 else [])
    print(f"running the {len(combos)} row(s) left in a fresh process", file=sys.stderr)
    res, ended = fresh_process(cmd, out, timeout=max(seconds_left, 1.0) + 120)
    rows = (res or {}).get("rows")  # what it finished, even if it was cut short
    if rows is None:
        return [{"backend": b, "dtype": d, "format": "any" if b in FORMAT_AGNOSTIC else f,
                 "error": f"the fresh process for the rows after {after}'s CUDA fault ended with {ended} and no "
                          f"results"} for b, d, f in combos]
    for row in rows:
        row.setdefault("fresh_process_after", after)  # a nested fault names its own row
    return rows


# ----------------------------------------------------------------------------- training
def run_training(args, config, device, layout, size, on_row=lambda rows: None):
    from crn_fast.loss import CRNLoss
    from crn_fast.train import compile_for_training, make_optimizer, train_step
    from crn_fast.vgg import load_vgg19
    rows = []
    start = time.perf_counter()
    target = torch.rand(args.batch, 3, *size, device=device) * 255
    # checkpointing off first, every backend: the race a cut-short run most needs
    for ckpt in (False, True):
        for backend in args.train_backends:
            for dname in args.dtypes:
                row = {"backend": backend, "checkpointing": ckpt, "dtype": dname}
                left = args.max_seconds - (time.perf_counter() - start)
                model = forward = crit = opt = None
                try:
                    if left <= 0:
                        raise Skip(f"--max-seconds {args.max_seconds:g} budget used up")
                    cuda = torch.device(device).type == "cuda"
                    if "triton" in backend and not cuda:
                        raise Skip("the Triton kernels are timed compiled on a GPU")
                    if backend == "compile" and not cuda and ckpt:
                        raise Skip("CPU: one compiled training row (without checkpointing) is enough")
                    if dname == "fp16":
                        raise Skip("fp16 training needs loss scaling; the benchmark uses bf16")
                    ops = "triton" if "triton" in backend else "eager"
                    model = CRN(config, backend=ops, checkpointing=ckpt).to(device).train()
                    crit = CRNLoss(load_vgg19("random"), "perceptual").to(device)
                    if "compile" in backend:  # as crn-train --compile: the generator and the loss
                        torch._dynamo.reset()
                    forward, crit = compile_for_training(model, crit, "default" if "compile" in backend else "off")
                    opt = make_optimizer(model.parameters(), 1e-4, device)  # as crn_fast.train steps
                    amp = DTYPES[dname] if dname != "fp32" else None

                    no_scaling = torch.amp.GradScaler(torch.device(device).type, enabled=False)

                    def step():  # crn_fast.train's step, which reads nothing back from the device
                        train_step(forward, crit, opt, no_scaling, layout, target, amp)
                    with PeakMemory(device) as mem:
                        step()
                    ms = time_fn(step, device, args.warmup, args.iters, max(left, 1e-3))
                    row.update(summarize(ms), peak_memory_mib=mem.mib)
                except Skip as e:
                    row["skipped"] = str(e)
                except torch.cuda.OutOfMemoryError as e:
                    row["error"] = f"out of memory: {str(e).splitlines()[0][:200]}"
                except Exception as e:
                    row["error"], row["error_detail"] = error_text(e)
                finally:
                    model = forward = crit = opt = None
                    if torch.device(device).type == "cuda":
                        torch.cuda.empty_cache()
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
                on_row(rows)
    return rows


# ----------------------------------------------------------------------------- output
def fmt(v, spec):
    return "" if v is None else format(v, spec)


def markdown_table(rows, training=False) -> str:
    if training:
        head = "| backend | checkpointing | dtype | median ms | peak memory MiB | note |\n|---|---|---|---:|---:|---|\n"
        return head + "".join(
            f"| {r['backend']} | {r['checkpointing']} | {r['dtype']} | {fmt(r.get('median_ms'), '.1f')} | "
            f"{fmt(r.get('peak_memory_mib'), '.0f')} | {r.get('skipped') or r.get('error') or ''} |\n" for r in rows)
    head = ("| backend | dtype | format | min ms | median ms | p90 ms | img/s | peak MiB | build s | max abs err "
            "| PSNR dB | TFLOP/s | % peak | note |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    return head + "".join(
        f"| {r['backend']} | {r['dtype']} | {r.get('format', 'nchw')} | {fmt(r.get('min_ms'), '.2f')} | "
        f"{fmt(r.get('median_ms'), '.2f')} | {fmt(r.get('p90_ms'), '.2f')} | {fmt(r.get('images_per_s'), '.3g')} | "
        f"{fmt(r.get('peak_memory_mib'), '.0f')} | {fmt(r.get('build_s'), '.1f')} | "
        f"{fmt(r.get('max_abs_err'), '.3g')} | {fmt(r.get('psnr_db'), '.1f')} | "
        f"{fmt(r.get('tflops'), '.3g')} | {fmt(r.get('pct_of_peak'), '.0f')} | "
        f"{_note(r)} |\n" for r in rows)


def _note(row) -> str:
    fresh = f"fresh process after {row['fresh_process_after']}'s fault" if "fresh_process_after" in row else ""
    return "; ".join(n for n in (_row_note(row), fresh) if n)


def _row_note(row) -> str:
    if row.get("skipped") or row.get("error"):
        return row.get("skipped") or row.get("error")
    if "conv_modes" in row:  # {module: "fused" | "split" | "lowres"}; the other modules ran cuDNN convs
        by_mode = {mode: [int(i) for i, m in row["conv_modes"].items() if m == mode] for mode in CONV_MODES[1:]}
        return "conv modes: " + (", ".join(f"{mode} in modules {ms}" for mode, ms in by_mode.items() if ms)
                                 or "cuDNN everywhere")
    return f"fused conv in modules {row['fused_modules']}" if "fused_modules" in row else ""  # older results


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(rows, path, floor_ms, title):
    """Horizontal bars on a log axis (CPU-provider rows would dwarf GPU ones on a linear scale),
    fastest first, with each compute floor as a labelled line in the legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = sorted((r for r in rows if r.get("median_ms")), key=lambda r: r["median_ms"])
    if not done:
        return
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(done) + 1.8))
    labels = [f"{r['backend']} {r['dtype']} {r.get('format', '')}".strip() for r in done]
    colors = ["#7f7f7f" if r["backend"] == "convs-only" else "#c97a2b" if r["backend"].startswith("compile")
              else "#4a7ab5" for r in done]
    ax.barh(labels, [r["median_ms"] for r in done], color=colors)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    # minor ticks labelled at 2x and 5x only: all of 2..9 overprint each other within a decade
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""))
    # every compute floor in view, and room for the slowest row's label
    ax.set_xlim(min([done[0]["median_ms"], *floor_ms.values()]) / 1.5, done[-1]["median_ms"] * 3)
    ax.tick_params(axis="x", which="both", labelsize=7)
    for y, r in enumerate(done):
        v = r["median_ms"]
        ax.text(v * 1.03, y, f"{v:.3g} ms" if v < 1000 else f"{v:,.0f} ms", va="center", fontsize=7)
    styles = iter(["--", ":", "-."])
    for dname, ms in floor_ms.items():
        ax.axvline(ms, color="#c0392b", ls=next(styles, "--"), lw=1, label=f"{dname}: FLOPs at the measured matmul rate, {ms:.3g} ms")
    if floor_ms:
        ax.legend(loc="upper right", fontsize=7)  # above the short (fast) bars, clear of the labels
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("median latency (ms, log scale), lower is better; grey: convolutions only, orange: torch.compile")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", default="1024x2048", help="HxW (default 1024x2048)")
    ap.add_argument("--preset", default=None, help="default: the preset whose top module matches --res")
    ap.add_argument("--batch-size", "--batch", dest="batch", type=positive_int, default=1,
                    help="layouts per pass (default 1)")
    ap.add_argument("--backends", default=None, help=f"comma list of {', '.join(ALL_BACKENDS)} (default: all)")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: all on GPU, fp32 on CPU)")
    ap.add_argument("--formats", default=None, help="comma list of nchw,channels_last (default: both on GPU, "
                                                    "channels_last on CPU)")
    ap.add_argument("--rows", default=None, help="exact rows instead of backends x dtypes x formats: comma list of "
                    "BACKEND:DTYPE:FORMAT, in the order to run them (e.g. triton-cudagraph:bf16:channels_last)")
    ap.add_argument("--train-backends", default=None, help="--train: comma list of eager, triton, compile, "
                    "triton-compile (default: all)")
    ap.add_argument("--warmup", type=non_negative_int, default=None,
                    help="default: 3 on GPU (10 if fast), 0 on CPU at 2 MP")
    ap.add_argument("--iters", type=positive_int, default=None, help="default: 20 on GPU; on CPU 3 (1 at >= 512x1024)")
    ap.add_argument("--max-seconds", type=positive_float, default=3600, help="bound on the whole run (default 3600)")
    ap.add_argument("--device", default=None, help="default: cuda if available")
    ap.add_argument("--layout", default=None, help="a real label map PNG (default: a shared Cityscapes one)")
    ap.add_argument("--train", action="store_true", help="benchmark one training step per variant instead")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/<device>_<res>[_train].json")
    ap.add_argument("--markdown", default=None, help="default: beside the JSON, .md")
    ap.add_argument("--plot", default=None, help="default: beside the JSON, .png")
    ap.add_argument("--no-save", action="store_true", help="print only")
    ap.add_argument("--allow-tf32", action="store_true", help="fp32 rows may use TF32 convs/matmuls (torch's "
                    "default for cuDNN); off by default, and the fp32 reference never uses it")
    args = ap.parse_args(argv)

    def choices(value, valid, what, default):
        items = value.split(",") if value else default
        bad = [v for v in items if v not in valid]
        if bad:
            ap.error(f"{what}: {', '.join(map(repr, bad))} not valid; choose from {', '.join(valid)}")
        return items

    try:
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        ap.error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1)")
    if args.device.type not in ("cpu", "cuda") or args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: valid here: cpu" + (", cuda" if torch.cuda.is_available() else ""))
    cuda = args.device.type == "cuda"
    try:
        args.size = parse_resolution(args.res)
        args.config = get_preset(args.preset) if args.preset else preset_for_resolution(*args.size)
        args.config.validate_input_size(*args.size)
    except CRNError as e:
        ap.error(str(e))
    if args.layout and not Path(args.layout).is_file():
        ap.error(f"--layout {args.layout}: no such file")
    args.backends = choices(args.backends, ALL_BACKENDS, "--backends", list(ALL_BACKENDS))
    args.dtypes = choices(args.dtypes, list(DTYPES), "--dtypes", ["fp32", "bf16", "fp16"] if cuda else ["fp32"])
    args.formats = choices(args.formats, list(FORMATS), "--formats", list(FORMATS) if cuda else ["channels_last"])
    args.rows = [tuple(r.split(":")) for r in args.rows.split(",")] if args.rows else None
    for r in args.rows or []:
        if len(r) != 3 or r[0] not in ALL_BACKENDS or r[1] not in DTYPES or r[2] not in FORMATS:
            ap.error(f"--rows: {':'.join(r)!r} is not BACKEND:DTYPE:FORMAT with BACKEND in {', '.join(ALL_BACKENDS)}, "
                     f"DTYPE in {', '.join(DTYPES)}, FORMAT in {', '.join(FORMATS)}")
    if args.rows:
        args.dtypes = sorted({r[1] for r in args.rows}, key=list(DTYPES).index)
    args.train_backends = choices(args.train_backends, TRAIN_BACKENDS, "--train-backends", list(TRAIN_BACKENDS))
    big = args.size[0] * args.size[1] >= 512 * 1024
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else (0 if big else 1))
    args.iters = args.iters if args.iters is not None else (20 if cuda else (1 if big else 3))
    args.chart = not args.train and not args.no_save and has_matplotlib()
    if args.plot and not args.chart and not args.train and not args.no_save:
        ap.error(f"--plot {args.plot}: drawing the chart needs matplotlib (pip install 'crn_fast[bench]')")
    if not args.no_save:  # find an unwritable output folder now, not after an hour of measuring
        label = device_label(args.device)
        stem = ROOT / "benchmarks" / "results" / f"{label}_{args.size[0]}x{args.size[1]}{'_train' if args.train else ''}"
        args.json = results_path(ap, args.json or f"{stem}.json")
        for target in (args.markdown, args.plot):
            if target is not None:
                results_path(ap, target)
    return args


@contextlib.contextmanager
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def main(argv=None):
    args = parse_args(argv)
    device, size, config = args.device, args.size, args.config
    cuda = device.type == "cuda"
    # fp32 rows are compared with an fp32 reference: TF32 only when asked (the flags are recorded)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
    torch.manual_seed(0)
    model = CRN(config).eval()
    with torch.no_grad():  # trained-like norm parameters, so errors are measured on non-trivial outputs
        for m in model.refine:
            for n in (m.norm1, m.norm2):
                n.weight.uniform_(0.5, 1.5)
                n.bias.normal_(0, 0.3)
    try:
        layout, source = load_layout(args, config, size, device)
    except CRNError as e:  # the --layout file exists but cannot be decoded: a runtime error
        print(f"run.py: error: {e}", file=sys.stderr)
        return 1
    info = machine_info(device)
    print(f"crn_fast benchmark: {config.name} {list(config.widths)} at {size[0]}x{size[1]}, batch {args.batch}, "
          f"on {info.get('gpu') or info['cpu']} ({info['cpu_cores']} cores); layout: {source}", file=sys.stderr)
    result = {"machine": info, "preset": config.name, "config": config.to_dict(), "resolution": list(size),
              "batch": args.batch, "layout": source, "warmup": args.warmup, "iters": args.iters,
              "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}}

    def save(result, md, final):
        """The JSON and markdown after every row (a run cut short by a time limit keeps the rows it
        finished, marked partial); the chart once at the end."""
        title = (f"{config.name} at {size[0]}x{size[1]}, batch {args.batch} on {info.get('gpu') or info['cpu']}"
                 + (f"; {result['flops'] / 1e12:.4g} TFLOP per pass" if result.get("flops") else ""))
        if final:
            print(f"\n{title}\n\n{md}")
        if args.no_save:
            return
        # the markdown first: a JSON on disk always has its table beside it
        write_text_atomic(args.markdown or args.json.with_suffix(".md"),
                          f"### {title}{'' if final else ' (partial: the run was cut short)'}\n\n{md}")
        write_text_atomic(args.json, json.dumps({**result, **({} if final else {"partial": True})}, indent=2,
                                                default=float))
        if final:
            if args.chart:
                plot(result["rows"], args.plot or args.json.with_suffix(".png"), result["compute_floor_ms"], title)
            elif not args.train:
                print("no chart: matplotlib is not installed (pip install 'crn_fast[bench]')", file=sys.stderr)
            print(f"wrote {args.json} (+ .md{', .png' if args.chart else ''})", file=sys.stderr)

    if args.train:
        rows = run_training(args, config, device, layout, size,
                            on_row=lambda rows: save({**result, "training": rows}, markdown_table(rows, True), False))
        result["training"] = rows
        md = markdown_table(rows, training=True)
    else:
        peak = {}
        for d in args.dtypes:
            if cuda or d == "fp32":
                peak[d] = matmul_peak_tflops(device, DTYPES[d])
                print(f"measured {d} matmul peak: {peak[d]:.3g} TFLOP/s", file=sys.stderr)
        flops = crn_flops(config, *size, batch=args.batch)
        result.update(flops=flops, matmul_peak_tflops=peak,
                      compute_floor_ms={d: flops / (p * 1e12) * 1e3 for d, p in peak.items()})
        rows = run_inference(args, model, device, layout, size, peak, flops,
                             on_row=lambda rows: save({**result, "rows": rows, "conv_norm_configs": conv_configs()},
                                                      markdown_table(rows), False))
        result.update(rows=rows, conv_norm_configs=conv_configs())
        md = markdown_table(rows)
    save(result, md, True)
    return 0


if __name__ == "__main__":
    from crn_fast.cli import run_tool
    sys.exit(run_tool("run.py", main))
