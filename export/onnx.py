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
* onnxruntime runs the broadcast scale from 1.24 on. 1.23 and older (1.23 is the last for Python
  3.10) refuse it, and neither their full-scale LayerNormalization (2.2e-2 off on one (512, 64, 128)
  row of mean 5 and std 3) nor two ReduceMean passes in fp32 (5e-4; 4.4 at mean 1e4) is accurate
  there. ``ONNXGenerator`` runs those versions on an in-memory copy whose layer norms take their
  two passes in fp64 (``fp64_layer_norms``: 2.4e-7 on all three); the file stays as exported.

The area pyramid exports as AveragePool(2, stride 2) and the upsample as Resize(linear,
align_corners), both driven by runtime shapes, so any multiple of the model's stride works.

Mixed precision (``dtype="fp16"`` or ``"bf16"``) is written into the graph itself, so the same
file serves onnxruntime's CUDA provider and a strongly typed TensorRT network:

* the input is fp32 and is Cast to fp16/bf16 once; every Conv, AveragePool, Resize, Concat and
  LeakyRelu, and every conv weight, is fp16/bf16;
* each layer norm runs in fp32: Cast up, LayerNormalization (the accurate pattern above), the
  per-channel affine with fp32 gamma/beta, Cast down;
* the head conv's output is Cast to fp32 before ``(x + 1) / 2 * 255``, so callers receive fp32 on
  the 0..255 scale (bf16 would round it to steps of 1 there).

bf16 Conv and AveragePool need opset 22; fp16 works from opset 17.
"""
from __future__ import annotations

import copy
import re
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from crn_fast.errors import CRNError, need_file
from crn_fast.kernels import REFERENCE_OPS

from .compile import quiet_torch_export

INPUT_NAME, OUTPUT_NAME = "layout", "images"
MIN_OPSET = {"fp32": 17, "fp16": 17, "bf16": 22}  # LayerNormalization: 17; bf16 Conv/AveragePool: 22
DEFAULT_OPSET = {"fp32": 18, "fp16": 18, "bf16": 22}


def _layer_norm_lrelu_onnx(x, weight, bias, eps, slope):
    """LayerNormalization over (C,H,W) in fp32 (Cast up and down around it when x is fp16/bf16),
    then the per-channel affine in fp32 and LeakyRelu in x's dtype."""
    y = F.layer_norm(x.float(), x.shape[1:], eps=eps)
    y = y * weight.float().view(1, -1, 1, 1) + bias.float().view(1, -1, 1, 1)
    return F.leaky_relu(y.to(x.dtype), slope)


ONNX_OPS = types.SimpleNamespace(name="onnx", layer_norm_lrelu=_layer_norm_lrelu_onnx,
                                 upsample_concat=REFERENCE_OPS.upsample_concat,
                                 area_pyramid=REFERENCE_OPS.area_pyramid)


