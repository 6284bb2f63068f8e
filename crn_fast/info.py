"""crn-info: what a crn_fast file or folder is and holds, read without building a model.

    crn-info runs/demo                     # a training run: its step, model, data, last metrics, how to resume it
    crn-info runs/demo/model.ckpt          # a generator: its model, classes, weights and step
    crn-info exported/generator.onnx       # an export (.onnx, .pt2, .engine): its sidecar, verification included
    crn-info exported                      # every export in the folder
    crn-info models/1024p/model.ckpt       # the authors' TF checkpoint: the generator it converts to
    crn-info classes.json                  # a classes file, checked as crn-train --classes reads it
    crn-info model.ckpt --classes          # ... and the table of classes: channel, name, id, colour
    crn-info model.ckpt --write-classes my.json   # its classes as a file for --classes (a new run, crn-convert-tf)
    crn-info PATH --json                   # all of it as one JSON object, for scripts

Only headers are read: a generator's weights are counted from its safetensors header, a training
state is opened memory-mapped. Exit status: 0 read, 1 not readable or not a crn_fast file,
2 usage error.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import atomic_path, read_generator_file, state_dict_mismatch
from .config import CRNConfig
from .errors import CheckpointError, CRNError, UsageError, absent
from .labels import ClassSet, describe_ids, read_classes
from crn_fast.export.sidecar import EXPORTED, read_sidecar, sidecar_config

EXPORT_SUFFIXES = tuple(EXPORTED)
EXPORT_FORMATS = {"onnx": "ONNX", "aotinductor": "AOTInductor package", "tensorrt": "TensorRT engine"}


@dataclass
class Found:
    """What crn-info read: ``info`` (JSON-ready, ``kind`` first) and the classes it holds, if any."""
    info: dict
    classes: ClassSet | None = None
    config: CRNConfig | None = None


# ----------------------------------------------------------------------------- reading
def inspect(path: str | Path, deep: bool = True) -> Found:
    """Read ``path`` as whichever crn_fast thing it is; CheckpointError naming what it is not. A
    folder that is none of them is read as the things in its subfolders (``deep``)."""
    from .tf_checkpoint import folder_checkpoints, is_tf_checkpoint
    p = Path(path)
    if is_tf_checkpoint(p):
        return _tf_checkpoint(p)
    if p.is_dir():
        if any((p / f).is_file() for f in ("model.ckpt", "train_state.pt", "config.json")):
            return _run(p)
        sidecars = sorted(s for s in p.glob("*.json") if s.name[:-5].endswith(EXPORT_SUFFIXES))
        if sidecars:
            return _export_folder(p, sidecars)
        several = folder_checkpoints(p)
        inside = [] if several or not deep else _inside(p)
        if inside:  # runs/ (every run), the authors' models/ (each checkpoint folder)
            return Found({"kind": "folder", "path": str(p), "entries": [f.info for f in inside]},
                         inside[0].classes if len(inside) == 1 else None)
        raise CheckpointError(f"{p} is a folder without a training run (model.ckpt, train_state.pt), exports "
                              "(generator.onnx, .pt2, .engine and their .json sidecars) or a TF checkpoint, "
                              "in it or in its subfolders" +
                              (f"; it holds {len(several)} TF checkpoints: give one prefix, "
                               f"{' or '.join(map(str, several))}" if several else ""))
    if p.name.endswith(EXPORT_SUFFIXES) or p.name[:-5].endswith(EXPORT_SUFFIXES) and p.suffix == ".json":
        if p.is_file() or p.with_name(p.name + ".json").is_file():  # an artefact, or the sidecar left of one
            return _export(p)
    if not p.is_file():
        raise CheckpointError(f"{p} {absent(p)}" if not p.exists() else f"{p} is not a file or folder")
    if p.suffix == ".json":
        return _json_file(p)
    import zipfile
    if zipfile.is_zipfile(p) or p.suffix == ".pt":  # what torch.save writes (or a cut copy of one)
        return _train_state_file(p)
    return _generator(p)


def _inside(p: Path) -> list[Found]:
    """What crn-info reads in ``p``'s subfolders (one level: runs/*, models/*); unreadable ones are
    left out here, as a listing should, and named when given themselves."""
    found = []
    for sub in sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")):
        try:
            found.append(inspect(sub, deep=False))
        except (CRNError, OSError):
            continue
    return found


def _model(config: CRNConfig) -> dict:
    h, w = config.resolution
    return {**config.to_dict(), "modules": config.num_modules, "resolution": [h, w], "stride": config.stride}


def _classes(classes: ClassSet) -> dict:
    return {"name": classes.name, "classes": classes.num_classes, "layout_channels": classes.layout_channels,
            "ids": describe_ids(classes.ids), "void_ids": describe_ids(classes.void_ids),
            "colors": "given" if classes.colors_given else "made up"}


def _generator(p: Path) -> Found:
    import torch
    from .model import CRN
    config, state, extra = read_generator_file(p, weights=False)
    with torch.device("meta"):
        expected = CRN(config).state_dict()
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values()})
    info = {"kind": "generator", "path": str(p), "bytes": p.stat().st_size, "model": _model(config),
            "classes": _classes(config.class_set),
            "weights": {"parameters": sum(t.numel() for t in state.values()), "tensors": len(state),
                        "dtype": ", ".join(dtypes), "mismatch": state_dict_mismatch(expected, state) or None}}
    info.update({k: extra[k] for k in ("step", "converted_from") if k in extra})
    return Found(info, config.class_set, config)


def _tf_checkpoint(p: Path) -> Found:
    from .convert_tf import generator_variables, infer_config
    from .tf_checkpoint import TFCheckpoint
    ckpt = TFCheckpoint(p)
    shapes = ckpt.shapes()
    config = infer_config(shapes, ckpt.prefix.resolve().parent.name or "converted")
    variables = generator_variables(shapes)
    try:
        ckpt.check_shards(list(variables))
        shards = None
    except CRNError as e:  # an index alone (the authors' index files, say) still says the architecture
        shards = str(e)
    info = {"kind": "tf_checkpoint", "path": str(ckpt.prefix), "model": _model(config),
            "classes": _classes(config.class_set),
            "weights": {"parameters": sum(math.prod(s) for s in variables.values()), "tensors": len(variables),
                        "variables_in_checkpoint": len(shapes), "missing_data": shards}}
    return Found(info, config.class_set)


def _read_json(p: Path) -> object:
    try:
        return json.loads(p.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: unreadable ({e})") from None
    except ValueError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None


def _json_file(p: Path) -> Found:
    """A run's config.json, an export sidecar, or a classes file, told apart by their keys."""
    d = _read_json(p)
    if isinstance(d, dict) and "artefact" in d and "model" in d:
        return _export(p)
    if isinstance(d, dict) and "model" in d and "preset" in d:
        return _run(p.parent)
    if isinstance(d, dict) and "classes" in d:
        try:
            classes = read_classes(p)
        except CRNError as e:  # its message names the option; here the file was given as such
            raise CheckpointError(str(e).removeprefix("--classes ")) from None
        return Found({"kind": "classes", "path": str(p), "classes": _classes(classes)}, classes)
    raise CheckpointError(f"{p} is JSON but not a crn_fast file: not a run's config.json, an export sidecar "
                          "(<artefact>.json) or a classes file ({\"classes\": [...]})")


