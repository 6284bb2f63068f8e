"""Datasets: synthetic streets, Cityscapes, the authors' folder format and generic label/image pairs.

Every dataset yields ``(ids, image)``: ids a uint8 (H, W) tensor of class indices (void = the class
count: 19 for Cityscapes; see labels.ClassSet) and image a uint8 (3, H, W) tensor. Both stay 8-bit
until they reach the device, where ``device_batch`` widens them: the layout one-hot is built there
(``labels.one_hot``) and the image becomes float32 on the 0..255 scale. A 1024x2048 sample is then 8 MB
through the loader's worker processes, its pinned memory and the host-to-device copy, not the 40 MB
of int64 ids and a float32 image (3-4x less time per sample through two loader workers; see the
README's data costs). Labels resize with nearest neighbour, images with area averaging.

``--data`` forms: ``synthetic``, ``cityscapes:ROOT``, ``crn:ROOT``, ``pairs:LABEL_DIR,IMAGE_DIR``.
"""
from __future__ import annotations

import hashlib
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import CRNError, UsageError, absent
from .labels import CITYSCAPES, ClassSet, describe_ids, label_ids_to_train_ids
from .synthetic import render_scene

DATA_FORMS = "synthetic | cityscapes:ROOT | crn:ROOT | pairs:LABEL_DIR,IMAGE_DIR"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SCAN_MODES = ("auto", "always", "never")
# a Cityscapes frame's gtFine files, and those that are layouts, in the order one is chosen
CITYSCAPES_GT = re.compile(r"(.+)_gtFine_(labelTrainIds|labelIds|color|instanceIds)\.png")
CITYSCAPES_LAYOUTS = ("labelTrainIds", "labelIds", "color")
# --scan-labels auto decodes every label up front for datasets up to this size: Cityscapes' 2975 training
# labels take ~80 s in one thread (27 ms each), ~10 s with 8 cores
SCAN_AUTO_LIMIT = 5000
log = logging.getLogger("crn_fast")
# what PIL raises for an unknown format, cut data, a broken chunk or a decompression bomb
DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DataError(CRNError):
    """Bad training data; the message names the file."""


def _open(path: Path) -> Image.Image:
    """Open and fully decode an image. Every decoding failure (unknown format, cut data, a broken
    chunk, a decompression bomb) is a DataError naming the file."""
    im = None
    try:
        im = Image.open(path)
        im.load()
        return im
    except DECODE_ERRORS as e:
        if im is not None:  # opened, but its data would not decode: its file is not left open
            im.close()
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def label_kind(path: Path, classes: ClassSet = CITYSCAPES) -> str:
    """How decode_label reads a label file, by its name: with Cityscapes' classes its
    ``*_labelIds.png`` as label ids and ``*_labelTrainIds.png`` as train ids; any other by its
    image mode ("auto")."""
    if not classes.is_cityscapes:
        return "auto"
    return "label_ids" if path.name.endswith("_labelIds.png") else \
        "ids" if path.name.endswith("_labelTrainIds.png") else "auto"


# a JPEG label's colours or ids are changed by its lossy compression wherever two classes meet: void
# there (--unknown-colors void) would quietly teach the model wrong edges
_JPEG_LABEL = ("; it is a JPEG, whose lossy compression changes the values where classes meet: save "
               "labels in a lossless format (PNG)")


def jpeg_labels_warning(labels) -> str | None:
    """What to say, once, when labels are JPEGs. Their values where classes meet are changed by the
    compression: into values that are no class's (an error, or void with --unknown-colors void) but
    also, in greyscale, into neighbouring ids that are other classes', read without complaint."""
    jpegs = [p for p in labels if p.suffix.lower() in (".jpg", ".jpeg")]
    if not jpegs:
        return None
    return (f"{len(jpegs)} of {len(labels)} label(s) are JPEGs (the first: {jpegs[0]}): lossy compression changes "
            f"their values where classes meet, so those edges are read as other classes or void; save labels in "
            f"a lossless format (PNG)")


