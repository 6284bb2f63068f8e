"""crn-export on the tiny preset: ONNX in onnxruntime, AOTInductor in a fresh process, TensorRT logic."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from crn_fast import CRN, save_generator
from crn_fast.export.cli import main as export_main
from crn_fast.export.tensorrt import make_profile, precision_flags, tensorrt_missing_reason
from crn_fast.errors import CRNError
from crn_fast.labels import one_hot


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = CRN.from_preset("tiny")
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("ck") / "model.ckpt"
    save_generator(model, path)
    return path


def layout(n, h, w, seed=0):
    return one_hot(torch.randint(0, 20, (n, h, w), generator=torch.Generator().manual_seed(seed)))


@pytest.fixture(scope="module")
def onnx_export(ckpt, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx")
    assert export_main([str(ckpt), "--onnx", "--out", str(out)]) == 0
    return out


def test_onnx_is_one_dynamic_model_matching_eager(onnx_export, ckpt):
    from crn_fast import load_generator
    from crn_fast.export.onnx import ONNXGenerator
    side = json.loads((onnx_export / "generator.onnx.json").read_text())
    v = side["verification"]
    assert v["passed"] and len(v["results"]) == 2 and v["max_abs"] < 0.01
    assert [r["size"] for r in v["results"]] == [[64, 128], [32, 64]]
    assert side["shapes"]["layout"] == ["batch", 20, "16*h", "16*w"] and side["versions"]["onnxruntime"]
    run = ONNXGenerator(onnx_export / "generator.onnx")
    model = load_generator(ckpt)
    for x in (layout(2, 48, 80), layout(1, 128, 64, seed=1)):  # other batch and sizes, same file
        with torch.no_grad():
            ref = model(x)
        np.testing.assert_allclose(run(x).numpy(), ref.numpy(), atol=0.01)


def test_onnx_layer_norm_pattern_is_safe_for_onnxruntime_and_tensorrt(onnx_export):
    import onnx
    from onnx import numpy_helper
    g = onnx.load(onnx_export / "generator.onnx").graph
    ops = {n.op_type for n in g.node}
    assert "InstanceNormalization" not in ops and "GroupNormalization" not in ops
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    lns = [n for n in g.node if n.op_type == "LayerNormalization"]
    assert len(lns) == 10  # two per module
    for n in lns:
        assert {a.name: a.i for a in n.attribute}["axis"] in (1, -3)  # over (C, H, W)
        assert inits[n.input[1]].tolist() == [1.0]  # broadcast unit scale: the accurate onnxruntime path


def test_aoti_package_runs_in_a_fresh_process_without_crn_fast(ckpt, tmp_path):
    out = tmp_path / "aoti"
    assert export_main([str(ckpt), "--compile", "--res", "32x64", "--max-res", "64x128", "--max-batch", "2",
                        "--out", str(out)]) == 0
    side = json.loads((out / "generator.pt2.json").read_text())
    assert side["verification"]["passed"] and len(side["verification"]["results"]) == 2
    x = layout(2, 48, 96, seed=3)  # another batch and size inside the exported range
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch\n"
            f"runner = torch._inductor.aoti_load_package({str(out / 'generator.pt2')!r})\n"
            f"y = runner(torch.load({str(tmp_path / 'x.pt')!r}).contiguous())\n"
            f"torch.save(y, {str(tmp_path / 'y.pt')!r})\n"
            "assert not any(m.startswith('crn_fast') for m in sys.modules), 'crn_fast was imported'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    from crn_fast import load_generator
    with torch.no_grad():
        ref = load_generator(ckpt)(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), ref, atol=0.01, rtol=0)
    from crn_fast.export import load_aoti
    runner = load_aoti(out / "generator.pt2")  # either memory format in: the runner makes it NCHW
    for fmt in (torch.channels_last, torch.contiguous_format):
        torch.testing.assert_close(runner(x.contiguous(memory_format=fmt)), ref, atol=0.01, rtol=0)


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "crn_fast.export", *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stderr


@pytest.mark.skipif(tensorrt_missing_reason() is None, reason="TensorRT is installed: --trt works here")
def test_trt_without_tensorrt_fails_cleanly(ckpt, tmp_path):
    code, err = cli(ckpt, "--trt", "--out", tmp_path / "o")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "pip install tensorrt" in err or "CUDA GPU" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("case,msg", [
    ("missing", "does not exist"), ("corrupt", "not a readable crn_fast checkpoint"),
    ("foreign", "not a crn_fast generator"), ("res", "multiples of 2^4 = 16"), ("unwritable", "cannot write"),
    ("gpu", "no CUDA GPU"), ("nothing", "nothing to export"), ("onnx16", "exported in fp32"),
])
def test_bad_input_is_one_clear_error_and_nothing_written(ckpt, tmp_path, case, msg):
    out = tmp_path / "out"
    args = [ckpt, "--onnx", "--out", out]
    if case == "missing":
        args[0] = tmp_path / "nope.ckpt"
    elif case == "corrupt":
        (tmp_path / "bad.ckpt").write_bytes(ckpt.read_bytes()[:300])
        args[0] = tmp_path / "bad.ckpt"
    elif case == "foreign":
        from safetensors.torch import save_file
        save_file({"w": torch.zeros(1)}, str(tmp_path / "f.ckpt"))
        args[0] = tmp_path / "f.ckpt"
    elif case == "res":
        args += ["--res", "60x128"]
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        args[3] = tmp_path / "file" / "sub"
    elif case == "gpu":
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        args += ["--device", "cuda"]
    elif case == "nothing":
        args.remove("--onnx")
    elif case == "onnx16":
        args += ["--dtype", "fp16"]
    code, err = cli(*args)
    assert code == 2 and msg in err and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir())


def test_tensorrt_profile_and_precision_logic():
    p = make_profile(20, 16, (64, 128), (32, 64), (128, 256), batch=2, min_batch=1, max_batch=4)
    assert p.min == (1, 20, 32, 64) and p.opt == (2, 20, 64, 128) and p.max == (4, 20, 128, 256)
    assert make_profile(20, 16, (64, 128)).to_dict() == {"min": [1, 20, 64, 128], "opt": [1, 20, 64, 128],
                                                          "max": [1, 20, 64, 128]}
    with pytest.raises(CRNError, match="multiples of 16"):
        make_profile(20, 16, (64, 100))
    with pytest.raises(CRNError, match="min <= opt <= max"):
        make_profile(20, 16, (64, 128), min_res=(128, 256))
    with pytest.raises(CRNError, match="batch sizes"):
        make_profile(20, 16, (64, 128), batch=4, max_batch=2)
    assert precision_flags("fp32") == [] and precision_flags("fp16") == ["FP16"] and precision_flags("bf16") == ["BF16"]


@pytest.mark.tensorrt
@pytest.mark.parametrize("dtype,tol", [("fp32", 0.5), ("fp16", 8.0)])
def test_tensorrt_engine_matches_eager(ckpt, tmp_path, dtype, tol):
    from crn_fast import load_generator
    from crn_fast.export.tensorrt import TensorRTGenerator
    out = tmp_path / dtype
    assert export_main([str(ckpt), "--trt", "--dtype", dtype, "--out", str(out), "--min-res", "32x64",
                        "--max-res", "128x256"]) == 0
    side = json.loads((out / "generator.engine.json").read_text())
    assert side["verification"]["passed"] and side["profile"]["max"] == [1, 20, 128, 256]
    run = TensorRTGenerator(out / "generator.engine", cuda_graph=True)
    x = layout(1, 64, 128).cuda()
    with torch.no_grad():
        ref = load_generator(ckpt, device="cuda")(x)
    for _ in range(2):  # capture, then replay
        assert (run(x).float() - ref).abs().max() < tol


@pytest.mark.gpu
def test_onnxruntime_cuda_provider(onnx_export):
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider here")
    from crn_fast.export.onnx import ONNXGenerator
    x = layout(1, 64, 128)
    cpu = ONNXGenerator(onnx_export / "generator.onnx")(x)
    gpu = ONNXGenerator(onnx_export / "generator.onnx", device="cuda")(x)
    torch.testing.assert_close(gpu, cpu, atol=0.05, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_cuda_graph_equals_eager_and_keeps_its_model(ckpt, backend):
    """One whole-generator CUDA graph per shape; the runner holds the model, so dropping every
    other reference and collecting garbage cannot free the weights the graph reads."""
    import gc
    from crn_fast import load_generator
    from crn_fast.export import cuda_graph
    x = layout(2, 32, 64, seed=5).cuda()
    with torch.no_grad():
        ref = load_generator(ckpt).cuda()(x)
    run = cuda_graph(load_generator(ckpt, backend=backend).cuda(), x)
    gc.collect()
    torch.cuda.empty_cache()
    torch.randn(64, 1 << 20, device="cuda")  # reuse any freed memory
    for _ in range(2):
        torch.testing.assert_close(run(x), ref, atol=2e-3, rtol=1e-5)
    torch.testing.assert_close(run(layout(1, 64, 128, seed=6).cuda()).shape[-2:], torch.Size([64, 128]))


@pytest.mark.gpu
def test_aoti_package_of_the_triton_backend_holds_its_kernels(ckpt, tmp_path):
    """On CUDA the AOTInductor package keeps crn_fast's Triton kernels and runs in a process
    without crn_fast."""
    from crn_fast import load_generator
    from crn_fast.export import export_aoti
    path = export_aoti(load_generator(ckpt, backend="triton"), tmp_path / "g.pt2", (32, 64), device="cuda")
    x = layout(1, 32, 64, seed=7)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch\n"
            f"runner = torch._inductor.aoti_load_package({str(path)!r})\n"
            f"y = runner(torch.load({str(tmp_path / 'x.pt')!r}).cuda().contiguous())\n"
            f"torch.save(y.cpu(), {str(tmp_path / 'y.pt')!r})\n"
            "assert not any(m.startswith('crn_fast') for m in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    with torch.no_grad():
        ref = load_generator(ckpt)(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), ref, atol=0.01, rtol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cuda_graph_without_a_gpu_is_one_clear_error(ckpt):
    from crn_fast import CRNError, load_generator
    from crn_fast.export import cuda_graph
    with pytest.raises(CRNError, match="CUDA graphs need a CUDA GPU"):
        cuda_graph(load_generator(ckpt))
