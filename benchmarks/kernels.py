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
that) and the fused conv kernel (kernels/conv_norm.py; conv2 also split: apply pass + conv), in TFLOP/s, with every tile
candidate's time (pointer and TMA kernels) in the "conv_norm tuned configs" row. ``--conv-only``
runs just those.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import conv_configs, device_label, machine_info, time_fn, write_text_atomic  # noqa: E402

from crn_fast import kernels as K  # noqa: E402
from crn_fast.config import get_preset, parse_resolution  # noqa: E402
from crn_fast.constants import DTYPES, LEAKY_SLOPE, LN_EPS  # noqa: E402
from crn_fast.fast_inference import CUDNN_CHANNELS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1024p")
    ap.add_argument("--res", default=None, help="HxW (default: the preset's)")
    ap.add_argument("--dtypes", default=None, help="default: bf16,fp32 on GPU, fp32 on CPU")
    ap.add_argument("--iters", type=int, default=5, help="CPU timing repeats (GPU uses do_bench)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    conv = ap.add_mutually_exclusive_group()
    conv.add_argument("--no-conv", action="store_true", help="skip the conv rows (GPU)")
    conv.add_argument("--conv-only", action="store_true", help="only the conv rows (GPU; largest module first)")
    ap.add_argument("--formats", default="nchw,channels_last", help="memory formats (default: both)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    if args.conv_only and not cuda:
        ap.error("--conv-only needs a CUDA device: the conv rows time cuDNN against the Triton conv kernels")
    config = get_preset(args.preset)
    size = parse_resolution(args.res) if args.res else config.resolution
    dtypes = (args.dtypes or ("bf16,fp32" if cuda else "fp32")).split(",")
    bw = copy_bandwidth(device, args.iters)
    print(f"copy bandwidth: {bw:.0f} GB/s on {torch.cuda.get_device_name() if cuda else 'CPU'}", file=sys.stderr)
    ln_ref = K.layer_norm_lrelu_reference
    up_ref = K.upsample_concat_reference
    ln_c = None if args.no_compile else torch.compile(ln_ref)
    up_c = None if args.no_compile else torch.compile(up_ref)
    rows = []
    formats = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    for fname, dname in ((f, d) for f in args.formats.split(",") for d in dtypes if not args.conv_only):
        if fname not in formats:
            ap.error(f"--formats: {fname!r} is not one of {', '.join(formats)}")
        fmt, dt = formats[fname], DTYPES[dname]
        for i, c, h, w, prev in module_shapes(config, size):
            x = torch.randn(1, c, h, w, device=device, dtype=dt).contiguous(memory_format=fmt)
            wt, bs = torch.ones(c, device=device, dtype=dt), torch.zeros(c, device=device, dtype=dt)
            impls = {"eager": lambda: ln_ref(x, wt, bs, LN_EPS, LEAKY_SLOPE)}
            if ln_c:
                impls["compile"] = lambda: ln_c(x, wt, bs, LN_EPS, LEAKY_SLOPE)
            triton_ok = K.can_run(x)  # a GPU, or CPU tensors under TRITON_INTERPRET=1 (the test's smoke run)
            if triton_ok:
                impls["triton"] = lambda: K.layer_norm_lrelu(x, wt, bs)
            nbytes = 3 * x.numel() * x.element_size()
            rows += _measure("layer_norm_lrelu", i, (1, c, h, w), dname, impls, nbytes, bw, device, args.iters, fname)
            if triton_ok:
                rows += _measure("layer_norm_stats", i, (1, c, h, w), dname, {"triton": lambda: K.layer_norm_stats(x)},
                                 x.numel() * x.element_size(), bw, device, args.iters, fname)
            if prev is None:
                continue
            f = torch.randn(1, *prev, device=device, dtype=dt).contiguous(memory_format=fmt)
            lab = torch.rand(1, config.num_classes, h, w, device=device, dtype=dt).contiguous(memory_format=fmt)
            impls = {"eager": lambda: up_ref(f, lab)}
            if up_c:
                impls["compile"] = lambda: up_c(f, lab)
            if triton_ok:
                impls["triton"] = lambda: K.upsample_concat(f, lab)
            nbytes = (f.numel() + lab.numel() + (f.shape[1] + lab.shape[1]) * h * w) * f.element_size()
            rows += _measure("upsample_concat", i, (1, *prev, h, w), dname, impls, nbytes, bw, device, args.iters,
                             fname)
            if triton_ok:  # inference fusion: module i-1's norm + lrelu inside module i's upsample + concat
                wp, bp = torch.ones(prev[0], device=device, dtype=dt), torch.zeros(prev[0], device=device, dtype=dt)
                cm = CUDNN_CHANNELS if fname == "channels_last" else 1  # the model's padding
                impls = {"unfused (triton ln + upsample)": lambda: K.upsample_concat(K.layer_norm_lrelu(f, wp, bp), lab),
                         "triton fused": lambda: K.norm_lrelu_upsample_concat(f, *K.layer_norm_stats(f), wp, bp, lab,
                                                                              channels_multiple=cm)}
                out_c = -(-(f.shape[1] + lab.shape[1]) // cm) * cm
                nbytes = (2 * f.numel() + lab.numel() + out_c * h * w) * f.element_size()
                rows += _measure("norm_lrelu_upsample_concat", i, (1, *prev, h, w), dname, impls, nbytes, bw,
                                 device, args.iters, fname)
    out = Path(args.json or ROOT / "benchmarks" / "results" / f"kernels_{device_label(device)}_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(final=False):  # after each part: a run cut short by a time limit keeps what it measured
        write_text_atomic(out, json.dumps({"machine": machine_info(device), "copy_bandwidth_gbs": bw,
                                           "preset": args.preset, "resolution": list(size), "rows": rows,
                                           **({} if final else {"partial": True})}, indent=2))
    save()
    if cuda and "channels_last" in args.formats.split(",") and not args.no_conv:
        for dname in dtypes:
            conv_rows(config, size, DTYPES[dname], dname, device, rows, on_module=save)
    save(final=True)
    print(f"wrote {out}", file=sys.stderr)


def conv_rows(config, size, dt, dname, device, rows, on_module=None):
    """Each module's two convs (channels_last, GPU), largest module first: cuDNN alone and with the
    triton layer norm after it (the triton backend's work per layer; conv1 also padded to
    CUDNN_CHANNELS input channels, as the model runs it) against crn_fast's fused conv
    kernel with its epilogue (the output's statistics) and, for conv2, its prologue (the input's
    norm) or, as CRN's "split" mode runs it, after one norm_lrelu apply pass; the conv1 row is
    nearly the bare GEMM (the epilogue reads its own tile). Appends to
    ``rows``; ``on_module`` runs after each conv (saving what was measured so far)."""
    import torch.nn.functional as F
    g = torch.Generator(device=device).manual_seed(0)
    for i, c, h, w, _ in reversed(list(module_shapes(config, size))):  # the big modules first
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
            if layer == "conv1":
                impls["fused conv + stats"] = lambda: K.conv_norm(x, packed)
            else:  # CRN's "fused" and "split" conv2: norm on load, or one apply pass (x is dense here)
                impls["fused conv norm-in + stats"] = lambda: K.conv_norm(x, packed, norm=norm)
                impls["split: norm_lrelu + fused conv + stats"] = lambda: K.conv_norm(K.norm_lrelu(x, *norm), packed)
            flops = 2 * 9 * cin * c * h * w
            res = {}
            with torch.no_grad():
                for name, fn in impls.items():
                    try:
                        fn()  # tunes the fused kernel for this shape before timing
                        res[name] = bench(fn, device, 1)
                    except Exception as e:
                        print(f"{layer} m{i} {name}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
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
    rows.append({"op": "conv_norm tuned configs", "configs": conv_configs()})


def _measure(op, module, shape, dname, impls, nbytes, bw, device, iters, fmt="nchw"):
    res = {}
    with torch.no_grad():
        for name, fn in impls.items():
            try:
                res[name] = bench(fn, device, iters)
            except Exception as e:  # e.g. compile failing on a shape: report, keep going
                print(f"{op} {name}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
    rows = []
    base = res.get("eager") or res.get("unfused (triton ln + upsample)") or next(iter(res.values()), None)
    for name, ms in res.items():
        gbs = nbytes / (ms / 1e3) / 1e9
        row = {"op": op, "module": module, "shape": list(shape), "dtype": dname, "format": fmt, "impl": name, "ms": ms,
               "gb_per_s": gbs, "pct_of_copy_bw": 100 * gbs / bw, "speedup_vs_baseline": base / ms}
        if "compile" in res:
            row["speedup_vs_compile"] = res["compile"] / ms
        rows.append(row)
        print(f"{op:28s} m{module} {str(shape):26s} {dname:5s} {fmt:13s} {name:32s} {ms:9.4f} ms {gbs:8.1f} GB/s "
              f"{row['pct_of_copy_bw']:5.1f}% copy  x{row['speedup_vs_baseline']:.2f}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
