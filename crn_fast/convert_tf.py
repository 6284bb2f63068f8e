"""crn-convert-tf: the authors' released TensorFlow checkpoints -> a crn_fast generator file.

    crn-convert-tf PATH/model.ckpt OUT.ckpt        (also: python -m crn_fast.convert_tf)

The architecture (heights, widths, num_classes, k) is inferred from the variable shapes, so
checkpoints with other width schedules convert too. Adam slots and beta*_power are skipped.
"""
from __future__ import annotations

import argparse
import re
import sys

import numpy as np
import torch

from .config import CRNConfig
from .errors import CheckpointError, CRNError, UsageError
from .tf_checkpoint import TFCheckpoint

_GEN = re.compile(r"^g_(\d+)_conv(1|2|100)/(weights|biases|LayerNorm/gamma|LayerNorm/beta)$")
_SKIP = re.compile(r"(^beta[12]_power$)|(/Adam(_\d+)?$)")


def head_permutation(k: int) -> list[int]:
    """crn_fast channel 3i+c (image i, colour c) <- the authors' channel c*k+i (colour-major)."""
    return [c * k + i for i in range(k) for c in range(3)]


def generator_variables(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """The generator's variables; raises on variables that are neither generator nor optimizer state."""
    gen, unknown = {}, []
    for name, shape in shapes.items():
        if _SKIP.search(name):
            continue
        if _GEN.match(name):
            gen[name] = shape
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"unknown variables in the checkpoint (not a CRN generator?): {sorted(unknown)[:5]}")
    if not gen:
        raise CheckpointError("the checkpoint holds no generator variables (g_{height}_conv{1,2}/weights)")
    return gen


def infer_config(shapes: dict[str, tuple], name: str = "converted") -> CRNConfig:
    """The CRNConfig of a TF checkpoint, from its generator variable shapes alone."""
    gen = generator_variables(shapes)
    heights = sorted({int(_GEN.match(n).group(1)) for n in gen if "conv1/" in n})
    for a, b in zip(heights, heights[1:]):
        if b != 2 * a:
            raise CheckpointError(f"module heights {heights} do not double from one module to the next")
    widths, num_classes = [], None
    for i, h in enumerate(heights):
        for j in (1, 2):
            for v in ("weights", "LayerNorm/gamma", "LayerNorm/beta"):
                if f"g_{h}_conv{j}/{v}" not in gen:
                    raise CheckpointError(f"variable g_{h}_conv{j}/{v} is missing")
        w1 = gen[f"g_{h}_conv1/weights"]
        width = w1[3]
        if i == 0:
            num_classes = w1[2]
        elif w1[2] != widths[-1] + num_classes:
            raise CheckpointError(f"g_{h}_conv1/weights takes {w1[2]} channels, expected {widths[-1]} features + "
                                  f"{num_classes} layout channels")
        if gen[f"g_{h}_conv2/weights"] != (3, 3, width, width):
            raise CheckpointError(f"g_{h}_conv2/weights has shape {gen[f'g_{h}_conv2/weights']}, "
                                  f"expected {(3, 3, width, width)}")
        widths.append(width)
    top = heights[-1]
    head = gen.get(f"g_{top}_conv100/weights")
    if head is None or f"g_{top}_conv100/biases" not in gen:
        raise CheckpointError(f"the head g_{top}_conv100/{{weights,biases}} is missing")
    if head[2] != widths[-1] or head[3] % 3:
        raise CheckpointError(f"head g_{top}_conv100/weights has shape {head}; expected (1, 1, {widths[-1]}, 3k)")
    extra = set(gen) - {f"g_{h}_conv{j}/{v}" for h in heights for j in (1, 2)
                        for v in ("weights", "LayerNorm/gamma", "LayerNorm/beta")} \
        - {f"g_{top}_conv100/weights", f"g_{top}_conv100/biases"}
    if extra:
        raise CheckpointError(f"unknown generator variables: {sorted(extra)[:5]}")
    return CRNConfig(widths=tuple(widths), num_classes=num_classes, k=head[3] // 3,
                     base_size=(heights[0], 2 * heights[0]), name=name)


