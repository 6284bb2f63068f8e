"""crn-info: every kind of crn_fast file and folder described from its headers, the command that
resumes a run, the classes written back as a file, and one line for whatever it cannot read."""
import json
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from crn_fast import CRN, CRNConfig, save_generator
from crn_fast.config import get_preset
from crn_fast.export.cli import main as export_main
from crn_fast.info import inspect, main as info_main
from crn_fast.labels import read_classes
from crn_fast.train import main as train_main

from test_classes import write_blocks
from test_tf_checkpoint import write_authors_checkpoint


def info(capsys, *argv) -> tuple[int, str, str]:
    rc = info_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_run_is_described_and_its_resume_command_resumes_it(tmp_path, capsys):
    write_blocks(tmp_path / "data")
    spec = tmp_path / "data" / "blocks.json"
    run = tmp_path / "run"
    assert train_main(["--data", f"pairs:{tmp_path / 'data' / 'ids'},{tmp_path / 'data' / 'images'}",
                       "--classes", str(spec), "--res", "32x64", "--k", "2", "--lambdas", "auto", "--batch-size", "2",
                       "--seed", "3", "--steps", "2", "--checkpointing", "--out", str(run), "--no-progress",
                       "--log-every", "1"]) == 0
    capsys.readouterr()
    rc, out, err = info(capsys, run)
    assert rc == 0 and not err
    lines = out.splitlines()
    assert lines[0] == f"{run}: crn_fast training run, step 2 of 2 (finished)"
    assert "tiny: 5 modules, widths 32, 32, 32, 24, 16; k=2 image(s) per layout" in out
    assert "classes   blocks (3 classes + void); ids 1-3, void 0; colours given" in out
    assert "4 pairs at 32x64; global batch 2" in out and "activation checkpointing" in out
    assert "loss      diversity, lambdas auto, VGG-19 random, seed 3" in out  # the defaults train() settled
    assert "  last      step 2: loss " in out and "train_state.pt (step 2, " in out
    resume = next(line for line in lines if line.startswith("  resume    ")).split(None, 1)[1]
    assert resume == f"crn-train --out {run} --resume --steps 4"
    # the classes file the run was given has gone: the resume takes the model's classes; crn-info
    # writes them back as a file, equal to the lost one
    spec.rename(tmp_path / "lost.json")
    rc, _, err = info(capsys, run / "model.ckpt", "--write-classes", tmp_path / "classes.json")
    assert rc == 0 and f"give it as --classes {tmp_path / 'classes.json'}" in err
    assert read_classes(tmp_path / "classes.json") == read_classes(tmp_path / "lost.json")
    assert train_main(shlex.split(resume)[1:] + ["--no-progress"]) == 0, capsys.readouterr().err
    assert "(resumed at step 2)" in capsys.readouterr().err
    rc, out, _ = info(capsys, run / "config.json")  # the run's config.json reads as the run
    assert rc == 0 and out.startswith(f"{run}: crn_fast training run, step 4 of 4 (finished)")
    rc, out, _ = info(capsys, run / "train_state.pt")
    assert rc == 0 and out.startswith(f"{run / 'train_state.pt'}: crn_fast training state at step 4")
    # runs/: every run in it
    train_main(["--out", str(tmp_path / "run2"), "--steps", "1", "--res", "32x64", "--no-progress"])
    capsys.readouterr()
    rc, out, _ = info(capsys, tmp_path)
    assert rc == 0 and out.startswith(f"{tmp_path}: 2 crn_fast folder(s) or checkpoint(s) inside\n\n{run}: ")
    assert f"\n\n{tmp_path / 'run2'}: crn_fast training run, step 1 of 1 (finished)\n" in out
    rc, _, err = info(capsys, tmp_path, "--write-classes", tmp_path / "x.json")
    assert rc == 2 and "--write-classes: " in err and "holds 2 models; give the one whose classes you want" in err
    # piped into a reader that has gone (head, say) before crn-info writes: no error
    r = subprocess.run(f"{shlex.quote(sys.executable)} -m crn_fast.info {shlex.quote(str(tmp_path))} --json | true; "
                       "echo ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True, text=True,
                       timeout=300)
    assert r.stdout == "0\n" and r.stderr == "", r.stderr
    found = json.loads(info(capsys, run, "--json")[1])
    assert found["kind"] == "run" and found["step"] == 4 and found["generator"]["step"] == 4
    assert found["classes"]["name"] == "blocks" and found["options"]["k"] == 2
    # a config.json cut short: the run is still described from its other files, as --resume reads it
    (run / "config.json").write_text('{"data": ')
    rc, out, _ = info(capsys, run)
    assert rc == 0 and "  options   unknown: " in out and "not valid JSON" in out
    assert out.rstrip().endswith(f"  resume    crn-train --out {run} --resume")
    # a training state cut short: named, the rest still described
    (run / "train_state.pt").write_bytes((run / "train_state.pt").read_bytes()[:1000])
    rc, out, _ = info(capsys, run)
    assert rc == 0 and out.startswith(f"{run}: crn_fast training run, step 4\n")  # model.ckpt's; no total known
    assert "train_state.pt UNREADABLE (" in out and "truncated or corrupt" in out and "cannot be resumed" in out


