"""What the channels_last kernels compile to, without a GPU: registers, SASS instructions per
program, barriers, and the width of every global load and store, for sm_90 at the 1024p shapes.

    python benchmarks/sass_census.py            # a table; --json FILE to keep it

Triton compiles each kernel ahead of time (tests/gpu_compile_check.py) with the divisibility it
would see at run time (arguments divisible by 16 are specialised), and Triton's bundled nvdisasm
lists the SASS. Counts are static (the whole program, each loop body once): a proxy for issue
cost and for what a kernel does per element (e.g. LDG.E.128 = 16-byte vector loads; U16 = one
bf16 at a time), not a timing.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's Python functions


def sass(kernel) -> str:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool, "-c", f.name], capture_output=True, text=True, check=True).stdout


_INSTR = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def census(kernel) -> dict:
    from gpu_compile_check import spill_bytes
    code = sass(kernel)
    ops = [m.group(1) for m in map(_INSTR.match, code.splitlines()) if m]
    kinds = collections.Counter(op.split(".")[0] for op in ops)
    memory = collections.Counter(op for op in ops if op.startswith(("LDG", "STG")))
    regs = re.findall(r"Used (\d+) registers", spill_bytes(kernel.asm["ptx"], 90)[2])
    return {"registers": int(regs[0]) if regs else None, "instructions": len(ops), "barriers": kinds["BAR"],
            "global_memory": dict(sorted(memory.items()))}


def cases():
    """(name, kernel, pointer dtypes, float args, constexprs, args divisible by 16, warps) at the
    1024p channels_last shapes."""
    from gpu_compile_check import A, L, U
    bf, f = "bf16", "fp32"
    ln = {"X": bf, "Y": bf, "W": bf, "B": bf, "Cnt": f, "Mean": f, "M2": f, "MeanOut": f, "RstdOut": f}
    up = {"Fe": bf, "L": bf, "O": bf, "Mean": f, "Rstd": f, "Wn": bf, "Bn": bf}
    up_aligned = ["Fe", "L", "O", "C", "H", "W", "h", "w", "fs0", "fs2", "fs3", "ls0", "ls2", "os0", "os2"]
    yield ("layer_norm stats (flat)", L._stats_kernel, {"X": bf, "Cnt": f, "Mean": f, "M2": f}, [],
           dict(BLOCK=4096, FP64=False), ["X", "sN"], 8)
    for c, hw in ((512, 8), (32, 128)):
        yield (f"layer_norm apply channels_last C={c}", L._apply_cl_kernel, ln, ["eps", "slope"],
               dict(BLOCK_HW=hw, BLOCK_C=c, BLOCK_P=1024, FP64=False, n_ct=1), ["X", "Y", "C", "HW", "sN"], 8)
    for norm in (False, True):  # module 8: 128 feature channels, output pixel stride 152 (padded to 8)
        yield (f"upsample_concat channels_last{' + norm' if norm else ''}", U._fwd_cl_kernel, up,
               ["scale_h", "scale_w", "slope"], dict(APPLY_NORM=norm, ROWS=16, BLOCK_W=32, BLOCK_C=64, BLOCK_CL=32,
                                                     PIX=8, LPIX=4, fs1=1, ls1=1, os1=1), up_aligned, 4)
    for norm in (False, True):  # module 8 in NCHW: 1-D row tiles of one channel
        yield (f"upsample_concat nchw{' + norm' if norm else ''}", U._fwd_kernel, up, ["scale_h", "scale_w", "slope"],
               dict(APPLY_NORM=norm, ROWS=16, BLOCK_W=1024, fs3=1, ls3=1, os3=1), up_aligned + ["os1", "ls1", "fs1"], 4)
    yield ("area_pyramid 4 levels, 20 classes", A._pyramid_kernel, {k: bf for k in ("X", "Y1", "Y2", "Y3", "Y4")}, [],
           dict(NLEV=4, CL=True, C=20, BLOCK_C=32), ["X", "Y1", "Y2", "Y3", "Y4", "H", "W"], 4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from gpu_compile_check import compile_kernel
    rows = []
    print("| kernel | registers | SASS instr | barriers | global loads/stores |\n|---|---:|---:|---:|---|")
    for name, fn, ptrs, floats, const, aligned, warps in cases():
        row = {"kernel": name, **census(compile_kernel(fn, ptrs, floats, const, 90, warps, aligned=aligned))}
        rows.append(row)
        mem = ", ".join(f"{k} x{v}" for k, v in row["global_memory"].items())
        print(f"| {name} | {row['registers']} | {row['instructions']} | {row['barriers']} | {mem} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": "sm_90", "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
