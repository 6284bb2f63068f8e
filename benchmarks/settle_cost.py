"""What ranks stopping together costs a training step: the time of one ``Ranks.settle`` when
nothing failed (the all-reduce of two int32 every step adds; crn_fast.distributed), between
``--ranks`` local gloo processes, as the median of ``--iters`` calls after a warm-up.

    python benchmarks/settle_cost.py [--ranks 2] [--iters 2000]   # writes results/settle_cost_<device>.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import device_label, machine_info, results_path, write_text_atomic  # noqa: E402

from crn_fast.cli import positive_int  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _rank(rank, world, store, iters, out):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from crn_fast.distributed import setup_distributed
    ranks = setup_distributed()
    for _ in range(100):
        ranks.settle(None)
    us = []
    for _ in range(iters):
        t0 = time.perf_counter()
        ranks.settle(None)
        us.append((time.perf_counter() - t0) * 1e6)
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps({"median_us": statistics.median(us),
                                         "p90_us": sorted(us)[int(0.9 * len(us))]}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=positive_int, default=2)
    ap.add_argument("--iters", type=positive_int, default=2000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = results_path(ap, args.json or ROOT / "benchmarks" / "results" / f"settle_cost_{device_label('cpu')}.json")
    with tempfile.TemporaryDirectory(prefix="crn-settle-") as tmp:
        mp.start_processes(_rank, args=(args.ranks, f"{tmp}/store", args.iters, f"{tmp}/r.json"),
                           nprocs=args.ranks, start_method="spawn")
        row = json.loads(Path(f"{tmp}/r.json").read_text())
    print(f"Ranks.settle, nothing failed, {args.ranks} gloo ranks: median {row['median_us']:.0f} us, "
          f"p90 {row['p90_us']:.0f} us per call")
    facts = {"machine": machine_info("cpu"), "ranks": args.ranks, "iters": args.iters, **row}
    write_text_atomic(out, json.dumps(facts, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
