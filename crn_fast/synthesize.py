"""crn-synthesize: layouts in, photographs out.

    crn-synthesize --ckpt model.ckpt --labels FILE_OR_DIR --out DIR   (also python -m crn_fast.synthesize)

Labels are read like training labels: Cityscapes colour PNGs (the authors' format), palette PNGs,
greyscale train-id PNGs, or Cityscapes *_labelIds.png. One PNG per layout; with k > 1 the k images
side by side. Values are clipped to 0..255.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .config import parse_resolution
from .data import decode_label, label_files, resize_pair
from .errors import CRNError
from .images import output_row, save_png
from .labels import one_hot


def _label_kind(path: Path) -> str:
    return "label_ids" if path.name.endswith("_labelIds.png") else \
        "train_ids" if path.name.endswith("_labelTrainIds.png") else "auto"


def load_generator_for(args, device):
    if args.backend == "tensorrt":
        if not args.engine:
            raise CRNError("--backend tensorrt needs --engine PATH (build one with crn-export --trt)")
        from crn_fast.export.tensorrt import TensorRTGenerator
        gen = TensorRTGenerator(args.engine)
        if gen.config is None:
            raise CRNError(f"{args.engine}.json (the sidecar crn-export writes beside the engine) is missing or "
                           f"unreadable: it holds the model config synthesis needs")
        return gen
    if not args.ckpt:
        raise CRNError("--ckpt is required (a crn_fast generator file; convert TF checkpoints with crn-convert-tf)")
    from .checkpoint import load_generator
    return load_generator(args.ckpt, backend=args.backend, device=device)


def synthesize(args) -> list[Path]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_generator_for(args, device)
    config = model.config
    size = parse_resolution(args.resolution) if args.resolution else None
    files = label_files(Path(args.labels))
    items = []
    for f in files:
        ids, _ = resize_pair(decode_label(f, _label_kind(f), args.unknown_colors), None, size)
        try:
            config.validate_input_size(*ids.shape)
        except CRNError as e:
            raise CRNError(f"{f}: {e} Pass --resolution to resize the layouts.") from None
        items.append((f, ids))
    out_dir = Path(args.out)
    written = []
    for start in range(0, len(items), args.batch_size):
        chunk = items[start:start + args.batch_size]
        by_shape: dict[tuple, list] = {}
        for f, ids in chunk:
            by_shape.setdefault(ids.shape, []).append((f, ids))
        for group in by_shape.values():
            ids = torch.from_numpy(np.stack([g[1] for g in group]).astype(np.int64)).to(device)
            with torch.inference_mode():
                out = model(one_hot(ids, config.num_classes))
            for (f, _), o in zip(group, out):
                written.append(save_png(output_row(o), out_dir / f"{f.stem}.png"))
    return written


def build_parser():
    ap = argparse.ArgumentParser(prog="crn-synthesize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="crn_fast generator file (model.ckpt)")
    ap.add_argument("--labels", required=True, help="a label PNG or a folder of them")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--backend", default="eager", choices=("eager", "triton", "tensorrt"))
    ap.add_argument("--engine", help="TensorRT engine (with --backend tensorrt)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--resolution", default=None, help="resize layouts to HxW (nearest neighbour) first")
    ap.add_argument("--unknown-colors", default="error", choices=("error", "void"),
                    help="label colours outside the Cityscapes table: error, or void (the authors' rule)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = synthesize(args)
    except CRNError as e:
        print(f"crn-synthesize: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} image(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
