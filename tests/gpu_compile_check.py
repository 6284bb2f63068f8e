"""Compile every Triton kernel ahead of time for a Hopper GPU (sm_90) with Triton's bundled ptxas,
without a GPU. Run by tests/test_kernels_compile.py in a process without TRITON_INTERPRET (the
interpreter replaces @triton.jit functions); ``--as-inductor``: each kernel as torch.compile and
AOTInductor compile it (as_inductor_compiles_them). Catches what the interpreter cannot: type errors,
unsupported ops and lowering failures in the compiled path. Each kernel's PTX is then assembled
again with ``ptxas -v``: a kernel that spills registers to local memory (beyond SPILL_LIMIT) fails.
"""
import importlib
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

L = importlib.import_module("crn_fast.kernels.layer_norm_lrelu")
U = importlib.import_module("crn_fast.kernels.upsample_concat")
C = importlib.import_module("crn_fast.kernels.conv_norm")
A = importlib.import_module("crn_fast.kernels.area_pyramid")
UC = importlib.import_module("crn_fast.kernels.upsample_conv")


def compile_kernel(fn, ptrs, floats, constexprs, arch, num_warps=4, num_stages=3, aligned=(), descs=None):
    """``aligned``: arguments Triton would see divisible by 16 at run time (it specializes on that):
    pointers and the pixel strides of 16-channel-aligned activations. ``descs``: tensor-descriptor
    arguments, name -> (dtype, block shape)."""
    descs = descs or {}
    sig = {n: "constexpr" if n in constexprs else "*" + ptrs[n] if n in ptrs else
           f"tensordesc<{descs[n][0]}[{','.join(map(str, descs[n][1]))}]>" if n in descs else
           "fp32" if n in floats else "i32" for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


# Spilled bytes allowed per kernel: none on Hopper, the target, and none with Triton 3.9+. On sm_80
# Triton 3.6 (torch 2.11's) caps two 8-warp conv1 tiles at 128 registers and spills one (4 bytes).
# One register through L1 is noise; what the check exists to catch is a kernel that lowers badly
# (hundreds of bytes).
TRITON_VERSION = tuple(int(v) for v in triton.__version__.split(".")[:2])
SPILL_LIMIT = {90: 0, 80: 0 if TRITON_VERSION >= (3, 9) else 8}


def check_spills(what: str, ptx: str, arch: int) -> int:
    stores, loads, report = spill_bytes(ptx, arch)
    assert max(stores, loads) <= SPILL_LIMIT.get(arch, 0), f"{what} spills registers:\n{report}"
    return max(stores, loads)


def spill_bytes(ptx: str, arch: int) -> tuple[int, int, str]:
    """(spill store bytes, spill load bytes, ptxas -v report) of one kernel."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        r = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", f.name,
                            "-o", "/dev/null"], capture_output=True, text=True)
    report = r.stderr + r.stdout
    stores = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", report))
    loads = sum(int(v) for v in re.findall(r"(\d+) bytes spill loads", report))
    return stores, loads, report


def main(arch: int = 90, dtypes=("fp32", "bf16", "fp16")) -> int:
    n = worst = 0
    for dt in dtypes:
        a = "fp32"
        ln = dict(BLOCK_C=4, BLOCK_HW=1024, FP64=False)
        kernels = [
            (L._stats_kernel, {"X": dt, "Cnt": a, "Mean": a, "M2": a}, [], dict(BLOCK=4096, FP64=False)),
            (L._finalize_kernel, {"X": dt, "Cnt": a, "Mean": a, "M2": a, "MeanOut": a, "RstdOut": a}, ["eps"],
             dict(BLOCK_P=1024, FP64=False)),
            *[(L._apply_kernel, {"X": dt, "Y": dt, "W": dt, "B": dt, "Cnt": a, "Mean": a, "M2": a, "MeanOut": a,
                                 "RstdOut": a}, ["eps", "slope"], dict(ln, BLOCK_P=1024, GIVEN=given))
              for given in (False, True)],  # GIVEN: norm_lrelu, the statistics reduced elsewhere
            *[(L._apply_cl_kernel, {"X": dt, "Y": dt, "W": dt, "B": dt, "Cnt": a, "Mean": a, "M2": a, "MeanOut": a,
                                    "RstdOut": a}, ["eps", "slope"], dict(BLOCK_HW=hw, BLOCK_C=4096 // hw, BLOCK_P=1024,
                                                                          FP64=False, GIVEN=given))
              for hw in (4, 128) for given in (False, True)],
            # the backward's tiles: NCHW, and channels_last at 512 and 32 channels (_plan)
            *[(L._bwd_reduce_kernel, {"X": dt, "DY": dt, "W": dt, "B": dt, "MeanIn": a, "RstdIn": a, "S1": a,
                                      "S2": a, "DWp": a, "DBp": a}, ["slope"], dict(ln, BLOCK_C=bc, BLOCK_HW=bhw))
              for bc, bhw in ((4, 1024), (256, 16), (32, 128))],
            *[(L._bwd_dx_kernel, {"X": dt, "DY": dt, "DX": dt, "W": dt, "B": dt, "MeanIn": a, "RstdIn": a, "S1": a,
                                  "S2": a}, ["slope"], dict(ln, BLOCK_C=bc, BLOCK_HW=bhw, BLOCK_P=1024))
              for bc, bhw in ((4, 1024), (256, 16), (32, 128))],
            *[(U._bwd_kernel, {"G": dt, "DF": dt}, ["scale_h", "scale_w", "inv_h", "inv_w"],
               dict(BLOCK_H=2, BLOCK_W=512, PAIRS_H=pairs, PAIRS_W=pairs)) for pairs in (False, True)],
            *[(U._bwd_cl_kernel, {"G": dt, "DF": dt}, ["scale_h", "scale_w", "inv_h", "inv_w"],
               dict(BLOCK_W=32 // (4 if dt == "fp32" else 2), BLOCK_C=64, PAIRS_H=pairs, PAIRS_W=pairs, PIX=4))
              for pairs in (False, True)],  # 16 bytes of gradient a thread a tap; pixels of C + 20 channels
        ] + [(U._fwd_kernel, {"Fe": dt, "L": "fp32", "O": dt, "Mean": a, "Rstd": a, "Wn": dt, "Bn": dt},
              ["scale_h", "scale_w", "slope"], dict(APPLY_NORM=norm, ROWS=16, BLOCK_W=bw, PAIRS=pairs))
             # 8 pixels: one run of 4 source columns a row, the smallest tile the host runs in pairs;
             # 2048: the wider row tile benchmarks/kernels.py races against the default
             for norm in (False, True) for bw, pairs in ((1024, False), (1024, True), (8, True), (2048, True))] \
          + [(U._fwd_cl_kernel, {"Fe": dt, "L": dt, "O": dt, "Mean": a, "Rstd": a, "Wn": dt, "Bn": dt},
              ["scale_h", "scale_w", "slope"], dict(APPLY_NORM=norm, ROWS=16, BLOCK_W=32, BLOCK_C=64, BLOCK_CL=32, PIX=8,
                                                    LPIX=4, LV=4, PAIRS=pairs))
             for norm in (False, True) for pairs in (False, True)]
        kernels += [(A._pyramid_kernel, {"X": dt, "Y1": dt, "Y2": dt, "Y3": dt, "Y4": dt}, [],
                     dict(NLEV=nlev, CL=cl, C=20, BLOCK_C=32)) for nlev in (1, 4) for cl in (False, True)]
        # upsample_conv: every tile in bf16 (the GPU dtype; the dot tiles run in bf16/fp16 only), the first
        # elsewhere; as launched: Cout divisible by 16 (every preset's widths are), which lets Triton load
        # g as 16-byte vectors (without it, 2-byte loads and ~2x the registers); the layout's 20 classes
        # per pixel contiguous (channels_last, as the model runs it) and, for the first tile, an NCHW layout
        uc = {"G": dt, "L": dt, "WL": dt, "Y": dt, "PCnt": a, "PMean": a, "PM2": a}
        kernels += [(UC._upconv_kernel, uc, ["scale_h", "scale_w"],
                     dict(STATS=True, IEEE=dt == "fp32", DOT_F32=False, EVEN_C=True, L_DENSE=20 if dense else 0,
                          BLOCK_P=bp, BLOCK_C=bc, BLOCK_L=32, KW=kw), warps, list(uc) + ["Cout"])
                    for bp, bc, warps, kw in (UC.TILES if dt == "bf16" else UC.TILES[:1])
                    for dense in ((True, False) if (bp, bc, warps, kw) == UC.TILES[0] else (True,))]
        if dt == "bf16":  # sizes, counts and strides of 1, which Triton turns into constants at run time
            ones = dict(H=1, W=1, h=1, w=1, C=1, CL=1, fs3=1, ls3=1, os3=1)
            kernels += [
                (L._stats_kernel, {"X": dt, "Cnt": a, "Mean": a, "M2": a}, [],
                 dict(BLOCK=4096, FP64=False, FULL=1, TAIL=1, P=1, TPP=1)),
                (L._apply_cl_kernel, {"X": dt, "Y": dt, "W": dt, "B": dt, "Cnt": a, "Mean": a, "M2": a,
                                      "MeanOut": a, "RstdOut": a}, ["eps", "slope"],
                 dict(BLOCK_HW=8, BLOCK_C=512, BLOCK_P=1, FP64=False, n_ct=1, T=1, P=1, TPP=1, GIVEN=False)),
                (U._fwd_kernel, {"Fe": dt, "L": dt, "O": dt, "Mean": a, "Rstd": a, "Wn": dt, "Bn": dt},
                 ["scale_h", "scale_w", "slope"], dict(APPLY_NORM=True, ROWS=1, BLOCK_W=1, PAIRS=False, **ones)),
                (U._fwd_cl_kernel, {"Fe": dt, "L": dt, "O": dt, "Mean": a, "Rstd": a, "Wn": dt, "Bn": dt},
                 ["scale_h", "scale_w", "slope"], dict(APPLY_NORM=True, ROWS=1, BLOCK_W=1, BLOCK_C=1, BLOCK_CL=1,
                                                       PIX=1, LPIX=1, LV=1, PAIRS=False, CP=1, **ones)),
                (A._pyramid_kernel, {"X": dt, "Y1": dt, "Y2": dt, "Y3": dt, "Y4": dt}, [],
                 dict(NLEV=2, CL=True, C=1, BLOCK_C=1, H=1, W=1))]
        for fn, ptrs, floats, const, *launched in kernels:
            # as launched (an --as-inductor copy lives in its own module, and replaces L's kernel)
            warps = launched[0] if launched else L.NUM_WARPS if getattr(L, fn.__name__, None) is fn else 4
            k = compile_kernel(fn, ptrs, floats, const, arch, warps, aligned=launched[1] if len(launched) > 1 else ())
            assert k.asm.get("cubin"), fn.__name__
            worst = max(worst, check_spills(f"{fn.__name__} ({dt}, {const})", k.asm["ptx"], arch))
            n += 1
    conv_n, conv_worst = check_conv_norm(arch)
    n, worst = n + conv_n, max(worst, conv_worst)
    print(f"compiled {n} kernels for sm_{arch}, " + (f"the worst spills {worst} bytes" if worst else
                                                     "none spills registers"))
    return 0


def check_conv_norm(arch: int) -> int:
    """The fused conv in every tuning config, as conv1 (stats), conv2 (input norm + stats) and the
    head (1x1, input norm, bias, 0..255) in bf16, conv2 and head in fp32, the small fallbacks in
    both, fp16 in one: tensor-core MMAs (wgmma on sm_90 for 64+ row tiles, else mma.sync), loads
    pipelined through cp.async into shared memory, within shared memory, and no spills (SPILL_LIMIT).
    Returns (kernels compiled, most bytes spilled by one)."""
    a = "fp32"
    fn = C._conv_kernel
    conv1, conv2, head = (3, False, True, False), (3, True, True, False), (1, True, False, True)
    cases = [("bf16", cfg, layer) for cfg in C.CONFIGS for layer in (conv1, conv2, head)]
    cases += [("fp16", C.CONFIGS[0], conv2)] + [("fp32", cfg, layer) for cfg in C.FP32_CONFIGS for layer in (conv2, head)]
    cases += [(dt, cfg, layer) for dt in ("bf16", "fp32") for cfg in C.SMALL_CONFIGS for layer in (conv1, conv2, head)]
    worst = 0
    aligned = ["X", "Wp", "Y", "Bias", "MeanIn", "RstdIn", "Gamma", "Beta", "PCnt", "PMean", "PM2", "Cin", "Cout",
               "sxn", "sxh", "sxw", "P"]
    for dt, (bm, bn, bk, warps, stages), (ksize, norm, stats, is_head) in cases:
        ptrs = {"X": dt, "Wp": dt, "Y": dt, "Bias": dt, "MeanIn": a, "RstdIn": a, "Gamma": dt, "Beta": dt,
                "PCnt": a, "PMean": a, "PM2": a}
        const = dict(KSIZE=ksize, NORM_IN=norm, STATS=stats, HAS_BIAS=is_head, HEAD=is_head, IEEE=dt == "fp32",
                     DOT_F32=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        k = compile_kernel(fn, ptrs, ["slope"], const, arch, warps, stages, aligned)
        ptx = k.asm["ptx"]
        what = f"_conv_kernel ({dt}, {bm}x{bn}x{bk}, {warps} warps, {stages} stages, {ksize}x{ksize}, norm={norm}, " \
            f"head={is_head}, sm_{arch})"
        if dt != "fp32":
            mma = "wgmma.mma_async" if arch >= 90 and bm >= 64 else "mma.sync"  # wgmma: 64-row warpgroup tiles
            assert mma in ptx, f"{what} does not use tensor cores ({mma})"
        assert "cp.async" in ptx, f"{what} does not pipeline its loads through shared memory (no cp.async)"
        worst = max(worst, check_spills(what, ptx, arch))
        smem_kb = {80: 163, 90: 227}.get(arch, 99)  # the opt-in shared memory per block
        assert k.metadata.shared <= smem_kb * 1024, f"{what} needs {k.metadata.shared} B of shared memory"
    # the TMA kernel (run on sm_90+ only): TMA loads of both tiles, wgmma, no spills
    # (and the small tile the tests pin, which a GPU runs compiled: mma.sync under 64 rows)
    # bf16 with an input norm reads x, gamma and beta as int32 channel pairs (BF16_PAIRS), fp16 per element
    tma_cases = [("bf16", cfg, layer) for cfg in C.TMA_CONFIGS for layer in (conv1, conv2)] \
        + [("bf16", C.TMA_CONFIGS[0], head), ("fp16", C.TMA_CONFIGS[0], conv2)] \
        + [("bf16", C._INTERPRETER_CONFIGS[0], layer) for layer in (conv1, conv2, head)] if arch >= 90 else []
    for dt, (bm, bn, bk, warps, stages, _), (ksize, norm, stats, is_head) in tma_cases:
        pairs = norm and dt == "bf16"
        ptrs = {"Y": dt, "Bias": dt, "MeanIn": a, "RstdIn": a, "Gamma": "i32" if pairs else dt,
                "Beta": "i32" if pairs else dt, "PCnt": a, "PMean": a, "PM2": a}
        const = dict(KSIZE=ksize, NORM_IN=norm, STATS=stats, HAS_BIAS=is_head, HEAD=is_head, DOT_F32=False,
                     BF16_PAIRS=pairs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        descs = {"Xd": ("i32", [1, 1, bm, bk // 2]) if pairs else (dt, [1, 1, bm, bk]), "Wd": (dt, [1, bk, bn])}
        k = compile_kernel(C._conv_tma_kernel, ptrs, ["slope"], const, arch, warps, stages,
                           [n for n in ptrs if n not in ("MeanIn", "RstdIn")] + ["Cin", "Cout", "P"], descs)
        ptx = k.asm["ptx"]
        what = f"_conv_tma_kernel ({dt}, {bm}x{bn}x{bk}, {warps} warps, {stages} stages, {ksize}x{ksize}, " \
            f"norm={norm}, sm_{arch})"
        assert "cp.async.bulk.tensor.4d" in ptx and "cp.async.bulk.tensor.3d" in ptx, f"{what}: no TMA loads"
        assert ("wgmma.mma_async" if bm >= 64 else "mma.sync") in ptx, f"{what} does not use tensor cores"
        worst = max(worst, check_spills(what, ptx, arch))
        assert k.metadata.shared <= 227 * 1024, f"{what} needs {k.metadata.shared} B of shared memory"
    k = compile_kernel(C._finalize_kernel, {"PCnt": a, "PMean": a, "PM2": a, "MeanOut": a, "RstdOut": a}, ["eps"],
                       dict(BLOCK_P=1024), arch)
    worst = max(worst, check_spills("_finalize_kernel", k.asm["ptx"], arch))
    return len(cases) + len(tma_cases) + 1, worst


def as_inductor_compiles_them(folder: str) -> int:
    """Replace every kernel by what Inductor compiles in its place when torch.compile or
    AOTInductor meets it inside a crn_fast operator (wrap_triton): one generated module with
    Inductor's imports, the kernel's source, the @triton.jit helpers it reaches through its globals
    and the constants they read (Inductor's own transitive-closure function). A kernel that does not
    survive that copy (a global Inductor does not carry over, two helpers of one name, source that
    only works in its own module) then fails here on CPU, not in Inductor's compile worker on a GPU.
    The conv tiles are cut to one per kind: what is checked is the source, not the tiling."""
    import builtins
    import dis
    import importlib.util
    import os

    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code
    header = TritonKernel.gen_common_triton_imports()
    n = 0
    for mod in (L, U, C, A, UC):
        for name, fn in list(vars(mod).items()):
            if not (isinstance(fn, triton.JITFunction) and name.endswith("_kernel")) or fn.fn.__module__ != mod.__name__:
                continue  # a kernel of another module (imported to launch it) is checked there
            reached, todo = {}, [fn]  # every @triton.jit function the kernel reaches, by name
            while todo:
                f = todo.pop()
                if reached.setdefault(f.__name__, f) is not f:
                    raise AssertionError(f"{mod.__name__}.{name} reaches two @triton.jit functions named "
                                         f"{f.__name__}: Inductor's copy keeps only one")
                todo += [g for k in f.fn.__code__.co_names if isinstance(g := f.fn.__globals__.get(k),
                                                                          triton.JITFunction) and k not in reached]
            path = os.path.join(folder, f"{mod.__name__.rsplit('.', 1)[-1]}{name}.py")
            with open(path, "w") as out:
                out.write(f"{header}\n@triton.jit\n{user_defined_triton_kernel_transitive_closure_source_code(fn)}")
            spec = importlib.util.spec_from_file_location(f"inductor_{name}", path)
            generated = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(generated)
            except Exception as e:
                raise AssertionError(f"Inductor's copy of {mod.__name__}.{name} ({path}) does not load: "
                                     f"{type(e).__name__}: {e}") from e
            space = vars(generated)
            for f in (v for v in list(space.values()) if isinstance(v, triton.JITFunction)):
                missing = {i.argval for i in dis.Bytecode(f.fn) if i.opname == "LOAD_GLOBAL"
                           and i.argval not in space and not hasattr(builtins, i.argval)}
                assert not missing, f"Inductor's copy of {mod.__name__}.{name}: {f.__name__} reads {sorted(missing)}, " \
                    "which the copy does not define"
            setattr(mod, name, space[name])
            n += 1
    C.CONFIGS, C.TMA_CONFIGS, C.FP32_CONFIGS, C.SMALL_CONFIGS = (C.CONFIGS[:1], C.TMA_CONFIGS[:1], C.FP32_CONFIGS[:1],
                                                                 C.SMALL_CONFIGS[:1])
    C._INTERPRETER_CONFIGS = C._INTERPRETER_CONFIGS[:1]
    return n


if __name__ == "__main__":
    arch = int(next((a for a in sys.argv[1:] if a.isdigit()), 90))
    if "--as-inductor" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{as_inductor_compiles_them(tmp)} kernels as Inductor generates them")
            sys.exit(main(arch, dtypes=("bf16",)))  # the copies' source, not every dtype, is the question
    sys.exit(main(arch))
