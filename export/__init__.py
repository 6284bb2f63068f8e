"""crn_fast.export: torch.compile, AOTInductor, ONNX and TensorRT artefacts, each verified against eager."""
