"""Kernel benchmark: the fused Triton ops against eager torch and torch.compile, at every module
shape of a preset (default: 1024p at 1024x2048, batch 1).

    python benchmarks/kernels.py                        # GPU: triton.testing.do_bench
    python benchmarks/kernels.py --preset tiny --res 64x128   # CPU: eager vs compile only

Bytes moved (the roofline denominator):
    layer_norm_lrelu         2 reads + 1 write of x (stats pass, apply pass)
    layer_norm_stats         1 read of x (the statistics of a conv2 output, inference path)
    upsample_concat          read features + read label + write the concatenated output
    norm_lrelu_upsample_cat  read the raw conv output twice (stats, gather) + label + write output
                             (channels_last: padded to 8 channels per pixel, as the triton
                             inference path hands it to cuDNN; the pad's zeros are written too)
Achieved GB/s is compared with the measured device-to-device copy bandwidth (read + write).
On a GPU, each module's convs: cuDNN (+ the triton layer norm; conv1 also with its input channels
zero-padded to a multiple of 8, as the triton backend runs it, and "speedup_vs_cudnn" is against
that) and the fused conv kernel (kernels/conv_norm.py; conv2 also split: apply pass + conv), in
TFLOP/s, with every tile candidate's time (pointer and TMA kernels) in the "conv_norm tuned configs"
row. ``--conv-only`` runs just those.

The work is a list of parts, one (format, dtype, module) each (plan); the results are saved after
each. An implementation that fails gets a row with its error. When the GPU is unusable after a
failure (a CUDA fault is sticky: every later call of the process fails), the parts left run in a
fresh kernels.py process, and their rows name the part that faulted ("fresh_process_after").
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import (FORMATS, context_broken, conv_configs, device_label, error_text,  # noqa: E402
                   fresh_process, inject_fault, machine_info, results_path, time_fn, write_text_atomic)

from crn_fast import kernels as K  # noqa: E402
from crn_fast.cli import positive_int  # noqa: E402
from crn_fast.config import get_preset  # noqa: E402
from crn_fast.constants import DTYPES, LEAKY_SLOPE, LN_EPS  # noqa: E402
from crn_fast.errors import CRNError  # noqa: E402
from crn_fast.fast_inference import CUDNN_CHANNELS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
U = importlib.import_module("crn_fast.kernels.upsample_concat")  # the module (the package exports its function)


def bench(fn, device, iters):
    if torch.device(device).type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100)
    return min(time_fn(fn, device, warmup=1, iters=iters))


def copy_bandwidth(device, iters) -> float:
    n = (1 << 28) if torch.device(device).type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of fp32
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), device, iters)
    return 2 * a.numel() * 4 / (ms / 1e3) / 1e9


def module_shapes(config, size):
    n = config.num_modules
    for i, c in enumerate(config.widths):
        h, w = size[0] >> (n - 1 - i), size[1] >> (n - 1 - i)
        prev = (config.widths[i - 1], h // 2, w // 2) if i else None
        yield i, c, h, w, prev


def plan(config, size, formats, dtypes, ops=True, conv=False) -> list[tuple]:
    """The benchmark's units of work, in order: ("ops", format, dtype, module) for the norm and
    upsample kernels, then ("conv", "channels_last", dtype, module) for each module's convs, largest
    module first. A part is also the unit that a fresh process resumes from after a CUDA fault."""
    parts = [("ops", f, d, i) for f in formats for d in dtypes for i in range(config.num_modules)] if ops else []
    return parts + ([("conv", "channels_last", d, i) for d in dtypes for i in reversed(range(config.num_modules))]
                    if conv else [])


def part_label(part) -> str:
    kind, fname, dname, i = part
    return f"{fname if kind == 'ops' else 'conv'}:{dname}:m{i}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1024p")
    ap.add_argument("--res", default=None, help="HxW (default: the preset's)")
    ap.add_argument("--dtypes", default=None, help="default: bf16,fp32 on GPU, fp32 on CPU")
    ap.add_argument("--iters", type=positive_int, default=5, help="CPU timing repeats (GPU uses do_bench)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    conv = ap.add_mutually_exclusive_group()
    conv.add_argument("--no-conv", action="store_true", help="skip the conv rows (GPU)")
    conv.add_argument("--conv-only", action="store_true", help="only the conv rows (GPU; largest module first)")
    ap.add_argument("--formats", default="nchw,channels_last", help="memory formats (default: both)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--from-part", type=int, default=0, help=argparse.SUPPRESS)  # a fresh process after a fault
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    if args.conv_only and not cuda:
        ap.error("--conv-only needs a CUDA device: the conv rows time cuDNN against the Triton conv kernels")
    formats = args.formats.split(",")
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        ap.error(f"--formats: {', '.join(map(repr, bad))} unknown; choose from {', '.join(FORMATS)}")
    try:
        config = get_preset(args.preset)
        size = config.input_size(args.res or config.resolution, "--res")
    except CRNError as e:
        ap.error(str(e))
    dtypes = (args.dtypes or ("bf16,fp32" if cuda else "fp32")).split(",")
    parts = plan(config, size, formats, dtypes, ops=not args.conv_only,
                 conv=cuda and "channels_last" in formats and not args.no_conv)
    out = results_path(ap, args.json or ROOT / "benchmarks" / "results" /
                       f"kernels_{device_label(device)}_{args.preset}.json")
    bw = copy_bandwidth(device, args.iters)
    print(f"copy bandwidth: {bw:.0f} GB/s on {torch.cuda.get_device_name() if cuda else 'CPU'}", file=sys.stderr)
    rows, machine = [], machine_info(device)

    def save(final=False):  # after each part: a run cut short by a time limit keeps what it measured
        write_text_atomic(out, json.dumps({"machine": machine, "copy_bandwidth_gbs": bw,
                                           "preset": args.preset, "resolution": list(size), "rows": rows,
                                           **({} if final else {"partial": True})}, indent=2))
    ops = OpRows(config, size, device, args.iters, bw, compile_=not args.no_compile)
    ran_conv = False
    for k in range(args.from_part, len(parts)):
        kind, fname, dname, i = parts[k]
        before = len(rows)
        try:
            inject_fault(part_label(parts[k]))
            if kind == "ops":
                rows += ops.rows(fname, dname, i)
            else:
                ran_conv = True
                conv_rows(config, size, DTYPES[dname], dname, device, rows, on_module=save, modules=[i])
        except Exception as e:  # what the part's own rows did not catch
            rows.append({"op": kind, "module": i, "dtype": dname, "format": fname, "error": error_text(e)[0]})
        failed = any("error" in r for r in rows[before:])
        save()
        if failed and k + 1 < len(parts) and context_broken(device, part_label(parts[k])):
            # a CUDA fault is sticky: the parts left run in a fresh process, which resumes after this one
            for r in rows[before:]:
                if "error" in r:
                    r["error"] += " (the GPU was unusable after it: the parts after it ran in a fresh process)"
            save()
            rest, complete = parts_in_a_fresh_process(args, dtypes, formats, out, k + 1, after=part_label(parts[k]))
            rows += rest
            break
    else:
        complete = True
    if ran_conv:
        rows.append({"op": "conv_norm tuned configs", "configs": conv_configs()})
    save(final=complete)  # still partial if the fresh process was cut short
    print(f"wrote {out}", file=sys.stderr)


def parts_in_a_fresh_process(args, dtypes, formats, out: Path, first: int, after: str) -> tuple[list[dict], bool]:
    """(rows, whether it finished) of parts ``first``.. measured by a new kernels.py process (the
    same options, so the same plan of parts), each row marked with the part whose fault made it
    necessary; its own faults recurse the same way. Its file sits beside ``out`` until it is merged
    (a time limit that ends both processes leaves it there, with what it measured)."""
    rest = out.with_name(f"{out.stem}.from-part-{first}.json")
    argv = [str(Path(__file__).resolve()), "--preset", args.preset, "--dtypes", ",".join(dtypes), "--iters",
            str(args.iters), "--formats", ",".join(formats), "--json", str(rest), "--from-part", str(first)]
    argv += (["--res", args.res] if args.res else []) + (["--no-compile"] if args.no_compile else []) + \
        (["--no-conv"] if args.no_conv else []) + (["--conv-only"] if args.conv_only else [])
    print(f"running the parts left (from part {first}) in a fresh process", file=sys.stderr)
    res, ended = fresh_process(argv, rest, timeout=3600)
    if res is None:
        return [{"op": "parts left", "error": f"the fresh process for the parts after {after}'s CUDA fault ended "
                                              f"with {ended} and no results"}], True
    rest.unlink(missing_ok=True)
    for row in res["rows"]:
        row.setdefault("fresh_process_after", after)  # a nested fault names its own part
    return res["rows"], "partial" not in res


class OpRows:
    """The norm and upsample kernels' rows of one (format, dtype, module): eager (and torch.compile)
    against crn_fast's Triton kernels, in GB/s and % of the copy bandwidth."""

    def __init__(self, config, size, device, iters, bw, compile_=True):
        self.config, self.size, self.device, self.iters, self.bw = config, size, device, iters, bw
        self.ln_c = torch.compile(K.layer_norm_lrelu_reference) if compile_ else None
        self.up_c = torch.compile(K.upsample_concat_reference) if compile_ else None

    def rows(self, fname, dname, module) -> list[dict]:
        ln_ref, up_ref, ln_c, up_c = K.layer_norm_lrelu_reference, K.upsample_concat_reference, self.ln_c, self.up_c
        config, device, iters, bw = self.config, self.device, self.iters, self.bw
        fmt, dt = FORMATS[fname], DTYPES[dname]
        i, c, h, w, prev = list(module_shapes(config, self.size))[module]
        rows = []
        x = torch.randn(1, c, h, w, device=device, dtype=dt).contiguous(memory_format=fmt)
        wt, bs = torch.ones(c, device=device, dtype=dt), torch.zeros(c, device=device, dtype=dt)
        impls = {"eager": lambda: ln_ref(x, wt, bs, LN_EPS, LEAKY_SLOPE)}
        if ln_c:
            impls["compile"] = lambda: ln_c(x, wt, bs, LN_EPS, LEAKY_SLOPE)
        triton_ok = K.can_run(x)  # a GPU, or CPU tensors under TRITON_INTERPRET=1 (the test's smoke run)
        if triton_ok:
            impls["triton"] = lambda: K.layer_norm_lrelu(x, wt, bs)
        nbytes = 3 * x.numel() * x.element_size()
        rows += _measure("layer_norm_lrelu", i, (1, c, h, w), dname, impls, nbytes, bw, device, iters, fname)
        if triton_ok:
            rows += _measure("layer_norm_stats", i, (1, c, h, w), dname, {"triton": lambda: K.layer_norm_stats(x)},
                             x.numel() * x.element_size(), bw, device, iters, fname)
        if prev is None:
            return rows
        f = torch.randn(1, *prev, device=device, dtype=dt).contiguous(memory_format=fmt)
        lab = torch.rand(1, config.num_classes, h, w, device=device, dtype=dt).contiguous(memory_format=fmt)
        impls = {"eager": lambda: up_ref(f, lab)}
        if up_c:
            impls["compile"] = lambda: up_c(f, lab)
        if triton_ok:
            impls["triton"] = lambda: K.upsample_concat(f, lab)
        wide = triton_ok and fname == "nchw" and w > U.ROW_TILE_CUDA and x.is_cuda  # the default's alternative
        if wide:
            impls["triton, 2x wider row tiles"] = lambda: _wider_rows(K.upsample_concat, f, lab)
        nbytes = (f.numel() + lab.numel() + (f.shape[1] + lab.shape[1]) * h * w) * f.element_size()
        rows += _measure("upsample_concat", i, (1, *prev, h, w), dname, impls, nbytes, bw, device, iters, fname,
                         same_as={"triton, 2x wider row tiles": "triton"})
        if triton_ok:  # inference fusion: module i-1's norm + lrelu inside module i's upsample + concat
            wp, bp = torch.ones(prev[0], device=device, dtype=dt), torch.zeros(prev[0], device=device, dtype=dt)
            cm = CUDNN_CHANNELS if fname == "channels_last" else 1  # the model's padding
            impls = {"unfused (triton ln + upsample)": lambda: K.upsample_concat(K.layer_norm_lrelu(f, wp, bp), lab),
                     "triton fused": lambda: K.norm_lrelu_upsample_concat(f, *K.layer_norm_stats(f), wp, bp, lab,
                                                                          channels_multiple=cm)}
            if wide:
                impls["triton fused, 2x wider row tiles"] = lambda: _wider_rows(
                    K.norm_lrelu_upsample_concat, f, *K.layer_norm_stats(f), wp, bp, lab)
            out_c = -(-(f.shape[1] + lab.shape[1]) // cm) * cm
            nbytes = (2 * f.numel() + lab.numel() + out_c * h * w) * f.element_size()
            rows += _measure("norm_lrelu_upsample_concat", i, (1, *prev, h, w), dname, impls, nbytes, bw,
                             device, iters, fname, same_as={"triton fused, 2x wider row tiles": "triton fused"})
        return rows


def conv_rows(config, size, dt, dname, device, rows, on_module=None, modules=None):
    """Each module's two convs (channels_last, GPU), largest module first: cuDNN alone and with the
    triton layer norm after it (the triton backend's work per layer; conv1 also padded to
    CUDNN_CHANNELS input channels, as the model runs it) against crn_fast's fused conv
    kernel with its epilogue (the output's statistics) and, for conv2, its prologue (the input's
    norm) or, as CRN's "split" mode runs it, after one norm_lrelu apply pass; the conv1 row is
    nearly the bare GEMM (the epilogue reads its own tile). Appends to ``rows`` (an implementation
    that fails: a row with its error); ``on_module`` runs after each conv (saving what was measured
    so far). ``modules``: those modules only (default: all)."""
    import torch.nn.functional as F
    g = torch.Generator(device=device).manual_seed(0)
    for i, c, h, w, _ in reversed(list(module_shapes(config, size))):  # the big modules first
        if modules is not None and i not in modules:
            continue
        for layer, cin in (("conv1", config.in_channels(i)), ("conv2", c)):
            x = torch.randn(1, h, w, -(-cin // 16) * 16, device=device, dtype=dt, generator=g) \
                .permute(0, 3, 1, 2)[:, :cin]  # the padded pixel stride the fused path's input has
            x_cl = x.contiguous(memory_format=torch.channels_last)
            wt = (torch.randn(c, cin, 3, 3, device=device, dtype=dt, generator=g) * 0.02) \
                .contiguous(memory_format=torch.channels_last)
            packed = K.pack_conv_weight(wt)
            ones, zeros = torch.ones(c, device=device, dtype=dt), torch.zeros(c, device=device, dtype=dt)
            norm = (torch.zeros(1, device=device), torch.ones(1, device=device),
                    torch.ones(cin, device=device, dtype=dt), torch.zeros(cin, device=device, dtype=dt))
            impls = {"cudnn": lambda: F.conv2d(x_cl, wt, padding=1),
                     "cudnn + triton ln": lambda: K.layer_norm_lrelu(F.conv2d(x_cl, wt, padding=1), ones, zeros)}
            base_name = "cudnn"  # the cuDNN conv the model runs, which the speedups are against
            if layer == "conv1" and cin % CUDNN_CHANNELS:  # what the triton backend's "cudnn" mode runs
                cp = -(-cin // CUDNN_CHANNELS) * CUDNN_CHANNELS
                x_pad = torch.zeros(1, h, w, cp, device=device, dtype=dt).permute(0, 3, 1, 2)
                x_pad[:, :cin] = x
                w_pad = torch.zeros(c, cp, 3, 3, device=device, dtype=dt).contiguous(memory_format=torch.channels_last)
                w_pad[:, :cin] = wt
                base_name = f"cudnn, Cin padded to {cp}"
                impls[base_name] = lambda: F.conv2d(x_pad, w_pad, padding=1)
                impls[f"{base_name} + triton ln"] = \
                    lambda: K.layer_norm_lrelu(F.conv2d(x_pad, w_pad, padding=1), ones, zeros)
            if layer == "conv1" and i > 0:  # conv1 from the previous module's raw output, as the model runs it
                cf = cin - config.num_classes
                raw = torch.randn(1, h // 2, w // 2, cf, device=device, dtype=dt, generator=g).permute(0, 3, 1, 2)
                lab = torch.rand(1, h, w, config.num_classes, device=device, dtype=dt, generator=g).permute(0, 3, 1, 2)
                st = K.layer_norm_stats(raw)
                g1, b1 = torch.ones(cf, device=device, dtype=dt), torch.zeros(cf, device=device, dtype=dt)
                wg, wl = K.pack_upsample_conv_weight(wt, cf)
                w_cudnn = w_pad if cin % CUDNN_CHANNELS else wt

                def cudnn_mode():
                    up = K.norm_lrelu_upsample_concat(raw, *st, g1, b1, lab, channels_multiple=CUDNN_CHANNELS)
                    full = up.as_strided((1, w_cudnn.shape[1], h, w), up.stride())  # the zero pad channels too
                    return K.layer_norm_lrelu(F.conv2d(full, w_cudnn, padding=1), ones, zeros)
                impls["cudnn mode: norm+upsample+concat, cudnn, triton ln"] = cudnn_mode
                impls["lowres mode: norm, mm + upsample_conv + stats, norm"] = lambda: K.norm_lrelu(
                    *K.upsample_conv(K.norm_lrelu(raw, *st, g1, b1), lab, wg, wl), ones, zeros)
            if layer == "conv1":
                impls["fused conv + stats"] = lambda: K.conv_norm(x, packed)
            else:  # CRN's "fused" and "split" conv2: norm on load, or one apply pass (x is dense here)
                impls["fused conv norm-in + stats"] = lambda: K.conv_norm(x, packed, norm=norm)
                impls["split: norm_lrelu + fused conv + stats"] = lambda: K.conv_norm(K.norm_lrelu(x, *norm), packed)
            flops = 2 * 9 * cin * c * h * w
            res, failed = {}, {}
            with torch.no_grad():
                for name, fn in impls.items():
                    try:
                        fn()  # tunes the fused kernel for this shape before timing
                        res[name] = bench(fn, device, 1)
                    except Exception as e:
                        failed[name] = error_text(e)[0]
                        print(f"{layer} m{i} {name}: {failed[name][:300]}", file=sys.stderr)
            rows += [{"op": layer, "module": i, "shape": [1, cin, c, h, w], "dtype": dname, "format": "channels_last",
                      "impl": name, "error": err} for name, err in failed.items()]
            base = res.get(base_name)
            for name, ms in res.items():
                row = {"op": layer, "module": i, "shape": [1, cin, c, h, w], "dtype": dname,
                       "format": "channels_last", "impl": name, "ms": ms, "tflops": flops / (ms / 1e3) / 1e12,
                       "speedup_vs_cudnn": base / ms if base else None}
                rows.append(row)
                print(f"{layer:8s} m{i} {cin:5d}->{c:<5d} {h}x{w:<5d} {dname:5s} {name:28s} {ms:8.4f} ms "
                      f"{row['tflops']:7.1f} TFLOP/s", file=sys.stderr)
            if on_module:
                on_module()


def _wider_rows(fn, *args):
    """fn(*args) with the NCHW upsample-concat's row tile twice its default width on GPUs (2048
    pixels, 16 a thread): the rows that decide upsample_concat.ROW_TILE_CUDA."""
    default = U.ROW_TILE_CUDA
    U.ROW_TILE_CUDA = 2 * default
    try:
        return fn(*args)
    finally:
        U.ROW_TILE_CUDA = default


def _measure(op, module, shape, dname, impls, nbytes, bw, device, iters, fmt="nchw", same_as=None):
    """Time each impl: one row each (an error row for one that fails). same_as {impl: other impl}: a
    variant of the same computation, its row also records its output's max abs difference from the
    other's (a tile change should not change a bit)."""
    res, rows = {}, []
    with torch.no_grad():
        for name, fn in impls.items():
            try:
                res[name] = bench(fn, device, iters)
            except Exception as e:  # e.g. compile failing on a shape: a row with the error, keep going
                err = error_text(e)[0]
                rows.append({"op": op, "module": module, "shape": list(shape), "dtype": dname, "format": fmt,
                             "impl": name, "error": err})
                print(f"{op} m{module} {name}: {err[:300]}", file=sys.stderr)
    base = res.get("eager") or res.get("unfused (triton ln + upsample)") or next(iter(res.values()), None)
    for name, ms in res.items():
        gbs = nbytes / (ms / 1e3) / 1e9
        row = {"op": op, "module": module, "shape": list(shape), "dtype": dname, "format": fmt, "impl": name, "ms": ms,
               "gb_per_s": gbs, "pct_of_copy_bw": 100 * gbs / bw, "speedup_vs_baseline": base / ms}
        if "compile" in res:
            row["speedup_vs_compile"] = res["compile"] / ms
        if (same_as or {}).get(name) in res:
            with torch.no_grad():
                row["max_abs_diff_vs_" + same_as[name]] = \
                    (impls[name]().float() - impls[same_as[name]]().float()).abs().max().item()
        rows.append(row)
        print(f"{op:28s} m{module} {str(shape):26s} {dname:5s} {fmt:13s} {name:32s} {ms:9.4f} ms {gbs:8.1f} GB/s "
              f"{row['pct_of_copy_bw']:5.1f}% copy  x{row['speedup_vs_baseline']:.2f}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
