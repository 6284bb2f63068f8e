"""The GPU-speed targets (issue 9), checked from one GPU session's result files.

    python benchmarks/targets.py --results DIR --device h100 [--baseline benchmarks/results] [--out FILE]

Reads, from DIR (what benchmarks/gpu_session.sh writes; names by device and resolution):
    <device>_1024x2048.json             the race (run.py): crn_fast's rows vs every torch.compile mode
    kernels_<device>.json               kernels.py: % of copy bandwidth per module, both formats
    profile_<device>_1024x2048.json     profile_stages.py: ms per module and stage
    <device>_1024x2048_fp32_tf32.json   run.py --allow-tf32: fp32 as the baseline's fp32 was measured
and from --baseline the results of the code before this work (benchmarks/results/commit-8e629a8),
for "fp32 no slower than before". Prints (and writes with --out) one markdown table: each target, its
threshold, the measured value with the rows it came from, and whether it is met. A target whose
rows are missing says so instead of passing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RES = "1024x2048"
NOISE = 0.03  # "no slower": within 3% (the run-to-run spread of the committed GPU medians)


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _timed(rows, prefix, dtype):
    return [r for r in rows or [] if r.get("median_ms") and r["backend"].startswith(prefix) and r["dtype"] == dtype]


def _label(r) -> str:
    return f"{r['backend']} {r['dtype']} {r.get('format', '')}".strip()


def evaluate(race, kernels=None, profile=None, fp32_tf32=None, baseline=None) -> list[dict]:
    """[{target, threshold, measured, met (True/False/None = not measured)}] from parsed result JSONs."""
    out = []

    def add(target, threshold, measured, met):
        out.append({"target": target, "threshold": threshold, "measured": measured, "met": met})

    rows = (race or {}).get("rows", [])
    ours, theirs = _timed(rows, "triton", "bf16"), _timed(rows, "compile", "bf16")
    best = min(ours, key=lambda r: r["median_ms"]) if ours else None
    best_c = min(theirs, key=lambda r: r["median_ms"]) if theirs else None
    if best:
        ms = best["median_ms"]
        add("crn_fast's best GPU path, bf16 1024x2048", "<= 10 ms (moonshot <= 5 ms)",
            f"{ms:.2f} ms ({_label(best)})", ms <= 10.0)
    else:
        add("crn_fast's best GPU path, bf16 1024x2048", "<= 10 ms", "no crn_fast bf16 row was timed", None)
    if best and best_c:
        ratio = best_c["median_ms"] / best["median_ms"]
        add("faster than the best torch.compile variant", ">= 1.3x",
            f"{ratio:.2f}x ({best_c['median_ms']:.2f} ms {_label(best_c)})", ratio >= 1.3)
        e, ec = best.get("max_abs_err"), best_c.get("max_abs_err")
        add("max abs error vs eager fp32, no worse than torch.compile's bf16", f"<= {ec:.3g}" if ec is not None
            else "compile's error", f"{e:.3g}" if e is not None else "not measured",
            None if e is None or ec is None else e <= ec)
    else:
        add("faster than the best torch.compile variant", ">= 1.3x", "a side of the race was not timed", None)

    krows = [r for r in (kernels or {}).get("rows", []) if r.get("impl") == "triton"
             and r.get("op") in ("layer_norm_lrelu", "upsample_concat")]
    if krows:
        top = sorted({r["module"] for r in krows})[-3:]
        sel = [r for r in krows if r["module"] in top]
        formats = sorted({r.get("format", "nchw") for r in sel})
        what = f"layer_norm_lrelu and upsample_concat at modules {top}, {' and '.join(formats)}"
        failed = [r for r in sel if "error" in r]  # a kernel that could not run is not fast enough
        if failed:
            r = failed[0]
            add(what, ">= 80% of copy bandwidth", f"{len(failed)} failed to run ({r['op']} m{r['module']} "
                f"{r.get('format', 'nchw')}: {r['error'][:120]})", False)
        else:
            worst = min(sel, key=lambda r: r["pct_of_copy_bw"])
            add(what, ">= 80% of copy bandwidth", f"worst {worst['pct_of_copy_bw']:.0f}% ({worst['op']} "
                f"m{worst['module']} {worst.get('format', 'nchw')})",
                worst["pct_of_copy_bw"] >= 80 and len(formats) == 2)
    else:
        add("kernels at the three largest modules", ">= 80% of copy bandwidth", "no kernel rows", None)

    prof = (profile or {}).get("profile_ms", {}) if (profile or {}).get("machine", {}).get("gpu") else {}
    non_conv = {v: sum(sum(st.values()) - st.get("conv", 0.0) for st in table.values())
                for v, table in prof.items() if v.startswith("triton")}
    if non_conv:
        v = min(non_conv, key=non_conv.get)
        add("non-conv time per forward (profile)", "<= 2.5 ms", f"{non_conv[v]:.2f} ms ({v}; "
            + ", ".join(f"{k} {x:.2f}" for k, x in sorted(non_conv.items())) + ")", non_conv[v] <= 2.5)
    else:
        add("non-conv time per forward (profile)", "<= 2.5 ms", "no triton profile from a GPU", None)

    new32 = _timed((fp32_tf32 or {}).get("rows"), "triton", "fp32")
    old32 = [r for r in _timed((baseline or {}).get("rows"), "triton", "fp32") if r["backend"] == "triton"]
    if new32 and old32:
        new, old = min(r["median_ms"] for r in new32), old32[0]["median_ms"]
        add("fp32 no slower than before (TF32 convs, as measured then)", f"<= {old:.2f} ms (+{NOISE:.0%} noise)",
            f"{new:.2f} ms ({new / old:.2f}x)", new <= old * (1 + NOISE))
    else:
        add("fp32 no slower than before", "the old triton fp32 median", "a side was not measured", None)
    return out


def markdown(results, title="") -> str:
    mark = {True: "met", False: "**not met**", None: "not measured"}
    lines = [f"### Targets: {title}\n" if title else "", "| target | threshold | measured | verdict |",
             "|---|---|---|---|"]
    lines += [f"| {r['target']} | {r['threshold']} | {r['measured']} | {mark[r['met']]} |" for r in results]
    return "\n".join(x for x in lines if x) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="the session's result folder")
    ap.add_argument("--device", required=True, help="the device label in the file names (h100, h200, ...)")
    ap.add_argument("--baseline", default=str(Path(__file__).resolve().parent / "results" / "commit-8e629a8"),
                    help="folder with the older <device>_1024x2048.json (default: benchmarks/results/commit-8e629a8)")
    ap.add_argument("--res", default=RES, help=f"the race's resolution in the file names (default {RES})")
    ap.add_argument("--out", default=None, help="also write the table here")
    args = ap.parse_args(argv)
    res, dev, r = Path(args.results), args.device, args.res
    if not res.is_dir():
        ap.error(f"--results {res}: no such folder (give the folder gpu_session.sh wrote, or an unpacked "
                 f"gpu_results.tar.gz)")
    files = [res / f"{dev}_{r}.json", res / f"kernels_{dev}.json", res / f"profile_{dev}_{r}.json",
             res / f"{dev}_{r}_fp32_tf32.json", Path(args.baseline) / f"{dev}_{r}.json"]
    loaded = [_load(f) for f in files]
    race = loaded[0]
    results = evaluate(*loaded)
    md = markdown(results, f"{dev}, {(race or {}).get('preset', '1024p')} at {r}, batch 1")
    cut = [f.name for f, d in zip(files, loaded) if d and d.get("partial")]
    if cut:  # a step that hit its time limit: its later rows were never measured
        md += f"\nCut short by a time limit (only the rows they finished): {', '.join(cut)}\n"
    print(md)
    if args.out:
        Path(args.out).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
