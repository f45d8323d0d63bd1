"""Procedurally generated image sets: any size, no network, no licence question.

Each image is drawn from ``(seed, split, index)`` alone, so the set is identical on every
machine and costs no disk. Used by the tests (fast, any number of classes) and as an offline
stand-in where no small real set can be shipped.
"""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import DataError, did_you_mean
from .dataset import Dataset, Reader, Sample

SHAPES = ("circle", "square", "triangle", "cross", "ring", "stripes", "dots", "diamond")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour, rng) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx - r, cy), (cx, cy + r), (cx + r, cy)], fill=colour)
    elif shape == "cross":
        w = max(2, r / 3)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r / 3)))
    elif shape == "stripes":
        step = max(3, int(r / 2))
        for x in range(int(cx - r), int(cx + r), step * 2):
            draw.rectangle([x, cy - r, x + step, cy + r], fill=colour)
    elif shape == "dots":
        for _ in range(6):
            dx, dy = rng.uniform(-r, r, size=2)
            s = max(1.5, r / 5)
            draw.ellipse([cx + dx - s, cy + dy - s, cx + dx + s, cy + dy + s], fill=colour)


class ShapeReader(Reader):
    def __init__(self, shapes: list[str], image_size: int, seed: int):
        self.shapes = shapes
        self.image_size = image_size
        self.seed = seed

    def __call__(self, ref) -> Image.Image:
        split_code, index, label = ref
        rng = np.random.default_rng([self.seed, split_code, index])
        size = self.image_size
        # Dark random background; the shape's hue is tied to its class (with jitter), so even the
        # random-init offline model's features separate the classes.
        background = tuple(int(c) for c in rng.integers(0, 90, size=3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        r = rng.uniform(0.25, 0.4) * size
        cx, cy = rng.uniform(r, size - r, size=2)
        hue = (label / len(self.shapes) + rng.uniform(-0.04, 0.04)) % 1.0
        colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0)))
        _draw_shape(draw, self.shapes[label], cx, cy, r, colour, rng)
        noise = rng.normal(0, 12, size=(size, size, 3))
        arr = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).filter(ImageFilter.GaussianBlur(0.5))


def synthetic_shapes(n_classes: int = 4, *, shapes: list[str] | None = None, train_per_class: int = 20,
                     val_per_class: int = 5, test_per_class: int = 10, image_size: int = 64, seed: int = 0,
                     name: str | None = None) -> Dataset:
    """Coloured shapes on noisy backgrounds; one class per shape (``circle``, ``square``, …), each with its own hue."""
    if shapes is None:
        if not 2 <= n_classes <= len(SHAPES):
            raise DataError(f"synthetic_shapes: n_classes must be 2..{len(SHAPES)}, got {n_classes}.")
        shapes = list(SHAPES[:n_classes])
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise DataError(f"synthetic_shapes: unknown shape {unknown[0]!r}; choose from {SHAPES}."
                        + did_you_mean(unknown[0], SHAPES))
    splits = {}
    for code, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class),
                                               ("test", test_per_class))):
        if per_class <= 0:
            continue
        splits[split] = [Sample(f"{split}/{label}/{i}", label, (code, label * 100_000 + i, label))
                         for label in range(len(shapes)) for i in range(per_class)]
    return Dataset(name=name or f"synthetic_shapes{len(shapes)}", class_ids=list(shapes), class_names=list(shapes),
                   splits=splits, reader=ShapeReader(list(shapes), image_size, seed),
                   source={"kind": "synthetic", "generator": "shapes", "seed": seed, "image_size": image_size},
                   templates=["a photo of a {}.", "a drawing of a {}."])