def tf_to_state_dict(ckpt: TFCheckpoint, config: CRNConfig) -> dict[str, torch.Tensor]:
    def t(name):
        return torch.from_numpy(np.ascontiguousarray(ckpt.read(name))).float()

    state = {}
    for i, h in enumerate(config.heights):
        for j in (1, 2):
            state[f"refine.{i}.conv{j}.weight"] = t(f"g_{h}_conv{j}/weights").permute(3, 2, 0, 1).contiguous()
            state[f"refine.{i}.norm{j}.weight"] = t(f"g_{h}_conv{j}/LayerNorm/gamma")
            state[f"refine.{i}.norm{j}.bias"] = t(f"g_{h}_conv{j}/LayerNorm/beta")
    top, perm = config.heights[-1], head_permutation(config.k)
    state["head.weight"] = t(f"g_{top}_conv100/weights").permute(3, 2, 0, 1)[perm].contiguous()
    state["head.bias"] = t(f"g_{top}_conv100/biases")[perm].contiguous()
    return state


def read_tf_generator(src, name: str | None = None) -> tuple[CRNConfig, dict[str, torch.Tensor], dict]:
    """(config, state_dict, extra) of the generator in TF checkpoint ``src`` (its prefix, its
    .index or a data shard), as checkpoint.read_generator_file gives them for a crn_fast file: the
    architecture inferred from the variable shapes, every needed shard checked before a tensor is
    read. ``name``: the config's name (default: the checkpoint's folder, e.g. "512p")."""
    ckpt = TFCheckpoint(src)
    config = infer_config(ckpt.shapes(), name or ckpt.prefix.resolve().parent.name or "converted")
    ckpt.check_shards(list(generator_variables(ckpt.shapes())))
    return config, tf_to_state_dict(ckpt, config), {"converted_from": str(ckpt.prefix)}


def convert(src, dst, name: str | None = None, classes=None):
    """Convert TF checkpoint ``src`` (prefix) to crn_fast file ``dst``; nothing is written on error.
    ``classes`` (a labels.ClassSet): what its layout channels mean, if not Cityscapes'."""
    from .checkpoint import save_generator
    from .model import CRN
    config, state, extra = read_tf_generator(src, name)
    if classes is not None:
        if classes.layout_channels != config.num_classes:
            raise UsageError(f"--classes {classes.describe()} makes {classes.layout_channels} layout channels, but "
                             f"{src} takes {config.num_classes}")
        config = config.with_classes(classes)
    model = CRN(config)
    model.load_state_dict(state, strict=True)
    save_generator(model, dst, extra=extra)
    return model


def main(argv=None) -> int:
    from pathlib import Path
    from .cli import add_logging_options, log, run_tool, setup_logging
    ap = argparse.ArgumentParser(prog="crn-convert-tf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="TF checkpoint prefix, e.g. models/512p/model.ckpt (or its .index file, "
                    "or its folder)")
    ap.add_argument("out", help="output crn_fast generator file, e.g. 512p.ckpt")
    ap.add_argument("--name", default=None, help="config name stored in the file (default: the folder name)")
    ap.add_argument("--classes", default=None,
                    help="what the layout channels mean, if not Cityscapes' (the authors' models): a class count or "
                         "a JSON classes file, as crn-train's --classes; kept in the file for every tool")
    add_logging_options(ap)
    args = ap.parse_args(argv)
    setup_logging(args)
    if Path(args.out).is_dir():
        ap.error(f"output {args.out} is a folder; give a file name, e.g. {Path(args.out) / 'model.ckpt'}")
    from .tf_checkpoint import _checkpoint_prefix
    prefix, out = _checkpoint_prefix(args.checkpoint).resolve(), Path(args.out).resolve()
    if out.parent == prefix.parent and (out.name == f"{prefix.name}.index" or
                                        out.name.startswith(f"{prefix.name}.data-")):
        ap.error(f"output {args.out} is a file of the TensorFlow checkpoint being converted; give another name, "
                 f"e.g. {Path(args.out).with_name(prefix.parent.name + '.ckpt')}")

    def run():
        from .checkpoint import remove_stale_temporaries
        remove_stale_temporaries(Path(args.out).parent, Path(args.out).name)  # left by a killed conversion
        from .labels import read_classes
        try:
            classes = read_classes(args.classes) if args.classes is not None else None
        except CRNError as e:
            raise UsageError(str(e)) from None
        c = convert(args.checkpoint, args.out, args.name, classes).config
        log.info(f"wrote {args.out}: {c.num_modules} modules, widths {list(c.widths)}, {c.num_classes} layout "
                 f"channels ({c.class_set.describe()}), k={c.k}, nominal {c.resolution[0]}x{c.resolution[1]}")
    return run_tool("crn-convert-tf", run)


if __name__ == "__main__":
    sys.exit(main())
