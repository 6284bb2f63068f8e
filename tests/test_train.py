"""End to end: training, resume, DDP with torchrun (gloo), progressive init, synthesis."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crn_fast import CRN, CRNConfig, load_generator, save_generator
from crn_fast.train import init_from, main as train_main, parse_train_modules
from crn_fast.synthesize import main as synth_main

from test_data import write_cityscapes, write_pairs

SMALL = ["--resolution", "32x64", "--batch-size", "2", "--no-progress", "--log-every", "1"]


def run(args, env=None, **kw):
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, **kw)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = run(["-m", "crn_fast.train", "--out", str(out), "--steps", "40", "--no-progress", "--log-every", "5"])
    assert r.returncode == 0, r.stderr
    return out, r


def test_demo_writes_checkpoint_metrics_and_samples(demo_run):
    out, r = demo_run
    assert "device cpu" in r.stderr and "VGG-19 weights: random" in r.stderr and "synthetic" in r.stderr
    assert "0 loader worker(s)" in r.stderr  # on a CPU the step's threads use the cores
    # one sheet encoded once (in the background) for its step file, latest.png and TensorBoard
    latest = (out / "samples" / "latest.png").read_bytes()
    assert latest == (out / "samples" / "step_000040.png").read_bytes()
    if (out / "tb").exists():  # tensorboard installed (the dev extra has it)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(out / "tb"))
        events.Reload()
        (image,) = events.Images("samples")
        assert image.step == 40 and image.encoded_image_string == latest
    model = load_generator(out / "model.ckpt")
    assert model.config.name == "tiny"
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30, 35, 40]
    for key in ("loss", "loss_pixel", "loss_conv5_2", "images_per_s", "peak_memory_mb"):
        assert key in rows[0]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], [r["loss"] for r in rows]
    sheet = np.asarray(Image.open(out / "samples" / "latest.png"))
    assert sheet.shape == (4 * 64, 3 * 128, 3)  # 4 rows of layout | target | output
    assert (out / "train_state.pt").is_file()
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 40
    # --backend auto (the default) settles on eager on a CPU, and the run's options say so
    assert "backend eager" in r.stderr and state["options"]["backend"] == "eager"
    assert json.loads((out / "config.json").read_text())["backend"] == "eager"


def test_resume_is_bitwise_exact(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_main(["--out", str(a), "--steps", "6", *SMALL]) == 0
    assert train_main(["--out", str(b), "--steps", "3", *SMALL]) == 0
    assert train_main(["--out", str(b), "--steps", "6", "--resume", *SMALL]) == 0
    sa, sb = load_generator(a / "model.ckpt").state_dict(), load_generator(b / "model.ckpt").state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    steps = [json.loads(l)["step"] for l in (b / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_takes_the_runs_own_options(tmp_path, capsys):
    """--out X --resume alone continues a run with its own options (config.json's, else the training
    state's), bitwise as if never stopped; a finished run resumed at its own length is one usage
    error; an option given is still compared."""
    a, b = tmp_path / "a", tmp_path / "b"
    options = ["--k", "2", "--lambdas", "auto", "--seed", "3", *SMALL]
    assert train_main(["--out", str(a), "--steps", "4", *options]) == 0
    assert train_main(["--out", str(b), "--steps", "2", *options]) == 0
    capsys.readouterr()
    assert train_main(["--out", str(b), "--resume", "--steps", "4", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "--resume: the run's own options: --res 32x64 --k 2 --lambdas auto --batch-size 2 --backend eager " \
           "--seed 3 --log-every 1\n" in err, err
    sa, sb = load_generator(a / "model.ckpt").state_dict(), load_generator(b / "model.ckpt").state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [json.loads(line)["step"] for line in (b / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    before = (b / "train_state.pt").read_bytes()
    assert train_main(["--out", str(b), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--resume: the run is already at step 4, and --steps 4 ends there: nothing to train; give a longer " \
           "--steps (e.g. --steps 8) or --epochs" in err, err
    assert (b / "train_state.pt").read_bytes() == before
    assert train_main(["--out", str(b), "--resume", "--steps", "5", "--seed", "4", "--no-progress"]) == 2
    assert "--seed 3 (now 4)" in capsys.readouterr().err
    # config.json gone (or cut by a crash): the training state's own options
    (b / "config.json").write_text('{"data": "synth')
    assert train_main(["--out", str(b), "--resume", "--steps", "5", "--no-progress"]) == 0
    assert "--resume: the run's own options: --res 32x64 --k 2 --lambdas auto --batch-size 2 --backend eager " \
           "--seed 3\n" in capsys.readouterr().err
    assert json.loads((b / "config.json").read_text())["k"] == 2  # rewritten whole
    # what the run had can be turned off when resuming: --no-checkpointing, --val-data none
    assert train_main(["--out", str(b), "--resume", "--steps", "6", "--checkpointing", "--val-data", "synthetic",
                       "--val-samples", "2", "--no-progress"]) == 0
    assert "validation at step 6" in capsys.readouterr().err
    assert train_main(["--out", str(b), "--resume", "--steps", "7", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "--checkpointing --seed 3 --val-data synthetic --val-samples 2\n" in err and "validation at step 7" in err
    assert train_main(["--out", str(b), "--resume", "--steps", "8", "--no-checkpointing", "--val-data", "none",
                       "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "checkpointing" not in err and "val" not in err, err
    saved = json.loads((b / "config.json").read_text())
    assert saved["checkpointing"] is False and saved["val_data"] is None
    # --workers: a count the run had, and auto (the default) given back
    assert train_main(["--out", str(b), "--resume", "--steps", "9", "--workers", "1", "--no-progress"]) == 0
    assert "1 loader worker(s)" in capsys.readouterr().err
    assert train_main(["--out", str(b), "--resume", "--steps", "10", "--no-progress"]) == 0
    assert "--workers 1" in capsys.readouterr().err
    assert train_main(["--out", str(b), "--resume", "--steps", "11", "--workers", "auto", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "--workers" not in err and "0 loader worker(s)" in err, err  # a CPU's auto


def test_ddp_two_gloo_ranks_match_one_process(tmp_path):
    common = ["--steps", "3", "--resolution", "32x64", "--batch-size", "4", "--no-progress",
              "--val-data", "synthetic", "--val-every", "3", "--val-samples", "3"]
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "crn_fast.train",
             "--out", str(tmp_path / "ddp"), *common])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 ranks (DDP)" in r.stderr
    assert json.loads((tmp_path / "ddp" / "ddp.json").read_text())["max_weight_spread"] == 0.0
    assert train_main(["--out", str(tmp_path / "one"), *common]) == 0
    s2 = load_generator(tmp_path / "ddp" / "model.ckpt").state_dict()
    s1 = load_generator(tmp_path / "one" / "model.ckpt").state_dict()
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], atol=2e-5, rtol=1e-4)
    # the validation loss: each rank its share of the layouts, summed over the ranks
    val = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in line] for d in ("ddp", "one")]
    assert [v["val_images"] for v in val[0]] == [v["val_images"] for v in val[1]] == [3]
    assert val[0][0]["val_loss"] == pytest.approx(val[1][0]["val_loss"], rel=1e-4)


def torchrun_lines(r, prog="crn_fast.train") -> list[str]:
    """crn_fast's own lines on stderr (torchrun's warnings and its failure report left out)."""
    return [line for line in r.stderr.splitlines() if prog in line and "torch/distributed" not in line
            and not line.lstrip().startswith(("File", "Failures", f"{prog} FAILED"))]


def test_ddp_a_run_refused_by_rank_0_stops_every_rank_in_one_line(tmp_path):
    """Only rank 0 checks --out. Before, rank 1 went on into DDP and died on the closed connection
    with a gloo traceback (with NCCL it would have waited for its timeout)."""
    common = ["--steps", "1", "--resolution", "32x64", "--batch-size", "2", "--no-progress", "--out", str(tmp_path)]
    assert train_main(common) == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "crn_fast.train", *common])
    assert r.returncode != 0
    assert torchrun_lines(r) == [f"python -m crn_fast.train: error: {tmp_path} already holds a run (train_state.pt at "
                                 "step 1); continue it with --resume, or replace it with --overwrite"], r.stderr
    assert "[rank1]" not in r.stderr and "Connection closed" not in r.stderr and "exitcode  : 2" in r.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_ddp_a_bad_file_in_one_ranks_share_stops_both_ranks(tmp_path):
    """Rank 1's first batch holds a cut image (found only when loaded): rank 1 names the file, rank 0
    says that rank 1 stopped the run, and neither is left waiting in DDP's all-reduce."""
    from crn_fast.train import StepBatches
    root = write_pairs(tmp_path / "p", n=6, size=(32, 64))
    # a seed whose first global batch gives rank 1 a sample outside the 4 of the sample sheets
    seed = next(s for s in range(100) if list(StepBatches(6, 2, 1, 2, s, 0, 1))[0][0] >= 4)
    (bad,) = list(StepBatches(6, 2, 1, 2, seed, 0, 1))[0]
    image = root / "images" / f"{bad:08d}.jpg"  # noisy, so that half of it keeps the whole header
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(image)
    image.write_bytes(image.read_bytes()[:image.stat().st_size // 2])
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "crn_fast.train",
             "--data", f"pairs:{root / 'labels'},{root / 'images'}", "--seed", str(seed), "--steps", "2",
             "--out", str(tmp_path / "run"), *SMALL, "-q"])
    assert r.returncode != 0
    mine, rank1 = torchrun_lines(r), [line for line in torchrun_lines(r) if "rank 1 stopped the run" not in line]
    assert len(mine) == 2 and len(rank1) == 1 and image.name in rank1[0], r.stderr
    assert f"python -m crn_fast.train: error: rank 1 stopped the run: {rank1[0].split('error: ', 1)[1]}" in mine
    assert "[rank0]" not in r.stderr and "Connection closed" not in r.stderr, r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").read_text()  # stopped before the first step