class _HeadToFloat(torch.nn.Module):
    """The head conv in the graph's precision, its output Cast to fp32 (before the 0..255 scaling)."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x).float()


def check_opset(opset: int, dtype: str = "fp32") -> None:
    from crn_fast.errors import CRNError
    if opset < MIN_OPSET[dtype]:
        why = "LayerNormalization" if MIN_OPSET[dtype] == 17 else "bf16 Conv and AveragePool"
        raise CRNError(f"--opset {opset}: {dtype} ONNX models need opset {MIN_OPSET[dtype]} or later ({why}); "
                       f"the default is {DEFAULT_OPSET[dtype]}")
    highest = highest_opset()
    if highest is not None and opset > highest:
        raise CRNError(f"--opset {opset}: the onnx package here knows opsets up to {highest} (valid: "
                       f"{MIN_OPSET[dtype]}-{highest}); the default is {DEFAULT_OPSET[dtype]}")


def highest_opset() -> int | None:
    """The newest default-domain opset the installed onnx package defines (None: onnx not installed)."""
    try:
        import onnx
    except ImportError:
        return None
    return onnx.defs.onnx_opset_version()


def model_opset(proto) -> int:
    """The default-domain opset an ONNX model declares."""
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def onnx_model_for_export(model, dtype: str = "fp32"):
    """A CPU copy of ``model`` that exports the graph described in the module docstring."""
    from crn_fast.constants import DTYPES
    m = copy.deepcopy(model).cpu().eval().use_ops(ONNX_OPS).to(memory_format=torch.contiguous_format)
    m = m.to(DTYPES[dtype])
    if dtype != "fp32":
        for module in m.refine:  # gamma/beta stay fp32: the affine runs with the fp32 layer norm
            module.norm1.float()
            module.norm2.float()
        m.head = _HeadToFloat(m.head)
    return m


def export_onnx(model, path: str | Path, example_size: tuple[int, int], opset: int | None = None,
                max_batch: int = 64, max_size: tuple[int, int] | None = None, dtype: str = "fp32") -> Path:
    """Export ``model`` to ``path`` with dynamic batch and spatial size, in fp32 or mixed precision
    (``dtype`` fp16/bf16: fp32 input, output and layer norms; everything else fp16/bf16)."""
    from torch.export import Dim
    opset = opset or DEFAULT_OPSET[dtype]
    check_opset(opset, dtype)
    cfg = model.config
    example_size = cfg.input_size(example_size, "example_size")
    max_size = None if max_size is None else cfg.input_size(max_size, "max_size")
    m = onnx_model_for_export(model, dtype)
    s = cfg.stride
    # traced at 2 strides or more a side: at one stride the coarsest level is 1 pixel high or wide,
    # a size torch.export specialises (the graph would then hold for that size only); the model
    # exported runs at any multiple of the stride, one included (verify() checks the sizes asked for)
    trace = (max(example_size[0], 2 * s), max(example_size[1], 2 * s))
    hmax, wmax = max_size or (max(trace[0], 4096), max(trace[1], 8192))
    batch = Dim("batch", min=1, max=max_batch)
    h, w = Dim("h", min=1, max=max(2, hmax // s)), Dim("w", min=1, max=max(2, wmax // s))
    example = torch.zeros(2, cfg.num_classes, *trace)
    example[:, -1] = 1
    with torch.no_grad(), quiet_torch_export():
        program = torch.onnx.export(m, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], verbose=False,
                                    dynamic_shapes={"layout": {0: batch, 2: s * h, 3: s * w}})
    import onnx
    from crn_fast.errors import CRNError
    if model_opset(program.model_proto) != opset:  # the exporter falls back to its own opset with a warning
        raise CRNError(f"--opset {opset}: the exporter wrote opset {model_opset(program.model_proto)} instead (its "
                       f"version conversion failed; the default is {DEFAULT_OPSET[dtype]})")
    proto = _broadcast_unit_scales(program.model_proto)
    proto.metadata_props.add(key="crn_fast.dtype", value=dtype)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return Path(path)


def onnx_dtype(path: str | Path) -> str:
    """The precision crn_fast exported an ONNX model in (fp32 for models without the mark)."""
    import onnx
    proto = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in proto.metadata_props if p.key == "crn_fast.dtype"), "fp32")


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


ORT_BROADCAST_SCALE = (1, 24)  # the first onnxruntime whose LayerNormalization broadcasts its scale


def ort_runs_broadcast_scale(version: str) -> bool:
    """Whether an onnxruntime of this version runs crn_fast's LayerNormalization as exported."""
    return tuple(int(v) for v in re.findall(r"\d+", version)[:2]) >= ORT_BROADCAST_SCALE


def fp64_layer_norms(proto):
    """``proto`` with each of crn_fast's layer norms (a LayerNormalization of its unit scale and zero
    bias, over (C,H,W) of an fp32 (N,C,H,W) tensor) as Cast to fp64, mean = ReduceMean, d = x - mean,
    d / Sqrt(ReduceMean(d * d) + eps), Cast to fp32: for onnxruntime before 1.24 (module docstring)."""
    from onnx import TensorProto, helper, numpy_helper
    g = proto.graph
    opset = model_opset(proto)
    nodes, added = [], set()
    for n in g.node:
        if n.op_type != "LayerNormalization" or n.input[1:] != ["crn_unit_scale", "crn_zero_bias"] or \
                any(n.output[1:]):
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        axis = attrs.get("axis", -1) % 4  # crn_fast's layer norms take 4-d (N,C,H,W) input
        axes = list(range(axis, 4))
        eps_name, axes_name = f"crn_ln_eps_{attrs.get('epsilon', 1e-5)!r}", f"crn_ln_axes_{axis}"
        if eps_name not in added:
            g.initializer.append(numpy_helper.from_array(np.array(attrs.get("epsilon", 1e-5), np.float64), eps_name))
            added.add(eps_name)
        if opset >= 18 and axes_name not in added:  # ReduceMean's axes: an input from opset 18, before an attribute
            g.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), axes_name))
            added.add(axes_name)

        def mean(x, out):
            if opset >= 18:
                return helper.make_node("ReduceMean", [x, axes_name], [out], keepdims=1)
            return helper.make_node("ReduceMean", [x], [out], axes=axes, keepdims=1)
        v = f"{n.output[0]}_fp64_"
        nodes += [helper.make_node("Cast", [n.input[0]], [v + "x"], to=TensorProto.DOUBLE), mean(v + "x", v + "mean"),
                  helper.make_node("Sub", [v + "x", v + "mean"], [v + "d"]),
                  helper.make_node("Mul", [v + "d", v + "d"], [v + "d2"]), mean(v + "d2", v + "var"),
                  helper.make_node("Add", [v + "var", eps_name], [v + "var_eps"]),
                  helper.make_node("Sqrt", [v + "var_eps"], [v + "std"]),
                  helper.make_node("Div", [v + "d", v + "std"], [v + "y"]),
                  helper.make_node("Cast", [v + "y"], [n.output[0]], to=TensorProto.FLOAT)]
    del g.node[:]
    g.node.extend(nodes)
    return proto


