"""Costs the README states, measured: crn-synthesize's peak memory and time at two folder sizes 10x
apart (streaming: bounded by --batch-size, not by the folder), the same folder with --workers 0
(all in the main thread), the CPU stages crn-synthesize runs beside the generator (decoding a
layout, writing a PNG at zlib levels 6 and 1) in one thread and in its default thread count, and the
up-front label scan of training (--scan-labels) per 2048x1024 colour label, in one thread and in
the threads crn-train gives it, and by two torchrun ranks at once, sharing the labels or (as before)
each checking them all; and the DataLoader's transport of one training sample, 8-bit (as crn_fast's
datasets yield it) against int64 ids and a float32 image, in the main process and through 2 workers.

    python benchmarks/data_costs.py [--files 10] [--res 1024x2048]     # writes results/data_costs_<device>.json
    python benchmarks/data_costs.py --only loader     # re-measures the loader's transport alone, into that file
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import device_label, machine_info, results_path  # noqa: E402

from crn_fast import CRN, CRNConfig, CRNError, save_generator  # noqa: E402
from crn_fast.cli import cores_per_rank, positive_int, resolution  # noqa: E402
from crn_fast.data import PairDataset, decode_label  # noqa: E402
from crn_fast.images import save_png  # noqa: E402
from crn_fast.synthesize import default_workers  # noqa: E402
from crn_fast.labels import PALETTE  # noqa: E402
from crn_fast.synthetic import render_scene  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COSTS_WIDTHS = (16, 16, 12, 8)  # the generator synthesis runs here: small, as the folder is what is measured


def write_labels(folder: Path, n: int, h: int, w: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base = render_scene(h, w, seed=0, index=0)[0]
    for i in range(n):  # one real-looking scene, shifted per file: same decode cost, distinct files
        Image.fromarray(PALETTE[np.minimum(np.roll(base, 8 * i, axis=1), 18)]).save(folder / f"{i:06d}.png")


def peak_rss_mib(cmd) -> float:
    code = ("import resource, subprocess, sys\n"
            f"r = subprocess.run({cmd!r})\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
            "sys.exit(r.returncode)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def _scan_rank(files, rank: int, world: int, shared: bool, start, times) -> None:
    os.environ["LOCAL_WORLD_SIZE"] = str(world)  # cores_per_rank(): this machine's cores / its ranks
    ds = PairDataset([(f, None, "auto") for f in files], scan="always", check=False)
    start.wait()  # every rank imported and ready: the clock starts together
    t0 = time.perf_counter()
    assert not ds.check(cores_per_rank(), rank, world) if shared else not ds.check(cores_per_rank())
    times[rank] = time.perf_counter() - t0


def scan_ranks_ms(files, world: int, shared: bool) -> float:
    """ms per label of the up-front scan when ``world`` processes (torchrun's ranks on this machine,
    each with its cores_per_rank() threads) run it at once: each checking its share of the labels
    (``shared``, as crn-train does), or each checking all of them (as it did before). Timed from a
    common start to the last rank's end."""
    ctx = multiprocessing.get_context("spawn")
    start, times = ctx.Barrier(world), ctx.Array("d", world)
    procs = [ctx.Process(target=_scan_rank, args=(files, r, world, shared, start, times)) for r in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise SystemExit("the label scan failed in a rank")
    return max(times) / len(files) * 1e3


def stage_ms(fn, items, threads: int) -> float:
    """ms per item of ``fn`` over ``items`` in ``threads`` threads (1: a plain loop)."""
    t0 = time.perf_counter()
    if threads == 1:
        for item in items:
            fn(item)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fn, items))
    return (time.perf_counter() - t0) / len(items) * 1e3


def pipeline_stages(files, out: Path) -> dict:
    """The work crn-synthesize moves into threads, per image, in 1 thread and in its default count.
    The PNGs are real outputs of the small generator (decoded from the files' layouts)."""
    threads = default_workers()
    images = sorted(out.glob("*.png"))[:len(files)]
    arrays = [np.asarray(Image.open(p)) for p in images]
    rows = {"threads": threads}
    for n in sorted({1, threads}):
        rows[f"decode_ms_{n}"] = stage_ms(decode_label, files, n)
        for level in (6, 1):
            rows[f"png{level}_ms_{n}"] = stage_ms(lambda ia: save_png(ia[1], out / f"stage_{ia[0]}.png", level),
                                                  list(enumerate(arrays)), n)
    return rows


class _Samples(torch.utils.data.Dataset):
    """One training sample, as a dataset yields it: 8-bit (uint8 ids and image, crn_fast's) or wide
    (int64 ids and a float32 image, as before). Made once: what is timed is the loader's transport."""

    def __init__(self, h: int, w: int, wide: bool):
        ids, image = render_scene(h, w, seed=0, index=0)
        self.ids, self.image = torch.from_numpy(ids.astype(np.uint8)), torch.from_numpy(image).permute(2, 0, 1)
        if wide:
            self.ids, self.image = self.ids.long(), self.image.float()

    def __len__(self):
        return 1 << 30

    def __getitem__(self, i):
        return self.ids.clone(), self.image.clone()  # as a decoded sample: new memory each time