def test_ddp_ranks_share_the_data_check_and_keep_the_same_pairs(tmp_path):
    """Under torchrun each rank checks every second label (crn_fast.data.PairDataset.check), and the
    ranks pool what they found: a bad label in each rank's share is left out by both ranks, named
    once by rank 0, in the folder's order; without --skip-bad the first is the one error line."""
    root = write_pairs(tmp_path / "p", n=6, size=(32, 64))
    for i in (1, 2):  # rank 1's share, then rank 0's
        Image.fromarray(np.full((32, 64, 3), 7, np.uint8)).save(root / "labels" / f"{i:08d}.png")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "crn_fast.train",
                "--data", f"pairs:{root / 'labels'},{root / 'images'}", "--scan-labels", "always", "--steps", "1",
                *SMALL]
    r = run([*torchrun, "--skip-bad", "--out", str(tmp_path / "run")])
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = [line.split("skipped: ", 1)[1] for line in r.stderr.splitlines() if "skipped: " in line]
    assert [s.split(":")[0] for s in skipped] == [str(root / "labels" / f"0000000{i}.png") for i in (1, 2)], r.stderr
    assert "(4 pairs, labels scanned up front, 2 skipped)" in r.stderr
    assert json.loads((tmp_path / "run" / "ddp.json").read_text())["max_weight_spread"] == 0.0
    r = run([*torchrun, "--out", str(tmp_path / "stopped")])
    assert r.returncode != 0 and not (tmp_path / "stopped").exists()
    assert torchrun_lines(r) == [f"python -m crn_fast.train: error: {skipped[0]} (or --skip-bad to leave bad files "
                                 "out)"], r.stderr


