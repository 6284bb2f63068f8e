"""crn-synthesize's throughput end to end, in images/s at steady state: layouts decoded, the
generator, the images read back and written as PNGs, as a user runs it.

    python benchmarks/synth_throughput.py --res 1024x2048 --device cuda            # the 1024p preset
    python benchmarks/synth_throughput.py --res 1024x2048 --device cuda --cuda-graph --batch-size 2

Each case runs crn-synthesize twice in fresh processes, on N and on 2N layouts (colour PNGs of one
street scene, shifted per file): the difference of the two times is N layouts at steady state,
as model loading, CUDA's start and the kernels' compiles cancel. Both read-back modes run in the
same call: "overlapped" (crn_fast's: a batch is read back after the next is queued) and "in turn"
(CRN_FAST_SYNTH_OVERLAP=0: each batch read back before the next is queued, as before), so their
ratio is measured on one machine in one run. The weights are random (the preset's shapes are what
costs); writes results/synth_throughput_<device>_<res>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import device_label, machine_info, results_path  # noqa: E402
from data_costs import write_labels  # noqa: E402

from crn_fast import CRN, save_generator  # noqa: E402
from crn_fast.cli import positive_int, resolution, torch_device  # noqa: E402
from crn_fast.config import PRESETS, get_preset, preset_for_resolution  # noqa: E402
from crn_fast.errors import CRNError  # noqa: E402
from crn_fast.synthesize import OVERLAP_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = {"overlapped": "1", "in turn": "0"}


def run_seconds(cmd: list[str], overlap: str) -> float:
    env = {**os.environ, OVERLAP_ENV: overlap}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        sys.exit(f"crn-synthesize failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=resolution, default=(1024, 2048), help="HxW (default 1024x2048)")
    ap.add_argument("--preset", default=None, choices=list(PRESETS),
                    help="default: the one for --res (1024p at 1024x2048)")
    ap.add_argument("--device", type=torch_device, default=None, help="default: cuda if any")
    ap.add_argument("--files", type=positive_int, default=16, help="N: the runs take N and 2N layouts (16)")
    ap.add_argument("--batch-size", type=positive_int, default=1)
    ap.add_argument("--backend", default="auto", choices=("auto", "eager", "triton"))
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--modes", default="overlapped,in turn",
                    help=f"read-back modes, comma-separated: {', '.join(MODES)}")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    h, w = args.res
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes {args.modes!r}: valid: {', '.join(MODES)}")
    config = get_preset(args.preset) if args.preset else preset_for_resolution(h, w)
    try:
        config.validate_input_size(h, w)
    except CRNError as e:
        ap.error(f"--res {h}x{w}: {e}")
    out = results_path(ap, args.json or ROOT / "benchmarks" / "results" /
                       f"synth_throughput_{device_label(device)}_{h}x{w}.json")
    rows = []
    with tempfile.TemporaryDirectory(prefix="crn-synth-") as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        save_generator(CRN(config), tmp / "model.ckpt")
        for n in (args.files, 2 * args.files):
            write_labels(tmp / f"labels_{n}", n, h, w)
        for mode in modes:
            seconds = {}
            for n in (args.files, 2 * args.files):
                cmd = [sys.executable, "-m", "crn_fast.synthesize", str(tmp / "model.ckpt"), "--labels",
                       str(tmp / f"labels_{n}"), "--out", str(tmp / f"out_{mode}_{n}".replace(" ", "_")),
                       "--device", str(device), "--batch-size", str(args.batch_size), "--backend", args.backend,
                       "--no-progress", "-q", *(["--cuda-graph"] if args.cuda_graph else [])]
                seconds[n] = run_seconds(cmd, MODES[mode])
            steady = seconds[2 * args.files] - seconds[args.files]
            row = {"mode": mode, "seconds": {str(k): v for k, v in seconds.items()},
                   "images_per_s": args.files / steady if steady > 0 else None,
                   "ms_per_image": steady / args.files * 1e3}
            rows.append(row)
            print(f"{config.name} at {h}x{w} on {device}, batch {args.batch_size}, read back {mode}: "
                  f"{row['ms_per_image']:.1f} ms an image at steady state "
                  f"({args.files} and {2 * args.files} layouts: {seconds[args.files]:.1f} and "
                  f"{seconds[2 * args.files]:.1f} s)", flush=True)
    out.write_text(json.dumps({"machine": machine_info(device), "preset": config.name, "resolution": [h, w],
                               "batch_size": args.batch_size, "backend": args.backend, "cuda_graph": args.cuda_graph,
                               "files": args.files, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
