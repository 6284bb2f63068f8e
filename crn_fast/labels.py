"""What a layout's channels mean: the class sets, and the one palette / label-id table.

A :class:`ClassSet` names a generator's classes in layout-channel order, and says how label files
write them: each class's value in single-channel (greyscale) labels and its colour in colour
labels (and in pictures of layouts). Void is the layout's last channel, after the classes.

The default is Cityscapes (cityscapesScripts' labels.py): train ids 0..18 are the 19 classes the
authors' CRN models use; everything else is void, channel VOID = 19. Other data brings its own
set: ``--classes N`` (greyscale ids 0..N-1) or a JSON classes file (see ClassSet.from_dict).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .constants import NUM_CLASSES
from .errors import CRNError, absent

# (name, id, train_id, colour); train_id 255 = void
CITYSCAPES_LABELS = [
    ("unlabeled", 0, 255, (0, 0, 0)), ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)), ("out of roi", 3, 255, (0, 0, 0)),
    ("static", 4, 255, (0, 0, 0)), ("dynamic", 5, 255, (111, 74, 0)), ("ground", 6, 255, (81, 0, 81)),
    ("road", 7, 0, (128, 64, 128)), ("sidewalk", 8, 1, (244, 35, 232)), ("parking", 9, 255, (250, 170, 160)),
    ("rail track", 10, 255, (230, 150, 140)), ("building", 11, 2, (70, 70, 70)), ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)), ("guard rail", 14, 255, (180, 165, 180)), ("bridge", 15, 255, (150, 100, 100)),
    ("tunnel", 16, 255, (150, 120, 90)), ("pole", 17, 5, (153, 153, 153)), ("polegroup", 18, 255, (153, 153, 153)),
    ("traffic light", 19, 6, (250, 170, 30)), ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)), ("terrain", 22, 9, (152, 251, 152)), ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)), ("rider", 25, 12, (255, 0, 0)), ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)), ("bus", 28, 15, (0, 60, 100)), ("caravan", 29, 255, (0, 0, 90)),
    ("trailer", 30, 255, (0, 0, 110)), ("train", 31, 16, (0, 80, 100)), ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
]
VOID = NUM_CLASSES  # layout channel of void
TRAIN_ID = {name: t for name, _, t, _ in CITYSCAPES_LABELS if t != 255}
PALETTE = np.array([c for _, _, t, c in sorted((l for l in CITYSCAPES_LABELS if l[2] != 255), key=lambda l: l[2])],
                   np.uint8)  # (19, 3), train-id order
# Colours that mean void: Cityscapes' void classes, plus GTA5's (20, 20, 20) "static".
VOID_COLORS = sorted({c for _, _, t, c in CITYSCAPES_LABELS if t == 255} | {(20, 20, 20)})

_ID_TO_TRAIN = np.full(256, VOID, np.uint8)
for _, _id, _t, _ in CITYSCAPES_LABELS:
    _ID_TO_TRAIN[_id] = VOID if _t == 255 else _t


def label_ids_to_train_ids(ids: np.ndarray) -> np.ndarray:
    """Cityscapes ``*_labelIds.png`` values -> train ids (void = 19)."""
    return _ID_TO_TRAIN[ids]


MAX_CLASSES = 255  # class indices, void included, are stored in 8 bits (void = the class count)
MAX_ID = 65535  # the largest value a 16-bit greyscale label holds
_UNKNOWN = 255  # in a decoding table: a value that is no class's nor void's (void is at most 254)
Color = tuple[int, int, int]


def _color_key(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 colours -> (...) uint32 keys 0xRRGGBB, in three in-place passes."""
    key = rgb[..., 0].astype(np.uint32)
    key <<= 8
    key |= rgb[..., 1]
    key <<= 8
    key |= rgb[..., 2]
    return key


def made_up_colors(n: int) -> list[Color]:
    """n distinct colours, none black (void), for classes whose data names no colour: the PASCAL
    VOC colour map's bit interleaving, from its entry 1."""
    colors = []
    for i in range(1, n + 1):
        rgb, c = [0, 0, 0], i
        for bit in range(7, -1, -1):
            for ch in range(3):
                rgb[ch] |= (c >> ch & 1) << bit
            c >>= 3
        colors.append(tuple(rgb))
    return colors


