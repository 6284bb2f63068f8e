"""The command-line surface under bad input and faults: nothing lost, nothing cryptic.

Every tool answers a bad option or a fault with one line on stderr and its documented exit status
(0 done, 1 runtime error, 2 usage error, 3 verification failed) and leaves nothing half-written.
"""
import contextlib
import gc
import json
import os
import re
import stat
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from crn_fast import CRN, CRNConfig, CheckpointError, load_generator, save_generator
from crn_fast.errors import CRNError, UsageError
from crn_fast.labels import PALETTE, TRAIN_ID, VOID, VOID_COLORS, one_hot
from crn_fast.train import TrainConfig, main as train_main, train
from crn_fast.synthesize import main as synth_main

from released_models import ADAM_SLOTS, INDEX_ENTRIES, variables
from test_data import add_cityscapes_extras, write_cityscapes, write_pairs

SMALL = ["--res", "32x64", "--batch-size", "2", "--no-progress", "--log-every", "1", "-q"]


def cli(*args, timeout=300):
    """A tool in its own process, its ResourceWarnings shown (Python hides them): a file it leaves
    open, on an error path too, is then a second line on stderr, which one_line refuses."""
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "always::ResourceWarning"})
    return r.returncode, r.stderr


@contextlib.contextmanager
def no_file_left_open():
    """The same for a tool run in this process: every ResourceWarning shown, garbage collected at the
    end, none allowed (a file left open is recorded here, or logged to stderr once a tool's logging
    captures warnings)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    left = [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)]
    assert not left, left


def one_line(err: str) -> bool:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return len(lines) == 1 and "Traceback" not in err


def steps_in(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = CRN(CRNConfig(widths=(8, 6, 4), k=1))
    path = tmp_path_factory.mktemp("ck") / "m.ckpt"
    save_generator(m, path)
    return path


# ----------------------------------------------------------------------------- data loss
def test_training_into_an_existing_run_refuses_then_overwrite_restarts(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--out", out, "--steps", "3", *SMALL]) == 0
    before = (out / "train_state.pt").read_bytes()
    assert train_main(["--out", out, "--steps", "2", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "train_state.pt at step 3" in err and "--resume" in err and "--overwrite" in err and one_line(err)
    assert (out / "train_state.pt").read_bytes() == before and steps_in(out) == [1, 2, 3]
    assert train_main(["--out", out, "--steps", "2", "--overwrite", *SMALL]) == 0
    assert steps_in(out) == [1, 2] and torch.load(out / "train_state.pt", weights_only=True)["step"] == 2


def test_a_run_stopped_by_bad_data_keeps_the_disk_as_it_was(tmp_path, capsys):
    """--overwrite removes the old run only once the new one is set up: a typo in --data (or any
    bad option or file found while setting up) stops it with the old run intact; a new --out that
    fails the same way is never created."""
    out = tmp_path / "run"
    assert train_main(["--out", out, "--steps", "2", *SMALL]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    bad = ["--data", f"pairs:{tmp_path / 'nope'},{tmp_path / 'nope'}"]
    assert train_main(["--out", out, "--steps", "2", "--overwrite", *bad, *SMALL]) == 1
    assert "nope" in capsys.readouterr().err
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert train_main(["--out", tmp_path / "new" / "run", "--steps", "2", *bad, *SMALL]) == 1
    assert train_main(["--out", tmp_path / "new2", "--steps", "2", *SMALL, "--res", "30x64"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_cut_image_among_the_sample_sheets_layouts_keeps_the_old_run(tmp_path, capsys):
    """The sample sheets' first layouts and images are loaded before --overwrite removes the old run:
    an image whose data is cut (its header whole, so only loading finds it) used to stop the new run
    after the old one was gone."""
    root = write_pairs(tmp_path / "p", n=4, size=(32, 64))
    image = root / "images" / "00000001.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(image)
    image.write_bytes(image.read_bytes()[:image.stat().st_size // 2])
    out = tmp_path / "run"
    assert train_main(["--out", out, "--steps", "1", *SMALL]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert train_main(["--out", out, "--steps", "1", "--overwrite", "--data",
                       f"pairs:{root / 'labels'},{root / 'images'}", *SMALL]) == 1
    assert "00000001.jpg: unreadable image" in capsys.readouterr().err
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_files_get_the_permissions_open_would_give(tmp_path, tiny_ckpt, umask):
    from crn_fast.images import save_png
    old = os.umask(umask)
    try:
        save_generator(load_generator(tiny_ckpt), tmp_path / "g.ckpt")
        save_png(np.zeros((2, 2, 3), np.uint8), tmp_path / "p.png")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert want == 0o666 & ~umask
    for f in ("g.ckpt", "p.png"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == want, f


def test_a_run_without_train_state_says_what_is_there_and_stale_temporaries_go(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--out", out, "--steps", "1", *SMALL]) == 0
    (out / "train_state.pt").unlink()  # as if killed while writing the first training state
    stale = out / ".train_state.pt.abc123.tmp"
    stale.write_bytes(b"\0" * 1000)
    assert train_main(["--out", out, "--steps", "2", "--resume", *SMALL]) == 1
    err = capsys.readouterr().err
    assert "no train_state.pt" in err and f"--overwrite --init-from {out / 'model.ckpt'}" in err and one_line(err)
    # the advice works as given: the old weights are read before --overwrite removes the old run
    assert train_main(["--out", out, "--steps", "1", "--overwrite", "--init-from", out / "model.ckpt", *SMALL]) == 0
    assert not stale.exists() and not list(out.glob(".*.tmp"))


def test_synthesize_removes_its_own_stale_temporaries_only(tmp_path, tiny_ckpt):
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(tmp_path / "l.png")
    out = tmp_path / "o"
    out.mkdir()
    (out / ".l.png.x1y2.tmp").write_bytes(b"cut")  # a killed run's PNG temporary
    (out / ".notes.txt.x1y2.tmp").write_bytes(b"someone else's")
    assert synth_main([str(tiny_ckpt), "--labels", str(tmp_path / "l.png"), "--out", str(out), "-q"]) == 0
    assert not (out / ".l.png.x1y2.tmp").exists() and (out / ".notes.txt.x1y2.tmp").exists()


class Holder:
    """Another process that holds a folder as a crn_fast writer (checkpoint.writing_into), alone as a
    training run does or shared as crn-synthesize does, until the with-block ends."""

    def __init__(self, folder, alone: bool):
        code = ("import sys\nfrom crn_fast.checkpoint import writing_into\n"
                f"with writing_into({str(folder)!r}, '--out', alone={alone}):\n"
                "    print('held', flush=True)\n    sys.stdin.read()\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def __enter__(self):
        assert self.proc.stdout.readline().strip() == "held"
        return self

    def __exit__(self, *exc):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0
        self.proc.stdout.close()  # or a ResourceWarning, shown under dev mode, would end in a tool's stderr


def test_a_second_training_run_into_a_folder_in_use_stops_in_one_line(tmp_path, capsys):
    """A run started by mistake into the --out of a run still going (a second terminal, a job
    requeued while the first still runs) stops in one line and leaves that run's files alone,
    whether the first run has logged a step yet or not (then it looks like one that never stepped,
    which a new run would replace), and with --overwrite or --resume too. Once the first run has
    ended, the folder is free."""
    out = tmp_path / "run"
    assert train_main(["--out", out, "--steps", "1", *SMALL]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    fresh = tmp_path / "fresh"  # what a run that has not finished its first step holds
    fresh.mkdir()
    (fresh / "config.json").write_text((out / "config.json").read_text())
    (fresh / "metrics.jsonl").write_text("")
    busy = "is being written by another crn_fast run that is still going (training or synthesis); wait for it"
    for folder, extra in ((out, []), (out, ["--overwrite"]), (out, ["--resume", "--steps", "2"]), (fresh, [])):
        with Holder(folder, alone=True):
            assert train_main(["--out", folder, "--steps", "1", *extra, *SMALL]) == 1
        err = capsys.readouterr().err
        assert f"--out {folder} {busy}" in err and one_line(err), (extra, err)
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before
    assert sorted(f.name for f in fresh.iterdir()) == ["config.json", "metrics.jsonl"]
    assert train_main(["--out", out, "--steps", "2", "--resume", *SMALL]) == 0  # the first run has ended


def test_synthesis_runs_share_their_out_and_keep_each_others_temporaries(tmp_path, tiny_ckpt, capsys):
    """Two crn-synthesize runs of different layouts into one --out go on side by side. A run cleans
    the PNG temporaries of killed runs only when no other run writes there: while one does, a
    temporary may be one of its images being written. A training run's folder is not shared."""
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(tmp_path / "l.png")
    out = tmp_path / "o"
    out.mkdir()
    temporary = out / ".other.png.x1y2.tmp"  # an image another run is writing
    temporary.write_bytes(b"half")
    with Holder(out, alone=False):
        assert synth_main([str(tiny_ckpt), "--labels", str(tmp_path / "l.png"), "--out", str(out), "-q"]) == 0
        assert (out / "l.png").is_file() and temporary.exists()
    assert synth_main([str(tiny_ckpt), "--labels", str(tmp_path / "l.png"), "--out", str(out), "-q"]) == 0
    assert not temporary.exists()  # no other run: it was a killed run's


