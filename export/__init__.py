"""crn_fast.export: torch.compile, AOTInductor, ONNX and TensorRT artefacts, each verified against eager.

Heavy dependencies (onnx, onnxruntime, tensorrt) are imported only by the functions that need them.
"""
from .compile import compile_generator, export_aoti, load_aoti
from .cuda_graph import CUDAGraphGenerator, cuda_graph
from .verify import DEFAULT_TOLERANCE, compare, verify


def __getattr__(name):
    if name in ("TensorRTGenerator", "build_engine", "make_profile", "tensorrt_missing_reason"):
        from . import tensorrt
        return getattr(tensorrt, name)
    if name in ("export_onnx", "ONNXGenerator"):
        from . import onnx
        return getattr(onnx, name)
    raise AttributeError(name)


__all__ = ["CUDAGraphGenerator", "cuda_graph", "compile_generator", "export_aoti", "load_aoti", "compare", "verify", "DEFAULT_TOLERANCE",
           "TensorRTGenerator", "build_engine", "make_profile", "tensorrt_missing_reason", "export_onnx",
           "ONNXGenerator"]
