"""One config object describes a generator completely. It flows from the CLI to the model, into
every checkpoint's metadata and into every export sidecar; the channel schedule lives only here."""
from __future__ import annotations

import json
import numbers
import operator
from dataclasses import dataclass, field, fields

from .constants import NUM_CLASSES
from .errors import CRNError
from .labels import CITYSCAPES, ClassSet


@dataclass(frozen=True)
class CRNConfig:
    """Shape of a Cascaded Refinement Network.

    widths: output channels of each refinement module, coarsest first. Module i works at
        ``base_size * 2**i`` for the preset's nominal resolution (and is named by that height in
        the authors' checkpoints: ``g_{height}_conv1``).
    num_classes: layout channels, void included (19 Cityscapes classes + void = 20).
    k: number of images the head emits (3k channels, image-major).
    base_size: (height, width) of the first module at the nominal resolution.
    classes: what the layout channels mean (labels.ClassSet, or its dict form); None: Cityscapes'
        for 20 channels, else numbered classes (``class_set``). Cityscapes' is stored as None, so
        the authors' configs and every file written before class sets existed read the same.
    """

    widths: tuple[int, ...]
    num_classes: int = NUM_CLASSES + 1
    k: int = 1
    base_size: tuple[int, int] = (4, 8)
    name: str = field(default="custom", compare=False)
    classes: ClassSet | None = None

    def __post_init__(self):
        for name in ("widths", "base_size", "num_classes", "k"):  # whole numbers (numpy's too), never 2.5 or "8"
            value = getattr(self, name)
            many = name in ("widths", "base_size")
            iterable = hasattr(value, "__iter__") and not isinstance(value, (str, bytes))
            items = (list(value) if iterable else None) if many else [value]
            if items is None or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in items):
                raise CRNError(f"{name} must be " + ("a list of integers" if many else "an integer") +
                               f", got {value!r}")
            object.__setattr__(self, name, tuple(int(v) for v in items) if many else int(value))
        if isinstance(self.classes, dict):
            object.__setattr__(self, "classes", ClassSet.from_dict(self.classes, "the config's classes"))
        if self.classes == CITYSCAPES:
            object.__setattr__(self, "classes", None)
        if self.classes is not None and self.classes.layout_channels != self.num_classes:
            raise CRNError(f"the classes {self.classes.describe()} make {self.classes.layout_channels} layout "
                           f"channels, but num_classes is {self.num_classes}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise CRNError(f"widths must be a non-empty list of positive channel counts, got {list(self.widths)}")
        if self.num_classes < 1 or self.k < 1:
            raise CRNError(f"num_classes and k must be >= 1, got num_classes={self.num_classes}, k={self.k}")
        if len(self.base_size) != 2 or min(self.base_size) < 1:
            raise CRNError(f"base_size must be (height, width) >= 1, got {self.base_size}")

    @property
    def num_modules(self) -> int:
        return len(self.widths)

    @property
    def stride(self) -> int:
        """Input height and width must be multiples of this (the top/bottom module ratio)."""
        return 2 ** (self.num_modules - 1)

    @property
    def resolution(self) -> tuple[int, int]:
        """The nominal (height, width) the preset was trained at."""
        return self.base_size[0] * self.stride, self.base_size[1] * self.stride

    @property
    def heights(self) -> tuple[int, ...]:
        """Nominal height of each module: the number in the authors' variable names."""
        return tuple(self.base_size[0] * 2 ** i for i in range(self.num_modules))

    @property
    def class_set(self) -> ClassSet:
        """What the layout channels mean: ``classes``, else Cityscapes' for 20 channels, else
        numbered classes (greyscale ids 0..num_classes-2, void 255)."""
        if self.classes is not None:
            return self.classes
        return CITYSCAPES if self.num_classes == CITYSCAPES.layout_channels else ClassSet.numbered(self.num_classes - 1)

    def in_channels(self, i: int) -> int:
        return self.num_classes + (self.widths[i - 1] if i else 0)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "classes"}
        d["widths"], d["base_size"] = list(self.widths), list(self.base_size)
        if self.classes is not None:
            d["classes"] = self.classes.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "CRNConfig":
        known = {"widths", "num_classes", "k", "base_size", "name", "classes"}
        unknown = set(d) - known
        if unknown or "widths" not in d:
            raise CRNError(f"not a CRN config: unknown keys {sorted(unknown)}" if unknown
                           else "not a CRN config: 'widths' is missing")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})

    def replace(self, **kw) -> "CRNConfig":
        d = self.to_dict()
        d.update(kw)
        return CRNConfig.from_dict(d)

    def with_classes(self, classes: ClassSet) -> "CRNConfig":
        """This architecture for another class set (its layout channels follow)."""
        return self.replace(num_classes=classes.layout_channels, classes=classes)

    def validate_input_size(self, height: int, width: int) -> None:
        s = self.stride
        if height % s or width % s or height < s or width < s:
            h, w = self.resolution
            nh, nw = self.nearest_valid_size(height, width)
            raise CRNError(
                f"input size {height}x{width} cannot run on this {self.num_modules}-module CRN: height and width "
                f"must be positive multiples of 2^{self.num_modules - 1} = {s} (e.g. {h}x{w}, "
                f"{h // 2}x{w // 2} or {s}x{2 * s}); the nearest valid size is {nh}x{nw}.")

    def input_size(self, size, name: str = "size") -> tuple[int, int]:
        """``size`` ((H, W) ints, or "HxW") as the (H, W) this CRN runs at; else a CRNError that
        names the argument ``name`` and the valid sizes."""
        try:
            h, w = parse_resolution(size) if isinstance(size, str) else (operator.index(v) for v in size)
        except CRNError as e:
            raise CRNError(f"{name}: {e}") from None
        except (TypeError, ValueError):
            raise CRNError(f"{name} must be (height, width) integers or 'HxW', got {size!r}") from None
        try:
            self.validate_input_size(h, w)
        except CRNError as e:
            raise CRNError(f"{name}: {e}") from None
        return h, w

    def nearest_valid_size(self, height: int, width: int) -> tuple[int, int]:
        """The input size this CRN can run that is nearest to height x width (each rounded to a
        multiple of the stride, halves up, at least one stride)."""
        s = self.stride
        return max(s, (height + s // 2) // s * s), max(s, (width + s // 2) // s * s)


def _authors(widths: list[int], k: int, name: str) -> CRNConfig:
    return CRNConfig(widths=tuple(widths), k=k, name=name)


# The authors' released architectures, exactly as their checkpoint indexes store them.
_SMALL = [1024] * 5 + [512, 512]  # heights 4..64 at 1024, 128 and 256 at 512
PRESETS: dict[str, CRNConfig] = {
    "256p": _authors(_SMALL, 9, "256p"),
    "GTA": _authors(_SMALL, 9, "GTA"),
    "512p": _authors(_SMALL + [128], 1, "512p"),
    "1024p": _authors(_SMALL + [128, 32], 1, "1024p"),
    # Narrow enough for CPU tests and the training demo: 5 modules, 64x128.
    "tiny": CRNConfig(widths=(32, 32, 32, 24, 16), k=1, name="tiny"),
}


def get_preset(name: str) -> CRNConfig:
    if name not in PRESETS:
        raise CRNError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_for_resolution(height: int, width: int) -> CRNConfig:
    """The authors' preset whose top module matches the resolution (tiny for small inputs)."""
    for cfg in PRESETS.values():
        if cfg.resolution == (height, width):
            return cfg
    return PRESETS["1024p"] if height >= 1024 else PRESETS["512p"] if height >= 512 else \
        PRESETS["256p"] if height >= 256 else PRESETS["tiny"]


def parse_resolution(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h < 1 or w < 1:
            raise ValueError
        return h, w
    except ValueError:
        raise CRNError(f"resolution {text!r} is not HEIGHTxWIDTH with positive integers, e.g. 256x512") from None