def loader_ms(h: int, w: int, samples: int = 40) -> dict:
    """ms per sample through a DataLoader (batch 1) in the main process and through 2 worker processes
    (shared memory, then the collate), for 8-bit and wide samples of h x w."""
    rows = {}
    for wide in (True, False):
        for workers in (0, 2):
            it = iter(torch.utils.data.DataLoader(_Samples(h, w, wide), batch_size=1, num_workers=workers))
            for _ in range(4):  # the workers started, their first batches in flight
                next(it)
            t0 = time.perf_counter()
            for _ in range(samples):
                next(it)
            rows[f"{'int64+float32' if wide else 'uint8'}_workers_{workers}"] = \
                (time.perf_counter() - t0) / samples * 1e3
            del it
    print("loader transport per sample: " + ", ".join(f"{k} {v:.1f} ms" for k, v in rows.items()), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=positive_int, default=10,
                    help="the small folder; the large one has 10x (default 10)")
    ap.add_argument("--res", type=resolution, default=(1024, 2048), help="HxW (default 1024x2048)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", choices=("loader",), default=None,
                    help="measure one section and update its key in the result file (the others stay)")
    args = ap.parse_args()
    try:  # the small generator synthesised with below (4 modules: sizes in multiples of 8)
        h, w = CRNConfig(widths=COSTS_WIDTHS, k=1).input_size(args.res, "--res")
    except CRNError as e:
        ap.error(str(e))
    out = results_path(ap, args.json or ROOT / "benchmarks" / "results" / f"data_costs_{device_label('cpu')}.json")
    if args.only == "loader":
        kept = json.loads(out.read_text()) if out.is_file() else {"machine": machine_info("cpu")}
        if kept.get("resolution", [h, w]) != [h, w]:
            sys.exit(f"{out} holds {kept['resolution'][0]}x{kept['resolution'][1]}, not {h}x{w}: give --json")
        loader = loader_ms(h, w)
        kept.update({"resolution": [h, w], "loader_ms_per_sample": loader,
                     "loader_measured": time.strftime("%Y-%m-%d") + " (--only loader: a later run than the rest)"})
        out.write_text(json.dumps(kept, indent=2))
        print(f"wrote {out}")
        return
    with tempfile.TemporaryDirectory(prefix="crn-costs-") as tmp_name:  # GBs of labels and images at 1024p
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        ckpt = tmp / "tiny.ckpt"
        save_generator(CRN(CRNConfig(widths=COSTS_WIDTHS, k=1)), ckpt)  # small: the folder is what is measured
        rows = []
        for n, workers in ((args.files, None), (args.files, 0), (10 * args.files, None)):
            labels = tmp / f"labels_{n}"
            if not labels.exists():
                write_labels(labels, n, h, w)
            t0 = time.perf_counter()
            rss = peak_rss_mib([sys.executable, "-m", "crn_fast.synthesize", str(ckpt), "--labels", str(labels),
                                "--out", str(tmp / f"out_{n}_{workers}"), "--no-progress", "-q", "--device", "cpu",
                                *(["--workers", str(workers)] if workers is not None else [])])
            seconds = time.perf_counter() - t0
            rows.append({"files": n, "workers": "default" if workers is None else workers,
                         "label_mib_each": h * w / 2 ** 20, "peak_rss_mib": rss, "seconds": seconds})
            print(f"crn-synthesize, {n:4d} layouts of {h}x{w}, --workers {rows[-1]['workers']}: peak RSS {rss:7.0f} "
                  f"MiB, {seconds:.1f} s", flush=True)
        files = sorted((tmp / f"labels_{args.files}").glob("*.png"))
        stages = pipeline_stages(files, tmp / f"out_{args.files}_None")
        print("per image, 1 thread vs " + str(stages["threads"]) + ": " + ", ".join(
            f"{k} {v:.0f}" for k, v in stages.items() if k != "threads"), flush=True)
        scan = {}
        for threads in sorted({1, cores_per_rank()}):  # what crn-train runs: the dataset's own check
            t0 = time.perf_counter()
            PairDataset([(f, None, "auto") for f in files], scan="always", threads=threads)
            scan[threads] = (time.perf_counter() - t0) / len(files) * 1e3
            print(f"label scan, {threads} thread(s): {scan[threads]:.1f} ms per {h}x{w} colour label "
                  f"(Cityscapes train, 2975 labels: {2975 * scan[threads] / 1e3:.0f} s)")
        many = sorted((tmp / f"labels_{10 * args.files}").glob("*.png"))
        ranks = {how: scan_ranks_ms(many, 2, how == "shared") for how in ("every rank all", "shared")}
        print(f"label scan by 2 ranks at once, {len(many)} labels: " +
              ", ".join(f"{how} {ms:.1f} ms per label" for how, ms in ranks.items()))
    loader = loader_ms(h, w)
    out.write_text(json.dumps({"machine": machine_info("cpu"), "resolution": [h, w], "synthesize": rows,
                               "synthesize_stages_ms_per_image": stages, "scan_ms_per_label": scan[1],
                               "scan_ms_per_label_by_threads": scan, "scan_ms_per_label_2_ranks": ranks,
                               "loader_ms_per_sample": loader},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
