"""crn-export: a crn_fast checkpoint -> deployable artefacts, each verified against eager fp32.

    crn-export --onnx model.ckpt                  # generator.onnx: dynamic batch/height/width
    crn-export --trt model.ckpt --dtype fp16      # generator.onnx + generator.engine (TensorRT 10+)
    crn-export --compile model.ckpt --res 256x512 # generator.pt2: AOTInductor package

Every artefact gets a JSON sidecar (<artefact>.json): input/output names, shapes or profile,
dtype, library versions, device, export time and the verification result. Verification (on by
default) runs eager fp32 and the artefact on the same layouts at two resolutions and exits with
status 3 if the max abs error on the 0..255 scale is over --tolerance. Artefacts are built in a
temporary folder and moved into --out only when complete.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from crn_fast.config import parse_resolution
from crn_fast.errors import CRNError

from .verify import DEFAULT_TOLERANCE, verify


def build_parser():
    ap = argparse.ArgumentParser(prog="crn-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="crn_fast generator file (model.ckpt)")
    ap.add_argument("--onnx", action="store_true", help="ONNX model (onnxruntime, TensorRT)")
    ap.add_argument("--trt", action="store_true", help="TensorRT engine (implies building the ONNX model)")
    ap.add_argument("--compile", action="store_true", help="AOTInductor package (torch.export + Inductor)")
    ap.add_argument("--out", default="exported", help="output folder (default: exported)")
    ap.add_argument("--res", default=None, help="HxW to export/optimise for (default: the model's nominal size)")
    ap.add_argument("--min-res", default=None, help="smallest HxW of the dynamic range (TensorRT, AOTInductor)")
    ap.add_argument("--opt-res", default=None, help="HxW TensorRT optimises for (default: --res)")
    ap.add_argument("--max-res", default=None, help="largest HxW of the dynamic range (TensorRT, AOTInductor)")
    ap.add_argument("--batch", type=int, default=1, help="batch size to optimise for (default 1)")
    ap.add_argument("--min-batch", type=int, default=None)
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                    help="precision of TensorRT / AOTInductor artefacts (ONNX is always fp32)")
    ap.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17; default 18)")
    ap.add_argument("--workspace", type=float, default=8.0, help="TensorRT workspace in GiB (default 8)")
    ap.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimisation level 0-5 (default 3)")
    ap.add_argument("--timing-cache", default=None, help="TensorRT timing cache file (default: OUT/timing.cache)")
    ap.add_argument("--device", default=None, help="device for AOTInductor and verification (default: cuda if any)")
    ap.add_argument("--verify", dest="verify", action="store_true", default=True, help="verify (default)")
    ap.add_argument("--no-verify", dest="verify", action="store_false", help="skip verification")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="max abs error on 0..255 (default per dtype: " +
                         ", ".join(f"{k} {v}" for k, v in DEFAULT_TOLERANCE.items()) + ")")
    ap.add_argument("--layouts", default=None, help="folder of real label maps for verification (default: synthetic)")
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


def run(args) -> int:
    from crn_fast.checkpoint import load_generator
    if not (args.onnx or args.trt or args.compile):
        raise CRNError("nothing to export: pass --onnx, --trt and/or --compile")
    model = load_generator(args.checkpoint)  # clear error for missing/corrupt/foreign files
    cfg = model.config
    res = parse_resolution(args.res) if args.res else cfg.resolution
    opt_res = parse_resolution(args.opt_res) if args.opt_res else res
    min_res = parse_resolution(args.min_res) if args.min_res else None
    max_res = parse_resolution(args.max_res) if args.max_res else None
    for r in filter(None, (res, opt_res, min_res, max_res)):
        cfg.validate_input_size(*r)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CRNError(f"--device {device}: no CUDA GPU is available here")
    if args.trt:
        from .tensorrt import make_profile, precision_flags, tensorrt_missing_reason
        reason = tensorrt_missing_reason()
        if reason:
            raise CRNError(f"--trt: {reason}")
        profile = make_profile(cfg.num_classes, cfg.stride, opt_res, min_res, max_res, args.batch,
                               args.min_batch, args.max_batch)
        precision_flags(args.dtype)
    if args.onnx and args.dtype != "fp32" and not args.trt:
        raise CRNError("ONNX models are exported in fp32; choose reduced precision when building the engine "
                       "(--trt --dtype fp16) or the AOTInductor package (--compile --dtype bf16)")
    if args.dtype == "fp16" and args.compile and device == "cpu":
        raise CRNError("--compile --dtype fp16 needs a GPU; on CPU use fp32 or bf16")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".crn-export-", dir=out))
    except OSError as e:
        raise CRNError(f"cannot write to --out {out}: {e.strerror or e}") from None
    tol = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE[args.dtype]
    common = {"model": cfg.to_dict(), "checkpoint": str(args.checkpoint), "versions": _versions(),
              "input": {"name": "layout", "dtype": "float32", "layout": "NCHW one-hot, void last"},
              "output": {"name": "images", "dtype": "float32",
                         "layout": "NCHW, 3k channels image-major, 0..255 unclipped"}}
    produced, failed = [], []

    def finish(artefact: Path, info: dict, runner, verify_device: str, vsizes, batch=1):
        info = {**common, **info, "artefact": artefact.name, "device": _device_name(verify_device),
                "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if args.verify:
            info["verification"] = verify(runner, model, vsizes, args.layouts, tol, verify_device, batch)
            v = info["verification"]
            print(f"  verify {artefact.name}: max abs {v['max_abs']:.4g} (tolerance {tol}), " +
                  ", ".join(f"{r['size'][0]}x{r['size'][1]}: PSNR {r['psnr_db']:.1f} dB" for r in v["results"]))
            if not v["passed"]:
                failed.append(artefact.name)
        else:
            info["verification"] = None
        (work / f"{artefact.name}.json").write_text(json.dumps(info, indent=2))
        produced.extend([artefact, work / f"{artefact.name}.json"])

    try:
        if args.onnx or args.trt:
            from .onnx import ONNXGenerator, export_onnx
            t0 = time.perf_counter()
            path = export_onnx(model, work / "generator.onnx", res, args.opset,
                               max_batch=max(64, args.max_batch or 1), max_size=max_res)
            dt = time.perf_counter() - t0
            print(f"onnx: {path.name} in {dt:.1f}s")
            s = cfg.stride
            finish(path, {"format": "onnx", "opset": args.opset, "export_seconds": dt,
                          "shapes": {"layout": ["batch", cfg.num_classes, f"{s}*h", f"{s}*w"],
                                     "images": ["batch", 3 * cfg.k, f"{s}*h", f"{s}*w"]}},
                   ONNXGenerator(path), "cpu", verify_sizes(cfg, res, None, None))
        if args.trt:
            from .tensorrt import TensorRTGenerator, build_engine
            t0 = time.perf_counter()
            cache = args.timing_cache or str(out / "timing.cache")
            facts = build_engine(work / "generator.onnx", work / "generator.engine", profile, args.dtype,
                                 args.workspace, cache, args.opt_level)
            dt = time.perf_counter() - t0
            print(f"tensorrt: generator.engine in {dt:.1f}s")
            finish(work / "generator.engine", {"format": "tensorrt", "dtype": args.dtype, "build_seconds": dt,
                                               "profile": profile.to_dict(), **facts},
                   TensorRTGenerator(work / "generator.engine"), "cuda",
                   verify_sizes(cfg, opt_res, min_res, max_res))
        if args.compile:
            from .compile import export_aoti, load_aoti
            t0 = time.perf_counter()
            path = export_aoti(model, work / "generator.pt2", res, args.batch, args.dtype, device, min_res, max_res,
                               args.max_batch)
            dt = time.perf_counter() - t0
            print(f"aotinductor: {path.name} in {dt:.1f}s")
            runner = load_aoti(path)
            vs = verify_sizes(cfg, res, min_res, max_res) if (min_res or max_res) else [tuple(res)]
            finish(path, {"format": "aotinductor", "dtype": args.dtype, "compile_seconds": dt,
                          "shapes": {"layout": [args.batch, cfg.num_classes, *res]},
                          "dynamic": {"min_res": min_res, "max_res": max_res, "max_batch": args.max_batch},
                          "load": "torch._inductor.aoti_load_package(path)(layout)"},
                   runner, device, vs, batch=args.batch)
        for f in produced:
            f.replace(out / f.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("wrote " + ", ".join(str(out / f.name) for f in produced))
    if failed:
        print(f"crn-export: error: verification failed for {', '.join(failed)} (see the sidecar JSON)",
              file=sys.stderr)
        return 3
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CRNError as e:
        print(f"crn-export: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
