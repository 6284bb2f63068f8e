"""The one palette / label-id table: the official Cityscapes labels (cityscapesScripts' labels.py).

Train ids 0..18 are the 19 classes the CRN models use; everything else is void, which becomes
the generator's last layout channel (index VOID = 19).
"""
from __future__ import annotations

import numpy as np
import torch

from .constants import NUM_CLASSES

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


def _color_key(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


_COLOR_LUT_KEYS = np.array([_color_key(np.array(c)) for c in PALETTE.tolist() + VOID_COLORS])
_COLOR_LUT_VALS = np.array(list(range(NUM_CLASSES)) + [VOID] * len(VOID_COLORS), np.uint8)
_ORDER = np.argsort(_COLOR_LUT_KEYS)


def colors_to_train_ids(rgb: np.ndarray, unknown: str = "error") -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """(H, W, 3) colour label -> (train ids with void = 19, colours not in the table).

    unknown="void" maps unknown colours to void silently (the authors' rule); "error" leaves
    them void too but returns them so the caller can report the file.
    """
    key = _color_key(rgb)
    keys, vals = _COLOR_LUT_KEYS[_ORDER], _COLOR_LUT_VALS[_ORDER]
    pos = np.clip(np.searchsorted(keys, key), 0, len(keys) - 1)
    found = keys[pos] == key
    ids = np.where(found, vals[pos], VOID).astype(np.uint8)
    bad = [] if unknown == "void" or found.all() else \
        [tuple(int(v) for v in c) for c in np.unique(rgb[~found].reshape(-1, 3), axis=0)[:5]]
    return ids, bad


def train_ids_to_colors(ids: np.ndarray) -> np.ndarray:
    """Train ids (void = 19 or 255) -> (H, W, 3) uint8 colour image (void black)."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    return lut[ids]


def one_hot(ids: torch.Tensor, num_classes: int = NUM_CLASSES + 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, H, W) integer train ids -> (N, num_classes, H, W) layout in ``dtype``, channels_last. The
    last channel is void (1 - sum of the others): every id >= num_classes - 1, e.g. 19 or 255, lands
    there. Written by one scatter into zeros: a quarter of the bytes of F.one_hot's int64 + permute +
    cast (3x faster on a CPU at 1024x2048), and no read back, so no wait on a GPU."""
    index = torch.clamp(ids.long(), max=num_classes - 1).unsqueeze(1)
    out = torch.empty((ids.shape[0], num_classes, *ids.shape[1:]), dtype=dtype, device=ids.device,
                      memory_format=torch.channels_last)
    return out.zero_().scatter_(1, index, 1.0)
