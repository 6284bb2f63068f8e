"""Smoke runs of the benchmark scripts, so they cannot rot (tiny shapes; no timing assertions)."""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*args, env=None):
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=900, cwd=ROOT,
                       env=None if env is None else {**os.environ, **env})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_run_smoke_tiny(tmp_path):
    j, md, png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r = run("benchmarks/run.py", "--preset", "tiny", "--res", "64x128", "--iters", "1", "--json", j, "--markdown",
            md, "--plot", png, env={"TMPDIR": str(scratch)})
    assert not list(scratch.glob("crn-bench-*")), "the exported .pt2/.onnx files must not outlive the race"
    res = json.loads(j.read_text())
    rows = {(row["backend"], row["dtype"]): row for row in res["rows"]}
    for b in ("eager", "compile", "aoti", "onnxruntime"):
        row = rows[(b, "fp32")]
        assert "median_ms" in row, row
        assert row["max_abs_err"] < 0.05 and row["tflops"] > 0
    assert rows[("eager", "fp32")]["max_abs_err"] == 0
    assert "skipped" in rows[("tensorrt", "fp32")] or "median_ms" in rows[("tensorrt", "fp32")]
    assert res["flops"] > 0 and res["machine"]["cpu_cores"] >= 1 and res["matmul_peak_tflops"]["fp32"] > 0
    assert "| eager | fp32 |" in md.read_text() and png.stat().st_size > 1000
    assert "| compile | fp32 |" in r.stdout


