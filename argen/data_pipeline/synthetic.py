"""The synthetic demo image set: deterministic, class-conditional pictures that need no download.

Class c draws a shape (circle, square, triangle, cross, ring, stripes, ...) in a class colour on a class background
tint, at a position, size and rotation drawn from a per-image RNG. Images are reproducible from (seed, index), so
every process and every rerun sees the same data set.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

NUM_CLASSES = 10
_SHAPES = ["circle", "square", "triangle", "cross", "ring", "hstripes", "vstripes", "diamond", "checker", "dots"]
_PALETTE = [(230, 60, 50), (50, 160, 80), (40, 90, 220), (240, 200, 40), (160, 60, 200),
            (30, 190, 200), (240, 130, 30), (120, 120, 120), (200, 60, 140), (90, 50, 20)]


def synthetic_label(index: int, num_classes: int = NUM_CLASSES) -> int:
    return index % num_classes


def synthetic_image(index: int, size: int = 256, seed: int = 0, num_classes: int = NUM_CLASSES) -> Image.Image:
    """Image number `index` of the synthetic set (RGB, size x size); its label is synthetic_label(index)."""
    label = synthetic_label(index, num_classes)
    rng = np.random.default_rng([seed, index])
    color = _PALETTE[label % len(_PALETTE)]
    bg = tuple(int(255 - 0.35 * (255 - c)) for c in _PALETTE[(label + 5) % len(_PALETTE)])
    bg = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in bg)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.18, 0.32)
    cx, cy = size * rng.uniform(0.35, 0.65), size * rng.uniform(0.35, 0.65)
    shape = _SHAPES[label % len(_SHAPES)]
    box = [cx - r, cy - r, cx + r, cy + r]
    w = max(2, int(size / 24))
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    elif shape == "triangle":
        a = rng.uniform(0, 2 * math.pi)
        d.polygon([(cx + r * math.cos(a + k * 2 * math.pi / 3), cy + r * math.sin(a + k * 2 * math.pi / 3)) for k in range(3)], fill=color)
    elif shape == "cross":
        d.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=color)
        d.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=color)
    elif shape == "ring":
        d.ellipse(box, outline=color, width=w * 2)
    elif shape == "hstripes":
        for k in range(0, size, 4 * w):
            d.rectangle([0, k, size, k + 2 * w], fill=color)
    elif shape == "vstripes":
        for k in range(0, size, 4 * w):
            d.rectangle([k, 0, k + 2 * w, size], fill=color)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    elif shape == "checker":
        step = max(4, int(r / 2))
        for yy in range(0, size, step):
            for xx in range(0, size, step):
                if (xx // step + yy // step) % 2 == 0:
                    d.rectangle([xx, yy, xx + step - 1, yy + step - 1], fill=color)
    else:  # dots
        for _ in range(12):
            px, py = rng.uniform(0, size, 2)
            d.ellipse([px - w * 1.5, py - w * 1.5, px + w * 1.5, py + w * 1.5], fill=color)
    return img


def synthetic_caption(index: int, num_classes: int = NUM_CLASSES) -> str:
    label = synthetic_label(index, num_classes)
    return f"a {_SHAPES[label % len(_SHAPES)]} in colour {label} on a light background"
