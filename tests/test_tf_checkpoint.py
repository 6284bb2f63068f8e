"""The TF checkpoint reader, the converter and the authors' real checkpoint indexes."""
import re
import shutil

import numpy as np
import pytest
import torch

from crn_fast import PRESETS, CheckpointError, CRN, load_generator
from crn_fast.convert_tf import head_permutation, infer_config, main as convert_main
from crn_fast.labels import one_hot
from crn_fast.tf_checkpoint import TFCheckpoint, crc32c, read_index, write_checkpoint

from conftest import FIXTURES

TF_FIXTURE = FIXTURES / "tf_crn"


@pytest.mark.parametrize("name", ["256p", "512p", "1024p", "GTA"])
def test_presets_equal_the_real_checkpoint_indexes(shared, name):
    _, entries = read_index(shared / "checkpoint_index" / f"{name}.model.ckpt.index")
    shapes = {k: e.shape for k, e in entries.items()}
    config = infer_config(shapes)
    assert config == PRESETS[name]
    # every generator variable maps to a preset parameter of the same (transposed) shape
    params = dict(CRN(PRESETS[name]).named_parameters())
    for i, h in enumerate(config.heights):
        for j in (1, 2):
            kh, kw, cin, cout = shapes[f"g_{h}_conv{j}/weights"]
            assert params[f"refine.{i}.conv{j}.weight"].shape == (cout, cin, kh, kw)
            assert params[f"refine.{i}.norm{j}.weight"].shape == shapes[f"g_{h}_conv{j}/LayerNorm/gamma"]
            assert params[f"refine.{i}.norm{j}.bias"].shape == shapes[f"g_{h}_conv{j}/LayerNorm/beta"]
    top = config.heights[-1]
    assert params["head.weight"].shape[:2] == shapes[f"g_{top}_conv100/weights"][::-1][:2]
    assert all(e.dtype == 1 and e.shard_id == 0 for e in entries.values())  # float32, one shard


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_writer_reader_roundtrip(tmp_path):
    tensors = {"a/b": np.arange(12, dtype=np.float32).reshape(3, 4), "z": np.array([1, 2], np.int64),
               "": None}
    tensors.pop("")
    write_checkpoint(tmp_path / "m.ckpt", tensors)
    ck = TFCheckpoint(tmp_path / "m.ckpt")
    assert ck.shapes() == {"a/b": (3, 4), "z": (2,)}
    for k, v in tensors.items():
        np.testing.assert_array_equal(ck.read(k), v)


def test_head_permutation_colour_major_to_image_major():
    # authors: channel c*k+i is colour c of image i
    perm = head_permutation(3)
    assert perm == [0, 3, 6, 1, 4, 7, 2, 5, 8]


def test_tf_written_checkpoint_converts_and_matches_tf_output(tmp_path):
    """A random-weight checkpoint written by TensorFlow (tests/fixtures/make_tf_fixture.py) with the
    authors' names, an arbitrary width schedule and k=3, against the TF graph's own output on the
    layout stored with it."""
    exp = np.load(TF_FIXTURE / "expected.npz")
    assert convert_main([str(TF_FIXTURE / "model.ckpt"), str(tmp_path / "m.ckpt")]) == 0
    model = load_generator(tmp_path / "m.ckpt")
    assert list(model.config.widths) == exp["widths"].tolist() and model.config.k == int(exp["k"])
    ids = exp["layout_ids"]
    with torch.no_grad():
        out = model.images(one_hot(torch.from_numpy(ids).long()[None]))[0]  # (k, 3, H, W)
    ours = out.permute(0, 2, 3, 1)[:, ::2, ::2].numpy()
    err = np.abs(ours - exp["output_stride2"]).max()
    assert err < 0.05, f"max abs error {err} on the 0..255 scale"