def test_synthesize_under_torchrun_shares_the_layouts_and_stops_together(tmp_path):
    """torchrun -m crn_fast.synthesize: each rank writes every second layout, the files the same bytes
    as one process writes; a layout that fails on rank 1 stops both ranks at that batch, every image
    before it whole."""
    torch.manual_seed(0)
    ckpt = tmp_path / "m.ckpt"
    save_generator(CRN(CRNConfig(widths=(8, 6, 4), k=2)), ckpt)
    labels = write_pairs(tmp_path / "p", n=5, size=(32, 64)) / "labels"
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "crn_fast.synthesize",
                str(ckpt), "--labels", str(labels), "--no-progress"]
    assert synth_main([str(ckpt), "--labels", str(labels), "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    r = run([*torchrun, "--out", str(tmp_path / "two")])
    assert r.returncode == 0 and "wrote 5 image(s) to" in r.stderr and "(2 ranks)" in r.stderr, r.stderr
    one = sorted((tmp_path / "one").iterdir())
    assert [f.name for f in one] == [f"{i:08d}.png" for i in range(5)]
    assert all(f.read_bytes() == (tmp_path / "two" / f.name).read_bytes() for f in one)
    bad = labels / "00000003.png"  # rank 1's second layout (ranks take 0,2,4 and 1,3)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])  # the header whole, the data cut
    r = run([*torchrun, "--out", str(tmp_path / "cut")])
    lines = torchrun_lines(r, "crn-synthesize")
    assert r.returncode != 0 and len(lines) == 2 and "Traceback" not in "\n".join(lines), r.stderr
    assert f"crn-synthesize: error: {bad}: unreadable image" in lines[0] + lines[1]
    assert any(line.startswith("crn-synthesize: error: rank 1 stopped the run: ") for line in lines)
    # the first batch of each rank (00, 01) and rank 0's second (02) are whole; nothing after the cut one
    assert sorted(f.name for f in (tmp_path / "cut").iterdir()) == [f"{i:08d}.png" for i in range(3)]
    assert all(f.read_bytes() == (tmp_path / "two" / f.name).read_bytes() for f in (tmp_path / "cut").iterdir())


def test_fake_cityscapes_trains(tmp_path):
    root = write_cityscapes(tmp_path / "cs", n=4, size=(64, 128))
    assert train_main(["--data", f"cityscapes:{root}", "--out", str(tmp_path / "o"), "--steps", "2", *SMALL]) == 0
    assert (tmp_path / "o" / "model.ckpt").is_file()


def test_bad_data_option_exits_with_one_line(tmp_path):
    r = run(["-m", "crn_fast.train", "--data", "imagenet:/x", "--out", str(tmp_path)])
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "valid forms" in r.stderr and "Traceback" not in r.stderr
    r = run(["-m", "crn_fast.train", "--data", f"cityscapes:{tmp_path / 'none'}", "--out", str(tmp_path)])
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr  # a runtime error


def test_init_from_copies_lower_resolution_modules(tmp_path):
    torch.manual_seed(0)
    low = CRN(CRNConfig(widths=(8, 6), k=1))
    save_generator(low, tmp_path / "low.ckpt")
    high = CRN(CRNConfig(widths=(8, 6, 4), k=2))
    head_before = high.head.weight.clone()
    assert init_from(high, str(tmp_path / "low.ckpt")) == ["refine.0", "refine.1"]
    for i in range(2):
        for k, v in low.refine[i].state_dict().items():
            assert torch.equal(high.refine[i].state_dict()[k], v)
    assert torch.equal(high.head.weight, head_before)  # new head starts fresh


def test_train_modules_freezes_the_rest(tmp_path):
    assert parse_train_modules("3-4,head", 5) == {"refine.3", "refine.4", "head"}
    assert train_main(["--out", str(tmp_path), "--steps", "2", "--train-modules", "4,head", *SMALL]) == 0
    torch.manual_seed(0)
    fresh, trained = CRN.from_preset("tiny").state_dict(), load_generator(tmp_path / "model.ckpt").state_dict()
    assert all(torch.equal(fresh[k], trained[k]) for k in fresh if k.startswith("refine.0."))
    assert not torch.equal(fresh["refine.4.conv1.weight"], trained["refine.4.conv1.weight"])


def test_synthesize_real_labels(shared, tmp_path):
    """The authors' Cityscapes labels through the tiny preset's generator (its own weights: under
    pytest-xdist a module fixture such as the demo run would train again in a second worker)."""
    torch.manual_seed(0)
    save_generator(CRN.from_preset("tiny"), tmp_path / "tiny.ckpt")
    labels = shared / "labels" / "cityscapes_256"
    assert synth_main(["--ckpt", str(tmp_path / "tiny.ckpt"), "--labels", str(labels), "--out", str(tmp_path / "o"),
                       "--batch-size", "4"]) == 0
    pngs = sorted((tmp_path / "o").glob("*.png"))
    assert len(pngs) == 6 and Image.open(pngs[0]).size == (512, 256)


def test_synthesize_k_images_side_by_side_and_bad_sizes(tmp_path, shared, capsys):
    save_generator(CRN(CRNConfig(widths=(4, 4, 4), k=3)), tmp_path / "k3.ckpt")
    label = shared / "labels" / "gta_256" / "00100370.png"
    assert synth_main(["--ckpt", str(tmp_path / "k3.ckpt"), "--labels", str(label), "--out", str(tmp_path / "o"),
                       "--resolution", "32x64"]) == 0
    assert Image.open(tmp_path / "o" / "00100370.png").size == (3 * 64, 32)
    assert synth_main(["--ckpt", str(tmp_path / "k3.ckpt"), "--labels", str(label), "--out", str(tmp_path / "o"),
                       "--resolution", "30x64"]) == 2
    assert "multiples of 2^2 = 4" in capsys.readouterr().err


def test_synthesize_k_images_side_by_side_on_a_drawn_label(tmp_path, capsys):
    """The same facts without the authors' files: a colour label drawn here."""
    from crn_fast.labels import PALETTE
    save_generator(CRN(CRNConfig(widths=(4, 4, 4), k=3)), tmp_path / "k3.ckpt")
    ids = np.random.default_rng(1).integers(0, 19, (48, 96)).astype(np.uint8)
    Image.fromarray(PALETTE[ids]).save(tmp_path / "drawn.png")
    assert synth_main([str(tmp_path / "k3.ckpt"), "--labels", str(tmp_path / "drawn.png"), "--out",
                       str(tmp_path / "o"), "--res", "32x64", "-q"]) == 0
    assert Image.open(tmp_path / "o" / "drawn.png").size == (3 * 64, 32)
    assert synth_main([str(tmp_path / "k3.ckpt"), "--labels", str(tmp_path / "drawn.png"), "--out",
                       str(tmp_path / "o"), "--res", "30x64"]) == 2
    assert "multiples of 2^2 = 4" in capsys.readouterr().err


def test_killed_run_resumes_bitwise(tmp_path):
    """SIGKILL a real run mid-training; its last checkpoint loads and resuming matches an uninterrupted run."""
    import signal
    import time
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "crn_fast.train", "--out", str(out), "--save-every", "1", "--sample-every", "1000",
            *SMALL]
    proc = subprocess.Popen([*args, "--steps", "1000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if torch.load(out / "train_state.pt", weights_only=True)["step"] >= 2:
                    break
            except Exception:  # not written yet (never half-written: atomic rename)
                pass
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    saved = torch.load(out / "train_state.pt", weights_only=True)["step"]
    load_generator(out / "model.ckpt")  # the last good checkpoint is readable
    total = saved + 2
    assert train_main(["--out", str(out), "--steps", str(total), "--resume", "--sample-every", "1000", *SMALL]) == 0
    assert train_main(["--out", str(tmp_path / "ref"), "--steps", str(total), "--sample-every", "1000", *SMALL]) == 0
    a, b = load_generator(out / "model.ckpt").state_dict(), load_generator(tmp_path / "ref" / "model.ckpt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _run_until_logged(cmd, metrics, steps=3, timeout=300):
    """Start a training run; return it once ``metrics`` holds ``steps`` lines."""
    import time
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return proc
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"the run did not log {steps} steps: {proc.communicate()[1][-2000:]}")


def test_sigterm_stops_after_the_step_with_the_run_saved(tmp_path):
    """A scheduler's SIGTERM (preemption) no longer loses the steps since the last checkpoint: the
    run finishes its step, saves, and exits 143; --resume then matches an uninterrupted run bitwise."""
    import signal
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "crn_fast.train", "--out", str(out), "--save-every", "1000", "--sample-every",
           "1000", "--steps", "100000", *SMALL]
    proc = _run_until_logged(cmd, out / "metrics.jsonl")
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    saved = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == saved
    said = f"stopped by SIGTERM at step {saved} of 100000; its state is saved in {out / 'train_state.pt'}"
    assert err.strip().splitlines()[-1] == f"python -m crn_fast.train: {said}: continue with --resume"
    total = saved + 2
    assert train_main(["--out", str(out), "--steps", str(total), "--resume", "--sample-every", "1000", *SMALL]) == 0
    assert train_main(["--out", str(tmp_path / "ref"), "--steps", str(total), "--sample-every", "1000", *SMALL]) == 0
    a, b = load_generator(out / "model.ckpt").state_dict(), load_generator(tmp_path / "ref" / "model.ckpt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_sigterm_to_torchrun_stops_every_rank_at_the_same_step(tmp_path):
    """torchrun passes a SIGTERM on to its ranks, which may see it at different steps: they agree on
    one, both finish it, rank 0 saves it once, and the weights are still identical across ranks."""
    import signal
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "crn_fast.train", "--out", str(out), "--save-every", "1000", "--steps", "100000", *SMALL]
    proc = _run_until_logged(cmd, out / "metrics.jsonl")
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    saved = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == saved
    assert err.count(f"stopped by SIGTERM at step {saved} of 100000") == 1, err
    assert json.loads((out / "ddp.json").read_text())["max_weight_spread"] == 0.0
    assert "[rank0]" not in err and "[rank1]" not in err, err


def test_stop_signals_a_second_ctrl_c_stops_at_once_and_handlers_are_put_back():
    import signal
    from crn_fast.train import StopSignals
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.signum == signal.SIGINT  # the first: noted, the step goes on
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_with_other_options_is_a_clear_error(tmp_path, capsys):
    assert train_main(["--out", str(tmp_path), "--steps", "1", *SMALL]) == 0
    assert train_main(["--out", str(tmp_path), "--steps", "2", "--resume", "--k", "2", *SMALL]) == 2
    err = capsys.readouterr().err  # what differs, and the options that resume it
    assert "holds a different model" in err and "k 1 (now 2)" in err and "(--preset tiny --k 1)" in err, err
    # the run settled "auto" on eager: another backend rounds differently, so it is not the same run
    assert train_main(["--out", str(tmp_path), "--steps", "2", "--resume", "--backend", "triton", *SMALL]) == 2
    assert "--backend 'eager' (now 'triton')" in capsys.readouterr().err
    assert train_main(["--out", str(tmp_path / "empty"), "--steps", "2", "--resume", *SMALL]) == 1
    assert "has no train_state.pt to resume from" in capsys.readouterr().err


def test_the_training_state_keeps_the_vgg_fingerprint_not_its_weights(tmp_path, capsys):
    """train_state.pt holds the frozen VGG-19's fingerprint, not its 80 MB: --vgg-weights gives the
    weights again, and a file changed since the run is refused; a state from before (the weights
    themselves) still resumes."""
    from safetensors.torch import save_file
    from crn_fast.vgg import load_vgg19
    vgg = {k: v.contiguous() for k, v in load_vgg19("random", seed=5).state_dict().items()}
    save_file(vgg, str(tmp_path / "vgg19.safetensors"))
    common = ["--vgg-weights", str(tmp_path / "vgg19.safetensors"), "--out", str(tmp_path / "run"), *SMALL]
    assert train_main(["--steps", "2", *common]) == 0
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert sorted(state["loss"]) == ["lambdas", "running", "vgg"] and state["loss"]["vgg"].startswith("blake2b-128:")
    assert (tmp_path / "run" / "train_state.pt").stat().st_size < 5e6  # the tiny model and Adam's moments
    assert train_main(["--steps", "3", "--resume", *common]) == 0
    capsys.readouterr()
    # the weights file changed since, under the same name: refused, before any step
    save_file({**vgg, "features.0.bias": vgg["features.0.bias"] + 1}, str(tmp_path / "vgg19.safetensors"))
    assert train_main(["--steps", "4", "--resume", *common]) == 1
    err = capsys.readouterr().err
    assert f"--resume: the VGG-19 weights {tmp_path / 'vgg19.safetensors'} are not the ones the run was trained " \
           "with" in err and "give the weights file the run used" in err and err.count("error") == 1, err
    # a training state written before the fingerprint holds the weights themselves: they are restored
    old = {**state, "loss": {"lambdas": state["loss"]["lambdas"], "running": state["loss"]["running"],
                             **{f"vgg.{k}": v for k, v in vgg.items()}}}
    torch.save(old, tmp_path / "run" / "train_state.pt")
    assert train_main(["--steps", "4", "--resume", *common]) == 0
    assert torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)["step"] == 4


def test_the_validation_loss_is_the_loss_on_held_out_layouts_and_changes_no_step(tmp_path, capsys):
    """--val-data: the training loss (eval mode, no gradients) averaged over --val-samples layouts,
    in metrics.jsonl at every --val-every steps and at the end; the run's weights and auto lambdas
    are those of a run without it, bit for bit."""
    from crn_fast.data import device_batch, make_dataset
    from crn_fast.labels import one_hot
    from crn_fast.loss import CRNLoss
    from crn_fast.vgg import load_vgg19
    root = write_pairs(tmp_path / "val", n=5, size=(32, 64))
    val_data = f"pairs:{root / 'labels'},{root / 'images'}"
    common = ["--steps", "3", "--lambdas", "auto", *SMALL]
    assert train_main(["--out", str(tmp_path / "a"), "--val-data", val_data, "--val-every", "2", "--val-samples", "4",
                       *common]) == 0
    assert "validation at step 2: loss " in capsys.readouterr().err
    assert train_main(["--out", str(tmp_path / "b"), *common]) == 0
    sa, sb = (load_generator(tmp_path / d / "model.ckpt").state_dict() for d in ("a", "b"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    state = torch.load(tmp_path / "a" / "train_state.pt", weights_only=True)
    assert torch.equal(state["loss"]["running"],
                       torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)["loss"]["running"])
    val = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
           if "val_loss" in line]
    assert [(v["step"], v["val_images"]) for v in val] == [(2, 4), (3, 4)]
    # a sample sheet of the validation layouts at each validation: layout | target | output, 4 rows
    sheets = {f.name for f in (tmp_path / "a" / "samples").glob("val_*.png")}
    assert sheets == {"val_000002.png", "val_000003.png", "val_latest.png"}
    assert np.asarray(Image.open(tmp_path / "a" / "samples" / "val_latest.png")).shape == (4 * 32, 3 * 64, 3)
    # what it is: the mean loss of the final model over 4 of the 5 layouts, evenly spread
    model = load_generator(tmp_path / "a" / "model.ckpt")
    criterion = CRNLoss(load_vgg19("random", seed=0), "perceptual", "auto").eval()
    criterion.running.copy_(state["loss"]["running"])
    layouts = make_dataset(val_data, (32, 64), split="val")
    assert len(layouts) == 5
    layouts.subset(4)
    with torch.no_grad():
        losses = [float(criterion(model(one_hot(ids, 20)), image, one_hot(ids, 20))[0])
                  for ids, image in (device_batch(ids[None], image[None], "cpu") for ids, image in
                                     (layouts[i] for i in range(4)))]
    assert val[-1]["val_loss"] == pytest.approx(sum(losses) / 4, rel=1e-5)
    from crn_fast.info import main as info_main
    capsys.readouterr()
    assert info_main([str(tmp_path / "a")]) == 0
    shown = f"  val       step 3: loss {val[-1]['val_loss']:.5g} over 4 layouts of {val_data}\n"
    assert shown in capsys.readouterr().out
    # a bad validation file stops the run before its first step, naming the file; --skip-bad leaves it out
    label = root / "labels" / "00000002.png"
    good = label.read_bytes()
    label.write_bytes(b"not a png")
    assert train_main(["--out", str(tmp_path / "c"), "--val-data", val_data, "--val-samples", "4", *common]) == 1
    err = capsys.readouterr().err
    assert "00000002.png" in err and "(or --skip-bad to leave bad files out)" in err and err.count("error") == 1
    assert not (tmp_path / "c" / "train_state.pt").exists()
    assert train_main(["--out", str(tmp_path / "c"), "--val-data", val_data, "--val-samples", "4", "--skip-bad",
                       *common]) == 0
    assert "skipped (--val-data): " in capsys.readouterr().err
    assert json.loads((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()[-1])["val_images"] == 3
    # an image cut short (its header whole) too: each validation file is decoded whole up front
    label.write_bytes(good)
    image = root / "images" / "00000003.jpg"
    image.write_bytes(image.read_bytes()[:-200])
    assert train_main(["--out", str(tmp_path / "d"), "--val-data", val_data, "--val-samples", "4", *common]) == 1
    assert "00000003.jpg: " in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_synthesize_with_the_fused_conv_matches_eager(tmp_path, capsys):
    """crn-synthesize --backend triton --fused-conv on|split|lowres|auto and --fused-head (interpreter here, GPU
    in use) write the eager images; either flag without the triton backend is one usage error."""
    from crn_fast.kernels import can_run
    from crn_fast.labels import PALETTE
    if not can_run(torch.zeros(1)):
        pytest.skip("Triton's interpreter is not enabled")
    torch.manual_seed(0)
    save_generator(CRN(CRNConfig(widths=(8, 8, 8), k=1)), tmp_path / "g.ckpt")
    ids = np.random.default_rng(2).integers(0, 19, (16, 32)).astype(np.uint8)
    Image.fromarray(PALETTE[ids]).save(tmp_path / "a.png")
    common = [str(tmp_path / "g.ckpt"), "--labels", str(tmp_path / "a.png"), "--device", "cpu", "-q"]
    assert synth_main([*common, "--out", str(tmp_path / "eager")]) == 0
    ref = np.asarray(Image.open(tmp_path / "eager" / "a.png"), dtype=np.int16)
    for mode, extra in (("on", []), ("split", []), ("lowres", []), ("auto", []), ("head", ["--fused-head"])):
        flags = ["--fused-conv", mode] if not extra else extra
        assert synth_main([*common, "--out", str(tmp_path / mode), "--backend", "triton", *flags]) == 0
        got = np.asarray(Image.open(tmp_path / mode / "a.png"), dtype=np.int16)
        assert np.abs(got - ref).max() <= 1  # fp32 on both paths: at most a rounding step of 0..255
    for flags, msg in ((["--fused-conv", "on"], "--fused-conv on needs --backend triton"),
                       (["--fused-head"], "--fused-head needs --backend triton")):
        with pytest.raises(SystemExit) as e:
            synth_main([*common, "--out", str(tmp_path / "x"), "--backend", "eager", *flags])
        assert e.value.code == 2 and msg in capsys.readouterr().err
        # the default, --backend auto, picks eager on a CPU: the same refusal, naming why, nothing written
        assert synth_main([*common, "--out", str(tmp_path / "x"), *flags]) == 2
        err = capsys.readouterr().err
        assert f"{flags[0]}" in err and "needs the triton backend" in err and "auto chose eager on cpu" in err, err
        assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="fake CUDA tensors need a CUDA build of torch")
def test_optimizer_is_fused_adam_on_cuda():
    """Training on CUDA steps with PyTorch's fused Adam (one kernel over every parameter); elsewhere
    the default Adam. The same hyperparameters either way (a run resumes with its saved setting)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from crn_fast.train import make_optimizer
    cpu = make_optimizer([torch.nn.Parameter(torch.zeros(3))], 2e-4, torch.device("cpu"))
    with FakeTensorMode():
        cuda = make_optimizer([torch.nn.Parameter(torch.zeros(3, device="cuda"))], 2e-4, torch.device("cuda", 0))
    assert cuda.defaults["fused"] is True and not cpu.defaults["fused"]
    assert {k: v for k, v in cuda.defaults.items() if k != "fused"} == \
        {k: v for k, v in cpu.defaults.items() if k != "fused"}


# ----------------------------------------------------------------------------- the host runs ahead
def _reads_in_training(tmp_path, steps, monkeypatch):
    """Values the training code (auto lambdas too) reads back from tensors: float(), int(), bool(),
    .item(), .tolist(). On a GPU each one waits for the device. Only reads made by the step's own
    code are counted (train, its run folder's writers, loss, model, VGG, labels, kernels), not the
    CPU-side sampler's or the data's."""
    import crn_fast
    from crn_fast.train import TrainConfig, train
    pkg = Path(crn_fast.__file__).parent
    watched = tuple(str(p) for p in (pkg / "train.py", pkg / "run_folder.py", pkg / "loss.py", pkg / "model.py",
                                     pkg / "vgg.py", pkg / "labels.py", pkg / "kernels"))
    reads = []
    for name in ("__float__", "__int__", "__bool__", "item", "tolist"):
        def counted(self, *a, _real=getattr(torch.Tensor, name), _name=name, **kw):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(watched) and caller.co_name != "__iter__":  # StepBatches' indices
                reads.append(f"{caller.co_name}:{_name}")
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    train(TrainConfig(out=str(tmp_path / f"run{steps}"), steps=steps, res=(32, 64), batch_size=2, log_every=steps,
                      sample_every=steps, save_every=steps, progress=False, lambdas="auto"))
    monkeypatch.undo()
    return sorted(reads)


def test_a_train_config_from_python_takes_the_command_lines_forms_and_names_a_wrong_kind():
    """TrainConfig from Python: res as (H, W), a list or "HxW" (the command line's form); a value of
    the wrong kind ("2" for 2) is a UsageError naming the option, where it was a TypeError deep in
    the run; --amp takes what the command line offers (fp32 is no autocast precision)."""
    from crn_fast.errors import UsageError
    from crn_fast.train_config import TrainConfig
    for res in ("32x64", [32, 64], (32, 64)):
        assert TrainConfig(res=res).validate().res == (32, 64)
    for kw, msg in [({"steps": "2"}, r"^--steps '2': must be an integer or None \(the default\)$"),
                    ({"lr": "1e-4"}, r"^--lr '1e-4': must be a number$"),
                    ({"batch_size": 2.0}, r"^--batch-size 2.0: must be an integer$"),
                    ({"log_every": True}, r"^--log-every True: must be an integer$"),
                    ({"resume": "yes"}, r"^--resume 'yes': must be True or False$"),
                    ({"amp": "fp32"}, r"^--amp 'fp32': valid: off, bf16, fp16$"),
                    ({"res": (30, 64)}, r"^--res: input size 30x64 cannot run on this 5-module CRN"),
                    ({"res": "32 by 64"}, r"^--res: resolution '32 by 64' is not HEIGHTxWIDTH")]:
        with pytest.raises(UsageError, match=msg):
            TrainConfig(**kw).validate()


def test_training_steps_do_not_wait_for_the_device(tmp_path, monkeypatch):
    """Between the steps that log, sample or save, a training step reads nothing back from the device
    (no float(loss), no per-term reads, no data-dependent branch), so on a GPU the host queues the
    next step and loads its batch while the current one runs. 3 steps and 9 read the same values:
    the NaN/inf check, the loss and its terms, once, at the last step."""
    short, long = _reads_in_training(tmp_path, 3, monkeypatch), _reads_in_training(tmp_path, 9, monkeypatch)
    assert short == long, (short, long)
    assert "_train:tolist" in short and "check:tolist" in short


@pytest.mark.gpu
def test_a_cuda_training_step_never_synchronizes():
    """The real check on a GPU: crn_fast.train's step (triton backend, bf16 autocast, VGG-19 loss,
    fused Adam, the NaN/inf watch) under CUDA's sync debug mode, which raises on any host wait."""
    from crn_fast.labels import one_hot
    from crn_fast.loss import CRNLoss
    from crn_fast.train import FirstNonFinite, make_optimizer, train_step
    from crn_fast.vgg import load_vgg19
    model = CRN.from_preset("tiny", backend="triton").cuda().train()
    crit = CRNLoss(load_vgg19("random"), "perceptual", "auto").cuda()
    opt = make_optimizer(model.parameters(), 1e-4, torch.device("cuda"))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    ids = torch.randint(0, 20, (2, 64, 128), device="cuda")
    target = torch.rand(2, 3, 64, 128, device="cuda") * 255
    watch = FirstNonFinite(torch.device("cuda"))
    train_step(model, crit, opt, scaler, one_hot(ids, 20), target, torch.bfloat16)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (1, 2):
            loss, terms = train_step(model, crit, opt, scaler, one_hot(ids, 20), target, torch.bfloat16)
            watch.update(loss, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    watch.check(2, Path("unused"))
    assert torch.isfinite(loss) and len(terms) == 6


def test_compile_trains_the_same_steps_and_the_same_files(tmp_path):
    """--compile: the generator and the loss through torch.compile (Inductor's C++ code on a CPU)
    take the eager run's steps, to rounding, and write the same files; a resume takes --compile from
    the run unless given (--compile off turns it off)."""
    from crn_fast.checkpoint import read_generator_file
    args = ["--steps", "3", *SMALL]
    assert train_main(["--out", str(tmp_path / "eager"), *args]) == 0
    r = run(["-m", "crn_fast.train", "--out", str(tmp_path / "c"), "--compile", *args])
    assert r.returncode == 0, r.stderr
    assert "torch.compile (default; the first step compiles)" in r.stderr
    assert "compiled: the first step took" in r.stderr
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("eager", "c")]
    assert np.allclose(losses[0], losses[1], rtol=1e-4, atol=0), losses
    weights = [read_generator_file(tmp_path / d / "model.ckpt")[1] for d in ("eager", "c")]
    assert weights[0].keys() == weights[1].keys()  # the module's own names: no _orig_mod. prefix
    assert all(torch.allclose(weights[0][k], weights[1][k], rtol=1e-3, atol=1e-5) for k in weights[0])
    assert json.loads((tmp_path / "c" / "config.json").read_text())["compile"] == "default"
    r = run(["-m", "crn_fast.train", "--out", str(tmp_path / "c"), "--resume", "--steps", "4", "--compile", "off"])
    assert r.returncode == 0 and "torch.compile" not in r.stderr, r.stderr
    with pytest.raises(SystemExit) as e:
        train_main(["--out", str(tmp_path / "c"), "--resume", "--steps", "5", "--compile", "fastest"])
    assert e.value.code == 2


def test_a_failed_compile_is_one_line_and_the_run_starts_again_in_its_place(tmp_path):
    """torch.compile failing at step 1 (here Inductor finds no C++ compiler) is one line naming
    --compile; the folder it leaves (config.json, an empty metrics.jsonl) holds no step, so the same
    command without --compile starts the run there without --overwrite, and --resume says why not."""
    out = tmp_path / "run"
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ic")}
    r = run(["-m", "crn_fast.train", "--out", str(out), "--steps", "2", "--compile", *SMALL], env=env)
    lines = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--compile default: torch.compile failed at step 1 (" in lines[0] and "--compile off" in lines[0]
    assert not (out / "metrics.jsonl").read_text() and not (out / "train_state.pt").exists()
    r = run(["-m", "crn_fast.info", str(out)])
    assert r.returncode == 0 and "stopped   before its first step" in r.stdout and "resume  " not in r.stdout, r.stdout
    assert train_main(["--out", str(out), "--resume", "--steps", "2"]) == 1
    r = run(["-m", "crn_fast.train", "--out", str(out), "--steps", "2", *SMALL])
    assert r.returncode == 0 and "stopped before its first step (no checkpoint, no metrics): starting it again" \
        in r.stderr, r.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "config.json").read_text())["compile"] == "off"


def test_only_a_run_that_never_stepped_is_taken_over(tmp_path):
    """Without --overwrite a new run takes the place only of one that wrote nothing but its start: a
    run with any metrics line, checkpoint, or a folder whose config.json is not a run's is refused."""
    from crn_fast.run_folder import never_stepped
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": {}, "data": "synthetic", "backend_used": "eager"}))
    assert never_stepped(out)
    (out / "metrics.jsonl").write_text("")
    assert never_stepped(out)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert not never_stepped(out)
    (out / "metrics.jsonl").write_text("")
    (out / "model.ckpt").write_bytes(b"x")
    assert not never_stepped(out)
    (out / "model.ckpt").unlink()
    (out / "config.json").write_text('{"name": "someone else\'s"}')
    assert not never_stepped(out) and not never_stepped(tmp_path / "nothing")
    assert train_main(["--out", str(out), "--steps", "1", *SMALL]) == 2  # refused: not a run of ours


@pytest.mark.gpu
def test_validation_never_waits_for_the_gpu_until_its_sums_are_read():
    """validate() on a GPU under CUDA's sync debug mode: its layouts are copied from pinned memory
    and its count added as a number, so the host decodes the next batch while the GPU runs this one."""
    from crn_fast.labels import CITYSCAPES
    from crn_fast.loss import CRNLoss
    from crn_fast.train import TrainConfig, make_val_set, val_scores, validate
    from crn_fast.vgg import load_vgg19
    model = CRN.from_preset("tiny", backend="triton").cuda().train()
    crit = CRNLoss(load_vgg19("random"), "perceptual").cuda()
    val = make_val_set(TrainConfig(val_data="synthetic", val_samples=4), (64, 128), CITYSCAPES)
    validate(model, crit, val, 2, torch.device("cuda"), torch.bfloat16, 20)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums = validate(model, crit, val, 2, torch.device("cuda"), torch.bfloat16, 20)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    scores = val_scores(sums)
    assert scores["val_images"] == 4 and np.isfinite(scores["val_loss"]) and model.training


@pytest.mark.gpu
def test_compiled_triton_training_matches_eager_on_a_gpu():
    """--compile with the triton backend (crn-train's default on a GPU): the generator with its
    torch.ops.crn_fast operators (their backward registered) and the VGG-19 loss compiled by
    Inductor take the uncompiled steps, to bf16 rounding."""
    from crn_fast.labels import one_hot
    from crn_fast.loss import CRNLoss
    from crn_fast.train import compile_for_training, make_optimizer, train_step
    from crn_fast.vgg import load_vgg19
    ids = torch.randint(0, 20, (2, 64, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    target = torch.rand(2, 3, 64, 128, device="cuda", generator=torch.Generator("cuda").manual_seed(1)) * 255
    losses = {}
    for mode in ("off", "default"):
        torch.manual_seed(0)
        model = CRN.from_preset("tiny", backend="triton").cuda().train()
        crit = CRNLoss(load_vgg19("random"), "perceptual").cuda()
        opt = make_optimizer(model.parameters(), 1e-4, torch.device("cuda"))
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        forward, loss_fn = compile_for_training(model, crit, mode)
        losses[mode] = [float(train_step(forward, loss_fn, opt, scaler, one_hot(ids, 20), target, torch.bfloat16)[0])
                        for _ in range(3)]
    assert np.allclose(losses["off"], losses["default"], rtol=2e-2), losses


@pytest.mark.gpu
def test_synthesis_queues_each_batch_before_reading_the_last_one_back(tmp_path, monkeypatch):
    """crn-synthesize on a GPU under CUDA's sync-debug mode "error" while each batch is queued: its
    layouts go up from pinned memory and its images come back into pinned memory behind the
    generator, so nothing waits there; the one wait is each batch's copy event, after the next batch
    is queued. The files are a CPU run's, to one 8-bit level."""
    import crn_fast.synthesize as S
    from crn_fast.labels import PALETTE
    torch.manual_seed(0)
    save_generator(CRN.from_preset("tiny"), tmp_path / "tiny.ckpt")
    (tmp_path / "labels").mkdir()
    for i in range(5):
        ids = np.random.default_rng(i).integers(0, 19, (64, 128)).astype(np.uint8)
        Image.fromarray(PALETTE[ids]).save(tmp_path / "labels" / f"{i}.png")
    args = [str(tmp_path / "tiny.ckpt"), "--labels", str(tmp_path / "labels"), "--batch-size", "2", "--backend",
            "eager", "-q"]
    assert synth_main([*args, "--out", str(tmp_path / "warm"), "--device", "cuda"]) == 0  # cuDNN, the allocator
    real = S.run_batch

    def strict(*a):
        torch.cuda.set_sync_debug_mode("error")
        try:
            images, finite, copied = real(*a)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert images.is_pinned() and copied is not None
        return images, finite, copied

    monkeypatch.setattr(S, "run_batch", strict)
    assert synth_main([*args, "--out", str(tmp_path / "gpu"), "--device", "cuda"]) == 0
    monkeypatch.setattr(S, "run_batch", real)
    assert synth_main([*args, "--out", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    for i in range(5):
        gpu, cpu = (np.asarray(Image.open(tmp_path / d / f"{i}.png")).astype(int) for d in ("gpu", "cpu"))
        assert np.abs(gpu - cpu).max() <= 1, i


def test_the_first_images_per_s_leaves_out_the_compile():
    """With --compile the first log window's images/s leaves out the first step, which compiled (60 s
    for the tiny preset on a CPU, where a step takes 0.5): 10 steps of 2 images in 64.5 s, the first
    60 s, read 4 images/s, not 0.31. A window of the first step alone keeps what it measured."""
    from crn_fast.train import images_per_s
    assert images_per_s(20, 64.5, (60.0, 2)) == pytest.approx(18 / 4.5)
    assert images_per_s(20, 64.5) == pytest.approx(20 / 64.5)
    assert images_per_s(2, 60.0, (60.0, 2)) == pytest.approx(2 / 60.0)


def test_loader_workers_default_to_the_cores_on_a_gpu_and_to_none_on_a_cpu(monkeypatch):
    """--workers' default: on a GPU, worker processes decode the next batches while the steps run
    (one a core, shared by the node's torchrun ranks, at most 8); on a CPU none. A given --workers
    always wins. It does not change the data (each sample depends on its index only)."""
    from crn_fast.train import loader_workers
    monkeypatch.setattr("crn_fast.cli.cpu_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(None, "cpu") == 0 and loader_workers(3, torch.device("cpu")) == 3
    assert loader_workers(None, torch.device("cuda", 1)) == 8 and loader_workers(0, "cuda") == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers(None, "cuda") == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert loader_workers(None, "cuda") == 1


def test_sample_sheets_are_written_in_the_background_one_at_a_time(tmp_path):
    """Training goes on while a sheet's PNG is encoded and written; the next sheet waits for the
    last, and a failed write stops the run at the next sheet or at the end, never silently."""
    from crn_fast.errors import CRNError
    from crn_fast.run_folder import SampleWriter
    sheet = np.random.default_rng(0).integers(0, 255, (8, 12, 3)).astype(np.uint8)
    w = SampleWriter()
    w.write(sheet, [tmp_path / "step_1.png", tmp_path / "latest.png"], 1)
    w.write(sheet[::-1].copy(), [tmp_path / "step_2.png", tmp_path / "latest.png"], 2)  # after the first
    w.wait()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "step_1.png")), sheet)
    assert (tmp_path / "latest.png").read_bytes() == (tmp_path / "step_2.png").read_bytes()
    (tmp_path / "bad.png").mkdir()
    w.write(sheet, [tmp_path / "bad.png"], 3)
    with pytest.raises(CRNError, match="bad.png is a folder"):
        w.close()


def test_jpeg_labels_are_named_once_even_when_every_value_reads(tmp_path, capsys):
    """Greyscale JPEG labels whose compressed edges land on neighbouring ids (other classes) decode
    without an error: training and synthesis still say, once, that the labels are JPEGs."""
    for d in ("l", "i"):
        (tmp_path / d).mkdir()
    for n in range(2):
        ids = np.full((32, 64), 11, np.uint8)
        ids[:, 35:] = 14  # person | truck: the edge's new values, 12 and 13, are rider and car
        Image.fromarray(ids).save(tmp_path / "l" / f"{n}.jpg", quality=70)
        assert set(np.unique(np.asarray(Image.open(tmp_path / "l" / f"{n}.jpg")))) == {11, 12, 13, 14}
        Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "i" / f"{n}.png")
    data = f"pairs:{tmp_path / 'l'},{tmp_path / 'i'}"
    args = ["--data", data, "--steps", "1", "--out", str(tmp_path / "run"), *SMALL]
    assert train_main(args) == 0
    err = capsys.readouterr().err
    assert err.count("2 of 2 label(s) are JPEGs (the first: ") == 1 and "save labels in a lossless format" in err
    assert synth_main([str(tmp_path / "run" / "model.ckpt"), "--labels", str(tmp_path / "l"), "--out",
                       str(tmp_path / "syn"), "--no-progress"]) == 0
    assert capsys.readouterr().err.count("are JPEGs") == 1