def decode_label(path: Path, kind: str = "auto", unknown_colors: str = "error",
                 classes: ClassSet = CITYSCAPES) -> np.ndarray:
    """A label image -> class indices (H, W) uint8 of ``classes``, void = its class count (19 for
    Cityscapes).

    kind: "ids" (greyscale values are the classes' ids: Cityscapes' train ids 0-18, void 19 or
    255), "label_ids" (Cityscapes labelIds), "color" (the classes' colours) or "auto":
    greyscale -> ids, RGB -> colours, palette-mode -> colours, or its palette indices as ids
    when the classes have no colours (PASCAL VOC's labels with --classes 21). A colour or a value
    that is not the classes' nor void's (Cityscapes' labelIds under another name, say) is a
    DataError naming the file and the values; with unknown_colors="void" both are read as void
    (the authors' rule for colours).
    """
    im = _open(path)
    if kind == "auto":  # a palette PNG is its colours, or for classes without colours its indices (PASCAL VOC's)
        kind = "ids" if im.mode in ("L", "I", "I;16") or im.mode == "P" and not classes.colors_given else "color"
    if kind == "color":
        if not classes.colors_given:
            raise DataError(f"{path} is a colour label, but the classes ({classes.describe()}) have no colours: give "
                            f"--classes a JSON classes file with each class's \"color\", or use greyscale labels")
        if im.mode == "P":  # its palette's colours, looked up once, not each pixel's
            palette = np.zeros((256, 3), np.uint8)
            entries = np.array(im.getpalette() or [], np.uint8).reshape(-1, 3)[:256]
            palette[:len(entries)] = entries
            ids, bad = classes.colors_to_index(np.asarray(im), unknown_colors, palette)
        else:
            ids, bad = classes.colors_to_index(np.asarray(im if im.mode == "RGB" else im.convert("RGB")),
                                               unknown_colors)
        if bad:
            whose = "Cityscapes label colours" if classes.is_cityscapes else f"label colours of {classes.describe()}"
            raise DataError(f"{path}: colours {bad} are not {whose}" + (
                _JPEG_LABEL if im.format == "JPEG" else
                " (use --unknown-colors void to treat them as void, as the authors did)"))
        return ids
    arr = np.asarray(im)
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a single-channel id image, got mode {im.mode}")
    if kind == "label_ids":
        return label_ids_to_train_ids(np.clip(arr, 0, 255).astype(np.uint8))
    ids, bad = classes.ids_to_index(arr)
    if unknown_colors != "void" and bad.size:
        shown = ", ".join(map(str, bad[:8])) + (f" ... ({bad.size} values)" if bad.size > 8 else "")
        void = " or ".join(map(str, classes.void_ids))
        raise DataError(f"{path}: values {shown} are " + (
            f"not train ids ({describe_ids(classes.ids)}, void {void})" if classes.is_cityscapes else
            f"not ids of {classes.describe()}: class ids {describe_ids(classes.ids)}, void {void}") + (
            _JPEG_LABEL if im.format == "JPEG" else
            "; Cityscapes label ids are read as such from files named *_labelIds.png (use --unknown-colors void "
            "to treat other values as void)" if classes.is_cityscapes else
            " (use --unknown-colors void to treat other values as void)"))
    return ids


def resize_pair(ids: np.ndarray, image: np.ndarray | None, size: tuple[int, int] | None):
    if size is None:
        return ids, image
    h, w = size
    if ids.shape != (h, w):
        ids = np.asarray(Image.fromarray(ids).resize((w, h), Image.NEAREST))
    if image is not None and image.shape[:2] != (h, w):
        im = Image.fromarray(image)
        down = image.shape[0] >= h and image.shape[1] >= w
        image = np.asarray(im.resize((w, h), Image.BOX if down else Image.BILINEAR))
    return ids, image


def _to_tensors(ids: np.ndarray, image: np.ndarray):
    """(H, W) class indices and an (H, W, 3) uint8 image -> uint8 (H, W) and (3, H, W) tensors (the
    image a view: the loader's collate writes the batch contiguous)."""
    # writable arrays (a decoded label or image may be PIL's read-only buffer: torch warns on those)
    return (torch.from_numpy(np.require(ids, np.uint8, "W")),
            torch.from_numpy(np.require(image, np.uint8, "W")).permute(2, 0, 1))


