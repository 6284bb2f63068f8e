"""What the channels_last kernels compile to, without a GPU: registers, SASS instructions per
program, barriers, and the width of every global load and store, for sm_90 at the 1024p shapes;
for the fused conv's two kernels also the tensor-core mainloop (instructions from the loop's label
to its back-edge, per K step; the hot path leaves out blocks that only border tiles run), TMA
loads and wgmma instructions.

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


_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\s+(?:U?!?P\w+,\s*)?`\((\.L_x_\d+)\)")


def mainloop(code: str) -> dict | None:
    """The innermost loop around the first tensor-core instruction (HGMMA, else HMMA): from a label
    before it to a later branch back to that label. Its instruction count is the issue cost of one K
    step for each warp; None in a kernel without one."""
    lines = code.splitlines()
    first = next((i for i, line in enumerate(lines) if "HGMMA" in line or "HMMA" in line), None)
    if first is None:
        return None
    labels = {m.group(1): i for i, line in enumerate(lines[:first]) if (m := _LABEL.match(line.strip()))}
    loops = [(labels[m.group(1)], j) for j, line in enumerate(lines[first:], first)
             if (m := _BRANCH.search(line)) and m.group(1) in labels]
    if not loops:
        return None
    # the innermost: the shortest such span (a wait-retry block placed after the kernel's end also
    # jumps back into the loop, and spans far more)
    start, end = min(loops, key=lambda se: se[1] - se[0])
    body = [m.group(1) for m in map(_INSTR.match, lines[start:end + 1]) if m]
    kinds = collections.Counter(op.split(".")[0] for op in body)
    # a forward branch to a label inside the loop skips a conditional block (the input norm's
    # padding mask, run only by tiles at the image border): the hot path is the loop without them
    inner = {m.group(1): i for i, line in enumerate(lines[start:end + 1], start) if (m := _LABEL.match(line.strip()))}
    skipped = set()
    for j in range(start, end + 1):
        m = _BRANCH.search(lines[j])
        if m and j < inner.get(m.group(1), -1):
            skipped.update(range(j + 1, inner[m.group(1)]))
    hot = sum(1 for j in range(start, end + 1) if j not in skipped and _INSTR.match(lines[j]))
    return {"instructions": len(body), "hot_path": hot, "mma": kinds["HGMMA"] + kinds["HMMA"],
            "tma_loads": kinds["UTMALDG"], "async_copies": kinds["LDGSTS"], "barriers": kinds["BAR"]}


def census(kernel) -> dict:
    from gpu_compile_check import spill_bytes
    code = sass(kernel)
    ops = [m.group(1) for m in map(_INSTR.match, code.splitlines()) if m]
    kinds = collections.Counter(op.split(".")[0] for op in ops)
    memory = collections.Counter(op for op in ops if op.startswith(("LDG", "STG")))
    regs = re.findall(r"Used (\d+) registers", spill_bytes(kernel.asm["ptx"], 90)[2])
    row = {"registers": int(regs[0]) if regs else None, "instructions": len(ops), "barriers": kinds["BAR"],
           "global_memory": dict(sorted(memory.items()))}
    loop = mainloop(code)
    if loop:
        row["mainloop"] = loop
    return row


def cases():
    """(name, kernel, pointer dtypes, float args, constexprs, args divisible by 16, warps[, stages,
    tensor descriptors]) at the 1024p channels_last shapes."""
    from gpu_compile_check import A, C, L, U, UC
    bf, f = "bf16", "fp32"
    ln = {"X": bf, "Y": bf, "W": bf, "B": bf, "Cnt": f, "Mean": f, "M2": f, "MeanOut": f, "RstdOut": f}
    up = {"Fe": bf, "L": bf, "O": bf, "Mean": f, "Rstd": f, "Wn": bf, "Bn": bf}
    up_aligned = ["Fe", "L", "O", "C", "H", "W", "h", "w", "fs0", "fs2", "fs3", "ls0", "ls2", "os0", "os2"]
    yield ("layer_norm stats (flat)", L._stats_kernel, {"X": bf, "Cnt": f, "Mean": f, "M2": f}, [],
           dict(BLOCK=4096, FP64=False), ["X", "sN"], 8)
    for c, hw in ((512, 8), (32, 128)):
        yield (f"layer_norm apply channels_last C={c}", L._apply_cl_kernel, ln, ["eps", "slope"],
               dict(BLOCK_HW=hw, BLOCK_C=c, BLOCK_P=1024, FP64=False, n_ct=1, GIVEN=False), ["X", "Y", "C", "HW", "sN"],
               8)
    for norm in (False, True):  # module 8: 128 feature channels, output pixel stride 152 (padded to 8)
        yield (f"upsample_concat channels_last{' + norm' if norm else ''}", U._fwd_cl_kernel, up,
               ["scale_h", "scale_w", "slope"], dict(APPLY_NORM=norm, ROWS=16, BLOCK_W=32, BLOCK_C=64, BLOCK_CL=32,
                                                     PIX=8, LPIX=4, LV=4, PAIRS=True, fs1=1, ls1=1,
                                                     os1=1), up_aligned, 4)
    for norm in (False, True):  # module 8 in NCHW: 1-D row tiles of one channel
        yield (f"upsample_concat nchw{' + norm' if norm else ''}", U._fwd_kernel, up, ["scale_h", "scale_w", "slope"],
               dict(APPLY_NORM=norm, ROWS=16, BLOCK_W=1024, PAIRS=True, fs3=1, ls3=1, os3=1),
               up_aligned + ["os1", "ls1", "fs1"], 4)
    # the training step's gather (dL/dfeatures): module 8's exact 2x, from the gradient of its 148-channel
    # concat (channels_last: pixels 8-byte aligned, PIX 4) and, NCHW, of one channel's rows
    bwd = ["G", "DF", "C", "H", "W", "h", "w", "gs0", "gs2"]
    yield ("upsample_concat backward channels_last", U._bwd_cl_kernel, {"G": bf, "DF": bf},
           ["scale_h", "scale_w", "inv_h", "inv_w"], dict(BLOCK_W=16, BLOCK_C=64, PAIRS_H=True, PAIRS_W=True, PIX=4),
           bwd + ["ds0", "ds2", "ds3"], 4)
    yield ("upsample_concat backward nchw", U._bwd_kernel, {"G": bf, "DF": bf}, ["scale_h", "scale_w", "inv_h", "inv_w"],
           dict(BLOCK_H=1, BLOCK_W=1024, PAIRS_H=True, PAIRS_W=True, gs3=1), bwd + ["gs1"], 4)
    yield ("area_pyramid 4 levels, 20 classes", A._pyramid_kernel, {k: bf for k in ("X", "Y1", "Y2", "Y3", "Y4")}, [],
           dict(NLEV=4, CL=True, C=20, BLOCK_C=32), ["X", "Y1", "Y2", "Y3", "Y4", "H", "W"], 4)
    # the fused conv's 128x128x64 tile (8 warps, 3 stages), as conv1 and as conv2 (input norm)
    conv = {"Y": bf, "Bias": bf, "MeanIn": f, "RstdIn": f, "Gamma": bf, "Beta": bf, "PCnt": f, "PMean": f, "PM2": f}
    flags = dict(KSIZE=3, STATS=True, HAS_BIAS=False, HEAD=False, DOT_F32=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
    aligned = ["Y", "Bias", "Gamma", "Beta", "PCnt", "PMean", "PM2", "Cin", "Cout", "P"]
    for norm in (False, True):
        layer = "conv2 (norm in)" if norm else "conv1"
        yield (f"conv_norm pointer loads, {layer}", C._conv_kernel, {**conv, "X": bf, "Wp": bf}, ["slope"],
               dict(flags, NORM_IN=norm, IEEE=False), aligned + ["X", "Wp", "sxn", "sxh", "sxw"], 8, 3)
        # bf16 with an input norm: x, gamma and beta read as int32 channel pairs, as it runs
        pairs = {"Gamma": "i32", "Beta": "i32"} if norm else {}
        yield (f"conv_norm TMA, {layer}", C._conv_tma_kernel, {**conv, **pairs}, ["slope"],
               dict(flags, NORM_IN=norm, BF16_PAIRS=norm), aligned, 8, 3,
               {"Xd": ("i32", [1, 1, 128, 32]) if norm else (bf, [1, 1, 128, 64]), "Wd": (bf, [1, 64, 128])})
    # conv1 before the upsampling: its "mainloop" is one tap row, 3 taps (per output element and tap:
    # instructions / 3 / (BLOCK_P * BLOCK_C / threads)); module 8 (32 channels: the gathers), 7 and 5
    # (the blend on the tensor cores), with the layout's 20-class pixel stride
    uc = {"G": bf, "L": bf, "WL": bf, "Y": bf, "PCnt": f, "PMean": f, "PM2": f}
    uc_aligned = list(uc) + ["Cout", "H", "W", "h", "w", "ls0", "ls2", "n_xb", "P"]
    for what, (bp, bc, warps, kw) in (("m8, gathers", (32, 32, 4, 0)), ("m7, dots", (32, 128, 8, 32)),
                                      ("m5, dots", (32, 256, 8, 32))):
        yield (f"upsample_conv {what} {bp}x{bc}", UC._upconv_kernel, uc, ["scale_h", "scale_w"],
               dict(STATS=True, IEEE=False, DOT_F32=False, EVEN_C=True, L_DENSE=20, BLOCK_P=bp, BLOCK_C=bc,
                    BLOCK_L=32, KW=kw, ls1=1),
               uc_aligned, warps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from _util import results_path, write_text_atomic
    out = results_path(ap, args.json) if args.json else None
    from gpu_compile_check import compile_kernel
    rows = []
    print("| kernel | registers | SASS instr | barriers | global loads/stores | mainloop per K step |\n"
          "|---|---:|---:|---:|---|---|")
    for name, fn, ptrs, floats, const, aligned, warps, *more in cases():
        stages, descs = (more + [3, None][len(more):])[:2]
        row = {"kernel": name, **census(compile_kernel(fn, ptrs, floats, const, 90, warps, stages, aligned, descs))}
        rows.append(row)
        mem = ", ".join(f"{k} x{v}" for k, v in row["global_memory"].items())
        loop = row.get("mainloop")
        hot = f" ({loop['hot_path']} on the hot path)" if loop and loop["hot_path"] != loop["instructions"] else ""
        loop = f"{loop['instructions']} instr{hot}: {loop['mma']} MMA, {loop['tma_loads']} TMA, " \
            f"{loop['async_copies']} cp.async, {loop['barriers']} BAR" if loop else ""
        print(f"| {name} | {row['registers']} | {row['instructions']} | {row['barriers']} | {mem} | {loop} |")
    if out is not None:
        import triton
        write_text_atomic(out, json.dumps({"arch": "sm_90", "triton": triton.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