def describe_ids(values) -> str:
    """Integers as short ranges: '0-18', '1, 3, 7-9'."""
    values, parts = sorted(values), []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(parts)


@dataclass(frozen=True)
class ClassSet:
    """The classes of a layout, in channel order, and how label files write them.

    names: the classes; channel i is names[i], and void is channel len(names).
    ids: each class's value in single-channel (greyscale) label files.
    colors: each class's RGB colour, in colour label files and in pictures of layouts.
    void_ids, void_colors: the values and colours that mean void.
    colors_given: whether the colours are the data's (colour labels can be read), or made up
        (made_up_colors) for pictures only.
    name: what the set is called: "cityscapes", a classes file's name, or "N classes".
    """

    name: str
    names: tuple[str, ...]
    ids: tuple[int, ...]
    colors: tuple[Color, ...]
    void_ids: tuple[int, ...]
    void_colors: tuple[Color, ...]
    colors_given: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def void(self) -> int:
        """The void channel's index (and void's value in decoded labels)."""
        return len(self.names)

    @property
    def layout_channels(self) -> int:
        """A generator's input channels for this set: the classes and void."""
        return len(self.names) + 1

    @property
    def is_cityscapes(self) -> bool:
        return self == CITYSCAPES

    def describe(self) -> str:
        n = f"{self.num_classes} classes"
        return f"{n} + void" if self.name == n else f"{self.name} ({n} + void)"

    def difference(self, other: "ClassSet") -> str:
        """The first way ``other`` differs from this set, in words ('' if it does not)."""
        if self.names != other.names:
            if len(self.names) != len(other.names):
                return f"{other.describe()} instead of {self.describe()}"
            i = next(i for i, (a, b) in enumerate(zip(self.names, other.names)) if a != b)
            return f"class {i} is {other.names[i]!r} instead of {self.names[i]!r}"
        for what, mine, theirs in (("id", self.ids, other.ids), ("colour", self.colors, other.colors)):
            for i, (a, b) in enumerate(zip(mine, theirs)):
                if a != b:
                    show = (lambda v: list(v)) if what == "colour" else (lambda v: v)
                    return f"class {i} ({self.names[i]!r}) has {what} {show(b)} instead of {show(a)}"
        for what, a, b in (("void ids", self.void_ids, other.void_ids), ("void colours", self.void_colors,
                                                                         other.void_colors),
                           ("name", self.name, other.name), ("colours given", self.colors_given, other.colors_given)):
            if a != b:
                return f"{what} {b} instead of {a}"
        return ""

    # --- label files -> class indices (void = self.void) ------------------------------------------
    @cached_property
    def _id_lut(self) -> np.ndarray:
        """Greyscale value 0..MAX_ID -> class index, void, or UNKNOWN (not a value of this set)."""
        lut = np.full(MAX_ID + 1, _UNKNOWN, np.uint8)
        lut[list(self.void_ids)] = self.void
        lut[list(self.ids)] = np.arange(self.num_classes)
        return lut

    def ids_to_index(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Greyscale label values -> (class indices uint8 with void = self.void, the values that are
        not this set's, sorted; they are void in the indices). An 8- or 16-bit label is one table
        lookup."""
        raw, lut = values, self._id_lut
        if values.dtype not in (np.uint8, np.uint16):  # 32-bit ("I") labels: values beyond the table are unknown
            values = values.astype(np.int64)
            values = np.where((values >= 0) & (values <= MAX_ID), values, MAX_ID + 1)
            lut = np.append(lut, np.uint8(_UNKNOWN))
        index = lut[values]
        unknown = index == _UNKNOWN
        if not unknown.any():
            return index, np.empty(0, np.int64)
        index[unknown] = self.void
        return index, np.unique(raw[unknown]).astype(np.int64)

    @cached_property
    def _color_table(self) -> np.ndarray:
        """24-bit colour -> class index, void or _UNKNOWN: one lookup a pixel (a 16 MiB table, built at
        the first colour label). A class's colour wins over void's (Cityscapes' polegroup is pole's)."""
        table = np.full(1 << 24, _UNKNOWN, np.uint8)
        table[_color_key(np.array(self.void_colors, np.uint8).reshape(-1, 3))] = self.void
        table[_color_key(np.array(self.colors, np.uint8))] = np.arange(self.num_classes)
        return table

    def colors_to_index(self, rgb: np.ndarray, unknown: str = "error",
                        palette: np.ndarray | None = None) -> tuple[np.ndarray, list[Color]]:
        """(H, W, 3) colour label, or (H, W) palette indices and their (256, 3) ``palette`` -> (class
        indices with void = self.void, up to 5 colours not in the set). unknown="void" maps unknown
        colours to void silently (the authors' rule); "error" leaves them void too but returns them
        so the caller can report the file."""
        if palette is not None:  # 256 lookups, then one gather a pixel
            index = self._color_table[_color_key(palette)][rgb]
        else:
            index = self._color_table[_color_key(rgb)]
        missing = index == _UNKNOWN
        if not missing.any():
            return index, []
        index[missing] = self.void
        colors = palette[rgb[missing]] if palette is not None else rgb[missing]
        return index, [] if unknown == "void" else [tuple(int(v) for v in c) for c in np.unique(colors, axis=0)[:5]]

    def to_colors(self, index: np.ndarray) -> np.ndarray:
        """Class indices (void = self.void, or any value above the classes) -> (H, W, 3) uint8 colour
        image, void black."""
        lut = np.zeros((256, 3), np.uint8)
        lut[:self.num_classes] = self.colors
        return lut[index]

    # --- the classes file format (also a config's "classes") ---------------------------------------
    def to_dict(self) -> dict:
        """The classes file form, every value explicit; colours only when they are the data's."""
        classes = [{"name": n, "id": i, **({"color": list(c)} if self.colors_given else {})}
                   for n, i, c in zip(self.names, self.ids, self.colors)]
        return {"name": self.name, "classes": classes,
                "void": {"ids": list(self.void_ids), "colors": [list(c) for c in self.void_colors]}}

    @classmethod
    def from_dict(cls, d, source: str = "classes") -> "ClassSet":
        """A class set from its JSON form. ``source`` names it in errors (a file, a checkpoint)::

            {"name": "my-streets",                  # optional; default: the file's name
             "classes": [{"name": "road", "id": 1, "color": [128, 64, 128]},
                         {"name": "car", "id": 2, "color": "#00008e"}],
             "void": {"ids": [0, 255], "colors": [[0, 0, 0]]}}

        A class may be just its name. "id" is its value in greyscale labels (default: "first_id",
        itself default 0, plus its position); "color" its colour in colour labels, [r, g, b] or
        "#rrggbb", given for every class or for none (then made up, and colour labels cannot be
        read). "void" defaults to id 255 and colour black, where no class has them.
        """
        def fail(what):
            raise CRNError(f"{source}: {what}")

        if not isinstance(d, dict):
            fail(f"a classes file is a JSON object with a \"classes\" list, not a JSON {type(d).__name__}")
        unknown = set(d) - {"name", "classes", "first_id", "void"}
        if unknown:
            fail(f"unknown key(s) {', '.join(sorted(unknown))}; valid: name, classes, first_id, void")
        entries = d.get("classes")
        if not isinstance(entries, list) or not entries:
            fail("\"classes\" must be a non-empty list of class names or {\"name\", \"id\", \"color\"} objects")
        if len(entries) > MAX_CLASSES - 1:
            fail(f"{len(entries)} classes; at most {MAX_CLASSES - 1} (class indices and void are stored in 8 bits)")
        first = d.get("first_id", 0)
        if not _is_int(first) or not 0 <= first <= MAX_ID:
            fail(f"\"first_id\" {first!r} must be an integer 0-{MAX_ID}")
        names, ids, colors = [], [], []
        for i, e in enumerate(entries):
            e = {"name": e} if isinstance(e, str) else e
            where = f"class {i}"
            if not isinstance(e, dict):
                fail(f"{where} is {e!r}: a name, or an object with \"name\" and optional \"id\" and \"color\"")
            extra = set(e) - {"name", "id", "color"}
            if extra:
                fail(f"{where} has unknown key(s) {', '.join(sorted(extra))}; valid: name, id, color")
            name = e.get("name")
            if not isinstance(name, str) or not name.strip():
                fail(f"{where} needs a \"name\" (a non-empty string), got {name!r}")
            where = f"class {i} ({name!r})"
            value = e.get("id", first + i)
            if not _is_int(value) or not 0 <= value <= MAX_ID:
                fail(f"{where}: \"id\" {value!r} must be an integer 0-{MAX_ID} (its value in greyscale labels)")
            names.append(name)
            ids.append(int(value))
            colors.append(_color(e["color"], f"{source}: {where}") if "color" in e else None)
        given = [c is not None for c in colors]
        if any(given) and not all(given):
            fail(f"class {given.index(not given[0])} ({names[given.index(not given[0])]!r}) has "
                 f"{'no' if given[0] else 'a'} \"color\" but class 0 ({names[0]!r}) "
                 f"{'has' if given[0] else 'has none'}: give a colour for every class or for none")
        for what, values in (("name", names), ("id", ids), ("color", colors if all(given) else [])):
            seen: dict = {}
            for i, v in enumerate(values):
                if v in seen:
                    fail(f"classes {seen[v]} ({names[seen[v]]!r}) and {i} ({names[i]!r}) have the same {what} "
                         f"{list(v) if what == 'color' else repr(v)}")
                seen[v] = i
        void = d.get("void", {})
        if not isinstance(void, dict) or set(void) - {"ids", "colors"}:
            fail(f"\"void\" must be an object with optional \"ids\" and \"colors\" lists, got {void!r}")
        void_ids = void.get("ids", [] if 255 in ids else [255])
        if not isinstance(void_ids, list) or not all(_is_int(v) and 0 <= v <= MAX_ID for v in void_ids):
            fail(f"\"void\": \"ids\" must be a list of integers 0-{MAX_ID}, got {void_ids!r}")
        void_colors = [_color(c, f"{source}: \"void\"") for c in void.get(
            "colors", [] if all(given) and (0, 0, 0) in colors else [[0, 0, 0]])]
        for v in void_ids:
            if v in ids:
                fail(f"id {v} is both void and class {ids.index(v)} ({names[ids.index(v)]!r})")
        for c in void_colors if all(given) else ():
            if c in colors:
                fail(f"colour {list(c)} is both void and class {colors.index(c)} ({names[colors.index(c)]!r})")
        name = d.get("name", Path(source).stem)
        if not isinstance(name, str) or not name:
            fail(f"\"name\" must be a non-empty string, got {name!r}")
        return cls(name, tuple(names), tuple(ids), tuple(colors) if all(given) else tuple(made_up_colors(len(names))),
                   tuple(sorted(set(void_ids))), tuple(dict.fromkeys(void_colors)), all(given))

    @classmethod
    def numbered(cls, n: int) -> "ClassSet":
        """n classes written 0..n-1 in greyscale labels, void 255, colours made up."""
        if not 1 <= n <= MAX_CLASSES - 1:
            raise CRNError(f"{n} classes: a class set has 1-{MAX_CLASSES - 1} classes")
        return cls(f"{n} classes", tuple(f"class {i}" for i in range(n)), tuple(range(n)),
                   tuple(made_up_colors(n)), (255,), ((0, 0, 0),), False)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _color(value, where: str) -> Color:
    """[r, g, b] or "#rrggbb" -> (r, g, b)."""
    if isinstance(value, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", value):
        return tuple(int(value[i:i + 2], 16) for i in (1, 3, 5))
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in value):
        return tuple(int(v) for v in value)
    raise CRNError(f"{where}: colour {value!r} is not [r, g, b] with values 0-255 or \"#rrggbb\"")


# The authors' classes: train ids 0..18 in greyscale labels (void 19 or 255), Cityscapes' colours
# (void: its void classes' colours, and GTA5's (20, 20, 20), but not polegroup's, which is pole's).
# Cityscapes' own *_labelIds.png files are read through label_ids_to_train_ids first.
_PALETTE = tuple(tuple(int(v) for v in c) for c in PALETTE)
CITYSCAPES = ClassSet("cityscapes", tuple(n for n, _ in sorted(TRAIN_ID.items(), key=lambda kv: kv[1])),
                      tuple(range(NUM_CLASSES)), _PALETTE, (VOID, 255),
                      tuple(c for c in VOID_COLORS if c not in _PALETTE))


def read_classes(spec) -> ClassSet:
    """``--classes``: "cityscapes" (the default), a class count N (greyscale ids 0..N-1, void 255),
    or a JSON classes file (ClassSet.from_dict); from Python also a ClassSet, or the file's dict form."""
    if isinstance(spec, ClassSet):
        return spec
    if isinstance(spec, dict):
        try:
            return ClassSet.from_dict({"name": "custom", **spec}, "the classes dict")
        except CRNError as e:
            raise CRNError(f"--classes {e}") from None
    if isinstance(spec, bool) or not isinstance(spec, (str, int, float, os.PathLike)):
        raise CRNError(f"--classes: give cityscapes, a class count, a JSON classes file, or from Python a ClassSet or "
                       f"the file's dict form; got {type(spec).__name__} {spec!r}"[:300])
    spec = os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec)
    if spec == "cityscapes":
        return CITYSCAPES
    if re.fullmatch(r"[+-]?\d+(\.\d*)?", spec.strip()):
        if not spec.strip().isdigit() or not 1 <= int(spec) <= MAX_CLASSES - 1:
            raise CRNError(f"--classes {spec}: a class count is a whole number, 1-{MAX_CLASSES - 1}")
        return ClassSet.numbered(int(spec))
    path = Path(spec)
    if not spec or not path.is_file():
        raise CRNError(f"--classes {spec!r}: " + ("empty" if not spec else absent(path) if not path.exists() else
                                                  "not a file") +
                       "; give cityscapes, a class count (e.g. 12) or a JSON classes file")
    try:
        d = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a byte-order mark (Windows editors) is fine
    except (OSError, UnicodeDecodeError) as e:
        raise CRNError(f"--classes {spec}: unreadable ({e})") from None
    except ValueError as e:
        raise CRNError(f"--classes {spec}: not valid JSON ({e})") from None
    try:
        return ClassSet.from_dict(d, str(path))
    except CRNError as e:
        raise CRNError(f"--classes {e}") from None


def one_hot(ids: torch.Tensor, num_classes: int = NUM_CLASSES + 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, H, W) (or (N, 1, H, W)) integer class indices -> (N, num_classes, H, W) layout in ``dtype``,
    channels_last. The last channel is void (1 - sum of the others): every index outside 0 ..
    num_classes - 2 lands there, e.g. 19 or 255 for Cityscapes, or an ignore index of -1. Written by
    one scatter into zeros: a quarter of the bytes of F.one_hot's int64 + permute + cast (3x faster
    on a CPU at 1024x2048), and no read back, so no wait on a GPU (the checks here read only the
    shape and dtype). Anything else is a CRNError naming what would do."""
    if not isinstance(ids, torch.Tensor):
        raise CRNError(f"one_hot: ids must be a torch tensor of class indices, got {type(ids).__name__}" +
                       (": torch.from_numpy(ids)" if isinstance(ids, np.ndarray) else ""))
    if ids.is_floating_point() or ids.is_complex():
        raise CRNError(f"one_hot: ids must be integer class indices, got {ids.dtype}: a label map scaled to 0..1 "
                       f"(e.g. by torchvision's ToTensor) has lost its ids; read it as integers (a label PNG as "
                       f"uint8), or .long() a tensor whose values are already ids")
    if ids.dim() == 4 and ids.shape[1] == 1:
        ids = ids[:, 0]
    if ids.dim() != 3:
        raise CRNError(f"one_hot: ids must be (N, H, W) or (N, 1, H, W) class indices, got shape {tuple(ids.shape)}"
                       + (": one label map is ids[None]" if ids.dim() == 2 else ""))
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 2:
        raise CRNError(f"one_hot: num_classes must be an int >= 2 (the classes plus void), got {num_classes!r}")
    void = int(num_classes) - 1
    index = ids.long().clamp(max=void)
    if ids.dtype not in (torch.uint8, torch.bool):  # signed: an ignore index of -1 is void too
        index = index.masked_fill(index < 0, void)
    out = torch.empty((ids.shape[0], void + 1, *ids.shape[1:]), dtype=dtype, device=ids.device,
                      memory_format=torch.channels_last)
    return out.zero_().scatter_(1, index.unsqueeze(1), 1.0)