def test_writing_into_holds_a_folder_alone_or_shared(tmp_path):
    from crn_fast.checkpoint import writing_into
    cleaned = []
    with writing_into(tmp_path, "--out", alone=False, clean=lambda: cleaned.append("first")):
        with writing_into(tmp_path, "--out", alone=False, clean=lambda: cleaned.append("second")):
            pass
        with pytest.raises(CRNError, match="still going .training or synthesis.; wait for it to end, or give"):
            with writing_into(tmp_path, "--out", alone=True):
                pass
    assert cleaned == ["first"]  # the second run found the first writing there
    with writing_into(tmp_path, "--out", alone=True):
        t = time.monotonic()
        with pytest.raises(CRNError, match=r"still going \(a training run\)"):
            with writing_into(tmp_path, "--out", alone=False, wait_s=0.3):
                pass
        assert 0.3 <= time.monotonic() - t < 5  # it waited for the holder, then gave up
    with writing_into(tmp_path, "--out", alone=True, clean=lambda: cleaned.append("free")):
        pass  # every hold ended with its with-block
    assert cleaned == ["first", "free"]


def test_synthesize_refuses_two_labels_with_one_output_name(tmp_path, tiny_ckpt, capsys):
    labels = tmp_path / "labels"
    labels.mkdir()
    for ext in ("png", "bmp"):
        Image.fromarray(np.zeros((16, 32), np.uint8)).save(labels / f"000.{ext}")
    assert synth_main([str(tiny_ckpt), "--labels", str(labels), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "000.png" in err and "000.bmp" in err and "both be written as 000.png" in err and one_line(err)
    assert not (tmp_path / "o").exists()


def test_synthesize_never_writes_over_its_own_layouts(tmp_path, tiny_ckpt, capsys):
    """--out the labels' own folder would replace each PNG layout by its image (it did, silently):
    refused before anything is written, however the folder is spelled; other names may share it."""
    labels = tmp_path / "labels"
    labels.mkdir()
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(labels / "000.png")
    before = (labels / "000.png").read_bytes()
    for out in (labels, tmp_path / "labels" / ".." / "labels"):
        assert synth_main([str(tiny_ckpt), "--labels", str(labels), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "would overwrite the layout" in err and "another folder" in err and one_line(err), err
    assert (labels / "000.png").read_bytes() == before and sorted(labels.iterdir()) == [labels / "000.png"]
    (labels / "000.png").rename(labels / "000.bmp")  # its image, 000.png, is no layout: written beside it
    assert synth_main([str(tiny_ckpt), "--labels", str(labels), "--out", str(labels), "--no-progress"]) == 0
    assert sorted(p.name for p in labels.iterdir()) == ["000.bmp", "000.png"]


def test_synthesize_a_cityscapes_label_folder_as_it_is_shipped(tmp_path, tiny_ckpt):
    """--labels gtFine/val: one image per frame from its labelIds, through the cities' folders; run
    again with --out inside it, the earlier outputs are not read as layouts."""
    val = add_cityscapes_extras(write_cityscapes(tmp_path / "cs", n=3, size=(64, 128), split="val")) / "gtFine" / "val"
    for out in (tmp_path / "o", val / "o", val / "o"):
        assert synth_main([str(tiny_ckpt), "--labels", str(val), "--out", str(out), "--no-progress", "-q"]) == 0
        assert sorted(p.name for p in out.iterdir()) == [
            "aachen_000001_000019_gtFine_labelIds.png", "bremen_000000_000019_gtFine_labelIds.png",
            "bremen_000002_000019_gtFine_labelIds.png"]
    assert (val / "o" / "bremen_000000_000019_gtFine_labelIds.png").read_bytes() == \
        (tmp_path / "o" / "bremen_000000_000019_gtFine_labelIds.png").read_bytes()


# ----------------------------------------------------------------------------- bad data, found early
def test_unknown_colour_is_found_before_the_first_step(tmp_path, capsys):
    root = write_pairs(tmp_path / "p", n=12)
    Image.fromarray(np.full((16, 32, 3), 7, np.uint8)).save(root / "labels" / "00000010.png")
    out = tmp_path / "run"
    assert train_main(["--data", f"pairs:{root / 'labels'},{root / 'images'}", "--out", out, "--steps", "5",
                       "--res", "16x32", "--batch-size", "2", "--no-progress", "-q"]) == 1
    err = capsys.readouterr().err
    assert "00000010.png" in err and "not Cityscapes label colours" in err and "--skip-bad" in err
    assert not (out / "metrics.jsonl").exists()


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header is intact, the data is cut


@pytest.mark.parametrize("scan", ["always", "never"])
def test_skip_bad_skips_a_png_whose_data_is_cut(tmp_path, scan):
    root = write_pairs(tmp_path / "p", n=4, size=(64, 128))
    for f in (root / "labels").iterdir():  # noisy labels: the PNG is big enough to cut mid-data
        ids = np.random.default_rng(0).integers(0, 19, (64, 128)).astype(np.uint8)
        Image.fromarray(PALETTE[ids]).save(f)
    _cut(root / "labels" / "00000001.png")
    _cut(next((root / "images").glob("00000002.*")))
    from crn_fast.data import make_dataset
    spec = f"pairs:{root / 'labels'},{root / 'images'}"
    ds = make_dataset(spec, skip_bad=True, scan=scan)
    samples = [ds[i] for i in range(len(ds))]  # a cut label found late is replaced by the next good sample
    assert all(s[0].shape == (64, 128) for s in samples)
    assert any("00000002" in m for m in ds.skipped)  # the cut JPEG fails at its header: found up front
    if scan == "always":  # the label scan finds the cut PNG up front too
        assert len(ds) == 2 and any("00000001.png" in m and "truncated" in m for m in ds.skipped)


def test_a_bad_file_in_a_worker_is_one_line(tmp_path):
    root = write_pairs(tmp_path / "p", n=4)
    _cut(next((root / "images").glob("00000002.*")))
    code, err = cli("-m", "crn_fast.train", "--data", f"pairs:{root / 'labels'},{root / 'images'}", "--out",
                    tmp_path / "run", "--steps", "4", "--res", "16x32", "--batch-size", "2", "--workers", "2",
                    "--no-progress", "-q")
    assert code == 1 and one_line(err) and "00000002" in err and "unreadable image" in err, err


# ----------------------------------------------------------------------------- resume is exact
def test_resume_refuses_options_that_change_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--out", out, "--steps", "1", *SMALL]) == 0
    assert train_main(["--out", out, "--steps", "2", "--resume", "--lr", "0.01", "--seed", "3",
                       "--lambdas", "256p", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.0001 (now 0.01)" in err and "--seed 0 (now 3)" in err and "--lambdas" in err and one_line(err)
    assert train_main(["--out", out, "--steps", "2", "--resume", "--train-modules", "3,head", *SMALL]) == 2
    assert "--train-modules None (now '3,head')" in capsys.readouterr().err
    # the documented changeable ones are accepted
    assert train_main(["--out", out, "--steps", "2", "--resume", "--save-every", "5", "--log-every", "2",
                       "--res", "32x64", "--batch-size", "2", "--no-progress", "-q"]) == 0


def test_resume_says_when_the_data_changed_since_the_run(tmp_path, capsys):
    """--resume continues exactly only on the same files: the batches of every step depend on them.
    Files added, removed or renamed since the run was saved give one warning (the run goes on)."""
    root = write_pairs(tmp_path / "p", n=6, size=(32, 64))
    out, data = tmp_path / "run", ["--data", f"pairs:{root / 'labels'},{root / 'images'}"]
    assert train_main(["--out", out, "--steps", "1", *data, *SMALL]) == 0
    assert train_main(["--out", out, "--steps", "2", "--resume", *data, *SMALL]) == 0
    assert "--resume:" not in capsys.readouterr().err  # the same files: nothing said
    for f in ("labels/00000006.png", "images/00000006.jpg"):
        (root / f).write_bytes((root / f.replace("6", "0")).read_bytes())
    assert train_main(["--out", out, "--steps", "3", "--resume", *data, *SMALL]) == 0
    assert ("--resume: the data now holds 7 samples, the run had 6 (added, removed, renamed or skipped since): "
            "the batches from step 2 on differ from the run's own") in capsys.readouterr().err
    for f in ("labels/00000006.png", "images/00000006.jpg"):
        (root / f).rename(root / f.replace("6", "9"))
    assert train_main(["--out", out, "--steps", "4", "--resume", *data, *SMALL]) == 0
    assert "the data now holds 7 samples, the run had 7 but other files" in capsys.readouterr().err


def test_resume_from_a_foreign_train_state_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--out", out, "--steps", "1", *SMALL]) == 0
    torch.save({"step": 1, "weights": {}}, out / "train_state.pt")
    assert train_main(["--out", out, "--steps", "2", "--resume", *SMALL]) == 1
    err = capsys.readouterr().err
    assert "not a crn_fast training state" in err and one_line(err)


def test_metrics_after_a_resume_do_not_repeat_steps(tmp_path):
    out = tmp_path / "run"
    assert train_main(["--out", out, "--steps", "2", *SMALL]) == 0
    at2 = (out / "train_state.pt").read_bytes()
    assert train_main(["--out", out, "--steps", "4", "--resume", *SMALL]) == 0
    (out / "train_state.pt").write_bytes(at2)  # as if killed after logging steps 3-4 but before saving them
    assert train_main(["--out", out, "--steps", "4", "--resume", *SMALL]) == 0
    assert steps_in(out) == [1, 2, 3, 4]


def test_a_metrics_line_cut_by_a_kill_does_not_stop_the_resume(tmp_path, capsys):
    """A run killed while writing metrics.jsonl leaves its last line cut: --resume was a
    JSONDecodeError traceback. The cut line is left out, with a warning."""
    out = tmp_path / "run"
    assert train_main(["--out", out, "--steps", "2", *SMALL]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')
    assert train_main(["--out", out, "--steps", "3", "--resume", *SMALL]) == 0
    assert "metrics.jsonl: left out 1 unreadable line(s) (a write cut when the run was stopped)" in \
        capsys.readouterr().err
    assert steps_in(out) == [1, 2, 3]


# ----------------------------------------------------------------------------- one line, not a traceback
@pytest.mark.parametrize("args,msg", [
    (["--batch-size", "0"], "--batch-size/--batch: 0 must be >= 1"), (["--save-every", "0"], "--save-every: 0 must be"),
    (["--log-every", "0"], "--log-every: 0 must be >= 1"), (["--steps", "0"], "--steps: 0 must be >= 1"),
    (["--steps", "-3"], "--steps: -3 must be >= 1"), (["--lambdas", "1,2,x"], "--lambdas '1,2,x'"),
    (["--res", "30x64"], "multiples of 2^4 = 16"), (["--lr", "nan"], "finite number"),
    (["--seed", "-1"], "--seed: -1 must be >= 0"),  # was a traceback from the data order's generator
])
def test_training_options_are_usage_errors(tmp_path, args, msg):
    code, err = cli("-m", "crn_fast.train", "--out", tmp_path / "run", "--no-progress", *args)
    assert code == 2 and msg in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("lambdas,msg", [
    ("1,2,3", "needs 6 numbers (pixel, conv1_2, conv2_2, conv3_2, conv4_2, conv5_2), got 3"),
    ("1,2,3,4,-5,inf", "each weight must be a finite number >= 0, not conv4_2 -5, conv5_2 inf"),
    ((1.0, 2.0), "needs 6 numbers"),  # from Python too: TrainConfig(lambdas=...) is checked the same way
    ([0, 0, 0, 0, 0, float("nan")], "not conv5_2 nan"), (5, "give 1024p, 256p, auto, or 6"),
])
def test_bad_loss_weights_name_the_weight(lambdas, msg):
    with pytest.raises(UsageError, match=re.escape(msg)):
        TrainConfig(lambdas=lambdas).validate()
    assert TrainConfig(lambdas=[1, 0, 0, 0, 0, 2]).validate().lambdas == (1.0, 0.0, 0.0, 0.0, 0.0, 2.0)
    with pytest.raises(UsageError, match=re.escape("--seed -3: must be an integer >= 0")):
        TrainConfig(seed=-3).validate()
    with pytest.raises(UsageError, match=re.escape("--split val: only --data cityscapes:ROOT has splits (--data "
                                                   "synthetic)")):  # it was ignored
        TrainConfig(split="val").validate()


def test_a_folder_or_a_missing_split_says_what_is_there(tmp_path):
    from crn_fast.checkpoint import read_generator_file
    from crn_fast.data import DataError, make_dataset
    with pytest.raises(CheckpointError, match=re.escape(f"the run's generator is {tmp_path / 'model.ckpt'}")):
        save_generator(CRN(CRNConfig(widths=(8, 6, 4), k=1)), tmp_path / "model.ckpt")
        read_generator_file(tmp_path)  # --init-from runs/256p, say
    root = write_cityscapes(tmp_path / "cs")
    with pytest.raises(DataError, match="split 'valid' not found: .* the splits there: train \\(--split\\)"):
        make_dataset(f"cityscapes:{root}", split="valid")


def test_running_out_of_memory_is_one_line_with_what_the_tool_can_lower(capsys):
    """A failed allocation is no bug: one line saying what could not be allocated, and the options
    of the tool that need less memory. torch's CPU allocator and numpy fail for real here; a CUDA
    out-of-memory carries torch's own message, cut after the device's free memory."""
    from crn_fast.cli import run_tool
    cuda = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
        "is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. If reserved but "
        "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    for prog, fn, said in [
        ("crn-synthesize", lambda: torch.empty(2 ** 55, dtype=torch.uint8),
         "the CPU allocator could not allocate 33554432.00 GiB; lower --batch-size or --res"),
        ("python -m crn_fast.train", lambda: np.empty(2 ** 55, np.uint8),
         "Unable to allocate 32.0 PiB for an array with shape (36028797018963968,) and data type uint8; lower "
         "--batch-size or --res, or add --checkpointing and --amp bf16"),
        ("crn-export", lambda: _raise(cuda), "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
         "capacity of 79.19 GiB of which 1.06 GiB is free; lower --res, --max-res or --max-batch"),
    ]:
        assert run_tool(prog, fn) == 1
        assert capsys.readouterr().err == f"{prog}: error: out of memory: {said}\n"
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError keeps its traceback
        run_tool("crn-train", lambda: _raise(RuntimeError("a bug")))


def _raise(e):
    raise e


def test_unwritable_out_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    code, err = cli("-m", "crn_fast.train", "--out", tmp_path / "file" / "run", "--steps", "1", "--no-progress")
    assert code == 1 and "cannot write to --out" in err and one_line(err)


def test_convert_tf_into_a_folder_is_a_usage_error(tmp_path):
    from conftest import FIXTURES
    code, err = cli("-m", "crn_fast.convert_tf", FIXTURES / "tf_crn" / "model.ckpt", tmp_path)
    assert code == 2 and "is a folder" in err and "Traceback" not in err


@pytest.mark.parametrize("out", ["model.ckpt.index", "model.ckpt.data-00000-of-00001"])
def test_convert_tf_never_writes_over_the_checkpoint_it_reads(tmp_path, out):
    """An output named like a file of the TF checkpoint would replace it (the index was overwritten
    by the converted generator, silently): a usage error, with every file of the checkpoint kept."""
    import shutil
    from conftest import FIXTURES
    tf = tmp_path / "tf"
    shutil.copytree(FIXTURES / "tf_crn", tf)
    before = {p.name: p.read_bytes() for p in tf.iterdir()}
    code, err = cli("-m", "crn_fast.convert_tf", tf / "model.ckpt", tmp_path / "tf" / ".." / "tf" / out)
    assert code == 2 and "is a file of the TensorFlow checkpoint being converted" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in tf.iterdir()} == before


def test_a_full_disk_is_named(tmp_path):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    from crn_fast.cli import run_tool

    def write():
        with open("/dev/full", "w") as f:
            f.write("x" * 10000)
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    import io
    from contextlib import redirect_stderr
    buf = io.StringIO()
    with redirect_stderr(buf):
        assert run_tool("crn-x", write) == 1
    assert "the disk is full" in buf.getvalue() and one_line(buf.getvalue())


@pytest.mark.parametrize("args,msg", [
    (["--batch-size", "0"], "must be >= 1"), (["--device", "tpu9"], "'tpu9'"),
    (["--device", "cuda"], "no CUDA GPU is available"),
    (["--res", "30x62"], "--res 30x62: input size 30x62 cannot run"),
    (["--res", "30x62"], "nearest valid size is 32x64"),
    (["--res", "1x1"], "nearest valid size is 4x4"),
])
def test_synthesize_options_are_usage_errors(tmp_path, tiny_ckpt, args, msg):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(tmp_path / "l.png")
    code, err = cli("-m", "crn_fast.synthesize", tiny_ckpt, "--labels", tmp_path / "l.png", "--out", tmp_path / "o",
                    *args)
    assert code == 2 and msg in err and "Traceback" not in err, err


def test_a_layout_the_model_cannot_run_names_the_file_and_the_nearest_res(tmp_path, tiny_ckpt):
    Image.fromarray(np.zeros((18, 30), np.uint8)).save(tmp_path / "odd.png")
    code, err = cli("-m", "crn_fast.synthesize", tiny_ckpt, "--labels", tmp_path / "odd.png", "--out", tmp_path / "o")
    assert code == 2 and one_line(err), err
    assert "odd.png: input size 18x30 cannot run" in err and "the nearest valid size is 20x32" in err and "e.g. --res 20x32." in err, err
    assert not (tmp_path / "o").exists()


def test_malformed_checkpoint_metadata_and_state_dict_mismatch_are_explained(tmp_path, tiny_ckpt):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(tiny_ckpt), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for bad in ('{"widths": "abc"}', '[1, 2]', '{"widths": [8, 6, 4], "k": "x"}', "{nope"):
        save_file(state, str(tmp_path / "m.ckpt"), metadata={**meta, "config": bad})
        with pytest.raises(CheckpointError, match="embedded model config is missing or invalid"):
            load_generator(tmp_path / "m.ckpt")
    state2 = dict(state)
    state2["refine.0.conv1.weight"] = torch.zeros(8, 20, 1, 1)
    del state2["head.bias"]
    save_file(state2, str(tmp_path / "m.ckpt"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"1 missing: head.bias; 1 wrong shape: refine.0.conv1.weight "
                                              r"\(8, 20, 1, 1\) \(expected \(8, 20, 3, 3\)\)"):
        load_generator(tmp_path / "m.ckpt")


def test_train_state_refusal_is_not_cut(tmp_path):
    from crn_fast.checkpoint import load_train_state

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    torch.save({"x": Evil()}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError) as e:
        load_train_state(tmp_path / "s.pt")
    text = str(e.value)
    assert "\n" not in text and "weights_only" in text and len(text) > 250 and "os.system" in text or "posix" in text


def test_non_fp32_layouts_are_cast(tiny_ckpt):
    m = load_generator(tiny_ckpt)
    x = one_hot(torch.randint(0, 20, (1, 16, 32)))
    with torch.no_grad():
        ref = m(x)
        for dt in (torch.float64, torch.bfloat16, torch.float16):
            torch.testing.assert_close(m(x.to(dt)), ref)  # one-hot values are exact in every float type


def _noisy_labels(folder, n, size=(16, 32)):
    folder.mkdir()
    for i in range(n):  # noise: PNGs big enough to cut mid-data
        Image.fromarray(np.random.default_rng(i).integers(0, 19, size).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def test_synthesize_threads_write_what_one_thread_writes(tmp_path, tiny_ckpt):
    """Layouts decoded and PNGs written in 3 threads beside the generator: byte for byte the files
    of --workers 0 (all in order in the main thread). --png-compression changes bytes, not pixels."""
    labels = _noisy_labels(tmp_path / "labels", 7)
    for workers, level in (("0", "6"), ("3", "6"), ("3", "1")):
        assert synth_main([str(tiny_ckpt), "--labels", str(labels), "--out", str(tmp_path / f"o{workers}_{level}"),
                           "--workers", workers, "--png-compression", level, "--batch-size", "2", "-q"]) == 0
    names = sorted(p.name for p in (tmp_path / "o0_6").iterdir())
    assert names == [f"{i}.png" for i in sorted(range(7), key=str)]
    for name in names:
        one, three, fast = (tmp_path / f"o{w}" / name for w in ("0_6", "3_6", "3_1"))
        assert one.read_bytes() == three.read_bytes()
        assert fast.read_bytes() != one.read_bytes()
        assert np.array_equal(np.asarray(Image.open(fast)), np.asarray(Image.open(one)))


class _Copied:
    """Stands in for a GPU batch's copy event on a CPU, so the read back is deferred as on a GPU."""

    def __init__(self, log):
        self.log = log

    def synchronize(self):
        self.log.append("read back")


def test_synthesize_reads_a_batch_back_while_the_next_one_runs(tmp_path, tiny_ckpt, monkeypatch, capsys):
    """On a GPU a batch's images are copied to the host behind the generator and read back (checked,
    then written) once the next batch is queued, so the device never waits for the host. Forced here
    on a CPU: byte for byte the files of the direct path; a NaN image found a batch late still stops
    the run naming its file, every image before it written and none after."""
    import crn_fast.synthesize as S
    labels = _noisy_labels(tmp_path / "labels", 7)
    assert synth_main([str(tiny_ckpt), "--labels", str(labels), "--out", str(tmp_path / "direct"), "--batch-size",
                       "2", "-q"]) == 0
    log, real = [], S.run_batch

    def deferred(model, ids, device, num_classes, nan_at=None):
        images, finite, copied = real(model, ids, device, num_classes)
        assert copied is None  # a CPU: nothing to wait for
        log.append(f"batch of {len(ids)}")
        if nan_at is not None and log.count("batch of 2") == nan_at:
            finite = finite.clone()
            finite[0] = False
        return images, finite, _Copied(log)

    monkeypatch.setattr(S, "run_batch", deferred)
    assert synth_main([str(tiny_ckpt), "--labels", str(labels), "--out", str(tmp_path / "deferred"), "--batch-size",
                       "2", "-q"]) == 0
    assert log == ["batch of 2", "batch of 2", "read back", "batch of 2", "read back", "batch of 1", "read back",
                   "read back"]  # each batch read back after the next is queued; the last at the end
    names = sorted(p.name for p in (tmp_path / "direct").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "deferred").iterdir()) and len(names) == 7
    assert all((tmp_path / "direct" / n).read_bytes() == (tmp_path / "deferred" / n).read_bytes() for n in names)
    # CRN_FAST_SYNTH_OVERLAP=0 (the benchmark's other half): each batch read back before the next is queued
    log.clear()
    monkeypatch.setenv("CRN_FAST_SYNTH_OVERLAP", "0")
    assert synth_main([str(tiny_ckpt), "--labels", str(labels), "--out", str(tmp_path / "in_turn"), "--batch-size",
                       "2", "-q"]) == 0
    assert log == ["batch of 2", "read back"] * 3 + ["batch of 1", "read back"]
    assert all((tmp_path / "direct" / n).read_bytes() == (tmp_path / "in_turn" / n).read_bytes() for n in names)
    monkeypatch.delenv("CRN_FAST_SYNTH_OVERLAP")
    # the third batch's first image (4.png) is not finite: found while the fourth runs
    log.clear()
    monkeypatch.setattr(S, "run_batch", lambda *a: deferred(*a, nan_at=3))
    capsys.readouterr()
    assert synth_main([str(tiny_ckpt), "--labels", str(labels), "--out", str(tmp_path / "nan"), "--batch-size", "2",
                       "-q"]) == 1
    err = capsys.readouterr().err
    assert "4.png: the generator's output holds NaN or inf" in err and "stopped after 4 image(s)" in err, err
    assert sorted(p.name for p in (tmp_path / "nan").iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
    # an unreadable layout in the third batch (4.png) stops the run while the second is still on the
    # device: that batch is read back and written first, as the direct path wrote it before the error
    monkeypatch.setattr(S, "run_batch", deferred)
    bad = labels / "4.png"
    bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])
    assert synth_main([str(tiny_ckpt), "--labels", str(labels), "--out", str(tmp_path / "cut"), "--batch-size", "2",
                       "-q"]) == 1
    assert f"{bad}: unreadable image" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
    assert all((tmp_path / "direct" / n).read_bytes() == (tmp_path / "cut" / n).read_bytes() for n in
               ["0.png", "1.png", "2.png", "3.png"])


def test_synthesize_skip_existing_finishes_a_stopped_run(tmp_path, tiny_ckpt, capsys):
    """--skip-existing leaves out the layouts whose image is in --out: a run stopped after 3 of 7
    images is finished with the other 4, the 3 untouched, and the folder as one whole run's."""
    labels = _noisy_labels(tmp_path / "labels", 7)
    assert synth_main([str(tiny_ckpt), "--labels", str(labels), "--out", str(tmp_path / "whole"), "-q"]) == 0
    part = tmp_path / "part"
    part.mkdir()
    for name in ("0.png", "3.png", "6.png"):  # what a stopped run left: whole images only
        (part / name).write_bytes((tmp_path / "whole" / name).read_bytes())
    os.utime(part / "3.png", (1, 1))
    assert synth_main([str(tiny_ckpt), "--labels", str(labels), "--out", str(part), "--skip-existing",
                       "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"--skip-existing: 3 of 7 layout(s) already have their image in {part}" in err
    assert f"wrote 4 image(s) to {part}" in err
    assert (part / "3.png").stat().st_mtime == 1  # left as it was
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}
    assert {p.name: p.read_bytes() for p in part.iterdir()} == whole


def test_synthesize_sigterm_stops_after_the_batch_and_skip_existing_finishes(tmp_path, tiny_ckpt, capsys):
    """A scheduler's SIGTERM used to kill crn-synthesize without a word. It now finishes the batch
    it is in and the images already queued, says how many are written, exits 143, and
    --skip-existing then finishes the folder as one whole run would have written it."""
    import signal
    import time
    labels = _noisy_labels(tmp_path / "labels", 60, size=(256, 512))
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "crn_fast.synthesize", str(tiny_ckpt), "--labels", str(labels),
                             "--out", str(out), "--no-progress"], stderr=subprocess.PIPE,  # batches of 1: the
                            # same bytes as the whole run (batches of other sizes round differently)
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (out.is_dir() and any(out.glob("*.png"))):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    made = sorted(p.name for p in out.iterdir())
    assert 0 < len(made) < 60 and all(name.endswith(".png") for name in made)  # no temporaries left
    assert err.strip().splitlines()[-1] == (f"crn-synthesize: stopped by SIGTERM after {len(made)} of 60 image(s) in "
                                            f"{out}, each whole: finish with --skip-existing"), err
    assert synth_main([str(tiny_ckpt), "--labels", str(labels), "--out", str(out), "--skip-existing", "-q"]) == 0
    assert synth_main([str(tiny_ckpt), "--labels", str(labels), "--out", str(tmp_path / "whole"), "-q"]) == 0
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}
    assert {p.name: p.read_bytes() for p in out.iterdir()} == whole and len(whole) == 60


def test_synthesize_a_signal_in_the_last_batch_changes_nothing(tmp_path, tiny_ckpt, monkeypatch, capsys):
    """SIGTERM while the generator runs batch 1 of 2 stops after it (exit 143); in the last batch
    the run is done, so it ends as usual (exit 0), every image written."""
    import signal
    import crn_fast.synthesize as synthesize
    real = synthesize.one_hot

    def one_hot_then_sigterm(*args, **kw):  # the signal arrives while a batch runs
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw)
    monkeypatch.setattr(synthesize, "one_hot", one_hot_then_sigterm)
    labels = _noisy_labels(tmp_path / "labels", 2)
    argv = [str(tiny_ckpt), "--labels", str(labels), "--no-progress", "--workers", "0"]
    assert synth_main([*argv, "--out", str(tmp_path / "two")]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after 1 of 2 image(s)" in capsys.readouterr().err
    assert synth_main([*argv, "--out", str(tmp_path / "one"), "--batch-size", "2"]) == 0
    assert "wrote 2 image(s)" in capsys.readouterr().err and len(list((tmp_path / "one").iterdir())) == 2


@pytest.mark.parametrize("workers", ["0", "3"])
def test_synthesize_stops_at_a_cut_layout_with_every_image_before_it_written(tmp_path, tiny_ckpt, workers):
    """A layout whose data is cut (its header passes the first pass) stops the run in one line naming
    it. Every image before it is written whole, nothing after it, nothing half-written: the files a
    loop in file order would leave, whether or not later layouts were already decoded in threads."""
    labels = _noisy_labels(tmp_path / "labels", 6)
    _cut(labels / "3.png")
    code, err = cli("-m", "crn_fast.synthesize", tiny_ckpt, "--labels", labels, "--out", tmp_path / "o",
                    "--workers", workers, "--no-progress")
    assert code == 1 and "3.png" in err and one_line(err), err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["0.png", "1.png", "2.png"]
    for p in (tmp_path / "o").iterdir():
        Image.open(p).load()  # whole


@pytest.mark.parametrize("args,msg", [
    (["--png-compression", "10"], "'10': a zlib level, 0 (none, fastest) to 9 (smallest)"),
    (["--workers", "-1"], "--workers: -1 must be >= 0"),
])
def test_synthesize_pipeline_options_are_usage_errors(tmp_path, tiny_ckpt, args, msg):
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(tmp_path / "l.png")
    code, err = cli("-m", "crn_fast.synthesize", tiny_ckpt, "--labels", tmp_path / "l.png", "--out", tmp_path / "o",
                    *args)
    assert code == 2 and msg in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,msg", [
    (["--engine", "g.engine", "--backend", "eager"], "--engine g.engine is a TensorRT engine: it runs with --backend "
     "tensorrt (or auto), not --backend eager (leave --engine out to run the checkpoint)"),
    (["CKPT", "--engine", "g.engine"], "give a checkpoint or --engine, not both: the engine g.engine runs alone, its "
     "weights built in, so CKPT would be ignored"),
    (["CKPT", "--backend", "tensorrt"], "--backend tensorrt needs --engine PATH (build one with crn-export --trt)"),
    (["CKPT", "--out", "FILE"], "--out FILE is a file, not a folder"),  # was 'cannot write to ...: File exists'
    (["g.pt2", "--backend", "onnxruntime"], "--engine g.pt2 is an AOTInductor package: it runs with --backend aoti "
     "(or auto), not --backend onnxruntime"),
    (["--engine", "g.onnx", "--cuda-graph"], "--cuda-graph replays a checkpoint's generator or a TensorRT engine, "
     "not --backend onnxruntime"),
    (["--backend", "aoti"], "--backend aoti needs --engine PATH (build one with crn-export --compile)"),
    (["--engine", "CKPT"], "--engine CKPT: not a file crn-export writes; give generator.onnx (onnxruntime), "
     "generator.pt2 (AOTInductor) or generator.engine (TensorRT); a checkpoint is given as the first argument"),
])
def test_synthesize_engine_and_out_options_are_usage_errors(tmp_path, tiny_ckpt, capsys, args, msg):
    """--engine used to be ignored unless --backend tensorrt was given too: the checkpoint ran
    instead of the engine the user named. Now the engine implies tensorrt under auto, and what
    would be ignored (a checkpoint beside it) is refused; TensorRT needs a CUDA device."""
    from crn_fast.synthesize import main
    (tmp_path / "file").write_text("x")
    names = {"CKPT": str(tiny_ckpt), "FILE": str(tmp_path / "file")}
    with pytest.raises(SystemExit) as e:
        main(["--labels", str(tmp_path / "l.png"), "--out", str(tmp_path / "o"), *(names.get(a, a) for a in args)])
    err = capsys.readouterr().err
    for name, value in names.items():
        msg = msg.replace(name, value)
    assert e.value.code == 2 and msg in err, err
    assert not (tmp_path / "o").exists() and (tmp_path / "file").read_text() == "x"


def test_synthesize_runs_an_engine_on_a_cuda_device_only(tmp_path, capsys):
    from crn_fast.synthesize import main
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(tmp_path / "l.png")
    assert main(["--engine", "g.engine", "--labels", str(tmp_path / "l.png"), "--out", str(tmp_path / "o"),
                 "--device", "cpu"]) == 2
    assert "--engine g.engine: TensorRT runs on a CUDA device, not cpu" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_synthesize_colour_error_does_not_suggest_a_missing_option(tmp_path, tiny_ckpt):
    Image.fromarray(np.full((16, 32, 3), 7, np.uint8)).save(tmp_path / "l.png")
    code, err = cli("-m", "crn_fast.synthesize", tiny_ckpt, "--labels", tmp_path / "l.png", "--out", tmp_path / "o")
    assert code == 1 and "--unknown-colors void" in err and "--skip-bad" not in err and one_line(err)


# ----------------------------------------------------------------------------- NaN never passes silently
def test_nan_weights_are_refused_at_load(tmp_path, tiny_ckpt):
    m = load_generator(tiny_ckpt)
    with torch.no_grad():
        m.refine[1].conv2.weight[0, 0, 0, 0] = float("nan")
    save_generator(m, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match="NaN or inf values .*refine.1.conv2.weight"):
        load_generator(tmp_path / "nan.ckpt")


def test_a_non_finite_loss_stops_training_naming_the_step(tmp_path, capsys):
    """The loss is checked on the device each step and read back when the run logs or saves (here
    step 2): the error names the first bad step, and nothing computed after it is saved."""
    huge = ",".join(["1e38"] * 6)  # finite weights whose sum overflows fp32
    with no_file_left_open():  # metrics.jsonl is closed on the error's way out
        assert train_main(["--out", tmp_path / "run", "--steps", "3", "--lambdas", huge, "--save-every", "2",
                           *SMALL, "--log-every", "2"]) == 1
    err = capsys.readouterr().err
    assert "the loss is inf at step 1, noticed at step 2" in err and "no checkpoint was saved yet" in err
    assert one_line(err)
    assert not (tmp_path / "run" / "model.ckpt").exists() and not (tmp_path / "run" / "train_state.pt").exists()


# ----------------------------------------------------------------------------- one contract
def test_the_same_option_names_work_everywhere(tmp_path, tiny_ckpt):
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(tmp_path / "l.png")
    for args in (["--ckpt", tiny_ckpt, "--resolution", "16x32", "--batch", "1"],
                 [tiny_ckpt, "--res", "16x32", "--batch-size", "1"]):
        assert synth_main([*map(str, args), "--labels", str(tmp_path / "l.png"), "--out", str(tmp_path / "o"),
                           "-q"]) == 0
    assert train_main(["--out", tmp_path / "a", "--steps", "1", "--resolution", "32x64", "--batch", "2",
                       "--no-progress", "-q"]) == 0


def test_crn_train_help_names_itself_and_its_examples_render():
    r = subprocess.run(["crn-train", "--help"], capture_output=True, text=True, timeout=120)
    if r.returncode == 127 or "not found" in r.stderr:
        pytest.skip("crn-train is not on PATH (package not installed)")
    assert r.stdout.startswith("usage: crn-train")
    assert "--loss diversity \\\n        --vgg-weights imagenet-vgg-verydeep-19.mat" in r.stdout


def test_training_is_callable_from_python_without_argparse(tmp_path):
    out = train(TrainConfig(out=str(tmp_path / "py"), steps=2, res=(32, 64), batch_size=2, progress=False))
    assert load_generator(out / "model.ckpt").config.name == "tiny" and steps_in(out) == [2]
    with pytest.raises(Exception, match="--batch-size 0: must be >= 1"):
        train(TrainConfig(out=str(tmp_path / "bad"), batch_size=0))


def test_tensorboard_gets_the_sample_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = train(TrainConfig(out=str(tmp_path / "tb"), steps=2, res=(32, 64), batch_size=2, progress=False,
                            sample_every=1))
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert "samples" in acc.Tags()["images"] and len(acc.Images("samples")) == 2
    assert "loss" in acc.Tags()["scalars"]


# ----------------------------------------------------------------------------- checksums on every tensor
def test_a_corrupt_byte_in_a_large_tensor_is_caught(tmp_path):
    from crn_fast.tf_checkpoint import TFCheckpoint, write_checkpoint
    big = np.arange(3 << 20, dtype=np.float32)  # 12 MiB: above the old 8 MiB pure-Python limit
    write_checkpoint(tmp_path / "model.ckpt", {"g_4_conv1/weights": big})
    shard = next(tmp_path.glob("model.ckpt.data-*"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        TFCheckpoint(tmp_path / "model.ckpt").read("g_4_conv1/weights")


# ----------------------------------------------------------------------------- stands on its own
@pytest.mark.parametrize("name", ["256p", "512p", "1024p", "GTA"])
def test_presets_equal_the_released_checkpoints_from_a_table(name):
    """The same facts as test_presets_equal_the_real_checkpoint_indexes, without the files."""
    from crn_fast import PRESETS
    from crn_fast.convert_tf import infer_config
    shapes = variables(name)
    adam = {f"{k}/Adam{s}": v for k, v in list(shapes.items())[: ADAM_SLOTS[name] // 2] for s in ("", "_1")}
    all_vars = {**shapes, **adam, "beta1_power": (), "beta2_power": ()}
    assert len(all_vars) == INDEX_ENTRIES[name]
    config = infer_config(all_vars)
    assert config == PRESETS[name]
    params = dict(CRN(PRESETS[name]).named_parameters())
    for i, h in enumerate(config.heights):
        kh, kw, cin, cout = shapes[f"g_{h}_conv1/weights"]
        assert params[f"refine.{i}.conv1.weight"].shape == (cout, cin, kh, kw)


def test_colour_and_palette_labels_decode_without_the_authors_files(tmp_path):
    from crn_fast.data import decode_label
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, (32, 64)).astype(np.uint8)
    colours = np.concatenate([PALETTE, np.array([VOID_COLORS[0]], np.uint8)])
    rgb = colours[ids]
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    pal = Image.fromarray(ids, mode="P")
    pal.putpalette(colours.flatten().tolist())
    pal.save(tmp_path / "pal.png")
    for f in ("rgb.png", "pal.png"):
        got = decode_label(tmp_path / f)
        assert np.array_equal(got, np.where(ids == 19, VOID, ids)), f
    assert (decode_label(tmp_path / "rgb.png") == TRAIN_ID["road"]).any()


@pytest.fixture
def full_disk(tmp_path):
    """A real 512 KiB file system (tmpfs): writes past it fail with ENOSPC, as on a full disk."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_full_disk_in_training_and_synthesis_says_so(full_disk, tmp_path, tiny_ckpt):
    code, err = cli("-m", "crn_fast.train", "--out", full_disk / "run", "--steps", "2", "--res", "32x64",
                    "--batch-size", "2", "--no-progress", "-q")
    assert code == 1 and "the disk is full" in err and one_line(err), err
    assert not list((full_disk / "run").glob(".*.tmp"))  # nothing half-written left behind
    labels = tmp_path / "labels"
    labels.mkdir()
    for i in range(40):
        Image.fromarray(np.random.default_rng(i).integers(0, 19, (64, 128)).astype(np.uint8)).save(labels / f"{i}.png")
    big = tmp_path / "big.ckpt"
    m = CRN(CRNConfig(widths=(8, 6, 4), k=8))  # 8 noisy images per layout: big PNGs
    save_generator(m, big)
    code, err = cli("-m", "crn_fast.synthesize", big, "--labels", labels, "--out", full_disk / "o", "--no-progress")
    assert code == 1 and "the disk is full" in err and one_line(err), err
    written = sorted((full_disk / "o").iterdir(), key=lambda p: str(int(p.stem)))  # label_files' order
    assert not [p for p in written if p.suffix != ".png"]  # no temporaries: PNGs are written in threads
    for p in written:
        Image.open(p).load()  # each one whole


def test_tensorboard_on_a_full_disk_stops_the_run_naming_its_folder(full_disk):
    """TensorBoard writes from its own thread. A full disk there prints no thread traceback (in a
    real process: pytest would catch it in its own); TensorBoard's next call (the next metrics
    line) raises ENOSPC naming the TensorBoard folder, which the CLIs turn into their one line, as
    for any other write."""
    pytest.importorskip("tensorboard")
    code = f"""
import errno, time
import numpy as np
from pathlib import Path
from crn_fast.images import encode_png
from crn_fast.run_folder import TensorBoardLog
disk = Path({str(full_disk)!r})
tb = TensorBoardLog(disk)
assert tb.writer is not None
with open(disk / "filler", "wb", buffering=0) as f:  # fill the disk
    try:
        while True:
            f.write(bytes(4096))
    except OSError:
        pass
image = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
deadline = time.time() + 30
while time.time() < deadline:
    try:
        tb.png("samples", encode_png(image), image.shape, 1)
        tb.scalars({{"loss": 1.0}}, 1)
    except OSError as e:
        print(errno.errorcode[e.errno], e.filename)
        break
    time.sleep(0.05)
tb.close()  # disabled after the error: nothing more to write, nothing raised
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["ENOSPC", str(full_disk / "tb")], (r.stdout, r.stderr)
    assert "Exception in thread" not in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args,msg,code", [
    (["--res", "1000x7"], "multiples of", 2), (["--preset", "huge"], "unknown preset 'huge'", 2),
    (["--layout", "/nonexistent.png"], "no such file", 2), (["--dtypes", "fp8"], "'fp8' not valid", 2),
    (["--json", "/proc/nope/r.json"], "cannot write results to /proc/nope", 2),
    (["--layout", "NOTPNG"], "unreadable image", 1),
])
def test_benchmark_bad_options_are_one_line_before_any_work(tmp_path, args, msg, code):
    from conftest import ROOT
    if "NOTPNG" in args:
        (tmp_path / "x.png").write_text("not a png")
        args = ["--layout", tmp_path / "x.png", "--preset", "tiny", "--res", "32x64", "--no-save"]
    rc, err = cli(ROOT / "benchmarks" / "run.py", *args)
    assert rc == code and msg in err and "Traceback" not in err, err


def test_cli_logging_in_process_follows_the_current_stderr():
    """A CLI main() called in-process (a notebook; a harness that swaps sys.stderr) logs to whatever
    sys.stderr is when it logs, not to the stream it found at setup, which may be closed by then."""
    import argparse
    import contextlib
    import io
    import logging
    from crn_fast.cli import setup_logging
    first, later = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(first):
        setup_logging(argparse.Namespace(quiet=False, verbose=False))
    first.close()  # the stream the handler was set up with is gone
    with contextlib.redirect_stderr(later):
        logging.getLogger("crn_fast.train").info("step 1")
    assert later.getvalue() == "step 1\n"


def test_progress_in_a_log_file_is_lines_not_redraws():
    """stderr that is not a terminal (a batch job's log, a pipe) gets a line every every_s seconds and
    one at the end, never tqdm's carriage-return redraws; a terminal gets the bar."""
    import argparse
    import contextlib
    import io
    from crn_fast.cli import Progress, setup_logging
    setup_logging(argparse.Namespace(quiet=False, verbose=False))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        p = Progress(10, "train", "step", initial=4, every_s=0.0)
        assert p.bar is None and p.lines  # StringIO is not a tty
        for i in range(6):
            p.update(1, **({"loss": "1.500"} if i == 0 else {}))  # the loop reports its loss when it logs
        p.close()
        Progress(3, "train", "step", enabled=False).close()
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue()
    assert lines[0].startswith("train: 5/10 steps, ") and "left, loss 1.500" in lines[0]
    assert lines[-1].startswith("train: 10/10 steps, ") and " left" not in lines[-1], lines
    assert all(line.endswith("loss 1.500") for line in lines)  # the latest values stay
    assert len(lines) == 6  # 5..9 while running (every_s=0), then the final line; nothing when disabled
    with contextlib.redirect_stderr(io.StringIO()) as err:
        p = Progress(2, "synthesize", "image", every_s=3600.0)
        p.update(1)
        p.update(1)
        p.close()
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("synthesize: 2/2 images")
    with contextlib.redirect_stderr(io.StringIO()) as err:
        p = Progress(2, "train", "step", terminal=True)
        p.update(2, loss="0.1")
        p.close()
    assert "\r" in err.getvalue() and "2/2" in err.getvalue()  # the tqdm bar


def test_training_into_a_log_file_reports_progress_in_lines(tmp_path):
    code, err = cli("-m", "crn_fast.train", "--out", tmp_path / "run", "--steps", "3", "--res", "32x64",
                    "--batch-size", "2")
    assert code == 0, err
    assert "\r" not in err and "train: 3/3 steps, " in err, err


def test_without_triton_importing_and_training_print_nothing_from_torch(tmp_path):
    """The CPU install has no Triton: the operators run their torch reference, and torch's
    "Triton not available" warning (once per registered operator) is not shown to the user."""
    code = ("import sys; sys.modules['triton'] = None\n"  # as if Triton were not installed
            "import torch, crn_fast.kernels, crn_fast.train\n"
            "from crn_fast import CRN\n"
            "from crn_fast.labels import one_hot\n"
            "assert not crn_fast.kernels.HAS_TRITON\n"
            "y = CRN.from_preset('tiny')(one_hot(torch.zeros(1, 32, 64, dtype=torch.long)))\n"
            "assert torch.ops.crn_fast.layer_norm_lrelu is not None and y.shape == (1, 3, 32, 64)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_cli_warnings_are_one_plain_line(tmp_path, tiny_ckpt, verbose):
    """A warning (here: the triton backend falling back to the torch ops on a CPU without the
    interpreter) reaches a CLI user as one line like the tool's others; -v says where it was raised."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the triton backend does not fall back")
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(tmp_path / "l.png")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = ["-m", "crn_fast.synthesize", str(tiny_ckpt), "--labels", str(tmp_path / "l.png"), "--out",
            str(tmp_path / "o"), "--backend", "triton"] + (["-v"] if verbose else [])
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "requested but" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: backend='triton' requested but"), r.stderr
    assert ("(RuntimeWarning at " in lines[0]) == verbose and "self.set_backend" not in r.stderr, r.stderr


def test_a_cli_warning_is_shown_once(capsys):
    """torch's DataLoader warned twice about --workers 3 on 2 cores: Python's once-per-place
    registry is reset whenever code changes the warning filters, as torch does in between."""
    import argparse
    import warnings
    from crn_fast.cli import setup_logging
    showwarning = warnings.showwarning
    try:
        setup_logging(argparse.Namespace(quiet=True, verbose=False))
        for _ in range(2):
            with warnings.catch_warnings():  # changes the filters, resetting Python's registry
                warnings.simplefilter("default")
            warnings.warn("This DataLoader will create 3 worker processes", UserWarning)
        warnings.warn("another warning", UserWarning)
    finally:
        warnings.showwarning = showwarning
    assert capsys.readouterr().err == ("warning: This DataLoader will create 3 worker processes\n"
                                       "warning: another warning\n")
