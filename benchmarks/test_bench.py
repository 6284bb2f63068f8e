"""pytest-benchmark: per-module ops for each available implementation, and the tiny generator per backend."""
import pytest
import torch

pytest.importorskip("pytest_benchmark")
from crn_fast import CRN, kernels as K  # noqa: E402
from crn_fast.labels import one_hot  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = DEV == "cuda"
OPS_SHAPE = (1, 128, 256, 512) if CUDA else (1, 32, 64, 128)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _impls(names):
    return [pytest.param(n, marks=pytest.mark.skipif(n == "triton" and not CUDA, reason="Triton is timed on GPU"))
            for n in names]


@pytest.mark.parametrize("impl", _impls(["eager", "compile", "triton"]))
def test_layer_norm_lrelu(benchmark, impl):
    x = torch.randn(OPS_SHAPE, device=DEV)
    w, b = torch.ones(OPS_SHAPE[1], device=DEV), torch.zeros(OPS_SHAPE[1], device=DEV)
    fn = {"eager": K.layer_norm_lrelu_reference, "compile": torch.compile(K.layer_norm_lrelu_reference),
          "triton": K.layer_norm_lrelu}[impl]
    fn(x, w, b, 1e-12, 0.2)
    benchmark(lambda: (fn(x, w, b, 1e-12, 0.2), _sync()))


@pytest.mark.parametrize("impl", _impls(["eager", "compile", "triton"]))
def test_upsample_concat(benchmark, impl):
    n, c, h, w = OPS_SHAPE
    f = torch.randn(n, c, h // 2, w // 2, device=DEV)
    lab = torch.rand(n, 20, h, w, device=DEV)
    fn = {"eager": K.upsample_concat_reference, "compile": torch.compile(K.upsample_concat_reference),
          "triton": K.upsample_concat}[impl]
    fn(f, lab)
    benchmark(lambda: (fn(f, lab), _sync()))


@pytest.mark.parametrize("backend", _impls(["eager", "compile", "triton"]))
def test_tiny_generator(benchmark, backend):
    from crn_fast.export import compile_generator
    model = CRN.from_preset("tiny").to(DEV).eval()
    if backend == "triton":
        model.set_backend("triton")
    run = compile_generator(model) if backend == "compile" else model
    x = one_hot(torch.randint(0, 20, (1, 64, 128))).to(DEV)
    with torch.no_grad():
        run(x)
        benchmark(lambda: (run(x), _sync()))
