"""crn-export on the tiny preset: ONNX in onnxruntime, AOTInductor in a fresh process, TensorRT logic."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from crn_fast import CRN, CRNConfig, save_generator
from crn_fast.export.cli import main as export_main
from crn_fast.export.tensorrt import make_profile, tensorrt_missing_reason
from crn_fast.errors import CRNError, UsageError
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


def run_package_in_a_fresh_process(package, x, tmp_path, device="cpu"):
    """Run an AOTInductor package on x in a Python that never imports crn_fast; returns its output."""
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch\n"
            f"runner = torch._inductor.aoti_load_package({str(package)!r})\n"
            f"y = runner(torch.load({str(tmp_path / 'x.pt')!r}).to({device!r}).contiguous())\n"
            f"torch.save(y.cpu(), {str(tmp_path / 'y.pt')!r})\n"
            "assert not any(m.startswith('crn_fast') for m in sys.modules), 'crn_fast was imported'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return torch.load(tmp_path / "y.pt")


def layout(n, h, w, seed=0):
    return one_hot(torch.randint(0, 20, (n, h, w), generator=torch.Generator().manual_seed(seed)))


@pytest.fixture(scope="module")
def onnx_export(ckpt, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx")
    assert export_main([str(ckpt), "--onnx", "--out", str(out)]) == 0
    return out


def test_onnx_export_shows_no_torch_internal_noise(ckpt, tmp_path):
    """torch.onnx's per-op "torchvision is not installed" warnings and torch's own pytree
    FutureWarning say nothing about the user's model: the export's stderr is crn_fast's lines only."""
    pytest.importorskip("onnxruntime")
    r = subprocess.run([sys.executable, "-m", "crn_fast.export", str(ckpt), "--onnx", "--no-verify", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "torchvision" not in r.stderr and "LeafSpec" not in r.stderr, r.stderr


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


def test_onnxruntime_reads_and_writes_torchs_memory(onnx_export):
    """ONNXGenerator binds the layout and the output in torch's memory (IO binding: on a GPU with the
    CUDA provider nothing crosses to the host): the images session.run gives, bit for bit, from a
    channels_last layout (one_hot's), an NCHW one and a strided view; a new tensor every call."""
    from crn_fast.export.onnx import INPUT_NAME, OUTPUT_NAME, ONNXGenerator
    run = ONNXGenerator(onnx_export / "generator.onnx")
    x = layout(2, 48, 80, seed=3)
    assert x.is_contiguous(memory_format=torch.channels_last)
    expect = run.session.run([OUTPUT_NAME], {INPUT_NAME: x.contiguous().numpy()})[0]
    wide = torch.zeros(2, 20, 48, 96)
    wide[..., :80] = x
    outs = [run(v) for v in (x, x.contiguous(), wide[..., :80])]
    for out in outs:
        assert out.shape == expect.shape == (2, 3, 48, 80) and out.dtype == torch.float32 and out.device.type == "cpu"
        assert np.array_equal(out.numpy(), expect)
    assert outs[0].data_ptr() != outs[1].data_ptr()


def test_onnxruntime_before_1_24_runs_the_layer_norms_in_fp64(onnx_export, monkeypatch):
    """onnxruntime 1.23 and older (Python 3.10's newest is 1.23.2) refuse LayerNormalization's
    broadcast unit scale ("Size of scale and bias must match X.shape[axis:]"), and their full-scale
    form is 2e-2 off over a long row: ONNXGenerator runs them on an in-memory copy whose layer norms
    are two fp64 ReduceMean passes, the same images; the file is not touched."""
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from crn_fast.export import onnx as ox
    assert [ox.ort_runs_broadcast_scale(v) for v in ("1.18.0", "1.23.2", "1.24.1", "1.32.0", "2.0.0")] == \
        [False, False, True, True, True]
    path = onnx_export / "generator.onnx"
    before = path.read_bytes()
    proto = ox.fp64_layer_norms(onnx.load(str(path)))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert "LayerNormalization" not in ops and ops.count("ReduceMean") == 2 * 10 and ops.count("Cast") == 2 * 10
    x = layout(2, 48, 80, seed=3)
    expect = ox.ONNXGenerator(path)(x)
    rewrites, rewrite = [], ox.fp64_layer_norms
    monkeypatch.setattr(ox, "fp64_layer_norms", lambda p: rewrites.append(p) or rewrite(p))
    monkeypatch.setattr(ort, "__version__", "1.23.2")
    got = ox.ONNXGenerator(path)(x)
    assert len(rewrites) == 1 and path.read_bytes() == before
    np.testing.assert_allclose(got.numpy(), expect.numpy(), atol=2e-3, rtol=0)


def test_onnxruntime_runs_on_the_ranks_own_gpu(monkeypatch):
    """The CUDA provider gets the torch device's GPU: cuda:1 is GPU 1 and "cuda" torch's current one
    (a torchrun rank's), not onnxruntime's default GPU 0 for every rank."""
    ort = pytest.importorskip("onnxruntime")
    from crn_fast.export.onnx import onnxruntime_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnxruntime_providers("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert onnxruntime_providers("cuda")[0] == ("CUDAExecutionProvider", {"device_id": 3})
    assert onnxruntime_providers("cpu") == ["CPUExecutionProvider"]


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
    # --res at one stride (the coarsest level 1 pixel high), which torch.export would specialise: the
    # package is traced at two strides and verified at 16x32 and 64x128
    assert export_main([str(ckpt), "--compile", "--res", "16x32", "--max-res", "64x128", "--max-batch", "2",
                        "--out", str(out)]) == 0
    side = json.loads((out / "generator.pt2.json").read_text())
    assert side["verification"]["passed"] and len(side["verification"]["results"]) == 2
    x = layout(2, 48, 96, seed=3)  # another batch and size inside the exported range
    from crn_fast import load_generator
    with torch.no_grad():
        ref = load_generator(ckpt)(x)
    torch.testing.assert_close(run_package_in_a_fresh_process(out / "generator.pt2", x, tmp_path), ref,
                               atol=0.01, rtol=0)
    from crn_fast.export import load_aoti
    runner = load_aoti(out / "generator.pt2")  # either memory format in: the runner makes it NCHW
    for fmt in (torch.channels_last, torch.contiguous_format):
        torch.testing.assert_close(runner(x.contiguous(memory_format=fmt)), ref, atol=0.01, rtol=0)
    check_the_package_runner(runner, ckpt, out, tmp_path)


def check_the_package_runner(runner, ckpt, out, tmp_path):
    """load_aoti's runner checks each layout against the shapes in the package's sidecar (the
    package itself runs any shape given, wrongly), and splits or pads batches to those it runs;
    crn-synthesize runs the package given as the model, checking every layout's size first."""
    from crn_fast import load_generator
    from crn_fast.export.compile import PackageShapes
    from crn_fast.synthesize import main as synth_main
    from crn_fast.export.compile import cannot_run_here, package_metadata
    model = load_generator(ckpt)
    assert runner.shapes == PackageShapes((1, 2), 20, (16, 32), (64, 128), 16) and runner.device.type == "cpu"
    meta = package_metadata(out / "generator.pt2")
    assert meta["AOTI_DEVICE_KEY"] == "cpu" and cannot_run_here(meta) is None
    for shape in ((1, 20, 128, 256), (1, 20, 40, 64), (1, 19, 32, 64)):  # too large, not a multiple, 19 classes
        with pytest.raises(CRNError, match=re.escape(f"layout {'x'.join(map(str, shape))} is not a shape this "
                                                     "AOTInductor package runs: it takes 20 classes at 16x32 to "
                                                     "64x128 (multiples of 16)")):
            runner(torch.zeros(shape))
    x = layout(5, 32, 64, seed=4)  # batches of at most 2: split
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(runner(x), ref, atol=0.01, rtol=0)
    runner.shapes = dataclasses.replace(runner.shapes, batch=(2, 2))  # as a package of batch 2 alone: padded
    torch.testing.assert_close(runner(x[:1]), ref[:1], atol=0.01, rtol=0)
    static = {"shapes": {"layout": [2, 20, 64, 128]}, "dynamic": {"min_res": None, "max_res": None, "max_batch": None}}
    assert PackageShapes.from_sidecar(static, 16) == PackageShapes((2, 2), 20, (64, 128), (64, 128), 16)
    with pytest.raises(CRNError, match="1x20x32x64 is not a shape this AOTInductor package runs: it takes 20 "
                                       "classes at 64x128; export one"):
        PackageShapes.from_sidecar(static, 16).check((1, 20, 32, 64))

    labels = tmp_path / "labels"
    labels.mkdir()
    rng = np.random.default_rng(0)
    for name, hw in (("a", (32, 64)), ("b", (64, 128)), ("c", (16, 32))):
        Image.fromarray(rng.integers(0, 20, hw).astype(np.uint8)).save(labels / f"{name}.png")
    assert synth_main([str(out / "generator.pt2"), "--labels", str(labels), "--out", str(tmp_path / "pkg"),
                       "--batch-size", "3", "--no-progress"]) == 0
    assert synth_main([str(ckpt), "--labels", str(labels), "--out", str(tmp_path / "eager"), "--no-progress"]) == 0
    for name in "abc":
        got, want = (np.asarray(Image.open(tmp_path / d / f"{name}.png"), np.int16) for d in ("pkg", "eager"))
        assert np.abs(got - want).max() <= 1, name  # the same images, to 8-bit rounding
    Image.fromarray(np.zeros((128, 256), np.uint8)).save(labels / "big.png")
    assert synth_main([str(out / "generator.pt2"), "--labels", str(labels), "--out", str(tmp_path / "big")]) == 2
    assert not (tmp_path / "big").exists()  # named in the first pass, before anything is written


def test_a_package_for_another_machine_is_refused_before_it_loads(tmp_path, monkeypatch):
    """AOTInductor records where a package runs (platform, machine, CPU vector ISA, CUDA and compute
    capability); loaded elsewhere, it can stop the process with an illegal instruction. load_aoti
    reads that from the archive first and refuses in one line; a file that is no package is named."""
    import platform
    import zipfile
    from crn_fast.export import load_aoti
    from crn_fast.export.compile import cannot_run_here, package_metadata
    here = {"AOTI_DEVICE_KEY": "cpu", "AOTI_PLATFORM": sys.platform, "AOTI_MACHINE": platform.machine()}
    from crn_fast.export import compile as aoti
    assert aoti.best_cpu_isa() in ("DEFAULT", "AVX2", "AVX512") or platform.machine() not in ("x86_64", "AMD64")
    monkeypatch.setattr(aoti, "best_cpu_isa", lambda: "AVX2")
    assert cannot_run_here({**here, "AOTI_CPU_ISA": "AVX2"}) is None
    assert cannot_run_here({**here, "AOTI_CPU_ISA": "AVX512 AVX512_VNNI"}) == \
        "it was compiled for CPUs with AVX512, and this one's best is AVX2"
    assert cannot_run_here({**here, "AOTI_PLATFORM": "darwin"}) == \
        f"it was compiled on darwin, and this is {sys.platform}"
    assert "it was compiled for riscv64 CPUs" in cannot_run_here({**here, "AOTI_MACHINE": "riscv64"})
    if not torch.cuda.is_available():
        assert cannot_run_here({**here, "AOTI_DEVICE_KEY": "cuda"}) == \
            "it was compiled for a CUDA GPU, and this machine has none"
    package = tmp_path / "generator.pt2"
    with zipfile.ZipFile(package, "w") as z:  # only what is read before loading: the metadata
        z.writestr("generator/data/aotinductor/model/x.wrapper_metadata.json",
                   json.dumps({**here, "AOTI_CPU_ISA": "AVX512"}))
    assert package_metadata(package)["AOTI_CPU_ISA"] == "AVX512"
    with pytest.raises(CRNError, match=re.escape(f"{package} cannot run here: it was compiled for CPUs with AVX512, "
                                                 "and this one's best is AVX2. Export it on this machine")):
        load_aoti(package)
    (tmp_path / "g.pt2").write_text("not a package")
    with pytest.raises(CRNError, match="g.pt2: not an AOTInductor package"):
        load_aoti(tmp_path / "g.pt2")


def test_verify_leaves_the_callers_model_as_it_was_and_compare_never_broadcasts():
    """crn_fast.export.verify compares with eager fp32: a bf16 model in training mode was turned
    into an fp32 model in eval mode in place (nn.Module.float/.eval); now a copy runs where the dtype
    or device differ, and the mode comes back. compare refuses outputs of different shapes (an
    artefact of another k), which it broadcast."""
    from crn_fast.export import compare, verify
    model = CRN(CRNConfig(widths=(8, 8), k=1)).to(torch.bfloat16).train()
    v = verify(lambda x: model(x.to(torch.bfloat16)).float(), model, [(4, 8)], tolerance=16.0)
    assert v["passed"] and 0 < v["max_abs"] <= 16.0
    assert next(model.parameters()).dtype == torch.bfloat16 and model.training
    with pytest.raises(CRNError, match=r"^compare: the artefact's output is \(1, 3, 4, 8\), eager's \(1, 6, 4, 8\)$"):
        compare(torch.zeros(1, 3, 4, 8), torch.zeros(1, 6, 4, 8))


def test_the_exporters_check_their_sizes_before_tracing(tmp_path):
    """export_onnx and export_aoti from Python (crn-export checks its options itself): a size the
    model cannot run, one that is no (H, W) pair, or a range that does not hold the size is one
    CRNError naming the argument, before torch.export fails in its own words. "HxW" is taken too."""
    from crn_fast.export import export_aoti, export_onnx
    model = CRN(CRNConfig(widths=(8, 8), k=1)).eval()
    cases = [(lambda: export_onnx(model, tmp_path / "g.onnx", (7, 16)), r"^example_size: input size 7x16 cannot run "
              r"on this 2-module CRN: .* the nearest valid size is 8x16\.$"),
             (lambda: export_onnx(model, tmp_path / "g.onnx", 8), r"^example_size must be \(height, width\) integers "
              r"or 'HxW', got 8$"),
             (lambda: export_onnx(model, tmp_path / "g.onnx", "8x16", max_size="9x16"), r"^max_size: input size 9x16"),
             (lambda: export_aoti(model, tmp_path / "g.pt2", "8by16"),
              r"^size: resolution '8by16' is not HEIGHTxWIDTH"),
             (lambda: export_aoti(model, tmp_path / "g.pt2", (8, 16), min_size=(16, 16)),
              r"^min_size <= size is needed on each side, got 16x16 and 8x16$"),
             (lambda: export_aoti(model, tmp_path / "g.pt2", (8, 16), max_size=(8, 8)),
              r"^size <= max_size is needed on each side, got 8x16 and 8x8$")]
    for export, msg in cases:
        with pytest.raises(CRNError, match=msg):
            export()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("loader,what", [("load_aoti", "an AOTInductor package (.pt2)"),
                                         ("ONNXGenerator", "an ONNX model (.onnx)"),
                                         ("TensorRTGenerator", "a TensorRT engine (.engine)")])
def test_the_runners_say_what_their_path_is_instead_of_a_file(tmp_path, loader, what):
    """The Python API's loaders of exported files (crn-synthesize --engine checks its path itself):
    a path that is missing, a folder or a dangling link is one CRNError saying which, before
    onnxruntime's NO_SUCHFILE, torch's zip error, or TensorRT's absence here."""
    import crn_fast.export as ex
    load = getattr(ex, loader)
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    for path, why in [(tmp_path / "missing", "does not exist"), (tmp_path, f"is a folder, not {re.escape(what)}"),
                      (tmp_path / "gone", f"is a symbolic link to {tmp_path / 'nowhere'}, which does not exist")]:
        with pytest.raises(CRNError, match=f"^{re.escape(str(path))} {why}$"):
            load(path)
    if loader == "ONNXGenerator":  # a file of another kind, in onnxruntime's words before
        (tmp_path / "g.onnx").write_text("not a model")
        with pytest.raises(CRNError, match=r"g.onnx is not an ONNX model \(onnxruntime cannot parse it\)$"):
            load(tmp_path / "g.onnx")


def test_synthesize_runs_the_onnx_model_given_as_the_model(onnx_export, ckpt, tmp_path, capsys):
    """crn-synthesize generator.onnx: onnxruntime runs it (the model's classes from its sidecar),
    giving the checkpoint's images; without its sidecar it is one line naming the sidecar."""
    from crn_fast.synthesize import main as synth_main
    labels = tmp_path / "labels"
    labels.mkdir()
    rng = np.random.default_rng(1)
    for name, hw in (("a", (48, 80)), ("b", (64, 128))):
        Image.fromarray(rng.integers(0, 20, hw).astype(np.uint8)).save(labels / f"{name}.png")
    assert synth_main([str(onnx_export / "generator.onnx"), "--labels", str(labels), "--out", str(tmp_path / "o"),
                       "--batch-size", "2", "--no-progress"]) == 0
    assert synth_main(["--ckpt", str(ckpt), "--labels", str(labels), "--out", str(tmp_path / "e"),
                       "--no-progress"]) == 0
    for name in "ab":
        got, want = (np.asarray(Image.open(tmp_path / d / f"{name}.png"), np.int16) for d in ("o", "e"))
        assert np.abs(got - want).max() <= 1, name
    failed = tmp_path / "generator.failed.onnx"  # as crn-export keeps one that failed its verification
    failed.write_bytes((onnx_export / "generator.onnx").read_bytes())
    side = json.loads((onnx_export / "generator.onnx.json").read_text())
    side["verification"].update(passed=False, max_abs=12.5)
    (tmp_path / "generator.failed.onnx.json").write_text(json.dumps(side))
    capsys.readouterr()
    assert synth_main([str(failed), "--labels", str(labels), "--out", str(tmp_path / "f"), "--no-progress"]) == 0
    assert f"{failed} failed its verification against eager fp32 when exported (max abs 12.5" in \
        capsys.readouterr().err
    alone = tmp_path / "alone.onnx"
    alone.write_bytes((onnx_export / "generator.onnx").read_bytes())
    capsys.readouterr()
    assert synth_main([str(alone), "--labels", str(labels), "--out", str(tmp_path / "x")]) == 1
    assert f"{alone}.json (the sidecar crn-export writes beside alone.onnx) is missing" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "crn_fast.export", *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stderr


@pytest.mark.skipif(tensorrt_missing_reason() is None, reason="TensorRT is installed: --trt works here")
def test_trt_without_tensorrt_fails_cleanly(ckpt, tmp_path):
    code, err = cli(ckpt, "--trt", "--out", tmp_path / "o")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "pip install 'tensorrt>=10.12,<12'" in err or "CUDA GPU" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("case,msg,code", [
    ("missing", "does not exist", 1), ("corrupt", "not a readable crn_fast checkpoint", 1),
    ("foreign", "not a crn_fast generator", 1), ("res", "multiples of 2^4 = 16", 2), ("unwritable", "cannot write", 1),
    ("gpu", "no CUDA GPU", 2), ("nothing", "nothing to export", 2),
    ("maxres", "outside --min-res 64x128 .. --max-res 32x64", 2), ("opset16", "need opset 17 or later", 2),
    ("bf16opset", "bf16 ONNX models need opset 22", 2), ("minmax", "--min-res 64x128 is larger than --max-res 32x64", 2),
    ("nan", "must be a finite number >= 0", 2), ("negative", "must be a finite number >= 0", 2),
    ("badres", "is not HEIGHTxWIDTH", 2), ("batch", "got --batch 8, --max-batch 4", 2),
    ("outfile", "is a file, not a folder", 2), ("opset99", "--opset 99: the onnx package here knows opsets up to", 2),
])
def test_bad_input_is_one_clear_error_and_nothing_written(ckpt, tmp_path, case, msg, code):
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
    elif case == "maxres":
        args += ["--max-res", "32x64"]  # below the model's nominal 64x128
    elif case == "opset16":
        args += ["--opset", "16"]
    elif case == "bf16opset":
        args += ["--dtype", "bf16", "--opset", "18"]
    elif case == "opset99":  # beyond onnx's opsets: the exporter kept 18 and the sidecar said 99
        args += ["--opset", "99"]
    elif case == "minmax":
        args = [ckpt, "--compile", "--out", out, "--min-res", "64x128", "--max-res", "32x64", "--res", "32x64"]
    elif case == "nan":
        args += ["--tolerance", "nan"]
    elif case == "negative":
        args += ["--tolerance", "-1"]
    elif case == "badres":
        args += ["--res", "big"]
    elif case == "batch":
        args += ["--batch", "8", "--max-batch", "4"]  # --min-batch unset: not named ('None' before)
    elif case == "outfile":
        out.write_bytes(b"x")
        args[3] = out
    rc, err = cli(*args)
    assert rc == code and msg in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 or code == 2 and "usage:" in err  # argparse prints its usage line
    assert not out.exists() or (out.read_bytes() == b"x" if case == "outfile" else not any(out.iterdir()))


def test_an_opset_the_exporter_falls_back_from_is_an_error(ckpt, tmp_path, monkeypatch):
    """torch.onnx falls back to its own opset, with a warning, when it cannot convert to the one
    asked for; export_onnx says so rather than writing a model whose opset is not the one named."""
    import crn_fast.export.onnx as onnx_export
    from crn_fast.checkpoint import load_generator
    monkeypatch.setattr(onnx_export, "highest_opset", lambda: 1000)  # an onnx that would know opset 99
    with pytest.raises(CRNError, match=r"--opset 99: the exporter wrote opset \d+ instead"):
        onnx_export.export_onnx(load_generator(ckpt), tmp_path / "g.onnx", (32, 64), opset=99)
    assert not (tmp_path / "g.onnx").exists()


def test_an_engine_is_given_only_the_shapes_of_its_profile(tmp_path):
    """A TensorRT engine runs only inside its optimisation profile (in the sidecar crn-export writes):
    crn-synthesize checks each layout's size against it in its first pass, naming the file, and
    the runner checks every call's shape, before TensorRT would log its own error."""
    from crn_fast.export.tensorrt import _from_sidecar
    from crn_fast.synthesize import plan
    profile = make_profile(20, 16, (64, 128), (32, 64), (64, 128), batch=1, max_batch=2)
    profile.check((2, 20, 32, 64))
    with pytest.raises(CRNError, match=re.escape(
            "layout 3x20x64x128 is outside the engine's profile: batch 1-2, 20 channels, 32x64 to 64x128; build an "
            "engine for it with crn-export --trt (--min-res, --max-res, --max-batch), or --res to resize the layouts")):
        profile.check((3, 20, 64, 128))
    with pytest.raises(CRNError, match="layout 1x20x128x256 is outside"):
        profile.check((1, 20, 128, 256))
    config = CRNConfig(widths=(8, 8, 8, 8, 8), k=1)
    (tmp_path / "g.engine.json").write_text(json.dumps({"model": config.to_dict(), "profile": profile.to_dict()}))
    assert _from_sidecar(tmp_path / "g.engine") == (config, profile)
    assert _from_sidecar(tmp_path / "missing.engine") == (None, None)
    for name, hw in (("fits.png", (64, 128)), ("big.png", (128, 256))):
        Image.fromarray(np.zeros(hw, np.uint8)).save(tmp_path / name)
    assert plan([tmp_path / "fits.png"], config, None, tmp_path / "o", profile) == [(tmp_path / "fits.png", (64, 128))]
    with pytest.raises(UsageError, match=re.escape(f"{tmp_path / 'big.png'}: layout 1x20x128x256 is outside")):
        plan([tmp_path / "fits.png", tmp_path / "big.png"], config, None, tmp_path / "o", profile)
    assert plan([tmp_path / "big.png"], config, (64, 128), tmp_path / "o", profile)  # --res brings it inside


def test_tensorrt_profile_and_precision_logic():
    p = make_profile(20, 16, (64, 128), (32, 64), (128, 256), batch=2, min_batch=1, max_batch=4)
    assert p.min == (1, 20, 32, 64) and p.opt == (2, 20, 64, 128) and p.max == (4, 20, 128, 256)
    assert make_profile(20, 16, (64, 128)).to_dict() == {"min": [1, 20, 64, 128], "opt": [1, 20, 64, 128],
                                                          "max": [1, 20, 64, 128]}
    with pytest.raises(CRNError, match="multiples of 16"):
        make_profile(20, 16, (64, 100))
    with pytest.raises(CRNError, match="--min-res <= --opt-res <= --max-res"):
        make_profile(20, 16, (64, 128), min_res=(128, 256))
    with pytest.raises(CRNError, match="batch sizes"):
        make_profile(20, 16, (64, 128), batch=4, max_batch=2)


@pytest.mark.parametrize("version,ok", [("10.12.0.36", True), ("10.16.1.11", True), ("11.4.0.106", True),
                                        ("10.11.0.33", False), ("10.0.1", False), ("12.0.0", False),
                                        ("8.6.1", False), ("dev", False)])
def test_tensorrt_version_range_is_one_line(version, ok):
    from crn_fast.export.tensorrt import check_version
    if ok:
        check_version(version)
    else:
        with pytest.raises(CRNError, match=r"crn_fast supports 10.12 <= TensorRT < 12") as e:
            check_version(version)
        assert "\n" not in str(e.value)


def test_tensorrt_build_uses_only_the_listed_names_and_no_weak_typing():
    """export/tensorrt.py reaches TensorRT only through names in TENSORRT_API (its trt.X.Y chains
    are checked here), and none of the weak-typing API that TensorRT 11 removed."""
    import ast
    import inspect
    from crn_fast.export import tensorrt as T
    tree = ast.parse(inspect.getsource(T))
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "trt":
            used.add(("tensorrt", node.attr))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                isinstance(node.value.value, ast.Name) and node.value.value.id == "trt":
            used.add((node.value.attr, node.attr))
    listed = {(owner, n) for owner, names in T.TENSORRT_API.items() for n in names}
    assert used and used <= listed, used - listed
    source = inspect.getsource(T)
    code_only = source.split("REMOVED_IN_11 =")[0] + source.split("REMOVED_IN_11 =")[1].split("\n", 1)[1]
    for name in T.REMOVED_IN_11:
        assert f"BuilderFlag.{name}" not in code_only


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
    run = ONNXGenerator(onnx_export / "generator.onnx", device="cuda")
    torch.testing.assert_close(run(x), cpu, atol=0.05, rtol=0)
    # a layout made on the GPU (a fresh one-hot, still being written by torch's stream) stays there:
    # onnxruntime reads it in place and writes the images into a CUDA tensor
    ids = torch.randint(0, 20, (1, 64, 128), generator=torch.Generator().manual_seed(0)).cuda()
    on_gpu = run(one_hot(ids))
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), cpu, atol=0.05, rtol=0)


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
    with torch.no_grad():
        ref = load_generator(ckpt)(x)
    torch.testing.assert_close(run_package_in_a_fresh_process(path, x, tmp_path, "cuda"), ref, atol=0.01, rtol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cuda_graph_without_a_gpu_is_one_clear_error(ckpt):
    from crn_fast import CRNError, load_generator
    from crn_fast.export import cuda_graph
    with pytest.raises(CRNError, match="CUDA graphs need a CUDA GPU"):
        cuda_graph(load_generator(ckpt))


# ----------------------------------------------------------------------------- mixed-precision ONNX
def _types(proto):
    """value name -> elem type name, after full (strict) shape inference."""
    import onnx
    inf = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    vi = {v.name: v.type.tensor_type.elem_type for v in [*inf.graph.value_info, *inf.graph.input, *inf.graph.output]}
    vi.update({i.name: i.data_type for i in inf.graph.initializer})
    return inf, {k: onnx.TensorProto.DataType.Name(v) for k, v in vi.items()}


@pytest.mark.parametrize("dtype,low,tol", [("fp16", "FLOAT16", 8.0), ("bf16", "BFLOAT16", 16.0)])
def test_mixed_precision_onnx_is_typed_in_the_graph(ckpt, tmp_path, dtype, low, tol):
    """fp32 in and out, every Conv (weights too) in fp16/bf16, every LayerNormalization in fp32;
    checker and strict shape inference pass; a CPU runtime that implements the types (onnxruntime
    for fp16, onnx.reference for bf16, which onnxruntime's CPU provider lacks) is within the
    export tolerance of eager fp32."""
    import onnx
    from crn_fast import load_generator
    from crn_fast.export.onnx import ONNXGenerator, export_onnx, onnx_dtype
    # the example at one stride (16 for tiny): a size torch.export specialises, so the export traces at two
    path = export_onnx(load_generator(ckpt), tmp_path / "g.onnx", (16, 32), dtype=dtype)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    inf, t = _types(proto)
    g = inf.graph
    assert t[g.input[0].name] == "FLOAT" and t[g.output[0].name] == "FLOAT" and onnx_dtype(path) == dtype
    convs = [n for n in g.node if n.op_type == "Conv"]
    lns = [n for n in g.node if n.op_type == "LayerNormalization"]
    assert len(convs) == 11 and len(lns) == 10
    assert all(t[n.input[0]] == t[n.input[1]] == t[n.output[0]] == low for n in convs)
    assert all(t[n.input[0]] == t[n.output[0]] == "FLOAT" for n in lns)
    assert {t[n.input[0]] for n in g.node if n.op_type in ("AveragePool", "Resize", "LeakyRelu")} == {low}
    runner = ONNXGenerator(path)
    assert runner.runtime == ("onnxruntime" if dtype == "fp16" else "onnx.reference")
    x = layout(2, 32, 64, seed=4)
    with torch.no_grad():
        ref = load_generator(ckpt)(x)
    out = runner(x)
    assert out.dtype == torch.float32
    err = (out - ref).abs().max().item()
    assert 0 < err < tol, err  # reduced precision: not exact, within the documented tolerance


def test_cli_mixed_precision_onnx_is_verified(ckpt, tmp_path):
    out = tmp_path / "bf16"
    assert export_main([str(ckpt), "--onnx", "--dtype", "bf16", "--out", str(out), "-q"]) == 0
    side = json.loads((out / "generator.onnx.json").read_text())
    v = side["verification"]
    assert side["dtype"] == "bf16" and side["opset"] == 22 and v["passed"] and v["runtime"] == "onnx.reference"
    assert v["tolerance_max_abs"] == 16.0 and 0 < v["max_abs"] < 16


def test_failed_verification_never_replaces_a_good_artefact(ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    assert export_main([str(ckpt), "--onnx", "--out", str(out), "-q"]) == 0
    good, good_side = (out / "generator.onnx").read_bytes(), (out / "generator.onnx.json").read_text()
    stale = out / ".crn-export-999999-abc"  # left by a killed run (no such process)
    stale.mkdir()
    assert export_main([str(ckpt), "--onnx", "--out", str(out), "--tolerance", "0", "-q"]) == 3
    assert "verification failed for generator.failed.onnx" in capsys.readouterr().err
    assert (out / "generator.onnx").read_bytes() == good and (out / "generator.onnx.json").read_text() == good_side
    failed = json.loads((out / "generator.failed.onnx.json").read_text())
    assert not failed["verification"]["passed"] and (out / "generator.failed.onnx").stat().st_size > 1000
    assert not stale.exists() and not list(out.glob(".crn-export-*"))
