"""One run in several processes (torchrun): set up, stop together, compare the weights.

Ranks must stop at the same point. One that leaves alone strands the others in their next
collective: with NCCL until its timeout, with gloo in a traceback about a closed connection that
hides the real error. So whatever can fail on one rank alone (an option rank 0 checks, a bad file in
one rank's share of the data, rank 0's writes) runs in ``Ranks.together()``: each rank says whether
it failed, and if one did, every rank stops there. The first rank that failed prints its own error;
rank 0, if it is not that rank, prints one line naming it; the other ranks exit quietly. Every rank
exits with the failed rank's status. A failure inside a step's collectives (out of memory in the
backward, say) is not covered: the others are already waiting in DDP's all-reduce. The same
agreement carries a stop signal (SIGTERM, Ctrl-C) that reached any rank, so that all of them stop
after the same training step or synthesis batch (crn_fast.cli.StopSignals).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .cli import describe_failure
from .errors import RankStopped


@dataclass
class Ranks:
    rank: int
    world: int
    device: torch.device
    group: object = None  # a gloo group for the host's decisions (None: the default group, or one process)
    stopping: bool = False  # the ranks agreed to stop on a failure: see shutdown()

    @contextlib.contextmanager
    def together(self, signals=None):
        """Run the block on every rank; if it failed on any rank, stop every rank here. With
        ``signals`` (a cli.StopSignals), the ranks also agree whether any of them was asked to stop:
        ``signals.agreed`` is then the signal's number on every rank, else 0."""
        failure = None
        try:
            yield
        except Exception as e:  # noqa: BLE001 - settled across the ranks, then raised again
            failure = e
        self.settle(failure, signals)

    def settle(self, failure: Exception | None, signals=None) -> None:
        if self.world == 1:
            if failure is not None:
                raise failure
            if signals is not None:
                signals.agreed = signals.signum
            return
        # one small all-reduce on the host (gloo) when nothing failed, the usual case
        flag = torch.tensor([int(failure is not None), signals.signum if signals is not None else 0],
                            dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if signals is not None:
            signals.agreed = int(flag[1])
        if not flag[0]:
            return
        self.stopping = True
        said = [None] * self.world
        dist.all_gather_object(said, None if failure is None else describe_failure(failure), group=self.group)
        first = next(r for r, s in enumerate(said) if s is not None)
        if self.rank == first:
            raise failure
        code, message = said[first]
        raise RankStopped(f"rank {first} stopped the run: {message}", code, quiet=self.rank != 0)

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order. Call it only where every rank gets to: right
        after a together() block, before anything that may fail on one rank alone."""
        if self.world == 1:
            return [obj]
        said = [None] * self.world
        dist.all_gather_object(said, obj, group=self.group)
        return said

    def sum(self, n: int) -> int:
        """``n`` summed over the ranks."""
        if self.world == 1:
            return n
        total = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(total, group=self.group)
        return int(total)

    def weight_spread(self, model) -> float:
        """Largest difference of any weight between ranks (0 when DDP kept them identical)."""
        flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        return float((hi - lo).max())


_ranks: "Ranks | None" = None  # this process's, once set up

# torch modules whose functions take the default group as a default argument (``group=group.WORLD``,
# evaluated at import). Imported after init_process_group, they hold the group for the life of the
# process, past destroy_process_group: its gloo threads then live on into the interpreter's teardown,
# where they aborted the process ("terminate called without an active exception", SIGABRT) now and
# then. torch._inductor imports both (crn_fast.kernels imports it, when crn-synthesize builds its
# CRN), so they are imported before the group exists, while group.WORLD is still None. (ZeRO's
# torch.distributed.optim does the same, but nothing crn_fast runs imports it, and its import
# scripts TorchScript functions, with deprecation warnings.)
_TAKE_THE_GROUP_AT_IMPORT = ("torch.distributed.nn", "torch.distributed.fsdp.sharded_grad_scaler")


def setup_distributed() -> Ranks:
    """torchrun's process group (NCCL on GPUs, gloo on CPU), or one process when WORLD_SIZE is unset."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        for name in _TAKE_THE_GROUP_AT_IMPORT:
            with contextlib.suppress(ImportError):  # a torch without it cannot hold the group either
                importlib.import_module(name)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    global _ranks
    if _ranks is None or (_ranks.rank, _ranks.world) != (rank, world):
        group = None
        if world > 1 and dist.get_backend() != "gloo":  # decisions stay on the host: no device sync per step
            group = dist.new_group(backend="gloo")
        _ranks = Ranks(rank, world, device, group)
    return _ranks


def shutdown() -> None:
    """End the process group (a command line tool's last step). After a stop the ranks agreed on,
    first wait until every rank has printed its line: torchrun ends the other ranks as soon as one
    exits, which would cut rank 0's message. Then collect garbage: once torch._inductor is imported
    (crn_fast.kernels imports it), a reference cycle kept the gloo group until the interpreter's
    teardown, where its threads aborted the process ("terminate called without an active
    exception") in 8 of 60 two-rank runs; collected here, in none of 60. The group's other holder,
    a default argument, is kept empty by setup_distributed (_TAKE_THE_GROUP_AT_IMPORT)."""
    global _ranks
    if dist.is_initialized():
        if _ranks is not None and _ranks.stopping:
            dist.barrier(group=_ranks.group)
        dist.destroy_process_group()
        gc.collect()
    _ranks = None
