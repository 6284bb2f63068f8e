"""Ranks stop together: a failure on one rank stops every rank at the same point, in one line
(crn_fast.distributed). Two real gloo processes; the end-to-end torchrun runs are in test_train."""
import errno
import json
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crn_fast.cli import run_tool
from crn_fast.constants import EXIT_RUNTIME, EXIT_USAGE
from crn_fast.errors import CRNError, RankStopped, UsageError

# what fails on which rank, in each scenario
SCENARIOS = {
    "none": {},
    "rank 1 usage": {1: lambda: UsageError("--data x: no such folder")},
    "both": {0: lambda: CRNError("bad file a.png"), 1: lambda: CRNError("bad file b.png")},
    "rank 0 disk": {0: lambda: OSError(errno.ENOSPC, "No space left on device", "out/model.ckpt")},
    "rank 1 bug": {1: lambda: KeyError("step")},
    "rank 1 memory": {1: lambda: _caught(lambda: torch.empty(2 ** 55, dtype=torch.uint8))},  # a real failed allocation
}


def _caught(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("it did not fail")


def _rank(rank, store, results):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    from crn_fast.distributed import setup_distributed
    ranks = setup_distributed()
    seen = {}
    for name, fails in SCENARIOS.items():
        mine = fails[rank]() if rank in fails else None
        try:
            with ranks.together():
                if mine is not None:
                    raise mine
            seen[name] = "went on"
        except RankStopped as e:
            seen[name] = {"stopped": str(e), "code": e.exit_code, "quiet": e.quiet}
        except Exception as e:  # noqa: BLE001
            seen[name] = {"own": e is mine, "type": type(e).__name__}
    seen["after"] = ranks.weight_spread(_weights_of(rank))  # the ranks still talk: nothing is left waiting
    dist.destroy_process_group()
    (results / f"{rank}.json").write_text(json.dumps(seen))


def _weights_of(rank):
    m = torch.nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.fill_(rank)
        m.bias.zero_()
    return m


def _raise(e):
    raise e


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    d = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_rank, args=(d / "store", d), nprocs=2, start_method="spawn")
    return [json.loads((d / f"{r}.json").read_text()) for r in (0, 1)]


def test_nothing_failed_every_rank_goes_on(outcomes):
    assert outcomes[0]["none"] == outcomes[1]["none"] == "went on"


def test_one_rank_failed_it_speaks_rank_0_names_it(outcomes):
    r0, r1 = (o["rank 1 usage"] for o in outcomes)
    assert r1 == {"own": True, "type": "UsageError"}  # rank 1 raises its own error: its one line
    assert r0 == {"stopped": "rank 1 stopped the run: --data x: no such folder", "code": EXIT_USAGE, "quiet": False}


def test_every_rank_failed_only_rank_0_speaks(outcomes):
    r0, r1 = (o["both"] for o in outcomes)
    assert r0 == {"own": True, "type": "CRNError"}
    assert r1 == {"stopped": "rank 0 stopped the run: bad file a.png", "code": EXIT_RUNTIME, "quiet": True}


def test_rank_0_failed_write_stops_rank_1_quietly(outcomes):
    r0, r1 = (o["rank 0 disk"] for o in outcomes)
    assert r0 == {"own": True, "type": "OSError"}
    assert r1["quiet"] and r1["code"] == EXIT_RUNTIME and "the disk is full" in r1["stopped"], r1


def test_a_bug_on_one_rank_keeps_its_traceback_there(outcomes):
    r0, r1 = (o["rank 1 bug"] for o in outcomes)
    assert r1 == {"own": True, "type": "KeyError"}  # raised again as itself: its traceback on rank 1
    assert r0 == {"stopped": "rank 1 stopped the run: KeyError: 'step'", "code": EXIT_RUNTIME, "quiet": False}
    assert outcomes[0]["after"] == outcomes[1]["after"] == 1.0  # and the ranks still agree after all of it


def test_running_out_of_memory_on_one_rank_is_named_by_rank_0(outcomes):
    r0, r1 = (o["rank 1 memory"] for o in outcomes)
    assert r1 == {"own": True, "type": "RuntimeError"}  # run_tool prints it as one line (test_robustness)
    assert r0 == {"stopped": "rank 1 stopped the run: out of memory: the CPU allocator could not allocate "
                             "33554432.00 GiB", "code": EXIT_RUNTIME, "quiet": False}


def test_a_quiet_stop_prints_nothing_and_keeps_the_exit_status(capsys):
    assert run_tool("prog", lambda: _raise(RankStopped("rank 1 stopped the run: x", 2, True))) == 2
    assert capsys.readouterr().err == ""
    assert run_tool("prog", lambda: _raise(RankStopped("rank 1 stopped the run: x", 2, False))) == 2
    assert capsys.readouterr().err == "prog: error: rank 1 stopped the run: x\n"


def test_one_process_raises_its_error_unchanged():
    from crn_fast.distributed import Ranks
    ranks, e = Ranks(0, 1, "cpu"), UsageError("x")
    with pytest.raises(UsageError) as caught:
        with ranks.together():
            raise e
    assert caught.value is e


_ENDS_ITS_GROUP = """
import os
from crn_fast.distributed import setup_distributed, shutdown
ranks = setup_distributed()
from crn_fast import CRN, CRNConfig
CRN(CRNConfig(widths=(8, 6, 4), k=2))  # imports crn_fast.kernels, so torch._inductor, once the group exists
ranks.sum(1)
shutdown()
threads = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
os.write(2, f"rank {ranks.rank} threads after shutdown: {threads}\\n".encode())  # one write: whole lines
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through Linux's /proc")
def test_shutdown_ends_the_gloo_group_and_its_threads(tmp_path):
    """A tool that builds its CRN after torchrun's group exists (crn-synthesize does) ends the group
    at shutdown(): no gloo thread lives on into the interpreter's teardown, where they aborted two-rank
    runs now and then (SIGABRT, "terminate called without an active exception"). The holder was
    torch.distributed.nn's default arguments, imported by torch._inductor after the group existed."""
    import subprocess
    import sys
    script = tmp_path / "ends.py"
    script.write_text(_ENDS_ITS_GROUP)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # both ranks write to torchrun's one stderr: each report is one write (print's text and newline
    # were two, and once interleaved into "...['python']rank 1 threads ..."), read wherever it falls
    reports = sorted(re.findall(r"rank (\d) threads after shutdown: (\[[^\]]*\])", r.stderr))
    assert [rank for rank, _ in reports] == ["0", "1"], r.stderr
    assert not [threads for _, threads in reports if "gloo" in threads], reports
