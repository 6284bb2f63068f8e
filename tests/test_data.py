"""Datasets and bad-data reporting."""
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from crn_fast.data import DataError, SyntheticStreets, decode_label, device_batch, label_files, make_dataset
from crn_fast.errors import CRNError, UsageError
from crn_fast.labels import PALETTE, TRAIN_ID, VOID, one_hot
from crn_fast.synthetic import render_scene


def test_synthetic_is_deterministic_and_any_resolution():
    a, b = render_scene(32, 64, 5, 7), render_scene(32, 64, 5, 7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(render_scene(32, 64, 5, 8)[1], a[1])
    ids, img = render_scene(48, 80, 0, 0)
    assert ids.shape == (48, 80) and img.shape == (48, 80, 3)
    # several classes, each with its own look
    classes = set(np.unique(render_scene(128, 256, 0, 1)[0]).tolist())
    assert {TRAIN_ID["sky"], TRAIN_ID["road"], TRAIN_ID["building"], TRAIN_ID["car"]} <= classes
    ds = SyntheticStreets((32, 64), seed=1)
    ids, img = ds[3]
    assert ids.dtype == img.dtype == torch.uint8 and img.shape == (3, 32, 64)


def test_samples_stay_8_bit_until_the_device():
    """A sample crosses the loader's worker processes, pinned memory and the host-to-device copy in
    8 bits (a fifth of int64 ids and a float32 image); device_batch widens the image after the copy,
    exactly (every 8-bit value is a float32)."""
    ds = SyntheticStreets((32, 64), seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    ids, images = next(iter(loader))
    assert ids.dtype == images.dtype == torch.uint8 and images.shape == (2, 3, 32, 64)
    ids_d, target = device_batch(ids, images, "cpu")
    assert ids_d.dtype == torch.uint8 and target.dtype == torch.float32
    assert torch.equal(target, torch.from_numpy(np.stack([render_scene(32, 64, 1, i)[1] for i in range(2)]))
                       .permute(0, 3, 1, 2).float())
    assert torch.equal(one_hot(ids_d), one_hot(ids.long()))
    # a wider batch (a user's own dataset's int64 ids and float images) is taken as it is
    ids_w, target_w = device_batch(ids.long(), images.float(), "cpu")
    assert ids_w.dtype == torch.int64 and torch.equal(target_w, target)


def test_one_hot_void_channel():
    ids = torch.tensor([[[0, 18, 19, 255]]])
    lay = one_hot(ids)
    assert lay.shape == (1, 20, 1, 4)
    assert lay[0, :, 0].argmax(0).tolist() == [0, 18, 19, 19]
    torch.testing.assert_close(lay[:, 19], 1 - lay[:, :19].sum(1))


def test_one_hot_takes_label_maps_as_they_come_and_refuses_what_has_lost_its_ids():
    """(N, 1, H, W) as (N, H, W); a signed ignore index (-1) is void like 255; a float map (a label
    PNG through ToTensor is scaled to 0..1), a single map, or a numpy array is one CRNError that says
    what would do, where torch would fail deep in scatter (on a GPU: a device-side assert)."""
    ids = torch.tensor([[[0, 18, 19, 255, -1, -300]]])
    lay = one_hot(ids)
    assert lay[0, :, 0].argmax(0).tolist() == [0, 18, 19, 19, 19, 19] and torch.equal(lay.sum(1), torch.ones(1, 1, 6))
    assert torch.equal(one_hot(ids[:, None]), lay) and torch.equal(one_hot(ids.to(torch.int32), np.int64(20)), lay)
    for bad, msg in [(ids.float() / 255, r"integer class indices, got torch.float32: .*ToTensor"),
                     (ids[0], r"\(N, H, W\) or \(N, 1, H, W\) .* got shape \(1, 6\): one label map is ids\[None\]"),
                     (ids[:, None].expand(1, 2, 1, 6), r"got shape \(1, 2, 1, 6\)$"),
                     (ids.numpy(), r"a torch tensor .* got ndarray: torch.from_numpy\(ids\)")]:
        with pytest.raises(CRNError, match=msg):
            one_hot(bad)
    with pytest.raises(CRNError, match="num_classes must be an int >= 2"):
        one_hot(ids, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_hot_is_torchs_one_hot_in_channels_last(dtype):
    ids = torch.randint(0, 256, (2, 9, 14), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    lay = one_hot(ids, dtype=dtype)
    expect = torch.nn.functional.one_hot(ids.long().clamp(max=19), 20).permute(0, 3, 1, 2).to(dtype)
    assert torch.equal(lay, expect) and lay.dtype == dtype
    assert lay.is_contiguous(memory_format=torch.channels_last)  # the format the GPU path runs in


def write_cityscapes(root, n=3, size=(32, 64), split="train", train_ids=False):
    rng = np.random.default_rng(0)
    for i in range(n):
        city = "aachen" if i % 2 else "bremen"
        img_dir = root / "leftImg8bit" / split / city
        gt_dir = root / "gtFine" / split / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{city}_{i:06d}_000019"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(img_dir / f"{stem}_leftImg8bit.png")
        ids = rng.choice([7, 8, 11, 21, 23, 26, 0], size=size).astype(np.uint8)  # official label ids
        Image.fromarray(ids).save(gt_dir / f"{stem}_gtFine_labelIds.png")
        if train_ids:
            Image.fromarray(np.full(size, 3, np.uint8)).save(gt_dir / f"{stem}_gtFine_labelTrainIds.png")
    return root


def test_cityscapes_official_layout(tmp_path):
    root = write_cityscapes(tmp_path / "cs")
    ds = make_dataset(f"cityscapes:{root}", resolution=(16, 32))
    assert len(ds) == 3
    with warnings.catch_warnings():  # PIL's read-only buffers are copied, not handed to torch (it warns)
        warnings.simplefilter("error")
        ids, img = ds[0]
    assert ids.shape == (16, 32) and img.shape == (3, 16, 32) and ids.dtype == img.dtype == torch.uint8
    # labelIds map through the official table: 7 road->0, 8 sidewalk->1, 11 building->2, 0 unlabeled->void
    assert set(ids.unique().tolist()) <= {0, 1, 2, 8, 10, 13, VOID}
    root2 = write_cityscapes(tmp_path / "cs2", train_ids=True)
    assert make_dataset(f"cityscapes:{root2}")[0][0].unique().tolist() == [3]  # labelTrainIds preferred


def add_cityscapes_extras(root):
    """What the real gtFine folders hold beside each labelIds PNG: instance ids (16-bit, 26001 is car
    instance 1), the colour rendering and the polygons."""
    for f in sorted(root.rglob("*_gtFine_labelIds.png")):
        frame = f.name[: -len("_labelIds.png")]
        with Image.open(f) as im:
            size = im.size[::-1]
        Image.fromarray(np.full(size, 26001, np.uint16)).save(f.parent / f"{frame}_instanceIds.png")
        Image.fromarray(PALETTE[np.zeros(size, int)]).save(f.parent / f"{frame}_color.png")
        (f.parent / f"{frame}_polygons.json").write_text("{}")
    return root


def write_pairs(root, n=3, size=(16, 32)):
    (root / "labels").mkdir(parents=True)
    (root / "images").mkdir()
    for i in range(n):
        ids = np.random.default_rng(i).integers(0, 19, size)
        Image.fromarray(PALETTE[ids]).save(root / "labels" / f"{i:08d}.png")
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(root / "images" / f"{i:08d}.jpg")
    return root


def test_pairs_and_authors_folder_format(tmp_path):
    root = write_pairs(tmp_path / "p")
    ds = make_dataset(f"pairs:{root / 'labels'},{root / 'images'}")
    ids, _ = ds[1]
    assert torch.equal(ids, torch.from_numpy(np.random.default_rng(1).integers(0, 19, (16, 32))))
    crn = tmp_path / "crn"
    (crn / "Label256Full").mkdir(parents=True)
    (crn / "RGB256Full").mkdir()
    for f in (root / "labels").iterdir():
        f.rename(crn / "Label256Full" / f.name)
    for f in (root / "images").iterdir():
        Image.open(f).save(crn / "RGB256Full" / (f.stem + ".png"))
    assert len(make_dataset(f"crn:{crn}", resolution=(16, 32))) == 3


def test_real_authors_labels_decode(shared):
    ids = decode_label(shared / "labels" / "cityscapes_512" / "00100027.png")
    assert ids.shape == (512, 1024) and ids.max() <= VOID
    gta = decode_label(shared / "labels" / "gta_256" / "00100370.png")  # palette-mode PNG
    assert gta.shape == (256, 512) and (gta == TRAIN_ID["road"]).any()


@pytest.mark.parametrize("problem,msg", [
    ("missing", "no image named"), ("size", "is 16x32 but its image"), ("color", "not Cityscapes label colours"),
    ("unreadable", "unreadable image"), ("ids", r"values 20, 33 are not train ids \(0-18, void 19 or 255\)"),
    ("two images", r"2 images match it \(00000001.jpg, 00000001.png\); keep one"),  # one was picked by chance
])
def test_bad_data_names_the_file_and_skip_bad_counts_it(tmp_path, problem, msg):
    root = write_pairs(tmp_path / "p", n=3)
    bad = root / "labels" / "00000001.png"
    if problem == "missing":
        (root / "images" / "00000001.jpg").unlink()
    elif problem == "size":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "00000001.jpg")
    elif problem == "color":
        Image.fromarray(np.full((16, 32, 3), 7, np.uint8)).save(bad)
    elif problem == "two images":
        Image.fromarray(np.full((16, 32, 3), 9, np.uint8)).save(root / "images" / "00000001.png")
    elif problem == "ids":  # greyscale train ids with labelIds-like values among them
        Image.fromarray(np.array([[0, 18, 19, 255], [20, 33, 33, 1]] * 8, np.uint8).repeat(8, axis=1)).save(bad)
    else:
        bad.write_bytes(b"not a png")
    spec = f"pairs:{root / 'labels'},{root / 'images'}"
    with pytest.raises(DataError, match=msg) as e:
        ds = make_dataset(spec)
        [ds[i] for i in range(len(ds))]
    assert "00000001" in str(e.value)
    ds = make_dataset(spec, skip_bad=True)
    assert len(ds) == 2 and len(ds.skipped) == 1 and "00000001" in ds.skipped[0]


def test_pairs_from_one_folder_is_a_usage_error(tmp_path):
    """pairs:DIR,DIR made every label its own target (and a JPEG photograph a label)."""
    root = write_pairs(tmp_path / "p", n=2)
    for f in (root / "images").iterdir():
        f.rename(root / "labels" / f.name)
    with pytest.raises(UsageError, match="the labels and the images are one folder"):
        make_dataset(f"pairs:{root / 'labels'},{root / 'labels' / '.'}")


def test_unknown_colors_void_follows_the_authors_rule(tmp_path):
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(tmp_path / "x.png")
    assert (decode_label(tmp_path / "x.png", unknown_colors="void") == VOID).all()
    ids = np.array([[0, 18, 19, 255, 20, 33]], np.uint8)  # greyscale values that are no train ids: void too
    Image.fromarray(ids).save(tmp_path / "g.png")
    assert decode_label(tmp_path / "g.png", unknown_colors="void").tolist() == [[0, 18, VOID, VOID, VOID, VOID]]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_jpeg_label_is_named_as_the_cause(tmp_path, mode):
    """A label saved as JPEG gets new colours (or ids) where classes meet: the error says so and
    asks for PNG, rather than suggesting --unknown-colors void, which would train on wrong edges."""
    ids = np.random.default_rng(0).integers(0, 19, (32, 64)).astype(np.uint8)
    Image.fromarray(PALETTE[ids] if mode == "RGB" else ids).save(tmp_path / "x.jpg", quality=90)
    with pytest.raises(DataError, match=r"x.jpg: (colours|values) .* it is a JPEG, whose lossy compression changes "
                                        r"the values where classes meet: save labels in a lossless format \(PNG\)$"):
        decode_label(tmp_path / "x.jpg")


def test_pairs_read_cityscapes_label_ids_by_their_name(tmp_path):
    """A pairs folder (and crn-synthesize) reads a *_labelIds.png through Cityscapes' table, as the
    cityscapes: form does: its ids 7/8/26 are road/sidewalk/car, not classes 7/8 and an error."""
    (tmp_path / "l").mkdir()
    (tmp_path / "i").mkdir()
    Image.fromarray(np.array([[7, 8, 26, 0]] * 16, np.uint8).repeat(8, axis=1)).save(tmp_path / "l" / "a_labelIds.png")
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(tmp_path / "i" / "a_labelIds.png")
    ids, _ = make_dataset(f"pairs:{tmp_path / 'l'},{tmp_path / 'i'}")[0]
    assert ids[0, ::8].tolist() == [TRAIN_ID["road"], TRAIN_ID["sidewalk"], TRAIN_ID["car"], VOID]


def test_empty_folder_and_unknown_form(tmp_path):
    (tmp_path / "l").mkdir()
    (tmp_path / "i").mkdir()
    with pytest.raises(DataError, match="no label images"):
        make_dataset(f"pairs:{tmp_path / 'l'},{tmp_path / 'i'}")
    with pytest.raises(UsageError, match="valid forms: synthetic"):  # a bad option value: exit status 2
        make_dataset("imagenet:/x")
    with pytest.raises(DataError, match="does not exist"):
        make_dataset(f"cityscapes:{tmp_path / 'nope'}")
    with pytest.raises(UsageError, match=r"got ',/x' \(the LABEL_DIR is empty\)"):  # it read labels from '.'
        make_dataset("pairs:,/x")
    (tmp_path / "crn" / "Label256Full").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(tmp_path / "crn" / "Label256Full" / "00000001.png")
    with pytest.raises(DataError, match=r"RGB256Full does not exist: the crn: form pairs Label256Full/%08d.png "
                                        r"labels with RGB256Full/%08d.png images"):  # not one line per label
        make_dataset(f"crn:{tmp_path / 'crn'}")


def test_label_files_take_one_layout_per_cityscapes_frame_from_its_subfolders(tmp_path):
    """crn-synthesize --labels gtFine/val: the cities' subfolders are read, and of each frame's four
    gtFine files only the labelIds PNG is a layout (the instanceIds PNG used to fail, and the colour
    PNG made a second output); labelTrainIds wins where present, the colour PNG where it is alone."""
    root = add_cityscapes_extras(write_cityscapes(tmp_path / "cs", n=4, split="val"))
    with pytest.raises(DataError, match=f"is a Cityscapes root .* --labels {root / 'gtFine' / 'val'}$"):
        label_files(root)
    val = root / "gtFine" / "val"
    names = [f.name for f in label_files(val)]
    assert names == [f"{c}_{i:06d}_000019_gtFine_labelIds.png" for c, i in
                     (("aachen", 1), ("aachen", 3), ("bremen", 0), ("bremen", 2))]
    assert [f.name for f in label_files(val / "aachen")] == names[:2]
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(val / "aachen" / "aachen_000001_000019_gtFine_labelTrainIds.png")
    for f in (val / "bremen").glob("bremen_000000_*_gtFine_labelIds.png"):
        f.unlink()
    assert [f.name for f in label_files(val)] == [
        "aachen_000001_000019_gtFine_labelTrainIds.png", names[1], "bremen_000000_000019_gtFine_color.png", names[3]]
    # a folder with images of its own is read as it is, not its subfolders; the output folder never
    (val / "out").mkdir()
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(val / "out" / "earlier_output.png")
    assert "earlier_output.png" not in [f.name for f in label_files(val, exclude=val / "out")]
    assert [f.name for f in label_files(val / "out")] == ["earlier_output.png"]
    with pytest.raises(DataError, match="no label images .* in it or its subfolders"):
        label_files((tmp_path / "empty" / "sub").mkdir(parents=True) or tmp_path / "empty")


def test_the_up_front_check_runs_in_threads_with_the_same_outcome(tmp_path, monkeypatch):
    """make_dataset(threads=N) (crn-train: the cores of its rank) checks and decodes the labels in N
    threads: the same pairs kept, the same skipped files in the same order, and without skip_bad the
    first bad pair in the folder's order is the error, the checks after it cancelled."""
    root = write_pairs(tmp_path / "p", n=40)
    for i in (5, 17):  # an unknown colour, and a label of another size than its image
        Image.fromarray(np.full((16, 32, 3), 7, np.uint8)).save(root / "labels" / f"{i:08d}.png")
    Image.fromarray(PALETTE[np.zeros((8, 32), int)]).save(root / "labels" / "00000030.png")
    spec = f"pairs:{root / 'labels'},{root / 'images'}"
    one, four = (make_dataset(spec, skip_bad=True, scan="always", threads=t) for t in (1, 4))
    assert one.pairs == four.pairs and one.skipped == four.skipped and len(four.pairs) == 37
    assert "00000005" in four.skipped[0] and "00000017" in four.skipped[1] and "is 8x32 but" in four.skipped[2]
    import crn_fast.data as data
    calls, real = [], data.decode_label

    def slow_decode(path, *args):  # every label after the first bad one takes a while
        calls.append(path.name)
        time.sleep(0 if path.name <= "00000005.png" else 0.05)
        return real(path, *args)
    monkeypatch.setattr(data, "decode_label", slow_decode)
    with pytest.raises(DataError, match="00000005.png"):
        make_dataset(spec, scan="always", threads=4)
    assert len(calls) < 40, "the checks after the first bad pair were not cancelled"


@pytest.mark.parametrize("world", [2, 3])
def test_the_check_shared_by_ranks_keeps_what_one_process_keeps(tmp_path, monkeypatch, world):
    """crn-train under torchrun: each rank checks every world-th pair (PairDataset.check), and every
    rank passes all the ranks' findings to keep(): the same pairs and skipped files, in the same
    order, as one process checking them all; without skip_bad, the same first bad file."""
    root = write_pairs(tmp_path / "p", n=12)
    for i in (4, 7, 9):  # unknown colours in the shares of different ranks
        Image.fromarray(np.full((16, 32, 3), 7, np.uint8)).save(root / "labels" / f"{i:08d}.png")
    spec = f"pairs:{root / 'labels'},{root / 'images'}"
    one = make_dataset(spec, skip_bad=True, scan="always")
    import crn_fast.data as data
    decoded, real = [], data.decode_label
    monkeypatch.setattr(data, "decode_label", lambda path, *a: decoded.append(path.name) or real(path, *a))
    for skip_bad in (True, False):
        datasets = [make_dataset(spec, skip_bad=skip_bad, scan="always", check=False) for _ in range(world)]
        found = []
        for rank, ds in enumerate(datasets):
            decoded.clear()
            found.append(ds.check(1, rank, world))  # in threads: test_the_up_front_check_runs_in_threads
            stop = found[-1][0][0] if found[-1] and not skip_bad else 11  # a share stops at its first bad pair
            assert decoded == [f"{i:08d}.png" for i in range(rank, stop + 1, world)]
        merged = [f for share in reversed(found) for f in share]  # the order of the shares does not matter
        for ds in datasets:
            if skip_bad:
                ds.keep(merged)
                assert ds.pairs == one.pairs and ds.skipped == one.skipped and len(ds) == 9
            else:
                with pytest.raises(DataError, match=r"00000004.png.* \(or --skip-bad to leave bad files out\)"):
                    ds.keep(merged)
