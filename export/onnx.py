"""ONNX export of a CRN generator: one model, dynamic batch, height and width.

Layer norm over (C,H,W) is exported as ``LayerNormalization(axis=1)`` with unit scale, followed by
the per-channel affine (Mul, Add) and LeakyRelu. Why this pattern:

* ``GroupNormalization(num_groups=1)`` is wrong in TensorRT 10.16 (computed per channel, NVIDIA
  TensorRT issue 4756), and opset-21 GroupNormalization is not implemented in onnxruntime.
* torch's default export of ``group_norm`` is Reshape + ``InstanceNormalization`` over one row of
  C*H*W elements, and of ``layer_norm`` a LayerNormalization whose scale is ones Expand-ed to the
  full (C,H,W) shape. Measured here (onnxruntime 1.32, CPU) on one (1, 512, 64, 128) row against
  fp64: both give 4.4e-4 max error, while LayerNormalization with a broadcast scale of shape [1]
  gives 2.4e-7, as accurate as torch (1.1e-7). A hand-written ReduceMean two-pass form gives 5e-5.
  The fp32 row accumulation in those paths is where a full-width CRN's ONNX error comes from.
  So after export every LayerNormalization gets a [1]-shaped unit scale and zero bias (valid ONNX:
  scale and bias broadcast), and the Expand that fed them is removed. TensorRT imports the node as
  an INormalizationLayer, which the TensorRT builder keeps in fp32 under reduced precision.

The area pyramid exports as AveragePool(2, stride 2) and the upsample as Resize(linear,
align_corners), both driven by runtime shapes, so any multiple of the model's stride works.
"""
from __future__ import annotations

import copy
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from crn_fast.kernels import REFERENCE_OPS

INPUT_NAME, OUTPUT_NAME = "layout", "images"
DEFAULT_OPSET = 18  # LayerNormalization needs >= 17


def _layer_norm_lrelu_onnx(x, weight, bias, eps, slope):
    y = F.layer_norm(x, x.shape[1:], eps=eps)
    return F.leaky_relu(y * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1), slope)


ONNX_OPS = types.SimpleNamespace(name="onnx", layer_norm_lrelu=_layer_norm_lrelu_onnx,
                                 upsample_concat=REFERENCE_OPS.upsample_concat)


def export_onnx(model, path: str | Path, example_size: tuple[int, int], opset: int = DEFAULT_OPSET,
                max_batch: int = 64, max_size: tuple[int, int] | None = None) -> Path:
    """Export ``model`` (fp32) to ``path`` with dynamic batch and spatial size."""
    from torch.export import Dim
    if opset < 17:
        raise ValueError(f"--opset {opset}: LayerNormalization needs opset 17 or later")
    m = copy.deepcopy(model).float().cpu().eval().use_ops(ONNX_OPS)
    cfg = m.config
    s = cfg.stride
    hmax, wmax = max_size or (max(example_size[0], 4096), max(example_size[1], 8192))
    batch = Dim("batch", min=1, max=max_batch)
    h, w = Dim("h", min=1, max=max(1, hmax // s)), Dim("w", min=1, max=max(1, wmax // s))
    example = torch.zeros(2, cfg.num_classes, *example_size)
    example[:, -1] = 1
    with torch.no_grad():
        program = torch.onnx.export(m, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], verbose=False,
                                    dynamic_shapes={"layout": {0: batch, 2: s * h, 3: s * w}})
    import onnx
    proto = _broadcast_unit_scales(program.model_proto)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return Path(path)


def _broadcast_unit_scales(proto):
    """Give every LayerNormalization a [1]-shaped scale of 1 and bias of 0 (the affine is applied
    per channel after it), then drop the nodes that only fed the old full-size scale."""
    from onnx import numpy_helper
    import numpy as np
    g = proto.graph
    g.initializer.extend([numpy_helper.from_array(np.ones(1, np.float32), "crn_unit_scale"),
                          numpy_helper.from_array(np.zeros(1, np.float32), "crn_zero_bias")])
    for node in g.node:
        if node.op_type == "LayerNormalization":
            del node.input[1:]
            node.input.extend(["crn_unit_scale", "crn_zero_bias"])
    keep = {o.name for o in g.output}
    changed = True
    while changed:  # remove nodes whose outputs nobody reads
        used = keep | {i for n in g.node for i in n.input}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        changed = bool(dead)
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return proto


def onnxruntime_providers(device: str = "cpu") -> list[str]:
    import onnxruntime as ort
    have = ort.get_available_providers()
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in have:
            raise RuntimeError("onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class ONNXGenerator:
    """Runs an exported model in onnxruntime; called like the eager generator (torch in, torch out)."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=onnxruntime_providers(device))

    def __call__(self, layout: torch.Tensor) -> torch.Tensor:
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: layout.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out)