@pytest.mark.parametrize("plot", [False, True])
def test_run_without_matplotlib_saves_the_results_and_says_there_is_no_chart(tmp_path, plot):
    """matplotlib is an extra (crn_fast[bench]): without it the results are written and the chart is
    skipped with one line; asking for --plot is a usage error before any measuring."""
    j = tmp_path / "r.json"
    argv = ["benchmarks/run.py", "--preset", "tiny", "--res", "32x64", "--iters", "1", "--backends", "eager",
            "--json", str(j)] + (["--plot", str(tmp_path / "r.png")] if plot else [])
    code = ("import runpy, sys; sys.modules['matplotlib'] = None\n"  # as if it were not installed
            f"sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    if plot:
        assert r.returncode == 2 and "--plot" in r.stderr and "needs matplotlib" in r.stderr, r.stderr
        assert not j.exists()
    else:
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert "no chart: matplotlib is not installed" in r.stderr and j.exists() and j.with_suffix(".md").exists()
        assert not j.with_suffix(".png").exists()


def test_rows_after_a_sticky_cuda_fault_run_in_a_fresh_process(tmp_path):
    """After a CUDA fault every later call of the process fails, so one crashing kernel would cost
    every row after it. run.py measures the rows left in a new process (recursively), in order.
    A real fault needs a GPU: CRN_BENCH_FAULT=eager makes the eager rows fail as one would."""
    j = tmp_path / "r.json"
    rows = "eager:fp32:channels_last,convs-only:fp32:channels_last,eager:fp32:nchw,convs-only:fp32:nchw"
    r = run("benchmarks/run.py", "--preset", "tiny", "--res", "32x64", "--iters", "1", "--rows", rows, "--json", j,
            env={"CRN_BENCH_FAULT": "eager"})
    res = json.loads(j.read_text())
    got = [(row["backend"], row["format"], row.get("fresh_process_after")) for row in res["rows"]]
    assert got == [("eager", "channels_last", None), ("convs-only", "channels_last", "eager:fp32:channels_last"),
                   ("eager", "nchw", "eager:fp32:channels_last"), ("convs-only", "nchw", "eager:fp32:nchw")], got
    assert "partial" not in res and all("median_ms" in row for row in res["rows"] if row["backend"] == "convs-only")
    assert all("the rows after it ran in a fresh process" in row["error"] for row in res["rows"][::2])
    assert "fresh process after eager:fp32:nchw's fault" in j.with_suffix(".md").read_text()
    assert r.stderr.count("running the 3 row(s) left in a fresh process") == 1


def test_kernel_benchmark_parts_after_a_sticky_cuda_fault_run_in_a_fresh_process(tmp_path):
    """kernels.py saves after each part (format, dtype, module); after a part that leaves the GPU
    unusable, the parts left run in a fresh process (recursively), and the file says which part
    faulted. CRN_BENCH_FAULT names the parts that fail as a real fault would."""
    j = tmp_path / "k.json"
    r = run("benchmarks/kernels.py", "--preset", "tiny", "--res", "32x64", "--iters", "1", "--no-compile",
            "--formats", "channels_last", "--json", j,
            env={"CRN_BENCH_FAULT": "channels_last:fp32:m1,channels_last:fp32:m3"})
    res = json.loads(j.read_text())
    # the fresh processes' files are merged into it
    assert "partial" not in res and [p.name for p in tmp_path.iterdir()] == ["k.json"]
    by_module = {}
    for row in res["rows"]:
        by_module.setdefault(row["module"], set()).add(row.get("fresh_process_after"))
    assert by_module == {0: {None}, 1: {None}, 2: {"channels_last:fp32:m1"}, 3: {"channels_last:fp32:m1"},
                         4: {"channels_last:fp32:m3"}}, by_module
    faults = [row for row in res["rows"] if "error" in row]
    assert [row["module"] for row in faults] == [1, 3] and all(
        "illegal memory access" in row["error"] and "ran in a fresh process" in row["error"] for row in faults)
    assert {row["op"] for row in res["rows"] if row["module"] == 4} >= {"layer_norm_lrelu", "upsample_concat"}
    assert r.stderr.count("in a fresh process") == 2


def test_profile_variants_after_a_sticky_cuda_fault_run_in_a_fresh_process(tmp_path):
    """profile_stages.py: the variants after one that leaves the GPU unusable are profiled by a fresh
    process, merged into the same files, which name the faulting variant."""
    stem = tmp_path / "prof"
    r = run("benchmarks/profile_stages.py", "--preset", "tiny", "--res", "32x64", "--variants", "compile,eager",
            "--out", stem, env={"CRN_BENCH_FAULT": "compile"})
    res = json.loads(stem.with_suffix(".json").read_text())
    assert "partial" not in res and sorted(p.name for p in tmp_path.iterdir()) == ["prof.json", "prof.md"]
    assert list(res["profile_ms"]) == ["eager"] and list(res["errors"]) == ["compile"]
    assert "ran in a fresh process" in res["errors"]["compile"] and res["fresh_process_after"] == {"eager": "compile"}
    assert "eager: profiled in a fresh process after compile's CUDA fault" in stem.with_suffix(".md").read_text()
    assert r.stderr.count("in a fresh process") == 1


def test_training_benchmark_smoke(tmp_path):
    j = tmp_path / "t.json"
    # the compile rows' step (crn-train --compile's) is trained and checked in test_train, where Inductor's
    # cold compile of the generator and VGG-19 (~1 min on 2 cores) is paid once
    run("benchmarks/run.py", "--train", "--preset", "tiny", "--res", "32x64", "--iters", "1", "--json", j,
        "--markdown", tmp_path / "t.md", "--train-backends", "eager,triton")
    rows = json.loads(j.read_text())["training"]
    eager = [r for r in rows if r["backend"] == "eager" and r["dtype"] == "fp32"]
    assert len(eager) == 2 and all("median_ms" in r and r["peak_memory_mib"] > 0 for r in eager)


def test_bf16_error_smoke(tmp_path):
    """benchmarks/bf16_error.py: eager and triton bf16 against eager fp32 (the kernels in Triton's
    interpreter on a CPU), each within what bf16 rounding gives on 0..255."""
    j = tmp_path / "e.json"
    run("benchmarks/bf16_error.py", "--preset", "tiny", "--res", "32x64", "--json", j)
    res = json.loads(j.read_text())
    for key in ("eager_bf16", "triton_bf16"):
        assert 0 < res[key]["max_abs"] < 20 and res[key]["psnr_db"] > 30, res


def test_settle_cost_smoke(tmp_path):
    j = tmp_path / "s.json"
    run("benchmarks/settle_cost.py", "--iters", "5", "--json", j)
    row = json.loads(j.read_text())
    assert row["ranks"] == 2 and row["median_us"] > 0 and row["p90_us"] >= row["median_us"]


def test_loader_transport_smoke(tmp_path):
    """benchmarks/data_costs.py --only loader: both sample kinds, in the main process and through 2
    workers, into the result file beside its other keys (kept); a file of another size is refused."""
    j = tmp_path / "d.json"
    j.write_text(json.dumps({"resolution": [32, 64], "scan_ms_per_label": 1.0}))
    run("benchmarks/data_costs.py", "--only", "loader", "--res", "32x64", "--json", j)
    res = json.loads(j.read_text())
    assert res["scan_ms_per_label"] == 1.0 and "loader_measured" in res
    assert sorted(res["loader_ms_per_sample"]) == sorted(f"{kind}_workers_{n}" for kind in ("int64+float32", "uint8")
                                                         for n in (0, 2))
    r = subprocess.run([sys.executable, "benchmarks/data_costs.py", "--only", "loader", "--res", "64x128", "--json",
                        str(j)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "holds 32x64, not 64x128" in r.stderr


def test_synth_throughput_smoke(tmp_path):
    """benchmarks/synth_throughput.py: crn-synthesize on N and 2N layouts in fresh processes, the
    steady state from their difference, for each read-back mode asked; a bad mode is a usage error."""
    j = tmp_path / "s.json"
    run("benchmarks/synth_throughput.py", "--res", "32x64", "--preset", "tiny", "--files", "1", "--device", "cpu",
        "--modes", "overlapped", "--json", j)
    res = json.loads(j.read_text())
    (row,) = res["rows"]
    assert row["mode"] == "overlapped" and set(row["seconds"]) == {"1", "2"} and res["preset"] == "tiny"
    r = subprocess.run([sys.executable, "benchmarks/synth_throughput.py", "--modes", "fastest"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--modes 'fastest': valid: overlapped, in turn" in r.stderr


@pytest.mark.parametrize("argv, msg", [
    (["benchmarks/synth_throughput.py", "--res", "100x"], "is not HEIGHTxWIDTH"),
    (["benchmarks/synth_throughput.py", "--preset", "bogus"], "invalid choice: 'bogus'"),
    (["benchmarks/synth_throughput.py", "--res", "100x100", "--preset", "tiny"], "the nearest valid size is 96x96"),
    (["benchmarks/synth_throughput.py", "--preset", "tiny", "--res", "32x64", "--json", "/proc/nope/r.json"],
     "cannot write results to /proc/nope"),  # before any layout is written or timed
    (["benchmarks/data_costs.py", "--only", "loader", "--res", "0x5"], "is not HEIGHTxWIDTH"),
    (["benchmarks/data_costs.py", "--res", "60x128"], "--res: input size 60x128 cannot run on this 4-module CRN"),
    (["benchmarks/kernels.py", "--preset", "bogus"], "unknown preset 'bogus'"),
    (["benchmarks/kernels.py", "--preset", "tiny", "--res", "60x128"], "the nearest valid size is 64x128"),
    # an output path that cannot be written: one line before any measuring, not a traceback at the end
    *[([f"benchmarks/{script}.py", "--json", "/proc/nope/r.json"], "cannot write results to /proc/nope")
      for script in ("kernels", "bf16_error", "data_costs", "settle_cost", "sass_census")],
    (["benchmarks/bf16_error.py", "--preset", "bogus"], "unknown preset 'bogus'"),
    (["benchmarks/bf16_error.py", "--res", "100x100", "--preset", "tiny"], "the nearest valid size is 96x96"),
])
def test_benchmark_scripts_refuse_bad_sizes_and_presets_in_one_line(argv, msg):
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_kernel_benchmark_smoke(tmp_path):
    j = tmp_path / "k.json"
    # NCHW at 16x32 (the interpreter's slowest rows); the fault test below runs every row in channels_last
    run("benchmarks/kernels.py", "--preset", "tiny", "--res", "16x32", "--iters", "1", "--no-compile", "--formats", "nchw",
        "--json", j)
    rows = json.loads(j.read_text())["rows"]
    assert {r["format"] for r in rows} == {"nchw"}
    ops = {"layer_norm_lrelu", "upsample_concat"}
    from crn_fast.kernels import can_run
    if can_run(torch.zeros(1)):  # the triton rows run through the interpreter
        ops |= {"layer_norm_stats", "norm_lrelu_upsample_concat"}
        assert {r["impl"] for r in rows} >= {"eager", "triton", "triton fused"}
    assert {r["op"] for r in rows} >= ops
    assert all(r["gb_per_s"] > 0 for r in rows)


def test_targets_verdicts_from_session_files(tmp_path):
    """benchmarks/targets.py reads a GPU session's files and states each of issue 9's targets as met,
    not met, or not measured (never met for a missing side)."""
    def race_row(backend, dtype, ms, err=None, fmt="channels_last"):
        return {"backend": backend, "dtype": dtype, "format": fmt, "median_ms": ms, "max_abs_err": err}
    (tmp_path / "h100_1024x2048.json").write_text(json.dumps({"rows": [
        race_row("triton-autoconv-cudagraph", "bf16", 8.0, 2.5), race_row("triton", "bf16", 11.0, 2.5),
        race_row("compile-max-autotune", "bf16", 12.0, 3.0), race_row("compile", "bf16", 14.0, 3.0),
        race_row("eager", "bf16", 300.0, 4.0), {"backend": "compile-reduce-overhead", "dtype": "bf16", "error": "x"}]}))
    kern = [{"op": op, "module": m, "impl": "triton", "format": f, "pct_of_copy_bw": 85.0 if m != 7 else 70.0}
            for op in ("layer_norm_lrelu", "upsample_concat") for m in range(9) for f in ("nchw", "channels_last")]
    (tmp_path / "kernels_h100.json").write_text(json.dumps({"rows": kern, "partial": True}))
    stages = {"conv": 7.0, "norm": 0.5, "upsample/concat": 0.7, "other": 0.1}
    (tmp_path / "profile_h100_1024x2048.json").write_text(json.dumps({"machine": {"gpu": "NVIDIA H100"}, "profile_ms": {
        "triton": {"0": stages, "head": {"conv": 0.1, "norm": 0.0, "upsample/concat": 0.0, "other": 0.2}},
        "compile-max-autotune-no-cudagraphs": {"0": stages}}}))
    base = tmp_path / "old"
    base.mkdir()
    (base / "h100_1024x2048.json").write_text(json.dumps({"rows": [race_row("triton", "fp32", 32.0, fmt=None)]}))
    out = tmp_path / "targets.md"
    r = run("benchmarks/targets.py", "--results", tmp_path, "--device", "h100", "--baseline", base, "--out", out)
    table = out.read_text()
    assert table == r.stdout.strip() + "\n" or table in r.stdout
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "8.00 ms (triton-autoconv-cudagraph bf16 channels_last)" in lines["crn_fast's best GPU path, bf16 1024x2048"]
    assert lines["crn_fast's best GPU path, bf16 1024x2048"].endswith("| met |")
    assert "1.50x (12.00 ms compile-max-autotune" in lines["faster than the best torch.compile variant"]
    assert lines["max abs error vs eager fp32, no worse than torch.compile's bf16"].endswith("| met |")
    kline = next(v for k, v in lines.items() if k.startswith("layer_norm_lrelu and upsample_concat"))
    assert "worst 70% (layer_norm_lrelu m7" in kline and kline.endswith("**not met** |")
    assert "1.50 ms (triton" in lines["non-conv time per forward (profile)"]
    assert lines["fp32 no slower than before"].endswith("not measured |")  # no fp32/TF32 run in this folder
    assert "Cut short by a time limit (only the rows they finished): kernels_h100.json" in table
    # a kernel that failed to run at a large module is not fast enough, whatever the others measured
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import targets
    fast = [{**row, "pct_of_copy_bw": 90.0} for row in kern]
    failed = fast + [{"op": "upsample_concat", "module": 8, "impl": "triton", "format": "nchw",
                      "error": "RuntimeError: CUDA error: misaligned address"}]
    verdicts = [targets.evaluate(None, {"rows": rows})[2] for rows in (fast, failed)]
    assert verdicts[0]["met"] is True and verdicts[1]["met"] is False, verdicts
    assert "1 failed to run (upsample_concat m8 nchw: RuntimeError: CUDA error: misaligned" in verdicts[1]["measured"]


def test_run_keeps_finished_rows_when_cut_short(tmp_path):
    """run.py writes its JSON and markdown after every row, marked partial until the end: a step
    killed by gpu_session.sh's time limit keeps the rows it measured."""
    import time
    j = tmp_path / "r.json"
    p = subprocess.Popen([sys.executable, "benchmarks/run.py", "--preset", "tiny", "--res", "32x64", "--iters", "1",
                          "--warmup", "0", "--rows", "eager:fp32:nchw,compile:fp32:nchw", "--json", str(j)],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not j.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        p.kill()  # during the compile row, as a time limit would
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    res = json.loads(j.read_text())
    assert res["partial"] is True and [r["backend"] for r in res["rows"]] == ["eager"], res
    assert res["rows"][0]["median_ms"] > 0 and res["flops"] > 0 and res["compute_floor_ms"]["fp32"] > 0
    assert "(partial: the run was cut short)" in j.with_suffix(".md").read_text()


def test_a_failed_row_keeps_the_cause_of_a_nested_error():
    """Inductor's SubprocException says on its first line only that a subprocess failed; the row
    keeps the worker's own error line too, and the whole traceback as its detail."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _util import error_text
    try:
        raise RuntimeError("SubprocException: An exception occurred in a subprocess:\n\nTraceback (most recent "
                           "call last):\n  File \"w.py\", line 3, in f\nNameError: name '_taps' is not defined\n")
    except RuntimeError as e:
        summary, detail = error_text(e)
    assert summary == ("RuntimeError: SubprocException: An exception occurred in a subprocess: ... "
                       "NameError: name '_taps' is not defined")
    assert "test_a_failed_row_keeps_the_cause_of_a_nested_error" in detail and detail.endswith("defined\n\n")
    assert error_text(ValueError("one line"))[0] == "ValueError: one line"


def test_targets_missing_results_folder_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/targets.py", "--results", str(tmp_path / "nope"), "--device",
                        "h100"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "no such folder" in r.stderr and "Traceback" not in r.stderr


def _session_with_recorders(tmp_path, **env_extra):
    """benchmarks/gpu_session.sh with python3 and nvidia-smi replaced by programs that record
    their arguments: (completed process, the session log, the recorded command lines)."""
    bin_dir, calls, out = tmp_path / "bin", tmp_path / "calls.txt", tmp_path / "out"
    bin_dir.mkdir()
    recorder = f'#!/bin/sh\necho "$(basename "$0") $*" >> {calls}\necho "${{CRN_FAST_CONV_TUNING-unset}}" >> {calls}.env\n' \
        f'echo "${{CRN_FAST_CONV_TMA-unset}}" >> {calls}.tma\n' \
        'case "$*" in *device_label*) echo h100;; esac\n' \
        'case "$*" in *"tma or real_module_shapes"*) exit ${TMA_TESTS_RC:-0};; esac\n'
    for name in ("python3", "nvidia-smi"):
        (bin_dir / name).write_text(recorder)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("CRN_GPU_SMOKE", "CRN_GPU_FOLLOWUP", "CRN_GPU_TRAIN", "CRN_FAST_CONV_TMA")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", OUT=str(out), **env_extra)
    r = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "unbound" not in r.stderr, r.stderr[-2000:]
    assert (out / "gpu_results.tar.gz").stat().st_size > 0
    return r, (out / "gpu_session.log").read_text(), calls.read_text().splitlines()


def test_gpu_session_script_runs_its_steps(tmp_path):
    """The GPU branch of benchmarks/gpu_session.sh (not the CPU smoke branch) with its programs
    replaced by recorders: the kernel benchmark without conv rows, the race against every compile
    mode, the profile, the compiled tests (the fused conv's first), the conv rows alone, the fp32
    row with TF32 convs and the targets, each into its own file; every row, profile variant and
    option it names is one the scripts accept, and nothing in the script itself fails (an unset
    variable under `set -u` once ended it at step 3). CRN_GPU_FOLLOWUP=1, which older notes name,
    runs the same commands."""
    _, log, lines = _session_with_recorders(tmp_path)
    steps = ("F0. the TMA conv kernel", "F1. kernel benchmark", "F2. the race at 1024x2048", "F3. per-module profile",
             "F4. compiled tests", "F6. each module's convs", "F7. fp32 with TF32", "F5. the targets", "== done")
    assert [log.index(step) for step in steps] == sorted(log.index(step) for step in steps), log
    kern = [line for line in lines if "benchmarks/kernels.py" in line]
    assert len(kern) == 2 and all("--res 1024x2048" in line for line in kern), kern
    assert "--no-conv" in kern[0] and "kernels_h100.json" in kern[0], kern
    assert "--conv-only" in kern[1] and "kernels_conv_h100.json" in kern[1], kern
    tests = next(line for line in lines if "pytest" in line and "gpu or tensorrt" in line)
    assert tests.index("test_model.py") < tests.index("test_conv_norm.py") < tests.index("test_conv_tiles.py"), tests
    sys.path.insert(0, str(ROOT / "benchmarks"))
    race = [line for line in lines if "benchmarks/run.py" in line and "--allow-tf32" not in line]
    assert len(race) == 1 and "compile-max-autotune:bf16:channels_last" in race[0] and "--iters" not in race[0]
    assert "triton-fusedhead-cudagraph:bf16:channels_last" in race[0]
    rows = race[0].split("--rows ")[1].split()[0].split(",")
    # max-autotune, the slowest to build, last; "auto" (the TMA kernel's first run) just before it
    assert all(r.startswith("compile-max-autotune") for r in rows[-3:]), rows
    assert rows[-4] == "triton-autoconv-cudagraph:bf16:channels_last", rows
    # the race's tuned conv tiles are stored for the profile (auto included); the conv rows time every tile
    tuning = dict(zip(lines, (tmp_path / "calls.txt.env").read_text().splitlines()))
    assert tuning[race[0]].endswith("/conv_tuning_h100.json"), tuning[race[0]]
    profile = next(line for line in lines if "profile_stages.py" in line)
    assert "triton-autoconv,triton,triton-lowresconv" in profile and tuning[profile] == tuning[race[0]], profile
    assert rows[1] == "triton-lowresconv-cudagraph:bf16:channels_last", rows  # the new conv1, early
    assert tuning[kern[1]] == "", tuning[kern[1]]
    assert all(tuning[line] == "" for line in lines if "pytest" in line), tuning  # the tests keep out of it
    fp32 = [line for line in lines if "benchmarks/run.py" in line and "--allow-tf32" in line]
    assert len(fp32) == 1 and "triton-cudagraph:fp32:channels_last" in fp32[0], fp32
    assert "/h100_1024x2048_fp32_tf32.json" in fp32[0], fp32
    assert any("targets.py" in line and "--device h100" in line for line in lines)
    import profile_stages
    import run as run_py
    for line in lines:
        argv = line.split()[2:]
        if "--json" in argv:
            argv[argv.index("--json") + 1] = str(tmp_path / "parsed.json")
        if line.startswith("python3 benchmarks/run.py"):
            run_py.parse_args(argv)
        if line.startswith("python3 benchmarks/profile_stages.py"):
            assert set(argv[argv.index("--variants") + 1].split(",")) <= set(profile_stages.VARIANTS), argv
    (tmp_path / "followup").mkdir()
    _, _, alias = _session_with_recorders(tmp_path / "followup", CRN_GPU_FOLLOWUP="1")

    def commands(lines):  # without the session's temporary result folder
        return [re.sub(r"\S*/tmp\.\w+\b", "RESULTS", line) for line in lines]
    assert commands(alias) == commands(lines)


@pytest.mark.parametrize("tests_rc, tma_after", [(0, "unset"), (1, "0"), (134, "0"), (124, "unset")])
def test_gpu_session_followup_turns_the_tma_kernel_off_when_its_first_tests_fail(tmp_path, tests_rc, tma_after):
    """F0 runs the TMA kernel's tests before anything else; when they fail or crash (a sticky CUDA
    fault), every later step runs with CRN_FAST_CONV_TMA=0 and the log says so; passing, or only
    running out of time (124), leaves it on."""
    _, log, lines = _session_with_recorders(tmp_path, TMA_TESTS_RC=str(tests_rc))
    assert log.index("F0. the TMA conv kernel") < log.index("F1. kernel benchmark")
    f0 = next(i for i, line in enumerate(lines) if "tma or real_module_shapes" in line)
    assert "tests/test_conv_norm.py" in lines[f0] and "-x" in lines[f0].split()
    tma = (tmp_path / "calls.txt.tma").read_text().splitlines()
    assert tma[f0] == "unset" and set(tma[f0 + 1:]) == {tma_after}, tma
    assert ("CRN_FAST_CONV_TMA=0 from here on" in log) == (tma_after == "0")


def test_gpu_session_script_training_mode_races_triton_against_compile(tmp_path):
    """CRN_GPU_TRAIN=1: only the training rows, triton and torch.compile in one run (their ratio is
    measured in the same process), into the training results file, with its own log; first the
    convs' forward + backward unpadded and padded (what the training cascade's layout pad is for)."""
    _, log, lines = _session_with_recorders(tmp_path, CRN_GPU_TRAIN="1")
    assert "T. training at 1024x2048" in log and "== done" in log and "F2." not in log and "1. compiled" not in log
    convs = [line for line in lines if "benchmarks/memory_format.py" in line]
    assert len(convs) == 1 and "--train " in convs[0] and "--res 1024x2048 " in convs[0], convs
    assert convs[0].split("--json ")[1].split()[0].endswith("memory_format_h100_1024x2048_train.json")
    assert log.index("T1. the triton backend's training step") < log.index("T0. the 19 convs") < \
        log.index("T. training at") < log.index("P. one triton training step")
    sync = [line for line in lines if "tests/test_train.py" in line]
    assert len(sync) == 1 and "-m gpu" in sync[0], sync  # test_a_cuda_training_step_never_synchronizes
    prof = [line for line in lines if "benchmarks/profile_train.py" in line]
    assert len(prof) == 1 and "--res 1024x2048 " in prof[0] and "profile_train_h100_1024x2048" in prof[0], prof
    runs = [line for line in lines if "benchmarks/run.py" in line]
    assert len(runs) == 1 and "--train " in runs[0] and "--train-backends triton,compile " in runs[0], runs
    assert "--dtypes bf16" in runs[0] and runs[0].split("--json ")[1].split()[0].endswith("h100_1024x2048_train.json")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run as run_py
    argv = runs[0].split()[2:]
    argv[argv.index("--json") + 1] = str(tmp_path / "parsed.json")
    run_py.parse_args(argv)
    with tarfile.open(tmp_path / "out" / "gpu_results.tar.gz") as tar:
        assert "./h100_gpu_session_train.log" in tar.getnames()


def test_profile_attribution_counts_a_multi_kernel_conv_once():
    """profile_stages charges kernels to modules by counting convolutions: cuDNN's several kernels
    for one conv count once, and Inductor's fused kernels named after a convolution are not convs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from profile_stages import attribute, stage_of
    assert stage_of("triton_red_fused_convolution_native_group_norm_0") == "norm"
    assert stage_of("triton_tem_fused_convolution_0") == "conv"
    assert stage_of("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32") == "conv"
    assert stage_of("_conv_kernel") == "conv" and stage_of("_finalize_kernel") == "norm"
    assert stage_of("_pyramid_kernel") == "upsample/concat"
    names = ["sm90_xmma_fprop_implicit_gemm", "cutlass_splitk_gemm_reduce", "_stats_kernel",  # m0 conv1 (2 kernels)
             "sm90_xmma_fprop_implicit_gemm", "_apply_kernel",                                  # m0 conv2
             "_fwd_cl_kernel", "sm90_xmma_fprop_implicit_gemm", "_stats_kernel",                # m1 conv1
             "sm90_xmma_fprop_implicit_gemm", "_apply_kernel",                                  # m1 conv2
             "sm90_xmma_fprop_implicit_gemm", "elementwise_kernel"]                             # head
    table = attribute([(t, n, 1.0) for t, n in enumerate(names)], n_modules=2)
    assert table["0"]["conv"] == 3 and table["0"]["norm"] == 2
    assert table["1"]["conv"] == 2 and table["1"]["upsample/concat"] == 0  # upsample before m1's conv1 -> m0
    assert table["0"]["upsample/concat"] == 1 and table["head"] == {"conv": 1, "norm": 0.0,
                                                                     "upsample/concat": 0.0, "other": 1.0}


def test_profile_stages_smoke_and_a_bad_variant(tmp_path):
    """crn_fast's variants are split by the profiler ranges around each module: every module row
    has its two convs, module 0 no upsample (it reads the layout), module 1 the upsample-concat
    of module 0's output; the head's conv is its own row."""
    from crn_fast.kernels import can_run
    variants = ["eager"] + (["triton"] if can_run(torch.zeros(1)) else [])
    stem = tmp_path / "prof"
    run("benchmarks/profile_stages.py", "--preset", "tiny", "--res", "32x64", "--variants", ",".join(variants),
        "--out", stem)
    res = json.loads(stem.with_suffix(".json").read_text())
    assert "partial" not in res and res["errors"] == {} and "| **all** |" in stem.with_suffix(".md").read_text()
    for v in variants:
        table = res["profile_ms"][v]
        assert list(table)[:6] == ["0", "1", "2", "3", "4", "head"], (v, list(table))
        assert all(table[m]["conv"] > 0 and table[m]["norm"] > 0 for m in "01234"), (v, table)
        assert table["0"]["upsample/concat"] == 0 < table["1"]["upsample/concat"], (v, table)
        assert table["head"]["conv"] > 0 and table["head"]["norm"] == 0, (v, table)
        ops = res["kernels"][v]
        assert sum(op[3] == "1" and op[1] == "conv" for op in ops) == 2, (v, ops)  # module 1: conv1, conv2
    r = subprocess.run([sys.executable, "benchmarks/profile_stages.py", "--variants", "eager,compile-fast"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "compile-fast unknown" in r.stderr and "Traceback" not in r.stderr


def test_kernel_benchmark_conv_rows_run_through_the_interpreter():
    """The conv rows of benchmarks/kernels.py only run on a GPU session; here they run once on CPU
    tensors through Triton's interpreter (tiny shapes), so the GPU session cannot be the first to
    execute them."""
    import importlib.util
    from crn_fast.config import CRNConfig
    from crn_fast.kernels import can_run
    if not can_run(torch.zeros(1)):
        pytest.skip("Triton's interpreter is not enabled")
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = []
    saved = []
    # three modules (the interpreter's time): 8, 8 and 4 channels at 4x8 .. 16x32
    config = CRNConfig(widths=(8, 8, 4))
    mod.conv_rows(config, (16, 32), torch.float32, "fp32", "cpu", rows, on_module=lambda: saved.append(1))
    timed = [r for r in rows if "impl" in r]
    # conv1's input channels (20, 28, 28) are also padded to 8 for cuDNN, as the model runs them
    padded = {f"cudnn, Cin padded to {c}{ln}" for c in (24, 32) for ln in ("", " + triton ln")}
    # conv1 of modules 1..: also from the previous module's raw output, as the cuDNN and lowres modes run it
    modes = {"cudnn mode: norm+upsample+concat, cudnn, triton ln", "lowres mode: norm, mm + upsample_conv + stats, norm"}
    assert len(saved) == 2 * 3 and {r["impl"] for r in timed} == {
        "cudnn", "cudnn + triton ln", "fused conv + stats", "fused conv norm-in + stats",
        "split: norm_lrelu + fused conv + stats"} | padded | modes, {r["impl"] for r in timed}
    assert {r["module"] for r in timed if r["impl"] in modes} == {1, 2}
    assert [r["module"] for r in timed][0] == 2 and all(r["ms"] > 0 and r["speedup_vs_cudnn"] > 0 for r in timed)
    # each conv1's speedups are against its padded cuDNN conv
    m0 = {r["impl"]: r for r in timed if r["module"] == 0 and r["op"] == "conv1"}
    base = m0["cudnn, Cin padded to 24"]["ms"]
    assert m0["fused conv + stats"]["speedup_vs_cudnn"] == pytest.approx(base / m0["fused conv + stats"]["ms"])
    assert not [r for r in rows if "error" in r]
    rows.clear()  # one module only: the unit a kernels.py process resumes from after a CUDA fault
    mod.conv_rows(config, (16, 32), torch.float32, "fp32", "cpu", rows, modules=[0])
    assert {(r["op"], r["module"]) for r in rows} == {("conv1", 0), ("conv2", 0)}


def test_race_rows_name_each_modules_conv_mode():
    """A row with conv_norm modules says which ran "fused" and which "split" (CRN.fused_conv);
    rows of older result files (fused_modules) keep their note."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run as run_py
    assert run_py._note({"conv_modes": {"0": "fused", "1": "fused", "7": "split", "8": "lowres"}}) == \
        "conv modes: fused in modules [0, 1], split in modules [7], lowres in modules [8]"
    assert run_py._note({"conv_modes": {}}) == "conv modes: cuDNN everywhere"
    assert run_py._note({"fused_modules": [0, 3]}) == "fused conv in modules [0, 3]"


def test_training_profile_splits_one_step_by_phase_and_stage(tmp_path):
    """benchmarks/profile_train.py on CPU (tiny, eager ops): one profiled training step, every op
    in a phase (generator, loss, backward, optimizer; none outside them, the autograd engine's
    included), VGG-19's convs in the loss, the convolutions' backward in the backward phase, and
    the longest ops listed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_train
    assert profile_train.main(["--preset", "tiny", "--res", "64x128", "--out", str(tmp_path / "p")]) == 0
    res = json.loads((tmp_path / "p.json").read_text())
    phases = res["profile_ms"]
    assert set(phases) == {"generator", "loss", "backward", "optimizer"}, phases
    assert all(sum(row.values()) > 0 for row in phases.values())
    assert phases["backward"]["conv"] > 0 and phases["loss"]["conv"] > phases["generator"]["conv"] > 0  # VGG-19
    longest = {(name, phase) for name, phase, *_ in res["longest"]}
    assert ("aten::convolution_backward", "backward") in longest and len(res["longest"]) == 25
    assert "| **all** |" in (tmp_path / "p.md").read_text()


@pytest.mark.parametrize("argv", [["--res", "63x128", "--preset", "tiny"], ["--res", "abc"], ["--preset", "nope"]])
def test_profilers_reject_a_bad_shape_in_one_line(argv, capsys, tmp_path):
    """A resolution or preset the profilers cannot run: argparse's one-line error naming what is
    wrong and what would be valid, exit 2, nothing written."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_stages
    import profile_train
    for script in (profile_train, profile_stages):
        with pytest.raises(SystemExit) as e:
            script.main(argv + ["--out", str(tmp_path / "never" / "p")])
        err = capsys.readouterr().err.strip().splitlines()  # argparse: the usage, then the error
        assert e.value.code == 2 and ": error: " in err[-1] and "Traceback" not in "".join(err), err
        assert ("e.g." in err[-1] or "valid" in err[-1]) and not (tmp_path / "never").exists(), err


@pytest.mark.parametrize("script, argv, msg", [
    ("run", ["--iters", "0"], "--iters: 0 must be >= 1"), ("run", ["--warmup", "-1"], "--warmup: -1 must be >= 0"),
    ("run", ["--batch", "0"], "0 must be >= 1"), ("run", ["--max-seconds", "0"], "--max-seconds: 0 must be > 0"),
    ("kernels", ["--iters", "0"], "--iters: 0 must be >= 1")])
def test_benchmark_counts_out_of_range_are_one_line(script, argv, msg, capsys):
    """An iteration count, warm-up, batch or time budget the benchmarks cannot use is argparse's
    one-line error (--iters 0 used to time one pass, --warmup -1 none, silently), before any model
    is built."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    module = __import__(script)
    with pytest.raises(SystemExit) as e:
        (module.parse_args if script == "run" else module.main)(["--res", "64x128", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and msg in err[-1], err
