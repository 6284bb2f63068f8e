"""Class sets (--classes): the user's own classes, from the labels through training, checkpoints and
exports to synthesis. Cityscapes stays the default, and configs written before class sets read the same."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from crn_fast import CRNConfig, load_generator
from crn_fast.config import get_preset
from crn_fast.data import DataError, decode_label, make_dataset
from crn_fast.errors import CRNError, UsageError
from crn_fast.labels import CITYSCAPES, PALETTE, ClassSet, made_up_colors, read_classes
from crn_fast.synthesize import main as synth_main
from crn_fast.train import main as train_main

# ADE20K's convention: 0 is "other" (void), the classes count from 1
BLOCKS = {"name": "blocks", "first_id": 1, "void": {"ids": [0]},
          "classes": [{"name": "sky", "color": [200, 30, 30]}, {"name": "grass", "color": "#1ec81e"},
                      {"name": "water", "color": [30, 30, 200]}]}
COLORS = {1: (200, 30, 30), 2: (30, 200, 30), 3: (30, 30, 200)}


def blocks_ids(i: int, h: int = 32, w: int = 64) -> np.ndarray:
    ids = np.zeros((h, w), np.uint8)
    ids[: h // 2] = 1
    ids[h // 2:, : w // 2] = 2
    ids[h // 2:, w // 2:] = 3
    ids[:4, :4] = 0  # void
    return np.roll(ids, 5 * i, axis=1)


def write_blocks(root, n: int = 4):
    """Greyscale id labels, colour labels and photographs of BLOCKS, and its classes file."""
    for d in ("ids", "colors", "images"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ids = blocks_ids(i)
        Image.fromarray(ids).save(root / "ids" / f"{i:03d}.png")
        rgb = np.zeros((*ids.shape, 3), np.uint8)
        for k, c in COLORS.items():
            rgb[ids == k] = c
        Image.fromarray(rgb).save(root / "colors" / f"{i:03d}.png")
        Image.fromarray((rgb * 0.9).astype(np.uint8)).save(root / "images" / f"{i:03d}.png")
    (root / "blocks.json").write_text(json.dumps(BLOCKS))
    return root / "blocks.json"


def test_a_classes_file_reads_with_its_defaults_and_round_trips(tmp_path):
    path = write_blocks(tmp_path)
    cs = read_classes(path)
    assert cs.names == ("sky", "grass", "water") and cs.ids == (1, 2, 3) and cs.void_ids == (0,)
    assert cs.colors == tuple(COLORS.values()) and cs.void_colors == ((0, 0, 0),) and cs.colors_given
    assert cs.layout_channels == 4 and cs.void == 3 and cs.describe() == "blocks (3 classes + void)"
    assert ClassSet.from_dict(json.loads(json.dumps(cs.to_dict()))) == cs  # the config's form is a classes file
    assert ClassSet.from_dict(CITYSCAPES.to_dict()) == CITYSCAPES
    # names only: ids from 0, void 255, colours made up (distinct, none black) and not the data's
    plain = ClassSet.from_dict({"classes": ["a", "b"]}, "x/plain.json")
    assert plain.name == "plain" and plain.ids == (0, 1) and plain.void_ids == (255,) and not plain.colors_given
    made = made_up_colors(254)
    assert len(set(made)) == 254 and (0, 0, 0) not in made
    assert read_classes("cityscapes") is CITYSCAPES
    assert read_classes("12") == ClassSet.numbered(12) and read_classes("12").describe() == "12 classes + void"


@pytest.mark.parametrize("d, message", [
    ([], 'a JSON object with a "classes" list, not a JSON list'),
    ({"classes": []}, '"classes" must be a non-empty list'),
    ({"classes": ["a"], "colours": 1}, "unknown key(s) colours; valid: name, classes, first_id, void"),
    ({"classes": ["a", "a"]}, "classes 0 ('a') and 1 ('a') have the same name 'a'"),
    ({"classes": ["a", {"name": "b", "id": 0}]}, "classes 0 ('a') and 1 ('b') have the same id 0"),
    ({"classes": [{"name": "a", "color": [1, 2, 3]}, {"name": "b", "color": "#010203"}]},
     "classes 0 ('a') and 1 ('b') have the same color [1, 2, 3]"),
    ({"classes": [{"name": "a", "color": [1, 2, 3]}, "b"]}, "class 1 ('b') has no \"color\" but class 0 ('a') has"),
    ({"classes": [{"name": "a", "id": 70000}]}, "class 0 ('a'): \"id\" 70000 must be an integer 0-65535"),
    ({"classes": [{"name": "a", "color": [256, 0, 0]}]}, "colour [256, 0, 0] is not [r, g, b] with values 0-255"),
    ({"classes": [{"name": ""}]}, "class 0 needs a \"name\""),
    ({"classes": [{"name": "a", "size": 3}]}, "class 0 has unknown key(s) size"),
    ({"classes": ["a"], "void": {"ids": [0]}}, "id 0 is both void and class 0 ('a')"),
    ({"classes": [{"name": "a", "color": [0, 0, 0]}], "void": {"colors": [[0, 0, 0]]}},
     "colour [0, 0, 0] is both void and class 0 ('a')"),
    ({"classes": [str(i) for i in range(255)]}, "255 classes; at most 254"),
])
def test_a_bad_classes_file_is_one_error_naming_the_entry(d, message):
    with pytest.raises(CRNError) as e:
        ClassSet.from_dict(d, "my.json")
    assert str(e.value).startswith("my.json: ") and message in str(e.value), str(e.value)


def test_read_classes_names_a_missing_or_broken_file(tmp_path):
    with pytest.raises(CRNError, match="does not exist; give cityscapes, a class count"):
        read_classes(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{classes: [")
    with pytest.raises(CRNError, match="bad.json: not valid JSON"):
        read_classes(tmp_path / "bad.json")
    for count in ("0", "-3", "3.5", "255"):
        with pytest.raises(CRNError, match=f"--classes {count}: a class count is a whole number, 1-254"):
            read_classes(count)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(CRNError, match="--classes .*list.json: a classes file is a JSON object"):
        read_classes(tmp_path / "list.json")
    # as Windows editors save it, with a byte-order mark
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(BLOCKS).encode())
    assert read_classes(tmp_path / "bom.json").names == ("sky", "grass", "water")


def test_read_classes_from_python_takes_a_class_set_or_the_files_dict_form():
    """TrainConfig(classes=...) from Python: a ClassSet as it is, or a classes file's JSON as a dict
    (named "custom" unless it says); a dict was read as a path ("{'classes': ...}: does not exist"),
    and None or a list are named as the wrong kind."""
    assert read_classes(CITYSCAPES) is CITYSCAPES
    got = read_classes(BLOCKS)
    assert got.names == ("sky", "grass", "water") and got.name == "blocks" and got.ids == (1, 2, 3)
    assert read_classes({k: v for k, v in BLOCKS.items() if k != "name"}).name == "custom"
    with pytest.raises(CRNError, match=r"^--classes the classes dict: unknown key\(s\) names"):
        read_classes({"names": ["a"]})
    for bad in (None, ["a", "b"], True):
        with pytest.raises(CRNError, match=f"^--classes: give cityscapes, .* got {type(bad).__name__} "):
            read_classes(bad)


def test_labels_decode_in_the_classes_ids_and_colours(tmp_path):
    classes = read_classes(write_blocks(tmp_path))
    want = np.array([3, 0, 1, 2], np.uint8)[blocks_ids(0)]  # id 0 void (index 3), ids 1-3 -> 0-2
    assert (decode_label(tmp_path / "ids" / "000.png", classes=classes) == want).all()
    assert (decode_label(tmp_path / "colors" / "000.png", classes=classes) == want).all()
    # 16-bit greyscale labels hold ids above 255
    big = ClassSet.from_dict({"classes": [{"name": "a", "id": 300}, {"name": "b", "id": 1000}]})
    Image.fromarray(np.array([[300, 1000, 255]], np.uint16)).save(tmp_path / "wide.png")
    assert decode_label(tmp_path / "wide.png", classes=big).tolist() == [[0, 1, 2]]
    Image.fromarray(np.array([[300, 70000]], np.int32)).save(tmp_path / "int32.tif")  # mode "I": beyond 16 bits
    with pytest.raises(DataError, match=r"values 70000 are not ids of classes \(2 classes \+ void\): class ids "
                                        r"300, 1000"):
        decode_label(tmp_path / "int32.tif", classes=big)
    # a value or colour that is not the set's is an error naming them, or void when asked
    Image.fromarray(np.array([[1, 7, 9]], np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(DataError, match=r"odd.png: values 7, 9 are not ids of blocks \(3 classes \+ void\): "
                                        r"class ids 1-3, void 0 \(use --unknown-colors void"):
        decode_label(tmp_path / "odd.png", classes=classes)
    assert decode_label(tmp_path / "odd.png", unknown_colors="void", classes=classes).tolist() == [[0, 3, 3]]
    Image.fromarray(PALETTE[None, :2]).save(tmp_path / "cityscapes_colors.png")
    with pytest.raises(DataError, match=r"colours \[\(128, 64, 128\), \(244, 35, 232\)\] are not label colours of "
                                        r"blocks"):
        decode_label(tmp_path / "cityscapes_colors.png", classes=classes)
    # classes without colours cannot read a colour label: one line saying what to give
    with pytest.raises(DataError, match=r"000.png is a colour label, but the classes \(3 classes \+ void\) have no "
                                        r"colours: give --classes a JSON classes file"):
        decode_label(tmp_path / "colors" / "000.png", classes=ClassSet.numbered(3))
    # a palette PNG is read by its colours, or, for classes without colours, by its indices (PASCAL VOC's
    # labels: index = class id, 255 = the void outline)
    voc = Image.fromarray(np.array([[0, 1, 20, 255]], np.uint8), mode="P")
    voc.putpalette([v for c in made_up_colors(255) + [(0, 0, 0)] for v in c])
    voc.save(tmp_path / "voc.png")
    assert decode_label(tmp_path / "voc.png", classes=read_classes("21")).tolist() == [[0, 1, 20, 21]]
    with pytest.raises(DataError, match="colours .* are not label colours of blocks"):
        decode_label(tmp_path / "voc.png", classes=classes)
    # Cityscapes' reading is unchanged: train ids, void 19 or 255
    Image.fromarray(np.array([[0, 18, 19, 255]], np.uint8)).save(tmp_path / "train_ids.png")
    assert decode_label(tmp_path / "train_ids.png").tolist() == [[0, 18, 19, 19]]


def test_data_forms_that_need_cityscapes_classes_or_colours_say_so(tmp_path):
    classes = read_classes(write_blocks(tmp_path))
    with pytest.raises(UsageError, match="synthetic streets are drawn in Cityscapes' 19 classes, not --classes blocks"):
        make_dataset("synthetic", classes=classes)
    with pytest.raises(UsageError, match="Cityscapes' labels are read in Cityscapes' 19 classes"):
        make_dataset(f"cityscapes:{tmp_path}", classes=classes)
    with pytest.raises(UsageError, match="the crn: form's labels are colour PNGs, but the classes"):
        make_dataset(f"crn:{tmp_path}", classes=ClassSet.numbered(3))
    ds = make_dataset(f"pairs:{tmp_path / 'ids'},{tmp_path / 'images'}", classes=classes)
    ids, image = ds[1]
    assert ids.tolist() == np.array([3, 0, 1, 2])[blocks_ids(1)].tolist() and image.shape == (3, 32, 64)


def test_the_config_carries_its_classes_and_old_configs_read_as_cityscapes():
    tiny = get_preset("tiny")
    assert tiny.class_set is CITYSCAPES and "classes" not in tiny.to_dict()  # files written before: unchanged
    assert tiny.with_classes(CITYSCAPES).to_dict() == tiny.to_dict()
    blocks = ClassSet.from_dict(BLOCKS)
    cfg = tiny.with_classes(blocks)
    assert cfg.num_classes == 4 and cfg.class_set == blocks and cfg != tiny
    back = CRNConfig.from_dict(json.loads(cfg.to_json()))
    assert back == cfg and back.class_set == blocks
    assert CRNConfig(widths=(8,), num_classes=7).class_set == ClassSet.numbered(6)
    with pytest.raises(CRNError, match=r"the classes blocks \(3 classes \+ void\) make 4 layout channels, but "
                                       r"num_classes is 20"):
        CRNConfig(widths=(8,), classes=blocks)


def test_training_on_own_classes_keeps_them_through_checkpoint_export_and_synthesis(tmp_path, capsys):
    spec = write_blocks(tmp_path / "data")
    data = f"pairs:{tmp_path / 'data' / 'ids'},{tmp_path / 'data' / 'images'}"
    out = tmp_path / "run"
    common = ["--data", data, "--resolution", "32x64", "--batch-size", "2", "--no-progress", "--sample-every", "2"]
    assert train_main(["--classes", str(spec), "--steps", "2", "--out", str(out), *common]) == 0
    assert "classes blocks (3 classes + void)" in capsys.readouterr().err
    model = load_generator(out / "model.ckpt")
    assert model.config.class_set == read_classes(spec) and model.config.num_classes == 4
    # the sample sheet draws each layout in the classes' colours, void black
    sheet = np.asarray(Image.open(out / "samples" / "latest.png"))
    assert sheet.shape == (4 * 32, 3 * 64, 3)  # 4 rows of layout | target | output
    drawn = {tuple(c) for c in sheet[:32, :64].reshape(-1, 3)}
    assert drawn == set(COLORS.values()) | {(0, 0, 0)}
    # --resume without --classes: the model's own (the run's options are its own unless given)
    assert train_main(["--steps", "3", "--out", str(out), "--resume", *common]) == 0
    assert "--classes 'blocks (3 classes + void)' (the model's)" in capsys.readouterr().err
    # --classes given, another set: one line naming the first difference
    assert train_main(["--classes", "cityscapes", "--steps", "4", "--out", str(out), "--resume", *common]) == 2
    err = capsys.readouterr().err
    assert "classes: cityscapes (19 classes + void) instead of blocks (3 classes + void)" in err, err
    assert "--classes giving blocks (3 classes + void)" in err and err.count("error") == 1
    # ... or the file's colours changed since: what changed
    recoloured = tmp_path / "recoloured.json"
    water = {"name": "water", "color": "#0000ff"}
    recoloured.write_text(json.dumps({**BLOCKS, "classes": [*BLOCKS["classes"][:2], water]}))
    assert train_main(["--classes", str(recoloured), "--steps", "4", "--out", str(out), "--resume", *common]) == 2
    assert "classes: class 2 ('water') has colour [0, 0, 255] instead of [30, 30, 200]" in capsys.readouterr().err
    assert train_main(["--classes", str(spec), "--steps", "4", "--out", str(out), "--resume", *common]) == 0
    capsys.readouterr()
    # progressive training from a model of other classes with the same count: named, not copied
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**BLOCKS, "name": "other", "classes": ["sky", "sand", "water"]}))
    assert train_main(["--classes", str(other), "--init-from", str(out / "model.ckpt"), "--steps", "1",
                       "--out", str(tmp_path / "run2"), *common]) == 1
    assert "its classes are blocks (3 classes + void), the model's other (3 classes + void) (class 1 is 'sand' " \
           "instead of 'grass'); train with the --classes it was trained with" in capsys.readouterr().err
    # synthesis reads both label forms in the model's classes, with no option
    for form in ("ids", "colors"):
        assert synth_main([str(out / "model.ckpt"), "--labels", str(tmp_path / "data" / form),
                           "--out", str(tmp_path / f"syn_{form}"), "--no-progress"]) == 0
    a = np.asarray(Image.open(tmp_path / "syn_ids" / "001.png"))
    assert a.shape == (32, 64, 3) and (a == np.asarray(Image.open(tmp_path / "syn_colors" / "001.png"))).all()
    # a Cityscapes-coloured label is not the model's: one line
    Image.fromarray(np.repeat(PALETTE[None, :2], 16, axis=0).repeat(32, axis=1)).save(tmp_path / "city.png")
    assert synth_main([str(out / "model.ckpt"), "--labels", str(tmp_path / "city.png"), "--out",
                       str(tmp_path / "syn_city"), "--no-progress"]) == 1
    assert "are not label colours of blocks" in capsys.readouterr().err


def test_export_verification_layouts_use_the_models_classes(tmp_path):
    from crn_fast.export.verify import verification_layouts
    classes = read_classes(write_blocks(tmp_path))
    real = verification_layouts((32, 64), classes, str(tmp_path / "colors"), count=2)
    assert real.shape == (2, 4, 32, 64) and torch.equal(real.argmax(1)[0], torch.from_numpy(
        np.array([3, 0, 1, 2])[blocks_ids(0)]))
    drawn = verification_layouts((32, 64), ClassSet.numbered(5), count=2)
    assert drawn.shape == (2, 6, 32, 64) and (drawn.sum(1) == 1).all() and len(drawn.argmax(1).unique()) > 3


def test_a_tf_checkpoint_of_other_classes_converts_with_them(tmp_path, capsys):
    from crn_fast import CRN
    from crn_fast.convert_tf import main as convert_main
    from test_tf_checkpoint import write_authors_checkpoint
    spec = write_blocks(tmp_path)
    (tmp_path / "tf").mkdir()
    write_authors_checkpoint(tmp_path / "tf" / "model.ckpt", CRN(get_preset("tiny").replace(num_classes=4)))
    assert convert_main([str(tmp_path / "tf" / "model.ckpt"), str(tmp_path / "plain.ckpt")]) == 0
    assert "4 layout channels (3 classes + void)" in capsys.readouterr().err  # numbered: greyscale 0-2
    assert load_generator(tmp_path / "plain.ckpt").config.class_set == ClassSet.numbered(3)
    assert convert_main([str(tmp_path / "tf" / "model.ckpt"), str(tmp_path / "b.ckpt"), "--classes", str(spec)]) == 0
    assert load_generator(tmp_path / "b.ckpt").config.class_set == read_classes(spec)
    assert convert_main([str(tmp_path / "tf" / "model.ckpt"), str(tmp_path / "c.ckpt"), "--classes", "5"]) == 2
    assert "--classes 5 classes + void makes 6 layout channels, but" in capsys.readouterr().err
    assert not (tmp_path / "c.ckpt").exists()