def device_batch(ids: torch.Tensor, images: torch.Tensor, device, non_blocking: bool = False):
    """A batch of a dataset's (ids, images), 8-bit or wider, on ``device``: the ids as they are (one_hot
    widens them there) and the images as float32 on the 0..255 scale, widened after the copy."""
    return (ids.to(device, non_blocking=non_blocking),
            images.to(device, non_blocking=non_blocking).to(torch.float32))


class SyntheticStreets(torch.utils.data.Dataset):
    def __init__(self, resolution=(64, 128), seed: int = 0, length: int = 2000):
        self.resolution, self.seed, self.length = tuple(resolution), seed, length
        self.skipped: list[str] = []
        self.warning = None

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return _to_tensors(*render_scene(*self.resolution, self.seed, i))

    def check(self, threads: int = 1, rank: int = 0, world: int = 1) -> list:  # nothing to check:
        return []  # the scenes are drawn, not read (PairDataset.check)

    def subset(self, n: int) -> None:
        """Keep the first ``n`` scenes (PairDataset.subset)."""
        self.length = min(self.length, n)

    def keep(self, found) -> None:
        pass

    def describe(self) -> str:
        return f"synthetic streets ({self.length} scenes, seed {self.seed})"

    def fingerprint(self) -> str:
        """What the data order depends on: the same for the same scenes (PairDataset.fingerprint)."""
        return f"synthetic {self.resolution[0]}x{self.resolution[1]} seed {self.seed} x{self.length}"


