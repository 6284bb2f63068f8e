"""crn-synthesize: layouts in, photographs out.

    crn-synthesize model.ckpt --labels FILE_OR_DIR --out DIR   (also: --ckpt model.ckpt; python -m crn_fast.synthesize)
    crn-synthesize --backend tensorrt --engine generator.engine --labels DIR --out DIR

Labels are read like training labels: Cityscapes colour PNGs (the authors' format), palette PNGs,
greyscale train-id PNGs, or Cityscapes *_labelIds.png. One PNG per layout, named after it; with
k > 1 the k images side by side. Values are clipped to 0..255.

A folder is streamed: a first pass reads only the file headers (sizes, and two labels that would
write the same output name), then layouts are decoded, synthesized and written one batch at a
time with a progress bar, so memory is bounded by --batch-size, not by the folder. An output that
holds NaN or inf stops the run naming its file. Exit status: 0 done, 1 runtime error, 2 usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .cli import Progress, add_logging_options, log, positive_int, resolution, run_tool, setup_logging, torch_device
from .data import _open_header, decode_label, label_files, resize_pair
from .errors import CRNError, UsageError
from .images import output_row, save_png
from .labels import one_hot


def _label_kind(path: Path) -> str:
    return "label_ids" if path.name.endswith("_labelIds.png") else \
        "train_ids" if path.name.endswith("_labelTrainIds.png") else "auto"


def load_generator_for(args, device):
    if args.backend == "tensorrt":
        if not args.engine:
            raise UsageError("--backend tensorrt needs --engine PATH (build one with crn-export --trt)")
        from crn_fast.export.tensorrt import TensorRTGenerator
        gen = TensorRTGenerator(args.engine)
        if gen.config is None:
            raise CRNError(f"{args.engine}.json (the sidecar crn-export writes beside the engine) is missing or "
                           f"unreadable: it holds the model config synthesis needs")
        return gen
    from .checkpoint import load_generator
    from .model import choose_backend
    backend = choose_backend(args.backend, device)
    if backend != "triton" and (args.fused_conv != "off" or args.fused_head):
        flag = f"--fused-conv {args.fused_conv}" if args.fused_conv != "off" else "--fused-head"
        raise UsageError(f"{flag} needs the triton backend (its kernels are Triton's), but --backend auto chose "
                         f"eager on {device}: Triton kernels run on CUDA devices (--device cuda)")
    model = load_generator(args.ckpt, backend=backend, device=device)
    if args.fused_conv != "off":  # before any capture: "auto" measures at the first batch of each size
        model.fused_conv = True if args.fused_conv == "on" else args.fused_conv
    model.fused_head = args.fused_head
    if args.cuda_graph:
        if device.type != "cuda":
            raise UsageError("--cuda-graph needs a CUDA device (--device cuda)")
        from crn_fast.export import cuda_graph
        runner = cuda_graph(model)
        runner.config = model.config
        return runner
    return model


def plan(files: list[Path], config, size) -> list[tuple[Path, tuple[int, int]]]:
    """The cheap first pass: each file's header (readable, its size after --res) and unique output
    names. Nothing is decoded or kept but (path, size)."""
    by_name: dict[str, Path] = {}
    out = []
    if size:
        try:
            config.validate_input_size(*size)
        except CRNError as e:
            raise UsageError(f"--res {size[0]}x{size[1]}: {e}") from None
    for f in files:
        name = f"{f.stem}.png"
        if name in by_name:
            raise UsageError(f"{by_name[name]} and {f} would both be written as {name}; rename one or synthesize "
                             f"them into different --out folders")
        by_name[name] = f
        hw = size or _open_header(f)
        try:
            config.validate_input_size(*hw)
        except CRNError as e:
            raise UsageError(f"{f}: {e} Pass --res to resize the layouts, e.g. --res "
                             f"{'x'.join(map(str, config.nearest_valid_size(*hw)))}.") from None
        out.append((f, tuple(hw)))
    return out


def synthesize(args) -> list[Path]:
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    files = label_files(Path(args.labels))
    model = load_generator_for(args, device)
    config = model.config
    todo = plan(files, config, args.res)
    out_dir = Path(args.out)
    from .checkpoint import remove_stale_temporaries
    for f in remove_stale_temporaries(out_dir, "*.png"):
        log.info(f"removed {f} (left by an interrupted crn-synthesize)")
    written = []
    bar = Progress(len(todo), "synthesize", "image", enabled=args.progress and len(todo) > 1)
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start:start + args.batch_size]
        by_shape: dict[tuple, list] = {}
        for f, hw in chunk:
            by_shape.setdefault(hw, []).append(f)
        for hw, group in by_shape.items():
            ids = [resize_pair(decode_label(f, _label_kind(f), args.unknown_colors), None, args.res)[0] for f in group]
            ids = torch.from_numpy(np.stack(ids).astype(np.int64)).to(device)
            with torch.inference_mode():
                out = model(one_hot(ids, config.num_classes))
            for f, o in zip(group, out):
                if not torch.isfinite(o).all():
                    raise CRNError(f"{f}: the generator's output holds NaN or inf (are the weights finite?); "
                                   f"stopped after {len(written)} image(s)")
                written.append(save_png(output_row(o), out_dir / f"{f.stem}.png"))
        bar.update(len(chunk))
    bar.close()
    return written


def build_parser():
    ap = argparse.ArgumentParser(prog="crn-synthesize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", default=None, help="crn_fast generator file (model.ckpt)")
    ap.add_argument("--ckpt", default=None, help="the same, as an option")
    ap.add_argument("--labels", required=True, help="a label PNG or a folder of them")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--backend", default="auto", choices=("auto", "eager", "triton", "tensorrt"),
                    help="auto: triton on a CUDA device, eager elsewhere (default); tensorrt needs --engine")
    ap.add_argument("--engine", help="TensorRT engine (with --backend tensorrt)")
    ap.add_argument("--cuda-graph", action="store_true", help="replay the whole generator as a CUDA graph (GPU)")
    ap.add_argument("--fused-conv", default="off", choices=("off", "on", "split", "lowres", "auto"),
                    help="with --backend triton: the convs as Triton kernels with the layer norms folded in, in "
                         "every module (on: conv2 normalises its input as it loads it; split: one apply pass "
                         "between the convs instead), conv1 of modules 1.. with its feature weights applied "
                         "before the upsampling (lowres), or per module whichever of cuDNN, on, split and lowres "
                         "measured fastest at the first batch of each size (auto); default off")
    ap.add_argument("--fused-head", action="store_true",
                    help="with --backend triton: the last layer norm, the 1x1 head and its 0..255 scaling as one "
                         "Triton kernel (default off: not yet measured faster on a GPU)")
    ap.add_argument("--device", type=torch_device, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    ap.add_argument("--batch-size", "--batch", dest="batch_size", type=positive_int, default=1,
                    help="layouts per forward pass (default 1)")
    ap.add_argument("--res", "--resolution", dest="res", type=resolution, default=None,
                    help="resize layouts to HxW (nearest neighbour) first")
    ap.add_argument("--unknown-colors", default="error", choices=("error", "void"),
                    help="label colours outside the Cityscapes table: error, or void (the authors' rule)")
    ap.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no progress report (a bar on a terminal; in a log file or pipe, a line every 30 s)")
    add_logging_options(ap)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.checkpoint and args.ckpt and args.checkpoint != args.ckpt:
        ap.error(f"two checkpoints given ({args.checkpoint} and --ckpt {args.ckpt}): give one")
    args.ckpt = args.ckpt or args.checkpoint
    if args.fused_conv != "off" and args.backend not in ("triton", "auto"):
        ap.error(f"--fused-conv {args.fused_conv} needs --backend triton (the fused conv is a Triton kernel), "
                 f"got --backend {args.backend}")
    if args.fused_head and args.backend not in ("triton", "auto"):
        ap.error(f"--fused-head needs --backend triton (the fused head is a Triton kernel), "
                 f"got --backend {args.backend}")
    if not args.ckpt and args.backend != "tensorrt":
        ap.error("a checkpoint is required: crn-synthesize model.ckpt ... (convert TF checkpoints with crn-convert-tf)")
    setup_logging(args)

    def run():
        written = synthesize(args)
        log.info(f"wrote {len(written)} image(s) to {args.out}")
    return run_tool("crn-synthesize", run)


if __name__ == "__main__":
    sys.exit(main())