def onnxruntime_providers(device: str = "cpu") -> list:
    """onnxruntime's providers for a torch device: "cuda:1" runs on GPU 1, and "cuda" on torch's
    current GPU (a torchrun rank's own), not on onnxruntime's default GPU 0."""
    import onnxruntime as ort
    have = ort.get_available_providers()
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in have:
            raise RuntimeError("onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu)")
        index = torch.device(device).index
        if index is None:  # "cuda": torch's current GPU (under torchrun, the rank's own)
            index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class ONNXGenerator:
    """Runs an exported model; called like the eager generator (torch in, torch out).

    runtime: "onnxruntime" (CPU, or CUDA with ``device="cuda"`` and onnxruntime-gpu),
    "reference" (``onnx.reference``: pure numpy, slow, for small sizes only) or "auto":
    onnxruntime where it implements every node, else the reference evaluator. onnxruntime's CPU
    provider has no bf16 Conv/AveragePool, so bf16 models take the reference path on CPU.
    """

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, runtime: str = "auto"):
        if runtime not in ("auto", "onnxruntime", "reference"):
            raise ValueError(f"runtime {runtime!r}: valid: auto, onnxruntime, reference")
        need_file(path, "an ONNX model (.onnx)")
        self.path, self.session, self.evaluator = Path(path), None, None
        if runtime != "reference":
            import onnxruntime as ort
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if threads:
                opts.intra_op_num_threads = threads
            model = str(path)
            if not ort_runs_broadcast_scale(ort.__version__):
                import onnx
                model = fp64_layer_norms(onnx.load(model)).SerializeToString()
            try:
                self.session = ort.InferenceSession(model, opts, providers=onnxruntime_providers(device))
            except Exception as e:  # onnxruntime's NOT_IMPLEMENTED (a type without a kernel) and friends
                if "INVALID_PROTOBUF" in str(e):  # a file of another kind
                    raise CRNError(f"{path} is not an ONNX model (onnxruntime cannot parse it)") from None
                if runtime == "onnxruntime" or "NOT_IMPLEMENTED" not in str(e):
                    raise
        if self.session is None:
            import onnx
            from onnx.reference import ReferenceEvaluator
            self.evaluator = ReferenceEvaluator(onnx.load(str(path)))
        self.runtime = "onnxruntime" if self.session is not None else "onnx.reference"

    def __call__(self, layout: torch.Tensor) -> torch.Tensor:
        """(N, classes, H, W) -> (N, 3k, H, W) float32, on the layout's device where the session runs
        there (CUDA with the CUDA provider), else on the CPU."""
        if self.session is None:
            x = layout.detach().float().cpu().contiguous().numpy()
            return torch.from_numpy(self.evaluator.run([OUTPUT_NAME], {INPUT_NAME: x})[0].astype("float32", copy=False))
        return self._run_bound(layout)

    def _run_bound(self, layout: torch.Tensor) -> torch.Tensor:
        """onnxruntime reads the input and writes the output in torch's memory (IO binding), so a CUDA
        layout with the CUDA provider never crosses to the host: without it, a 1024x2048 one-hot
        (168 MB in fp32) went to the host and back to the GPU, and the images to the host, each call.
        On the CPU it saves the output's copy. The output's channels are the model's static 3k."""
        x = layout.detach().to(torch.float32)
        if x.is_cuda and "CUDAExecutionProvider" not in self.session.get_providers():
            x = x.cpu()
        x = x.contiguous()
        channels = self.session.get_outputs()[0].shape[1]
        if not isinstance(channels, int):  # pragma: no cover (crn_fast's exports fix it)
            raise RuntimeError(f"{self.path}: its output's channel count is not static ({channels!r})")
        y = torch.empty((x.shape[0], channels, *x.shape[2:]), dtype=torch.float32, device=x.device)
        index = x.device.index if x.device.index is not None else 0
        binding = self.session.io_binding()
        binding.bind_input(INPUT_NAME, x.device.type, index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(OUTPUT_NAME, y.device.type, index, np.float32, tuple(y.shape), y.data_ptr())
        if x.is_cuda:  # onnxruntime runs on its own stream: torch's writes to the layout come first
            torch.cuda.current_stream(x.device).synchronize()
        self.session.run_with_iobinding(binding)  # returns with the output written (the provider synchronizes)
        return y
