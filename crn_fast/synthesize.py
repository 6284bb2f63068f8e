"""crn-synthesize: layouts in, photographs out.

    crn-synthesize model.ckpt --labels FILE_OR_DIR --out DIR   (also: --ckpt model.ckpt; python -m crn_fast.synthesize)
    crn-synthesize exported/generator.onnx --labels DIR --out DIR    # what crn-export wrote: .onnx, .pt2, .engine
    crn-synthesize --engine generator.engine --labels DIR --out DIR   # the same (TensorRT: --backend tensorrt)
    torchrun --nproc_per_node 8 -m crn_fast.synthesize model.ckpt --labels DIR --out DIR   # a share a GPU

Labels are read like training labels, in the model's classes (its config holds them; Cityscapes'
by default): colour PNGs (the authors' format), palette PNGs, greyscale id PNGs, or Cityscapes'
*_labelIds.png. --labels is a file, a folder, or a folder of folders (Cityscapes' gtFine/val: one
layout per frame, its labelIds; see data.label_files). One PNG per layout, named after it; with
k > 1 the k images side by side. Values are clipped to 0..255.

A folder is streamed: a first pass reads only the file headers (sizes, and two labels that would
write the same output name), then layouts are decoded, synthesized and written one batch at a
time with a progress bar, so memory is bounded by --batch-size and --workers, not by the folder.
Decoding and PNG writing run in --workers threads beside the generator (the next batch is decoded
while this one runs); files are written in order, and an error (a bad layout, an output that holds
NaN or inf, a full disk) stops the run naming its file with every image before it written whole.

An exported generator (crn-export) runs instead of a checkpoint, by its file name: generator.onnx
through onnxruntime (its CPU provider, or CUDA with --device cuda and onnxruntime-gpu),
generator.pt2 (AOTInductor) on the device it was compiled for, generator.engine (TensorRT) on a
GPU. Its sidecar (<artefact>.json) gives the model's classes; a package or engine runs only the
layout sizes it was built for, and a layout outside them is named in the first pass.
Exit status: 0 done, 1 runtime error, 2 usage error.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from .cli import Progress, StopSignals, add_logging_options, count_or_auto, cpu_cores, log, positive_int, \
    resolution, run_tool, setup_logging, torch_device
from .data import _open_header, decode_label, jpeg_labels_warning, label_files, label_kind, resize_pair
from .distributed import setup_distributed, shutdown
from .errors import CRNError, RunStopped, UsageError, absent
from .images import OrderedWrites, save_png, side_by_side, uint8_images
from .labels import one_hot
from crn_fast.export.sidecar import EXPORTED


EXPORT_BACKENDS = {backend: flag for backend, _, flag in EXPORTED.values()}


def exported_kind(path: str | None) -> tuple[str, str, str] | None:
    """(backend, what it is, crn-export's flag) of an exported generator's file name, else None."""
    return EXPORTED.get(Path(path).suffix.lower()) if path else None


def load_exported(args, device):
    """--engine: an ONNX model, AOTInductor package or TensorRT engine, with the model config its
    sidecar holds; returns the runner and the device its layouts go to."""
    from crn_fast.export.sidecar import read_sidecar, sidecar_config
    path = args.engine
    if args.backend == "tensorrt" and device.type != "cuda":
        raise UsageError(f"--engine {path}: TensorRT runs on a CUDA device, not {device}")
    if not Path(path).is_file():
        raise CRNError(f"--engine {path}: " + ("not a file" if Path(path).exists() else absent(path)))
    facts = read_sidecar(path)  # the model's classes (and a package's or engine's shapes): none runs without
    config = sidecar_config(path, facts)
    if (facts.get("verification") or {}).get("passed") is False:  # crn-export kept it as generator.failed.*
        log.warning(f"{path} failed its verification against eager fp32 when exported (max abs "
                    f"{facts['verification'].get('max_abs')}; see {path}.json): its images may be wrong")
    if args.backend == "onnxruntime":
        from crn_fast.export.onnx import ONNXGenerator
        want_cuda = device.type == "cuda"
        if want_cuda and args.device is None:  # the default device: onnxruntime's CPU build runs on the CPU
            import onnxruntime as ort
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                log.info("onnxruntime has no CUDA provider here (pip install onnxruntime-gpu): running on the CPU")
                want_cuda, device = False, torch.device("cpu")
        try:
            gen = ONNXGenerator(path, str(device) if want_cuda else "cpu")  # this rank's GPU
        except RuntimeError as e:  # no CUDA provider for --device cuda; a file onnxruntime cannot read
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise CRNError(f"--engine {path}: {first.strip()[:300]}") from None
        if gen.runtime != "onnxruntime":
            log.warning(f"{path}: onnxruntime has no kernel here for its {facts.get('dtype', '')} nodes, so it runs "
                        f"in onnx's reference evaluator (numpy: slow; export in fp32 to run it in onnxruntime)")
        gen.config = config
        return gen, device
    if args.backend == "aoti":
        from crn_fast.export.compile import AOTIGenerator
        gen = AOTIGenerator(path, device if device.type == "cuda" else None)
        if args.device is not None and args.device.type != gen.device.type:
            raise UsageError(f"--engine {path} was compiled for {gen.device.type}, not --device {args.device}; "
                             f"export one on {args.device.type} with crn-export --compile --device "
                             f"{args.device.type}")
        return gen, gen.device
    from crn_fast.export.tensorrt import TensorRTGenerator
    return TensorRTGenerator(path, device, cuda_graph=args.cuda_graph), device  # this rank's GPU


def load_generator_for(args, device):
    """The generator synthesis runs (a checkpoint on its backend, or --engine's artefact), and the
    device its layouts go to."""
    if args.backend in EXPORT_BACKENDS:
        return load_exported(args, device)
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
        return runner, device
    return model, device


def plan(files: list[Path], config, size, out_dir: Path, profile=None) -> list[tuple[Path, tuple[int, int]]]:
    """The cheap first pass: each file's header (readable, its size after --res, and within a
    TensorRT engine's ``profile`` or an AOTInductor package's shapes: anything with
    ``check_size(channels, hw)``) and unique output names, none of them an input file (--out the
    labels' own folder). Nothing is decoded or kept but (path, size)."""
    by_name: dict[str, Path] = {}
    inputs = {f.resolve() for f in files}
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
        if (out_dir / name).resolve() in inputs:
            raise UsageError(f"--out {out_dir} would overwrite the layout {out_dir / name} with an image; write the "
                             f"images to another folder")
        hw = size or _open_header(f)
        try:
            config.validate_input_size(*hw)
        except CRNError as e:
            raise UsageError(f"{f}: {e} Pass --res to resize the layouts, e.g. --res "
                             f"{'x'.join(map(str, config.nearest_valid_size(*hw)))}.") from None
        if profile is not None:  # the engine runs only the sizes it was built for
            try:
                profile.check_size(config.num_classes, hw)
            except CRNError as e:
                raise UsageError(f"{f}: {e}") from None
        out.append((f, tuple(hw)))
    return out


# CRN_FAST_SYNTH_OVERLAP=0 reads each GPU batch back before queueing the next, as crn-synthesize did
# before: the other half of benchmarks/synth_throughput.py's comparison
OVERLAP_ENV = "CRN_FAST_SYNTH_OVERLAP"


def synthesize(args) -> list[Path]:
    """Synthesize every layout of --labels into --out; returns the files this process wrote. Under
    torchrun each rank (one a GPU) takes every world-th layout, in batches; the ranks stop together
    (crn_fast.distributed), each batch settled, so an error on one rank stops them all there. Runs
    of other layouts into the same --out may go on side by side (checkpoint.writing_into)."""
    with contextlib.ExitStack() as hold:
        return _synthesize(args, hold)


def _synthesize(args, hold: contextlib.ExitStack) -> list[Path]:
    ranks = setup_distributed()
    device = args.device or ranks.device
    out_dir = Path(args.out)
    with ranks.together():  # the same files, model and plan on every rank; rank 0 cleans up first
        files = label_files(Path(args.labels), exclude=out_dir)
        if ranks.rank == 0 and (jpegs := jpeg_labels_warning(files)):
            log.warning(jpegs)
        model, device = load_generator_for(args, device)
        config, profile = model.config, getattr(model, "profile", None)
        if profile is not None and not profile.min[0] <= min(args.batch_size, len(files)) <= profile.max[0]:
            raise UsageError(f"--batch-size {args.batch_size}: the engine runs batches of {profile.min[0]}-"
                             f"{profile.max[0]} (build it with crn-export --trt --max-batch {args.batch_size})")
        todo = plan(files, config, args.res, out_dir, profile or getattr(model, "shapes", None))
        if getattr(args, "skip_existing", False):  # a run stopped part way: its images are whole (atomic writes)
            planned, todo = len(todo), [(f, hw) for f, hw in todo if not (out_dir / f"{f.stem}.png").is_file()]
            if ranks.rank == 0 and planned > len(todo):
                log.info(f"--skip-existing: {planned - len(todo)} of {planned} layout(s) already have their image "
                         f"in {out_dir}")
        if ranks.rank == 0:  # before any rank writes: their temporaries are not stale
            from .checkpoint import remove_stale_temporaries, writing_into

            def clean():  # only while no other crn-synthesize writes into --out: its temporaries are live
                for f in remove_stale_temporaries(out_dir, "*.png"):
                    log.info(f"removed {f} (left by an interrupted crn-synthesize)")
            hold.enter_context(writing_into(out_dir, "--out", alone=False, clean=clean))
    mine = todo[ranks.rank::ranks.world]
    workers = default_workers() if args.workers is None else args.workers
    chunks = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    rounds = -(-len(todo[::ranks.world]) // args.batch_size)  # rank 0's share is the largest: every rank's count
    bar = Progress(len(mine), "synthesize", "image", enabled=args.progress and len(mine) > 1 and ranks.rank == 0)

    classes = config.class_set  # the model's: its checkpoint's (or the engine sidecar's) config says them

    def decode(f):
        return resize_pair(decode_label(f, label_kind(f, classes), args.unknown_colors, classes), None, args.res)[0]

    written: list[Path] = []

    def done(path):
        written.append(path)
        bar.update(1)

    def write(images, path):  # (k, H, W, 3) uint8, side by side
        return save_png(side_by_side(images), path, args.png_compression)

    # decoding and PNG writing in threads beside the generator (the next batch decoded while this
    # one runs), the PNGs finished in order: an error leaves every image before it written whole.
    # SIGTERM or a first Ctrl-C stops after the batch in which it came (every rank after the same one)
    stop = StopSignals(ranks.rank, "stopping after this batch, every image written whole (Ctrl-C again: stop at "
                                   "once)")
    with stop, OrderedWrites(workers, max(2 * workers, args.batch_size) if workers else 0, done,
                             "crn-synthesize") as pipe:
        def decode_ahead(i):
            return [(f, hw, pipe.submit(decode, f)) for f, hw in chunks[i]] if i < len(chunks) else []

        def emit(batch):
            """A batch's images, on the host: each checked, then written (k side by side)."""
            group, images, finite, copied = batch
            if copied is not None:
                copied.synchronize()  # this batch's copy only: the next batch runs on
            for (f, _), image, ok in zip(group, images.numpy(), finite.tolist()):
                if not ok:
                    raise CRNError(f"{f}: the generator's output holds NaN or inf (are the weights "
                                   f"finite?); stopped after {len(written) + len(pipe.pending)} image(s)")
                pipe.write(write, image, out_dir / f"{f.stem}.png")

        in_flight = None  # on a GPU: the last batch, its copy to the host queued behind it
        overlap = os.environ.get(OVERLAP_ENV, "1") != "0"
        ahead = decode_ahead(0)
        try:
            for i in range(rounds):
                if stop.agreed:  # at the end of the last batch
                    break
                current, ahead = ahead, decode_ahead(i + 1)
                with ranks.together(stop):  # one rank's bad layout, bad output or failed write stops every rank
                    by_shape: dict[tuple, list] = {}
                    for f, hw, decoded in current:
                        by_shape.setdefault(hw, []).append((f, decoded))
                    for group in by_shape.values():
                        batch = (group, *run_batch(model, np.stack([d.result() for _, d in group]), device,
                                                   config.num_classes))
                        if in_flight is not None:  # read back the batch before while this one runs on the device
                            before, in_flight = in_flight, None
                            emit(before)
                        if batch[-1] is None or not overlap:  # on the host already (a CPU): written while the
                            emit(batch)                          # next one runs
                        else:
                            in_flight = batch
        except BaseException:
            # a failure on any rank (a bad layout, say), or a second Ctrl-C: the batch still in flight was
            # computed before it, so it is written, as the direct path wrote it before the failure. The
            # failure stays the error said: a NaN found in that batch only stops its writes there.
            if in_flight is not None:
                with contextlib.suppress(Exception):
                    emit(in_flight)
            raise
        with ranks.together():
            if in_flight is not None:
                emit(in_flight)
            pipe.drain()
    bar.close()
    total = ranks.sum(len(written)) if stop.agreed else 0
    if stop.agreed and total < len(todo):  # a signal in the last batch changes nothing: the run is done
        raise RunStopped(f"stopped by {signal.Signals(stop.agreed).name} after {total} of {len(todo)} image(s) in "
                         f"{out_dir}, each whole: finish with --skip-existing", stop.agreed, quiet=ranks.rank != 0)
    return written


def run_batch(model, ids: np.ndarray, device, num_classes: int):
    """The generator on a batch of (N, H, W) uint8 class indices: (images (N, k, H, W, 3) uint8,
    finite (N,) bool, copied) on the host, where ``copied`` is None or, on a GPU, an event for their
    copy, queued behind the generator without waiting. The indices go up from pinned memory without
    waiting either (one_hot widens them on the device: 1/8 of int64's bytes), so the host queues this
    batch while the device still runs the one before, and reads that one back while this one runs:
    the device never idles for the host's copies and hand-offs between batches."""
    ids = torch.from_numpy(ids)
    cuda = torch.device(device).type == "cuda"
    with torch.inference_mode():
        out = model(one_hot((ids.pin_memory() if cuda else ids).to(device, non_blocking=cuda), num_classes))
        images = uint8_images(out.view(out.shape[0], -1, 3, *out.shape[2:]))
        finite = torch.isfinite(out).flatten(1).all(1)
    if not images.is_cuda:  # a CPU, or an artefact that returns host tensors (onnxruntime on the CPU)
        return images.cpu(), finite.cpu(), None
    host = (torch.empty(images.shape, dtype=torch.uint8, pin_memory=True),
            torch.empty(finite.shape, dtype=torch.bool, pin_memory=True))
    host[0].copy_(images, non_blocking=True)
    host[1].copy_(finite, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(images.device))  # the copies' stream: the images' device's, the
    return (*host, copied)                                     # current one only under torchrun's set_device


def default_workers() -> int:
    """Threads for decoding and encoding: one a core, at most 8."""
    return min(8, cpu_cores())


def png_level(text: str) -> int:
    if text not in tuple("0123456789"):
        raise argparse.ArgumentTypeError(f"{text!r}: a zlib level, 0 (none, fastest) to 9 (smallest)")
    return int(text)


def build_parser():
    ap = argparse.ArgumentParser(prog="crn-synthesize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", default=None,
                    help="crn_fast generator file (model.ckpt), or the authors' TF checkpoint prefix")
    ap.add_argument("--ckpt", default=None, help="the same, as an option")
    ap.add_argument("--labels", required=True, help="a label PNG or a folder of them")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--backend", default="auto", choices=("auto", "eager", "triton", *EXPORT_BACKENDS),
                    help="auto (default): with --engine the backend of its kind, else triton on a CUDA device, "
                         "eager elsewhere; tensorrt, onnxruntime and aoti run an --engine")
    ap.add_argument("--engine", help="an exported generator (crn-export) to run instead of a checkpoint: "
                    "generator.onnx (onnxruntime), generator.pt2 (AOTInductor) or generator.engine (TensorRT), "
                    "with its sidecar JSON; the file given as the checkpoint does the same")
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
                    help="label colours and greyscale values that are not the model's classes' (for Cityscapes: "
                         "its colours, train ids 0-18, void 19 or 255): error, or void (the authors' rule for "
                         "colours)")
    ap.add_argument("--workers", type=count_or_auto, default=None,
                    help="threads that decode layouts and write PNGs beside the generator (default auto: one a "
                         "core, at most 8; 0: everything in order in the main thread)")
    ap.add_argument("--skip-existing", action="store_true",
                    help="leave out the layouts whose image is already in --out, to finish a run that was stopped "
                         "(its images are whole: each is written to a temporary name, then renamed)")
    ap.add_argument("--png-compression", type=png_level, default=1,
                    help="zlib level of the PNGs, 0-9 (default 1: a photo-like 2-megapixel image took 89 ms to write "
                         "instead of 356 at PIL's 6, in 22%% more bytes, so that PNG writing keeps up with a GPU)")
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
    if Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"--out {args.out} is a file, not a folder")
    if exported_kind(args.ckpt) and not args.engine:  # crn-export's artefact given as the model: run it
        args.engine, args.ckpt = args.ckpt, None
    if args.engine:
        kind = exported_kind(args.engine)
        if kind is None:
            ap.error(f"--engine {args.engine}: not a file crn-export writes; give generator.onnx (onnxruntime), "
                     f"generator.pt2 (AOTInductor) or generator.engine (TensorRT); a checkpoint is given as the "
                     f"first argument, without --engine")
        if args.backend == "auto":  # the engine given is what runs
            args.backend = kind[0]
        if args.backend != kind[0]:
            ap.error(f"--engine {args.engine} is {kind[1]}: it runs with --backend {kind[0]} (or auto), "
                     f"not --backend {args.backend} (leave --engine out to run the checkpoint)")
    if args.backend in EXPORT_BACKENDS and not args.engine:
        ap.error(f"--backend {args.backend} needs --engine PATH (build one with crn-export "
                 f"{EXPORT_BACKENDS[args.backend]})")
    if args.backend in EXPORT_BACKENDS and args.ckpt:
        ap.error(f"give a checkpoint or --engine, not both: the engine {args.engine} runs alone, its weights built "
                 f"in, so {args.ckpt} would be ignored")
    if args.cuda_graph and args.backend in ("onnxruntime", "aoti"):
        ap.error(f"--cuda-graph replays a checkpoint's generator or a TensorRT engine, not --backend {args.backend}")
    if args.fused_conv != "off" and args.backend not in ("triton", "auto"):
        ap.error(f"--fused-conv {args.fused_conv} needs --backend triton (the fused conv is a Triton kernel), "
                 f"got --backend {args.backend}")
    if args.fused_head and args.backend not in ("triton", "auto"):
        ap.error(f"--fused-head needs --backend triton (the fused head is a Triton kernel), "
                 f"got --backend {args.backend}")
    if not args.ckpt and args.backend not in EXPORT_BACKENDS:
        ap.error("a checkpoint is required: crn-synthesize model.ckpt ... (a crn_fast generator file, or the "
                 "authors' TF checkpoint prefix, e.g. models/512p/model.ckpt)")
    setup_logging(args)

    def run():
        written = len(synthesize(args))
        ranks = setup_distributed()
        total = ranks.sum(written)
        if ranks.rank == 0:
            log.info(f"wrote {total} image(s) to {args.out}" + (f" ({ranks.world} ranks)" if ranks.world > 1 else ""))
    try:
        return run_tool("crn-synthesize", run)
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