def _config_of(d: dict, where: str) -> CRNConfig:
    try:
        return CRNConfig.from_dict(d)
    except (CRNError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: the model config is invalid ({e})") from None


def _export(p: Path) -> Found:
    side = p if p.suffix == ".json" else p.with_name(p.name + ".json")
    artefact = side.with_name(side.name[:-5])
    if not side.is_file():
        raise CheckpointError(f"{p} has no sidecar {side.name} beside it (crn-export writes one for every "
                              "artefact, with its model, shapes and verification); it was moved without it")
    d = read_sidecar(artefact)
    config = sidecar_config(artefact, d)
    info = {"kind": "export", "path": str(artefact), "present": artefact.is_file(),
            "bytes": artefact.stat().st_size if artefact.is_file() else None,
            "model": _model(config), "classes": _classes(config.class_set),
            **{k: v for k, v in d.items() if k not in ("model",)}}
    return Found(info, config.class_set)


def _export_folder(p: Path, sidecars: list[Path]) -> Found:
    found = [_export(s) for s in sidecars]
    return Found({"kind": "exports", "path": str(p), "exports": [f.info for f in found]}, found[0].classes)


def _load_train_state(p: Path) -> dict:
    from .checkpoint import load_train_state
    state = load_train_state(p, mmap=True)  # a 1024p run's state is gigabytes, of which this reads a few numbers
    if not isinstance(state, dict) or not {"step", "config"} <= set(state):
        raise CheckpointError(f"{p} is a PyTorch file but not a crn_fast training state (no step and config)")
    return state


def _train_state_file(p: Path) -> Found:
    state = _load_train_state(p)
    config = _config_of(state["config"], str(p))
    return Found({"kind": "train_state", "path": str(p), "bytes": p.stat().st_size, "step": int(state["step"]),
                  "model": _model(config), "classes": _classes(config.class_set),
                  "options": state.get("options"), "data": state.get("data")}, config.class_set)


def _last_metrics(p: Path, key: str = "loss") -> dict | None:
    """metrics.jsonl's last record holding ``key``: "loss" (a training step's) or "val_loss"."""
    last = None
    try:
        lines = p.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(record, dict) and "step" in record and key in record:
            last = record
    return last


def _run(p: Path) -> Found:
    """A training run's folder: its options (config.json), resume point (train_state.pt),
    generator (model.ckpt), last metrics and samples."""
    from .run_folder import never_stepped
    from .train_config import settled_loss, total_steps
    info: dict = {"kind": "run", "path": str(p)}
    try:
        options = _read_json(p / "config.json") if (p / "config.json").is_file() else None
        if options is not None and not (isinstance(options, dict) and "model" in options):
            raise CheckpointError(f"{p / 'config.json'} is not a crn_fast run's config.json (no 'model' entry)")
    except CheckpointError as e:  # the run's other files still say what it is (and --resume reads its state)
        options, info["config_error"] = None, str(e)
    configs = []  # the run's model, from whichever of its files are here
    if (p / "model.ckpt").is_file():
        generator = _generator(p / "model.ckpt")
        info["generator"] = generator.info
        configs.append(generator.config)
    if (p / "train_state.pt").is_file():
        try:
            state = _load_train_state(p / "train_state.pt")
            info["train_state"] = {"step": int(state["step"]), "bytes": (p / "train_state.pt").stat().st_size,
                                   "data": state.get("data")}
            configs.append(_config_of(state["config"], str(p / "train_state.pt")))
        except CheckpointError as e:  # a crashed run's cut state: the rest still says what the run is
            info["train_state_error"] = str(e)
    if options is not None:
        info["options"] = {k: v for k, v in options.items() if k != "model"}
        configs.append(_config_of(options["model"], str(p / "config.json")))
    if not configs:
        raise CheckpointError(f"{p}: no run here yet (no readable config.json, model.ckpt or train_state.pt)")
    config = configs[-1]
    info["model"], info["classes"] = _model(config), _classes(config.class_set)
    info["step"] = (info.get("train_state") or info.get("generator") or {}).get("step")
    o = info.get("options") or {}
    pairs = ((info.get("train_state") or {}).get("data") or {}).get("pairs")
    if o:
        o["loss"], o["lambdas"] = settled_loss(o.get("loss"), o.get("lambdas"), config.k)  # as train() settles them
        known = o.get("steps") is not None or o.get("epochs") is None or pairs  # epochs need the data's size
        info["total_steps"] = total_steps(o.get("steps"), o.get("epochs"), pairs, o["batch_size"]) if known else None
    info["last_metrics"] = _last_metrics(p / "metrics.jsonl")
    info["last_validation"] = _last_metrics(p / "metrics.jsonl", "val_loss")
    info["samples"] = str(p / "samples" / "latest.png") if (p / "samples" / "latest.png").is_file() else None
    if "train_state" in info:
        info["resume"] = resume_command(o, str(p), info["step"], info.get("total_steps"))
    elif never_stepped(p):
        info["never_stepped"] = True
    return Found(info, config.class_set)


def resume_command(options: dict, out: str, step: int | None, total: int | None) -> str:
    """The crn-train command that continues the run in ``out``: --resume takes every option not
    given from the run itself, so only a finished run needs one, more steps (or epochs)."""
    words = ["crn-train", "--out", out, "--resume"]
    if step is not None and total is not None and step >= total:
        words += ["--epochs", f"{2 * options['epochs']:g}"] if options.get("epochs") is not None else \
            ["--steps", str(2 * total)]
    return " ".join(shlex.quote(w) for w in words)


# ----------------------------------------------------------------------------- describing
def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _model_lines(m: dict, c: dict) -> list[str]:
    widths = ", ".join(map(str, m["widths"]))
    h, w = m["resolution"]
    classes = f"{c['name']} ({c['classes']} classes + void)" if c["name"] != f"{c['classes']} classes" else \
        f"{c['classes']} classes + void"
    return [f"  model     {m['name']}: {m['modules']} modules, widths {widths}; k={m['k']} image(s) per layout; "
            f"nominal size {h}x{w}; runs any multiple of {m['stride']}",
            f"  classes   {classes}; ids {c['ids']}, void {c['void_ids'] or 'none'}; colours {c['colors']}"]


def _weights_line(wt: dict) -> str:
    line = f"  weights   {wt['parameters']:,} parameters in {wt['tensors']} tensors"
    if wt.get("dtype"):
        line += f", {wt['dtype']}"
    if wt.get("mismatch"):
        line += f"; THEY DO NOT MATCH THE CONFIG: {wt['mismatch']}"
    if wt.get("missing_data"):
        line += f"; its data cannot be read: {wt['missing_data']}"
    return line


def describe(info: dict) -> list[str]:
    """The human-readable lines of an inspect() result."""
    kind, path = info["kind"], info["path"]
    if kind == "classes":
        c = info["classes"]
        return [f"{path}: classes file, read as --classes reads it",
                f"  classes   {c['name']}: {c['classes']} classes + void ({c['layout_channels']} layout channels); "
                f"ids {c['ids']}, void {c['void_ids'] or 'none'}; colours {c['colors']}"]
    if kind in ("exports", "folder"):
        entries = info["exports"] if kind == "exports" else info["entries"]
        lines = [f"{path}: {len(entries)} export(s)" if kind == "exports" else
                 f"{path}: {len(entries)} crn_fast folder(s) or checkpoint(s) inside"]
        for e in entries:
            lines += [""] + describe(e)
        return lines
    if kind == "generator":
        lines = [f"{path}: crn_fast generator, {_mb(info['bytes'])}" +
                 (f", saved at training step {info['step']}" if "step" in info else "") +
                 (f", converted from the TF checkpoint {info['converted_from']}" if "converted_from" in info else "")]
        return lines + _model_lines(info["model"], info["classes"]) + [_weights_line(info["weights"])]
    if kind == "tf_checkpoint":
        return [f"{path}: TensorFlow checkpoint of the authors' generator (every crn_fast tool reads it; "
                f"crn-convert-tf makes it a crn_fast file)"] + _model_lines(info["model"], info["classes"]) + \
            [_weights_line(info["weights"])]
    if kind == "train_state":
        o = info.get("options") or {}
        return [f"{path}: crn_fast training state at step {info['step']}, {_mb(info['bytes'])} (what --resume "
                f"continues from)"] + _model_lines(info["model"], info["classes"]) + \
            ([f"  data      {o.get('data')}, {(info.get('data') or {}).get('pairs', '?')} pairs"] if o else [])
    if kind == "export":
        return _export_lines(info)
    return _run_lines(info)


def _export_lines(info: dict) -> list[str]:
    fmt = EXPORT_FORMATS.get(info.get("format"), info.get("format", "?"))
    lines = [f"{info['path']}: {fmt}" + (f", {info['dtype']}" if info.get("dtype") else "") +
             (f", {_mb(info['bytes'])}" if info["present"] else " (MISSING: only its sidecar is here)") +
             (f", exported {info['exported_at']}" if info.get("exported_at") else "") +
             (f" on {info['device']}" if info.get("device") else "")]
    lines += _model_lines(info["model"], info["classes"])
    if info.get("shapes"):
        dyn = info.get("dynamic")
        runs = "" if dyn is None else "; static: only this shape runs" if not any(dyn.values()) else \
            "; dynamic: " + ", ".join(f"{k.replace('_', ' ')} {'x'.join(map(str, v)) if isinstance(v, list) else v}"
                                      for k, v in dyn.items() if v)
        lines.append("  shapes    " + ", ".join(f"{k} {list(v)}" for k, v in info["shapes"].items()) + runs)
    if info.get("profile"):
        pr = info["profile"]
        lines.append(f"  profile   layouts {'x'.join(map(str, pr['min']))} to {'x'.join(map(str, pr['max']))} "
                     f"(built for {'x'.join(map(str, pr['opt']))}); no other shape runs")
    v = info.get("verification")
    if v is None:
        lines.append("  verified  no (exported with --no-verify)")
    else:
        sizes = ", ".join(f"{r['size'][0]}x{r['size'][1]} PSNR {r['psnr_db']:.1f} dB" for r in v.get("results", []))
        lines.append(f"  verified  {'PASSED' if v.get('passed') else 'FAILED'} against eager fp32: max abs "
                     f"{v.get('max_abs', float('nan')):.4g} (tolerance {v.get('tolerance_max_abs')}); {sizes}")
    if info.get("versions"):
        lines.append("  versions  " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    if info.get("checkpoint"):
        lines.append(f"  from      {info['checkpoint']}")
    return lines


def _run_lines(info: dict) -> list[str]:
    step, total = info.get("step"), info.get("total_steps")
    state = "no checkpoint yet" if step is None else f"step {step}" + (f" of {total}" if total else "") + \
        (" (finished)" if total and step >= total else "")
    lines = [f"{info['path']}: crn_fast training run, {state}"] + _model_lines(info["model"], info["classes"])
    if info.get("config_error"):
        lines.append(f"  options   unknown: {info['config_error']}")
    if "generator" in info:
        lines.append(_weights_line(info["generator"]["weights"]))
    o = info.get("options")
    if o:
        pairs = ((info.get("train_state") or {}).get("data") or {}).get("pairs")
        res = "x".join(map(str, o.get("res") or info["model"]["resolution"]))
        lines.append(f"  data      {o.get('data')}" + (f" (split {o['split']})" if o.get("data", "").startswith(
            "cityscapes") else "") + (f", {pairs} pairs" if pairs else "") + f" at {res}" +
            f"; global batch {o.get('batch_size')}, lr {o.get('lr')}, amp {o.get('amp')}, backend "
            f"{o.get('backend_used') or o.get('backend')}" + (", activation checkpointing" if o.get(
                "checkpointing") else "") + (f", torch.compile ({o['compile']})" if o.get("compile", "off") != "off"
                                             else "") +
            (f", modules {o['train_modules']}" if o.get("train_modules") else ""))
        lines.append(f"  loss      {o.get('loss') or 'default'}, lambdas {o.get('lambdas') or 'default'}, VGG-19 "
                     f"{o.get('vgg_weights')}, seed {o.get('seed')}" +
                     (f"; started from {o['init_from']}" if o.get("init_from") else ""))
    m = info.get("last_metrics")
    if m:
        rate = f", {m['images_per_s']:.3g} images/s" if isinstance(m.get("images_per_s"), (int, float)) else ""
        loss = f"loss {m['loss']:.5g}" if isinstance(m.get("loss"), (int, float)) else "loss ?"
        lines.append(f"  last      step {m.get('step')}: {loss}{rate} (metrics.jsonl)")
    v = info.get("last_validation")
    if v and isinstance(v.get("val_loss"), (int, float)):
        n = v.get("val_images", "?")
        lines.append(f"  val       step {v.get('step')}: loss {v['val_loss']:.5g} over {n} layout"
                     f"{'' if n == 1 else 's'}" + (f" of {o['val_data']}" if o and o.get("val_data") else ""))
    files = []
    if "generator" in info:
        files.append(f"model.ckpt (step {info['generator'].get('step', '?')}, {_mb(info['generator']['bytes'])})")
    if "train_state" in info:
        ts = info["train_state"]
        files.append(f"train_state.pt (step {ts['step']}, {_mb(ts['bytes'])})")
    if info.get("train_state_error"):
        files.append(f"train_state.pt UNREADABLE ({info['train_state_error']}): the run cannot be resumed")
    if info.get("samples"):
        files.append("samples/latest.png")
    lines.append("  files     " + (", ".join(files) or "none yet"))
    if info.get("resume"):
        lines.append(f"  resume    {info['resume']}")
    if info.get("never_stepped"):
        lines.append("  stopped   before its first step (out of memory, a failed --compile?): nothing to resume; its "
                     "own crn-train command, fixed, starts it again in its place")
    return lines


def class_table(classes: ClassSet) -> list[str]:
    """One line a class: its layout channel, name, id in greyscale labels and colour; void last."""
    def hexes(colors):
        return ", ".join(f"#{r:02x}{g:02x}{b:02x}" for r, g, b in colors)
    rows = [(str(i), n, str(cid), hexes([c])) for i, (n, cid, c) in
            enumerate(zip(classes.names, classes.ids, classes.colors))]
    rows.append((str(classes.void), "void", describe_ids(classes.void_ids) or "-", hexes(classes.void_colors)))
    head = ("channel", "name", "id", "colour" + ("" if classes.colors_given else " (made up: for drawings only)"))
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    return [f"  {a:>{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d}" for a, b, c, d in [head, *rows]]


def write_classes(classes: ClassSet, path: str | Path) -> Path:
    """``classes`` as a classes file (what --classes reads), written atomically."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--write-classes {path} is a folder; give a file name, e.g. {path / 'classes.json'}")
    d = classes.to_dict()
    text = "{\n" + f'  "name": {json.dumps(d["name"])},\n  "classes": [\n' + \
        ",\n".join(f"    {json.dumps(c)}" for c in d["classes"]) + f'\n  ],\n  "void": {json.dumps(d["void"])}\n}}\n'
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return path


# ----------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    from .cli import add_logging_options, run_tool, setup_logging
    ap = argparse.ArgumentParser(prog="crn-info", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a run folder, a generator (model.ckpt), a TF checkpoint prefix, an export "
                    "(.onnx, .pt2, .engine, or its .json sidecar), a folder of exports, or a classes file")
    ap.add_argument("--json", action="store_true", help="print everything as one JSON object")
    ap.add_argument("--classes", action="store_true", help="also list every class: channel, name, id, colour")
    ap.add_argument("--write-classes", metavar="FILE", default=None,
                    help="write the classes as a JSON classes file, the form --classes reads")
    add_logging_options(ap)
    args = ap.parse_args(argv)
    setup_logging(args)

    def run():
        found = inspect(args.path)
        for option, wanted in (("--classes", args.classes), ("--write-classes", args.write_classes)):
            if wanted and found.classes is None:
                raise UsageError(f"{option}: {args.path} holds " + (
                    f"{len(found.info['entries'])} models; give the one whose classes you want"
                    if found.info["kind"] == "folder" else "no classes"))
        if args.write_classes:
            write_classes(found.classes, args.write_classes)
        if args.json:
            info = found.info
            if args.classes:
                info = {**info, "class_table": found.classes.to_dict()}
            text = json.dumps(info, indent=2, default=str)
        else:
            text = "\n".join(describe(found.info) + (class_table(found.classes) if args.classes else []))
        try:
            print(text, flush=True)
        except BrokenPipeError:  # crn-info ... | head: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and no second error at exit

        if args.write_classes:
            print(f"wrote {args.write_classes} ({found.classes.describe()}); give it as --classes "
                  f"{args.write_classes}", file=sys.stderr)

    return run_tool("crn-info", run)


if __name__ == "__main__":
    sys.exit(main())
