"""crn-export: a crn_fast checkpoint -> deployable artefacts, each verified against eager fp32.

    crn-export --onnx model.ckpt                  # generator.onnx: dynamic batch/height/width
    crn-export --onnx model.ckpt --dtype fp16     # mixed precision: fp16 convs, fp32 layer norms and I/O
    crn-export --trt model.ckpt --dtype fp16      # generator.onnx + a strongly typed generator.engine
    crn-export --compile model.ckpt --res 256x512 # generator.pt2: AOTInductor package

Every artefact gets a JSON sidecar (<artefact>.json): input/output names, shapes or profile,
dtype, library versions, device, export time and the verification result. Verification (on by
default) runs eager fp32 and the artefact on the same layouts at two resolutions. Artefacts are
built in a temporary folder and moved into --out only when complete and verified; one that fails
verification is kept beside the previous good one as generator.failed.<ext> (with its sidecar),
never in its place, and the exit status is 3.

Exit status: 0 done, 1 runtime error, 2 usage error, 3 verification failed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from crn_fast.cli import add_logging_options, log, non_negative_float, positive_int, resolution, run_tool, \
    setup_logging
from crn_fast.constants import DTYPES, EXIT_VERIFY
from crn_fast.errors import CRNError, UsageError

from .verify import DEFAULT_TOLERANCE, verify

WORK_PREFIX = ".crn-export-"


def build_parser():
    ap = argparse.ArgumentParser(prog="crn-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="crn_fast generator file (model.ckpt), or the authors' TF checkpoint prefix")
    ap.add_argument("--onnx", action="store_true", help="ONNX model (onnxruntime, TensorRT)")
    ap.add_argument("--trt", action="store_true", help="TensorRT engine (implies building the ONNX model)")
    ap.add_argument("--compile", action="store_true", help="AOTInductor package (torch.export + Inductor)")
    ap.add_argument("--out", default="exported", help="output folder (default: exported)")
    ap.add_argument("--res", type=resolution, default=None,
                    help="HxW to export/optimise for (default: the model's nominal size)")
    ap.add_argument("--min-res", type=resolution, default=None,
                    help="smallest HxW of the dynamic range (TensorRT, AOTInductor)")
    ap.add_argument("--opt-res", type=resolution, default=None, help="HxW TensorRT optimises for (default: --res)")
    ap.add_argument("--max-res", type=resolution, default=None,
                    help="largest HxW of the dynamic range (ONNX, TensorRT, AOTInductor)")
    ap.add_argument("--batch-size", "--batch", dest="batch", type=positive_int, default=1,
                    help="batch size to optimise for (default 1)")
    ap.add_argument("--min-batch", type=positive_int, default=None,
                    help="smallest batch of the TensorRT profile (default: --batch)")
    ap.add_argument("--max-batch", type=positive_int, default=None,
                    help="largest batch of the TensorRT profile, and of the AOTInductor package (above --batch: "
                         "a dynamic batch, 1 to this); default --batch. The ONNX model's batch is always dynamic")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                    help="precision of every artefact: fp32, or fp16/bf16 mixed precision (fp32 layer norms, "
                         "input and output)")
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18; 22 for bf16)")
    ap.add_argument("--workspace", type=float, default=8.0, help="TensorRT workspace in GiB (default 8)")
    ap.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="0-5",
                    help="TensorRT builder optimisation level 0-5 (default 3)")
    ap.add_argument("--timing-cache", default=None, help="TensorRT timing cache file (default: OUT/timing.cache)")
    ap.add_argument("--device", default=None, help="device for AOTInductor and verification (default: cuda if any)")
    ap.add_argument("--verify", dest="verify", action="store_true", default=True, help="verify (default)")
    ap.add_argument("--no-verify", dest="verify", action="store_false", help="skip verification")
    ap.add_argument("--tolerance", type=non_negative_float, default=None,
                    help="max abs error on 0..255 (default per dtype: " +
                         ", ".join(f"{k} {v}" for k, v in DEFAULT_TOLERANCE.items()) + ")")
    ap.add_argument("--layouts", default=None, help="folder of real label maps for verification (default: synthetic)")
    add_logging_options(ap)
    return ap


def _versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("onnx", "onnxruntime", "tensorrt", "triton"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            pass
    return v


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def verify_sizes(cfg, res, min_res, max_res) -> list[tuple[int, int]]:
    """Two resolutions inside the exported range: res and a smaller (or larger) multiple of the stride."""
    s = cfg.stride
    lo, hi = min_res or res, max_res or res
    if lo != hi:
        return [tuple(lo), tuple(hi)] if lo != res else [tuple(res), tuple(hi)]
    half = (res[0] // 2 // s * s, res[1] // 2 // s * s)
    return [tuple(res), half] if min(half) >= s else [tuple(res), (res[0] * 2, res[1] * 2)]


def check_options(args, cfg) -> dict:
    """Every option checked against the model before anything is built: UsageError naming it."""
    from .onnx import DEFAULT_OPSET, check_opset
    if not (args.onnx or args.trt or args.compile):
        raise UsageError("nothing to export: pass --onnx, --trt and/or --compile")
    res = args.res or cfg.resolution
    opt = args.opt_res or res
    for name, r in (("--res", res), ("--opt-res", opt), ("--min-res", args.min_res), ("--max-res", args.max_res)):
        if r is not None:
            try:
                cfg.input_size(r, name)
            except CRNError as e:
                raise UsageError(str(e)) from None
    lo, hi = args.min_res or res, args.max_res or res
    if args.min_res and args.max_res and not (lo[0] <= hi[0] and lo[1] <= hi[1]):
        raise UsageError(f"--min-res {lo[0]}x{lo[1]} is larger than --max-res {hi[0]}x{hi[1]} (in height or width); "
                         f"the dynamic range needs min <= max in both, e.g. --min-res {min(lo[0], hi[0])}x"
                         f"{min(lo[1], hi[1])} --max-res {max(lo[0], hi[0])}x{max(lo[1], hi[1])}")
    for name, r in (("--res", res), ("--opt-res", opt)):
        if not (lo[0] <= r[0] <= hi[0] and lo[1] <= r[1] <= hi[1]):
            raise UsageError(f"{name} {r[0]}x{r[1]} is outside --min-res {lo[0]}x{lo[1]} .. --max-res "
                             f"{hi[0]}x{hi[1]}; choose min <= res <= max in both height and width")
    bmin = args.batch if args.min_batch is None else args.min_batch
    bmax = args.batch if args.max_batch is None else args.max_batch
    if not bmin <= args.batch <= bmax:
        given = (("--min-batch", args.min_batch), ("--batch", args.batch), ("--max-batch", args.max_batch))
        said = [f"{name} {v}" for name, v in given if v is not None]
        raise UsageError(f"batch sizes must satisfy --min-batch <= --batch <= --max-batch (each range end defaults "
                         f"to --batch), got {', '.join(said)}")
    opset = args.opset or DEFAULT_OPSET[args.dtype]
    if args.onnx or args.trt:
        try:
            check_opset(opset, args.dtype)
        except CRNError as e:
            raise UsageError(str(e)) from None
    if args.workspace <= 0:
        raise UsageError(f"--workspace {args.workspace}: must be > 0 GiB")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UsageError(f"--device {device}: valid: cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    if args.dtype == "fp16" and args.compile and device == "cpu":
        raise UsageError("--compile --dtype fp16 needs a GPU; on CPU use fp32 or bf16")
    if args.layouts and not Path(args.layouts).is_dir():
        raise UsageError(f"--layouts {args.layouts}: no such folder")
    return {"res": res, "opt_res": opt, "opset": opset, "device": device}


def clean_stale_work_dirs(out: Path) -> None:
    """Remove temporary folders of crn-export runs that were killed (their process is gone)."""
    for d in out.glob(WORK_PREFIX + "*"):
        try:
            pid = int(d.name[len(WORK_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            log.info(f"removing {d} (left by an interrupted crn-export, process {pid})")
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def failed_name(name: str) -> str:
    """generator.onnx -> generator.failed.onnx (never the name of a verified artefact)."""
    stem, dot, ext = name.partition(".")
    return f"{stem}.failed.{ext}" if dot else f"{name}.failed"


def run(args) -> int:
    from crn_fast.checkpoint import load_generator
    model = load_generator(args.checkpoint)  # clear error for missing/corrupt/foreign files
    cfg = model.config
    opts = check_options(args, cfg)
    res, opt_res, device = opts["res"], opts["opt_res"], opts["device"]
    min_res, max_res = args.min_res, args.max_res
    profile = None
    if args.trt:
        from .tensorrt import _trt, make_profile
        _trt()  # TensorRT missing, no GPU or an unsupported version: one line, before any work
        profile = make_profile(cfg.num_classes, cfg.stride, opt_res, min_res, max_res, args.batch,
                               args.min_batch, args.max_batch)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; the artefacts go into a folder (default: exported)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_work_dirs(out)
        work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=out))
    except OSError as e:
        raise CRNError(f"cannot write to --out {out}: {e.strerror or e}") from None
    tol = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE[args.dtype]
    common = {"model": cfg.to_dict(), "checkpoint": str(args.checkpoint), "versions": _versions(),
              "input": {"name": "layout", "dtype": "float32", "layout": "NCHW one-hot, void last, contiguous"},
              "output": {"name": "images", "dtype": "float32",
                         "layout": "NCHW, 3k channels image-major, 0..255 unclipped"}}
    produced, failed = [], []

    def finish(artefact: Path, info: dict, runner, verify_device: str, vsizes, batch=1):
        info = {**common, **info, "artefact": artefact.name, "device": _device_name(verify_device),
                "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        ok = True
        if args.verify:
            log.info(f"verifying {artefact.name} against eager fp32 at " +
                     ", ".join(f"{h}x{w}" for h, w in vsizes) + " ...")
            v = verify(runner, model, vsizes, args.layouts, tol, verify_device, batch)
            v["runtime"] = getattr(runner, "runtime", None) or info.get("format")
            info["verification"] = v
            log.info(f"  {artefact.name}: max abs {v['max_abs']:.4g} (tolerance {tol}), " +
                     ", ".join(f"{r['size'][0]}x{r['size'][1]}: PSNR {r['psnr_db']:.1f} dB" for r in v["results"]))
            ok = v["passed"]
        else:
            info["verification"] = None
        name = artefact.name if ok else failed_name(artefact.name)
        if not ok:
            failed.append(name)
            artefact = artefact.rename(artefact.with_name(name))
            info["artefact"] = name
        side = work / f"{name}.json"
        side.write_text(json.dumps(info, indent=2))
        produced.extend([artefact, side])

    try:
        if args.onnx or args.trt:
            from .onnx import ONNXGenerator, export_onnx
            log.info(f"onnx: exporting {args.dtype} generator.onnx (opset {opts['opset']}) ...")
            t0 = time.perf_counter()
            path = export_onnx(model, work / "generator.onnx", res, opts["opset"],
                               max_batch=max(64, args.max_batch or 1), max_size=max_res, dtype=args.dtype)
            dt = time.perf_counter() - t0
            log.info(f"onnx: {path.name} in {dt:.1f}s")
            s = cfg.stride
            runner = ONNXGenerator(path)
            # onnx.reference (numpy) stands in where onnxruntime's CPU provider lacks a kernel (bf16):
            # exact but slow, so it verifies at the two smallest sizes the model runs
            vsizes = verify_sizes(cfg, res, None, None) if runner.runtime == "onnxruntime" else \
                [(s, 2 * s), (2 * s, 4 * s)]
            finish(path, {"format": "onnx", "dtype": args.dtype, "opset": opts["opset"], "export_seconds": dt,
                          "shapes": {"layout": ["batch", cfg.num_classes, f"{s}*h", f"{s}*w"],
                                     "images": ["batch", 3 * cfg.k, f"{s}*h", f"{s}*w"]}},
                   runner, "cpu", vsizes)
        if args.trt and "generator.onnx" not in failed:
            from .tensorrt import TensorRTGenerator, build_engine
            log.info("tensorrt: building a strongly typed engine (minutes for large profiles) ...")
            t0 = time.perf_counter()
            cache = args.timing_cache or str(out / "timing.cache")
            facts = build_engine(work / "generator.onnx", work / "generator.engine", profile, args.workspace, cache,
                                 args.opt_level)
            dt = time.perf_counter() - t0
            log.info(f"tensorrt: generator.engine in {dt:.1f}s")
            finish(work / "generator.engine", {"format": "tensorrt", "build_seconds": dt,
                                               "profile": profile.to_dict(), **facts},
                   TensorRTGenerator(work / "generator.engine"), "cuda",
                   verify_sizes(cfg, opt_res, min_res, max_res))
        if args.compile:
            from .compile import export_aoti, load_aoti
            log.info(f"aotinductor: compiling generator.pt2 on {device} (a minute or more) ...")
            t0 = time.perf_counter()
            path = export_aoti(model, work / "generator.pt2", res, args.batch, args.dtype, device, min_res, max_res,
                               args.max_batch)
            dt = time.perf_counter() - t0
            log.info(f"aotinductor: {path.name} in {dt:.1f}s")
            vs = verify_sizes(cfg, res, min_res, max_res) if (min_res or max_res) else [tuple(res)]
            finish(path, {"format": "aotinductor", "dtype": args.dtype, "compile_seconds": dt,
                          "shapes": {"layout": [args.batch, cfg.num_classes, *res]},
                          "dynamic": {"min_res": min_res, "max_res": max_res, "max_batch": args.max_batch},
                          "load": "torch._inductor.aoti_load_package(path)(layout.contiguous())",
                          "note": "the package checks no input shape (unless AOTI_RUNTIME_CHECK_INPUTS=1): give it "
                                  "the layout shape above, or one in the dynamic range, only; "
                                  "crn_fast.export.load_aoti checks them"},
                   load_aoti(path), device, vs, batch=args.batch)
        for f in produced:
            f.replace(out / f.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("wrote " + ", ".join(str(out / f.name) for f in produced))
    if failed:
        print(f"crn-export: error: verification failed for {', '.join(failed)} (kept beside any earlier good "
              f"artefact; see its sidecar JSON)", file=sys.stderr)
        return EXIT_VERIFY
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    return run_tool("crn-export", run, args)


if __name__ == "__main__":
    sys.exit(main())
