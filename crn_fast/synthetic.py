"""Procedural street scenes with Cityscapes train ids: the embedded default training data.

Each scene is drawn in resolution-independent coordinates, so any resolution works, and is a
pure function of (seed, index). The photo is rendered from the layout with per-class colour,
shading, texture and noise, plus per-instance variation (car paint, building tone), so the
layout-to-photo mapping is learnable but not trivial.
"""
from __future__ import annotations

import numpy as np

from .labels import TRAIN_ID, VOID

T = TRAIN_ID
# Base colour (RGB 0..255) of each class's "material"; instances vary around it.
_BASE = {T["sky"]: (120, 165, 215), T["road"]: (88, 86, 92), T["sidewalk"]: (168, 150, 160),
         T["building"]: (128, 112, 100), T["vegetation"]: (62, 112, 48), T["terrain"]: (130, 150, 80),
         T["car"]: (40, 60, 150), T["pole"]: (110, 110, 115), T["person"]: (150, 60, 70),
         T["traffic sign"]: (220, 200, 40), T["fence"]: (150, 130, 115), VOID: (20, 20, 20)}


def render_scene(height: int, width: int, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (train ids uint8 (H, W), image uint8 (H, W, 3))."""
    rng = np.random.default_rng([seed, index])
    yy, xx = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    ids = np.full((height, width), T["sky"], np.uint8)
    tint = np.ones((height, width, 3))  # per-pixel multiplicative variation (instances, shading)
    horizon = rng.uniform(0.38, 0.5)
    vx = rng.uniform(0.35, 0.65)  # vanishing point

    def paint(mask, cls, variation=0.0):
        ids[mask] = cls
        if variation:
            tint[mask] = rng.uniform(1 - variation, 1 + variation, 3)

    # buildings along the horizon, with windows
    x = 0.0
    while x < 1.0:
        w = rng.uniform(0.08, 0.25)
        top = horizon - rng.uniform(0.1, 0.35)
        m = (xx >= x) & (xx < x + w) & (yy >= top) & (yy < horizon + 0.02)
        paint(m, T["building"], 0.25)
        win = m & (np.sin(xx * width / rng.uniform(5, 9)) > 0.3) & (np.sin(yy * height / rng.uniform(5, 9)) > 0.2)
        tint[win] *= 0.55
        x += w
    # trees
    for _ in range(rng.integers(1, 5)):
        cx, cy, r = rng.uniform(0, 1), horizon - rng.uniform(0.0, 0.12), rng.uniform(0.04, 0.12)
        paint(((xx - cx) / 2) ** 2 * 4 + (yy - cy) ** 2 < r ** 2, T["vegetation"], 0.15)
    # ground: road trapezoid towards the vanishing point, sidewalks and terrain beside it
    below = yy >= horizon
    depth = np.clip((yy - horizon) / (1 - horizon), 0, 1)
    half = 0.05 + 0.6 * depth
    road = below & (np.abs(xx - vx) < half)
    side = below & ~road & (np.abs(xx - vx) < half * 1.5)
    paint(below & ~road & ~side, T["terrain"] if rng.random() < 0.5 else T["sidewalk"])
    paint(side, T["sidewalk"])
    paint(road, T["road"])
    lane = road & (np.abs(xx - vx) < 0.006 + 0.01 * depth) & (np.sin(depth * 40) > 0)
    tint[lane] = 2.2
    if rng.random() < 0.5:  # a fence along one side
        fx = vx + (1 if rng.random() < 0.5 else -1) * 1.5 * half
        paint(below & (np.abs(xx - fx) < 0.02 + 0.05 * depth) & (yy < horizon + 0.25 * depth + 0.05), T["fence"])
    # poles with signs, people on the sidewalk, cars on the road (far to near)
    for _ in range(rng.integers(1, 4)):
        px, base = rng.uniform(0.05, 0.95), rng.uniform(horizon + 0.05, 0.95)
        hgt = 0.5 * (base - horizon) + 0.1
        paint((np.abs(xx - px) < 0.004 + 0.004 * base) & (yy > base - hgt) & (yy < base), T["pole"])
        if rng.random() < 0.6:
            paint((np.abs(xx - px) < 0.02) & (yy > base - hgt - 0.03) & (yy < base - hgt + 0.02), T["traffic sign"])
    for _ in range(rng.integers(0, 4)):
        px, base = rng.uniform(0.05, 0.95), rng.uniform(horizon + 0.05, 1.0)
        s = 0.15 * (base - horizon) + 0.03
        paint(((xx - px) / (0.3 * s)) ** 2 + ((yy - base + s / 2) / (s / 2)) ** 2 < 1, T["person"], 0.3)
    for depth_pos in sorted(rng.uniform(0.1, 1.0, rng.integers(1, 5))):
        base = horizon + depth_pos * (1 - horizon)
        s = 0.04 + 0.18 * depth_pos
        cx = vx + rng.uniform(-0.6, 0.6) * (0.05 + 0.6 * depth_pos)
        body = (np.abs(xx - cx) < s) & (yy > base - 0.45 * s) & (yy < base)
        cabin = (np.abs(xx - cx) < 0.6 * s) & (yy > base - 0.8 * s) & (yy <= base - 0.45 * s)
        paint(body | cabin, T["car"], 0.6)
        tint[cabin] *= 0.6  # windows
    # render: material colour x instance tint x vertical shading x texture, plus sensor noise
    lut = np.zeros((256, 3))
    for cls, col in _BASE.items():
        lut[cls] = col
    img = lut[ids] * tint
    light = rng.uniform(0.8, 1.2)
    shade = np.where(ids == T["sky"], 1.15 - 0.45 * yy / max(horizon, 1e-3), 0.75 + 0.35 * yy)[..., None]
    texture = 1 + 0.08 * np.sin(xx * width * 0.9 + yy * height * 1.3)[..., None] * (ids != T["sky"])[..., None]
    img = img * shade * texture * light + rng.normal(0, 4, img.shape)
    return ids, np.clip(img, 0, 255).astype(np.uint8)
