"""Smoke runs of the benchmark scripts, so they cannot rot (tiny shapes; no timing assertions)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_run_smoke_tiny(tmp_path):
    j, md, png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    r = run("benchmarks/run.py", "--preset", "tiny", "--res", "64x128", "--iters", "1", "--json", j, "--markdown",
            md, "--plot", png)
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


def test_training_benchmark_smoke(tmp_path):
    j = tmp_path / "t.json"
    run("benchmarks/run.py", "--train", "--preset", "tiny", "--res", "32x64", "--iters", "1", "--json", j,
        "--markdown", tmp_path / "t.md")
    rows = json.loads(j.read_text())["training"]
    eager = [r for r in rows if r["backend"] == "eager" and r["dtype"] == "fp32"]
    assert len(eager) == 2 and all("median_ms" in r and r["peak_memory_mib"] > 0 for r in eager)


def test_kernel_benchmark_smoke(tmp_path):
    j = tmp_path / "k.json"
    run("benchmarks/kernels.py", "--preset", "tiny", "--res", "32x64", "--iters", "1", "--no-compile", "--json", j)
    rows = json.loads(j.read_text())["rows"]
    assert {r["op"] for r in rows} >= {"layer_norm_lrelu", "upsample_concat"}
    assert all(r["gb_per_s"] > 0 for r in rows)
