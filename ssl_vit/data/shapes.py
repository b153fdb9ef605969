"""`shapes`: a procedural 32x32 RGB set of 10 shape classes, generated from a seed, no download.

Why it exists: on digits raw pixels already reach ~97% on the linear probe, so every objective looks
the same. Here the class is the *shape* only; position, scale, rotation, foreground and background
colours, clutter and noise are nuisance variables. Raw pixels stay low on the probe while a model that
learns shape does well, which leaves room for objectives to differ. Colour being a nuisance also
exercises colour augmentations and MPP's 512-colour target.

Each image is drawn from its own seed `(seed, split, index)`, so any subset can be regenerated
alone, and a split's images never depend on its size. Labels cycle 0..9, so every class has the
same count (to within one).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = [
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "half_disc",
    "l_shape",
    "bar",
    "arrow",
]
SIZE = 32
DEFAULT_COUNTS = {"train": 4000, "test": 2000}
_SPLIT_IDS = {"train": 0, "test": 1}
_SUPER = 4  # draw at 4x and downsample: anti-aliased edges at 32 px
Point = tuple[float, float]


def _outline(label: int) -> tuple[list[list[Point]], list[list[Point]]]:
    """Polygons (filled, holes) of a unit shape centred on 0, roughly inside the unit disc."""
    circle = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    if label == 0:
        return [circle], []
    if label == 1:
        return [[(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]], []
    if label == 2:
        return [[(math.cos(t), math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]], []
    if label == 3:
        star = [
            (r * math.cos(t), r * math.sin(t))
            for i in range(10)
            for r, t in [(1.0 if i % 2 == 0 else 0.42, -math.pi / 2 + i * math.pi / 5)]
        ]
        return [star], []
    if label == 4:
        a, b = 0.28, 0.95
        return [
            [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a)]
            + [(-b, -a), (-a, -a)]
        ], []
    if label == 5:
        return [circle], [[(0.55 * x, 0.55 * y) for x, y in circle]]
    if label == 6:
        arc = [(math.cos(t), math.sin(t) + 0.4) for t in np.linspace(math.pi, 2 * math.pi, 25)]
        return [arc], []
    if label == 7:
        return [[(-0.7, -0.9), (-0.2, -0.9), (-0.2, 0.4), (0.7, 0.4), (0.7, 0.9), (-0.7, 0.9)]], []
    if label == 8:
        return [[(-0.25, -1.0), (0.25, -1.0), (0.25, 1.0), (-0.25, 1.0)]], []
    if label == 9:
        return [
            [(-0.15, 1.0), (0.15, 1.0), (0.15, -0.2), (0.55, -0.2), (0.0, -1.0), (-0.55, -0.2)]
            + [(-0.15, -0.2)]
        ], []
    raise ValueError(f"shape label must be in 0..9, got {label}")


POLARITY_GAP = 60.0


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _colour_pair(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Random foreground/background RGB colours far enough apart for the shape to stay visible."""
    while True:
        fg, bg = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
        if _luma(fg) - _luma(bg) >= POLARITY_GAP:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def _place(poly: list[Point], angle: float, scale: float, cx: float, cy: float) -> list[Point]:
    c, s = math.cos(angle), math.sin(angle)
    return [((x * c - y * s) * scale + cx, (x * s + y * c) * scale + cy) for x, y in poly]


def render(label: int, rng: np.random.Generator) -> np.ndarray:
    """One image (32, 32, 3) uint8 of class `label`, every nuisance drawn from `rng`."""
    big = SIZE * _SUPER
    fg, bg = _colour_pair(rng)
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):  # clutter: short lines and dots in random colours
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        x0, y0 = rng.uniform(0, big, size=2)
        if rng.random() < 0.5:
            x1, y1 = x0 + rng.uniform(-40, 40), y0 + rng.uniform(-40, 40)
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(3, 7)))
        else:
            r = rng.uniform(4, 10)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
    scale = rng.uniform(0.22, 0.42) * big
    cx, cy = rng.uniform(scale, big - scale, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    filled, holes = _outline(label)
    for poly in filled:
        draw.polygon(_place(poly, angle, scale, cx, cy), fill=fg)
    for poly in holes:
        draw.polygon(_place(poly, angle, scale, cx, cy), fill=bg)
    small = np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float64)
    noisy = small + rng.normal(0.0, rng.uniform(4.0, 14.0), size=small.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def shapes_arrays(split: str, count: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels (N,) int64 of one split (`train` or `test`)."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"shapes has splits 'train' and 'test', not '{split}'")
    n = DEFAULT_COUNTS[split] if count is None else count
    labels = np.arange(n, dtype=np.int64) % len(CLASS_NAMES)
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(n):
        images[i] = render(int(labels[i]), np.random.default_rng([seed, _SPLIT_IDS[split], i]))
    return images, labels