def test_every_tool_loads_the_tf_checkpoint_itself(tmp_path, capsys):
    """load_generator (so crn-synthesize, crn-export and --init-from) takes the authors' checkpoint as
    released: its prefix, .index or data shard gives the converted file's config and weights; a file
    named like the prefix is still read as the file it is."""
    assert convert_main([str(TF_FIXTURE / "model.ckpt"), str(tmp_path / "m.ckpt")]) == 0
    want = load_generator(tmp_path / "m.ckpt")
    for path in ("model.ckpt", "model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        got = load_generator(TF_FIXTURE / path)
        assert got.config == want.config and got.config.name == "tf_crn"
        assert all(torch.equal(v, want.state_dict()[k]) for k, v in got.state_dict().items())
    from crn_fast.synthesize import main as synth_main
    ids = np.load(TF_FIXTURE / "expected.npz")["layout_ids"]
    from PIL import Image
    Image.fromarray(ids.astype(np.uint8)).save(tmp_path / "layout.png")
    assert synth_main([str(TF_FIXTURE / "model.ckpt"), "--labels", str(tmp_path / "layout.png"), "--out",
                       str(tmp_path / "out"), "--no-progress"]) == 0
    assert (tmp_path / "out" / "layout.png").is_file()
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    for f in TF_FIXTURE.glob("model.ckpt.*"):
        (shadow / f.name).write_bytes(f.read_bytes())
    (shadow / "model.ckpt").write_bytes((tmp_path / "m.ckpt").read_bytes())
    assert load_generator(shadow / "model.ckpt").config.name == want.config.name  # the file, not the prefix
    torch.save({"step": 1}, tmp_path / "train_state.pt")
    with pytest.raises(CheckpointError, match="a PyTorch file \\(torch.save\\), not a crn_fast generator"):
        load_generator(tmp_path / "train_state.pt")


def test_a_tf_checkpoint_folder_loads_its_checkpoint(tmp_path, capsys):
    """The authors' models/512p folder itself: its one checkpoint, or the one TF's `checkpoint`
    state file names when it holds several; without that file, several are an error naming each."""
    assert convert_main([str(TF_FIXTURE / "model.ckpt"), str(tmp_path / "m.ckpt")]) == 0
    want = load_generator(tmp_path / "m.ckpt").state_dict()
    folder = tmp_path / "512p"
    folder.mkdir()
    _copy_fixture(folder)
    got = load_generator(folder)
    assert got.config.name == "512p" and all(torch.equal(v, want[k]) for k, v in got.state_dict().items())
    shutil.copy(folder / "model.ckpt.index", folder / "model.ckpt-100.index")  # an older one beside it
    with pytest.raises(CheckpointError, match=re.escape(f"it holds 2 TF checkpoints: give one prefix, "
                                                        f"{folder / 'model.ckpt'} or {folder / 'model.ckpt-100'}")):
        load_generator(folder)
    assert convert_main([str(folder), str(tmp_path / "x.ckpt")]) == 1
    assert f"{folder} is a folder with 2 TF checkpoints" in capsys.readouterr().err
    (folder / "checkpoint").write_text('model_checkpoint_path: "/home/them/train/model.ckpt"\n'  # as TF writes it
                                       'all_model_checkpoint_paths: "/home/them/train/model.ckpt"\n')
    assert convert_main([str(folder), str(tmp_path / "x.ckpt")]) == 0  # TF's latest
    assert all(torch.equal(v, want[k]) for k, v in load_generator(tmp_path / "x.ckpt").state_dict().items())
    (folder / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-999"\n')  # not here: the one that is
    (folder / "model.ckpt-100.index").unlink()
    assert load_generator(folder).config.name == "512p"
    (tmp_path / "empty").mkdir()
    assert convert_main([str(tmp_path / "empty"), str(tmp_path / "y.ckpt")]) == 1
    assert "is a folder with no TF checkpoint (no *.index file)" in capsys.readouterr().err


def test_the_fixture_layout_is_what_crn_fast_decodes_from_the_real_label(shared):
    from crn_fast.data import decode_label
    ids = decode_label(shared / "labels" / "cityscapes_256" / "00100027.png")
    np.testing.assert_array_equal(ids, np.load(TF_FIXTURE / "expected.npz")["layout_ids"])


def _copy_fixture(tmp_path):
    for f in TF_FIXTURE.glob("model.ckpt.*"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / "model.ckpt"


def test_missing_shard_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    src = _copy_fixture(tmp_path)
    (tmp_path / "model.ckpt.data-00000-of-00001").unlink()
    assert convert_main([str(src), str(tmp_path / "out.ckpt")]) == 1
    assert "missing data shard" in capsys.readouterr().err
    assert not (tmp_path / "out.ckpt").exists()


def test_truncated_shard_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    src = _copy_fixture(tmp_path)
    data = tmp_path / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    assert convert_main([str(src), str(tmp_path / "out.ckpt")]) == 1
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "out.ckpt").exists()


def test_corrupt_shard_fails_its_checksum(tmp_path):
    src = _copy_fixture(tmp_path)
    data = tmp_path / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    ck = TFCheckpoint(src)
    name = next(n for n, e in ck.entries.items() if e.offset <= 100 < e.offset + e.size)
    with pytest.raises(CheckpointError, match="checksum"):
        ck.read(name)


def test_unknown_variable_is_rejected(tmp_path, capsys):
    write_checkpoint(tmp_path / "m.ckpt", {"g_4_conv1/weights": np.zeros((3, 3, 20, 4), np.float32),
                                           "discriminator/w": np.zeros(3, np.float32)})
    assert convert_main([str(tmp_path / "m.ckpt"), str(tmp_path / "out.ckpt")]) == 1
    assert "unknown variables" in capsys.readouterr().err
    assert not (tmp_path / "out.ckpt").exists()


def test_not_an_index_file(tmp_path):
    (tmp_path / "x.ckpt.index").write_bytes(b"hello world" * 10)
    with pytest.raises(CheckpointError, match="not a TensorFlow checkpoint index"):
        TFCheckpoint(tmp_path / "x.ckpt")


def write_authors_checkpoint(prefix, model: CRN) -> None:
    """``model`` as the authors' TF code saves it: their names, colour-major head, Adam slots."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    tf = {"beta1_power": np.float32(0.9) * np.ones((), np.float32)}
    inv = np.argsort(head_permutation(model.config.k))
    for i, h in enumerate(model.config.heights):
        for j in (1, 2):
            tf[f"g_{h}_conv{j}/weights"] = sd[f"refine.{i}.conv{j}.weight"].transpose(2, 3, 1, 0)
            tf[f"g_{h}_conv{j}/weights/Adam"] = tf[f"g_{h}_conv{j}/weights"] * 0
            tf[f"g_{h}_conv{j}/LayerNorm/gamma"] = sd[f"refine.{i}.norm{j}.weight"]
            tf[f"g_{h}_conv{j}/LayerNorm/beta"] = sd[f"refine.{i}.norm{j}.bias"]
    top = model.config.heights[-1]
    tf[f"g_{top}_conv100/weights"] = sd["head.weight"][inv].transpose(2, 3, 1, 0)
    tf[f"g_{top}_conv100/biases"] = sd["head.bias"][inv]
    write_checkpoint(prefix, tf)


def test_converts_a_written_authors_layout_checkpoint(tmp_path):
    """crn_fast -> TF format (authors' names, colour-major head, Adam slots) -> crn_fast is exact."""
    model = CRN(PRESETS["tiny"].replace(k=2))
    for p in model.parameters():
        p.data.normal_()
    write_authors_checkpoint(tmp_path / "model.ckpt", model)
    assert convert_main([str(tmp_path / "model.ckpt"), str(tmp_path / "c.ckpt")]) == 0
    back = load_generator(tmp_path / "c.ckpt")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