class PairDataset(torch.utils.data.Dataset):
    """(label file, image file or None, label kind) triples, labels read as ``classes``.

    Checked up front: every file exists and its header is readable, and each label matches its
    image's size. ``scan`` also decodes every label up front, so unknown colours and cut files
    are found before the first step: "always", "never", or "auto" (for up to SCAN_AUTO_LIMIT
    pairs). With ``skip_bad`` a bad file found up front is left out, and one found later (an image
    with cut data) is replaced by the next good sample, with a warning naming it. ``skipped``: what
    was already left out (pairs with a file missing), for the count and the warnings.

    The check runs in ``threads`` threads. With ``check=False`` it is left to the caller, in two
    steps that several processes can share (crn-train under torchrun): each runs ``check`` on its
    share of the pairs, and every one passes the problems found by all to ``keep``.
    """

    def __init__(self, pairs, resolution=None, skip_bad: bool = False, unknown_colors: str = "error",
                 name: str = "pairs", scan: str = "auto", threads: int = 1, skipped=(), check: bool = True,
                 classes: ClassSet = CITYSCAPES):
        if scan not in SCAN_MODES:
            raise DataError(f"--scan-labels {scan!r}: valid: {', '.join(SCAN_MODES)}")
        self.resolution, self.unknown_colors, self.name, self.skip_bad = resolution, unknown_colors, name, skip_bad
        self.pairs, self.skipped, self.classes = list(pairs), list(skipped), classes
        self.warning = jpeg_labels_warning([label for label, _, _ in self.pairs])  # for the caller to say once
        self.scanned = scan == "always" or scan == "auto" and len(self.pairs) <= SCAN_AUTO_LIMIT
        self.decode_images = False  # check: decode each image whole too, not its header only (a small set)
        if check:
            self.keep(self.check(threads))

    def check(self, threads: int = 1, rank: int = 0, world: int = 1) -> list[tuple[int, str]]:
        """What is wrong in a share of the pairs (every ``world``-th, from ``rank``), as (index,
        problem) in order. The pairs are checked in ``threads`` threads (PIL and numpy release the
        GIL); without skip_bad the share's first bad pair stops the rest at once."""
        share = range(rank, len(self.pairs), world)
        found = []
        for i, problem in zip(share, in_threads(lambda i: self._problem(self.pairs[i]), share, threads)):
            if problem is not None:
                found.append((i, problem))
                if not self.skip_bad:
                    break
        return found

    def keep(self, found) -> None:
        """Act on the problems ``check`` found (all shares'): without skip_bad the first bad pair is
        the error, as if one process had checked them all in order; with it the bad pairs are left
        out, in order in ``skipped``."""
        found = sorted(found)
        if found and not self.skip_bad:
            raise DataError(f"{found[0][1]} (or --skip-bad to leave bad files out)")
        bad = {i for i, _ in found}
        self.pairs = [p for i, p in enumerate(self.pairs) if i not in bad]
        self.skipped += [problem for _, problem in found]
        if not self.pairs:
            raise DataError(f"{self.name}: no usable label/image pairs" +
                            (f" ({len(self.skipped)} skipped)" if self.skipped else ""))

    def subset(self, n: int) -> None:
        """Keep at most ``n`` pairs, spread evenly over the sorted files (every city of Cityscapes' val
        split, not the first): a fixed validation set, chosen before the files are checked."""
        if n < len(self.pairs):
            self.pairs = [self.pairs[i * len(self.pairs) // n] for i in range(n)]

    def _problem(self, pair) -> str | None:
        """What is wrong with a pair (None: nothing): a missing or unreadable file, sizes that differ,
        and, when scanned, a label that does not decode (bad colours, cut data)."""
        label, image, kind = pair
        try:
            lab = _open_header(label)
            if image is not None:
                img = _open_header(image)
                if lab != img:
                    raise DataError(f"{label} is {lab[0]}x{lab[1]} but its image {image} is {img[0]}x{img[1]}")
            if self.scanned:
                decode_label(label, kind, self.unknown_colors, self.classes)
            if self.decode_images and image is not None:
                _open(image)
        except DataError as e:
            return str(e)
        return None

    def __len__(self):
        return len(self.pairs)

    def load(self, i):
        label, image, kind = self.pairs[i]
        ids = decode_label(label, kind, self.unknown_colors, self.classes)
        img = np.asarray(_open(image).convert("RGB")) if image is not None else None
        ids, img = resize_pair(ids, img, self.resolution)
        return _to_tensors(ids, img)

    def __getitem__(self, i):
        for attempt in range(len(self.pairs)):
            j = (i + attempt) % len(self.pairs)
            try:
                return self.load(j)
            except DataError as e:
                if not self.skip_bad:
                    raise
                log.warning(f"skipped (found while training): {e}; using sample {(j + 1) % len(self.pairs)}")
        raise DataError(f"{self.name}: every file failed to decode")

    def fingerprint(self) -> str:
        """A digest of the pairs' file names, in order: a resumed run compares it with the run's, as
        the batches of every step depend on which files there are."""
        names = "".join(f"{label.name}\t{image.name if image else ''}\n" for label, image, _ in self.pairs)
        return hashlib.sha256(names.encode()).hexdigest()[:16]

    def describe(self) -> str:
        s = f"{self.name} ({len(self.pairs)} pairs"
        s += ", labels scanned up front" if self.scanned else ", labels checked when loaded (--scan-labels always)"
        return s + (f", {len(self.skipped)} skipped)" if self.skipped else ")")


def in_threads(fn, items, threads: int):
    """``fn`` over ``items``, results in order, in ``threads`` threads (1: this one). Leaving the
    loop early cancels the calls not yet started."""
    if threads <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="crn-scan")
    try:
        yield from pool.map(fn, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _open_header(path: Path) -> tuple[int, int]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with Image.open(path) as im:
            return im.size[::-1]
    except DECODE_ERRORS as e:
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} {path} " + ("is not a folder" if path.exists() else absent(path)))
    return path


def cityscapes_pairs(root: Path, split: str = "train", skip_bad: bool = False, split_option: str = " (--split)"):
    """Official layout: leftImg8bit/{split}/{city}/*_leftImg8bit.png + gtFine/{split}/{city}/*_gtFine_*.png.
    ``split_option``: how a missing split's error names the option that chose it ("" for none)."""
    if not (root / "leftImg8bit" / split).is_dir() and (root / "leftImg8bit").is_dir():
        splits = sorted(d.name for d in (root / "leftImg8bit").iterdir() if d.is_dir())
        raise DataError(f"Cityscapes split {split!r} not found: no folder {root / 'leftImg8bit' / split}; the "
                        f"splits there: {', '.join(splits) if splits else 'none'}{split_option}")
    img_root = _need_dir(root / "leftImg8bit" / split, "Cityscapes images folder")
    gt_root = _need_dir(root / "gtFine" / split, "Cityscapes gtFine folder")
    images = sorted(img_root.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DataError(f"{img_root}: no */*_leftImg8bit.png files")
    pairs, missing = [], []
    for img in images:
        stem = img.name[: -len("_leftImg8bit.png")]
        base = gt_root / img.parent.name / stem
        label = next((f for kind in CITYSCAPES_LAYOUTS[:2] if (f := Path(f"{base}_gtFine_{kind}.png")).is_file()), None)
        if label is not None:
            pairs.append((label, img, label_kind(label)))
        else:
            missing.append(f"{img}: no label {stem}_gtFine_labelIds.png (or *_labelTrainIds.png) in "
                           f"{base.parent}")
    return pairs, missing


def crn_pairs(root: Path, resolution=None):
    """The authors' format: Label{256,512,1024}Full/%08d.png colour labels + RGB{...}Full/%08d.png."""
    _need_dir(root, "data root")
    sizes = sorted(int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"Label(\d+)Full", p.name)))
    if not sizes:
        raise DataError(f"{root}: no Label{{256,512,1024}}Full folder")
    want = resolution[0] if resolution else sizes[-1]
    size = next((s for s in sizes if s >= want), sizes[-1])
    labels = sorted((root / f"Label{size}Full").glob("*.png"))
    if not labels:
        raise DataError(f"{root / f'Label{size}Full'}: empty folder")
    img_dir = root / f"RGB{size}Full"
    if not img_dir.is_dir():  # else each label would be reported missing its image
        raise DataError(f"{img_dir} does not exist: the crn: form pairs Label{size}Full/%08d.png labels with "
                        f"RGB{size}Full/%08d.png images")
    pairs, missing = [], []
    for lab in labels:
        img = next((img_dir / (lab.stem + e) for e in IMAGE_EXTS if (img_dir / (lab.stem + e)).is_file()), None)
        if img is None:
            missing.append(f"{lab}: no image {lab.stem}.png in {img_dir}")
        else:
            pairs.append((lab, img, "color"))
    return pairs, missing