def test_a_generator_and_its_export_are_described_from_their_headers(tmp_path, capsys):
    model = CRN(get_preset("tiny"))
    save_generator(model, tmp_path / "model.ckpt", extra={"step": 7})
    params = sum(p.numel() for p in model.parameters())
    rc, out, _ = info(capsys, tmp_path / "model.ckpt", "--classes")
    assert rc == 0 and out.startswith(f"{tmp_path / 'model.ckpt'}: crn_fast generator, ")
    assert "saved at training step 7" in out and f"weights   {params:,} parameters in 32 tensors, float32" in out
    assert "       18  bicycle             18  #770b20\n       19  void           19, 255  #000000, #00005a" in out
    # weights of another architecture than the file's config: said, not hidden
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    wrong = CRNConfig(widths=(32, 32, 32, 24, 8)).to_json()
    meta = {"format": "crn_fast.generator", "format_version": "1", "config": wrong}
    save_file(state, str(tmp_path / "wrong.ckpt"), metadata=meta)
    rc, out, _ = info(capsys, tmp_path / "wrong.ckpt")
    assert rc == 0 and "THEY DO NOT MATCH THE CONFIG: 7 wrong shape: refine.4.conv1.weight (16, 44, 3, 3) " \
        "(expected (8, 44, 3, 3))" in out
    # an export: its sidecar, verification included; a folder of exports lists each
    assert export_main(["--onnx", str(tmp_path / "model.ckpt"), "--out", str(tmp_path / "exp"), "--res", "32x64"]) == 0
    capsys.readouterr()
    rc, out, _ = info(capsys, tmp_path / "exp" / "generator.onnx")
    assert rc == 0 and out.startswith(f"{tmp_path / 'exp' / 'generator.onnx'}: ONNX, fp32, ")
    assert "  verified  PASSED against eager fp32: max abs " in out and "32x64 PSNR" in out
    assert f"  from      {tmp_path / 'model.ckpt'}" in out
    rc, folder, _ = info(capsys, tmp_path / "exp")
    assert rc == 0 and folder.startswith(f"{tmp_path / 'exp'}: 1 export(s)") and out in folder
    (tmp_path / "exp" / "generator.onnx").unlink()
    rc, out, _ = info(capsys, tmp_path / "exp" / "generator.onnx")
    assert rc == 0 and "(MISSING: only its sidecar is here)" in out
    # a TensorRT engine's sidecar names its profile: the only shapes it runs
    side = json.loads((tmp_path / "exp" / "generator.onnx.json").read_text())
    profile = {"min": [1, 20, 32, 64], "opt": [1, 20, 64, 128], "max": [2, 20, 128, 256]}
    side.update(format="tensorrt", artefact="generator.engine", profile=profile)
    (tmp_path / "exp" / "generator.engine").write_bytes(b"engine")
    (tmp_path / "exp" / "generator.engine.json").write_text(json.dumps(side))
    rc, out, _ = info(capsys, tmp_path / "exp" / "generator.engine")
    assert rc == 0 and out.startswith(f"{tmp_path / 'exp' / 'generator.engine'}: TensorRT engine, fp32, 0.0 kB")
    assert "  profile   layouts 1x20x32x64 to 2x20x128x256 (built for 1x20x64x128); no other shape runs" in out
    assert info(capsys, tmp_path / "exp")[1].startswith(f"{tmp_path / 'exp'}: 2 export(s)")
    # an AOTInductor package's sidecar: its one shape, or the range it was compiled for
    side.update(format="aotinductor", artefact="generator.pt2", shapes={"layout": [1, 20, 64, 128]},
                dynamic={"min_res": None, "max_res": None, "max_batch": None})
    (tmp_path / "exp" / "generator.pt2.json").write_text(json.dumps(side))
    out = info(capsys, tmp_path / "exp" / "generator.pt2.json")[1]
    assert "(MISSING: only its sidecar is here)" in out
    assert "  shapes    layout [1, 20, 64, 128]; static: only this shape runs\n" in out
    side["dynamic"] = {"min_res": [32, 64], "max_res": [128, 256], "max_batch": 4}
    (tmp_path / "exp" / "generator.pt2.json").write_text(json.dumps(side))
    out = info(capsys, tmp_path / "exp" / "generator.pt2.json")[1]
    assert "; dynamic: min res 32x64, max res 128x256, max batch 4\n" in out