def folder_pairs(label_dir: Path, image_dir: Path | None, classes: ClassSet = CITYSCAPES):
    """Generic pairs matched by file stem; image_dir None gives labels only (synthesis)."""
    _need_dir(label_dir, "label folder")
    labels = sorted(p for p in label_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not labels:
        raise DataError(f"{label_dir}: no label images ({', '.join(IMAGE_EXTS)})")
    if image_dir is None:
        return [(lab, None, label_kind(lab, classes)) for lab in labels], []
    _need_dir(image_dir, "image folder")
    if image_dir.resolve() == label_dir.resolve():  # every label would be its own image, or a.jpg a label
        raise UsageError(f"--data pairs:{label_dir},{image_dir}: the labels and the images are one folder; "
                         f"pairs are matched by name across two folders (LABEL_DIR,IMAGE_DIR)")
    by_stem: dict[str, list[Path]] = {}
    for f in sorted(image_dir.iterdir()):
        if f.suffix.lower() in IMAGE_EXTS:
            by_stem.setdefault(f.stem, []).append(f)
    pairs, missing = [], []
    for lab in labels:
        found = by_stem.get(lab.stem, [])
        if len(found) == 1:
            pairs.append((lab, found[0], label_kind(lab, classes)))
        else:  # none, or two such as a.jpg and a.png: which one is the photograph is not for us to guess
            missing.append(f"{lab}: no image named {lab.stem}.* in {image_dir}" if not found else
                           f"{lab}: {len(found)} images match it ({', '.join(f.name for f in found)}); keep one")
    return pairs, missing


def make_dataset(spec: str, resolution=None, seed: int = 0, split: str = "train", skip_bad: bool = False,
                 unknown_colors: str = "error", scan: str = "auto", threads: int = 1, check: bool = True,
                 classes: ClassSet = CITYSCAPES, option: str = "--data"):
    """Build the dataset named by a ``--data`` spec (see DATA_FORMS), its labels read as ``classes``;
    its files are checked in ``threads`` threads, or with ``check=False`` by the caller
    (PairDataset.check and keep). ``option``: the option its errors name (--val-data: a fixed split)."""
    kind, _, arg = spec.partition(":")
    if kind not in ("synthetic", "cityscapes", "crn", "pairs") or bool(arg) == (kind == "synthetic"):
        raise UsageError(f"unknown {option} {spec!r}; valid forms: {DATA_FORMS}")
    if kind in ("synthetic", "cityscapes") and not classes.is_cityscapes:
        raise UsageError(f"{option} {spec}: " + ("the synthetic streets are drawn" if kind == "synthetic" else
                                                 "Cityscapes' labels are read") +
                         f" in Cityscapes' 19 classes, not --classes {classes.describe()}; train on your own labels "
                         f"with --data pairs:LABEL_DIR,IMAGE_DIR, or leave --classes out")
    if kind == "crn" and not classes.colors_given:
        raise UsageError(f"{option} {spec}: the crn: form's labels are colour PNGs, but the classes "
                         f"({classes.describe()}) have no colours: give --classes a JSON classes file with each "
                         f"class's \"color\"")
    if kind == "synthetic":
        return SyntheticStreets(resolution or (64, 128), seed)
    if kind == "cityscapes":
        pairs, missing = cityscapes_pairs(Path(arg), split, split_option=" (--split)" if option == "--data" else "")
    elif kind == "crn":
        pairs, missing = crn_pairs(Path(arg), resolution)
    else:
        if "," not in arg:
            raise UsageError(f"{option} pairs needs LABEL_DIR,IMAGE_DIR, got {arg!r}")
        lab, img = arg.split(",", 1)
        if not lab or not img:
            raise UsageError(f"{option} pairs needs LABEL_DIR,IMAGE_DIR, got {arg!r} (the "
                             f"{'LABEL_DIR' if not lab else 'IMAGE_DIR'} is empty)")
        pairs, missing = folder_pairs(Path(lab), Path(img), classes)
    if missing and not skip_bad:
        raise DataError(missing[0] + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                        "; pass --skip-bad to train on the rest")
    return PairDataset(pairs, resolution, skip_bad, unknown_colors, name=f"{kind}:{arg}", scan=scan,
                       threads=threads, skipped=missing, check=check, classes=classes)


def label_files(path: Path, exclude: Path | None = None) -> list[Path]:
    """Label images to synthesize from: one file; every image in a folder; or, in a folder with no
    image of its own, every image in its subfolders (Cityscapes' gtFine/val/{city}/), except those
    under ``exclude`` (the output folder). A Cityscapes frame gives one layout, not one per file
    beside it: its labelTrainIds, else labelIds, else colour PNG (never its instanceIds)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path} {absent(path)}")
    if (path / "gtFine").is_dir() and (path / "leftImg8bit").is_dir():
        splits = sorted(d.name for d in (path / "gtFine").iterdir() if d.is_dir()) or ["val"]
        raise DataError(f"{path} is a Cityscapes root (photographs and labels): give its labels, e.g. --labels "
                        f"{path / 'gtFine' / ('val' if 'val' in splits else splits[0])}")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        skip = exclude.resolve() if exclude is not None else None
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file() and
                       (skip is None or not p.resolve().is_relative_to(skip)))
    files = one_layout_per_frame(files)
    if not files:
        raise DataError(f"{path}: no label images ({', '.join(IMAGE_EXTS)}) in it or its subfolders")
    return files


def one_layout_per_frame(files: list[Path]) -> list[Path]:
    """Of each Cityscapes frame's gtFine files (``{frame}_gtFine_{kind}.png``) keep one layout, the
    first of CITYSCAPES_LAYOUTS' kinds present; other files stay as they are, in order."""
    present, keep = set(files), []
    for f in files:
        m = CITYSCAPES_GT.fullmatch(f.name)
        if m is None:
            keep.append(f)
        elif m.group(2) in CITYSCAPES_LAYOUTS:
            better = CITYSCAPES_LAYOUTS[:CITYSCAPES_LAYOUTS.index(m.group(2))]
            if not any(f.with_name(f"{m.group(1)}_gtFine_{kind}.png") in present for kind in better):
                keep.append(f)
    return keep