def test_the_authors_tf_checkpoint_is_described_even_without_its_data(tmp_path, capsys):
    model = CRN(CRNConfig(widths=(16, 12, 8), k=3, name="x"))
    (tmp_path / "256p").mkdir()
    write_authors_checkpoint(tmp_path / "256p" / "model.ckpt", model)
    rc, out, _ = info(capsys, tmp_path / "256p")
    params = sum(p.numel() for p in model.parameters())
    assert rc == 0 and out.startswith(f"{tmp_path / '256p' / 'model.ckpt'}: TensorFlow checkpoint")
    assert "256p: 3 modules, widths 16, 12, 8; k=3" in out and f"{params:,} parameters in" in out
    for shard in (tmp_path / "256p").glob("model.ckpt.data-*"):
        shard.unlink()
    rc, out, _ = info(capsys, tmp_path / "256p" / "model.ckpt.index")
    assert rc == 0 and f"{params:,} parameters" in out and "its data cannot be read: missing data shard" in out


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "missing does not exist"),
    (lambda d: d / "dangling", "dangling is a symbolic link to "),  # ... missing, which does not exist
    (lambda d: d / "loop", "loop is a symbolic link loop"),
    (lambda d: d / "empty", "empty is a folder without a training run (model.ckpt, train_state.pt), exports"),
    (lambda d: d / "notes.txt", "notes.txt is not a readable crn_fast checkpoint (corrupt, truncated or another"),
    (lambda d: d / "other.json", "other.json is JSON but not a crn_fast file"),
    (lambda d: d / "bad_classes.json", "bad_classes.json: classes 0 ('a') and 1 ('a') have the same name 'a'"),
    (lambda d: d / "generator.pt2", "generator.pt2 has no sidecar generator.pt2.json beside it"),
    (lambda d: d / "state.pt", "state.pt is a PyTorch file but not a crn_fast training state"),
    (lambda d: d / "cut.pt", "cut.pt is not a readable training state: truncated or corrupt (no zip directory"),
])
def test_what_is_not_a_crn_fast_file_is_one_line(tmp_path, capsys, make, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "other.json").write_text('{"a": 1}')
    (tmp_path / "bad_classes.json").write_text('{"classes": ["a", "a"]}')
    (tmp_path / "generator.pt2").write_bytes(b"PK")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "state.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "state.pt").read_bytes()[:300])
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    rc, out, err = info(capsys, make(tmp_path))
    assert rc == 1 and not out and err == f"crn-info: error: {make(tmp_path)}{err.split(str(make(tmp_path)))[1]}"
    assert message in err and err.count("\n") == 1, err


def test_classes_files_are_checked_and_written_in_the_form_they_are_read(tmp_path, capsys):
    spec = tmp_path / "mine.json"
    spec.write_text(json.dumps({"name": "mine", "first_id": 1, "void": {"ids": [0]}, "classes": ["a", "b", "c"]}))
    rc, out, _ = info(capsys, spec, "--classes", "--write-classes", tmp_path / "copy.json")
    assert rc == 0 and "mine: 3 classes + void (4 layout channels); ids 1-3, void 0; colours made up" in out
    assert "        2  c      3  #808000\n        3  void   0  #000000" in out
    assert read_classes(tmp_path / "copy.json") == read_classes(spec)
    assert inspect(tmp_path / "copy.json").classes == read_classes(spec)
    rc, _, err = info(capsys, spec, "--write-classes", tmp_path)
    assert rc == 2 and f"--write-classes {tmp_path} is a folder" in err
