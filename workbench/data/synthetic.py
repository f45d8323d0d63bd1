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


class _GeneratedReader(Reader):
    """Draws image ``ref = (split_code, index, label)`` from a seed alone (picklable, no files)."""

    def __init__(self, classes: list[str], image_size: int, seed: int):
        self.classes = classes
        self.image_size = image_size
        self.seed = seed


def _generated_splits(class_ids: list[str], counts: dict[str, int]) -> dict[str, list[Sample]]:
    splits = {}
    for code, (split, per_class) in enumerate(counts.items()):
        if per_class > 0:
            splits[split] = [Sample(f"{split}/{class_ids[label]}/{i}", label, (code, label * 100_000 + i, label))
                             for label in range(len(class_ids)) for i in range(per_class)]
    return splits


class ShapeReader(_GeneratedReader):
    @property
    def shapes(self) -> list[str]:
        return self.classes

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
    splits = _generated_splits(list(shapes), {"train": train_per_class, "val": val_per_class,
                                              "test": test_per_class})
    return Dataset(name=name or f"synthetic_shapes{len(shapes)}", class_ids=list(shapes), class_names=list(shapes),
                   splits=splits, reader=ShapeReader(list(shapes), image_size, seed),
                   source={"kind": "synthetic", "generator": "shapes", "seed": seed, "image_size": image_size},
                   templates=["a photo of a {}.", "a drawing of a {}."])


LEAF_CONDITIONS = ("healthy", "rust", "blight", "powdery_mildew")


class LeafReader(_GeneratedReader):
    """A leaf on a soil-coloured background, healthy or with one of three disease patterns."""

    def __call__(self, ref) -> Image.Image:
        split_code, index, label = ref
        rng = np.random.default_rng([self.seed, split_code, index, 7])
        s = self.image_size
        soil = tuple(int(c) for c in (rng.integers(70, 120), rng.integers(50, 85), rng.integers(30, 55)))
        image = Image.new("RGB", (s, s), soil)
        draw = ImageDraw.Draw(image)
        cx, cy = s / 2 + rng.uniform(-0.08, 0.08) * s, s / 2 + rng.uniform(-0.08, 0.08) * s
        half_len, half_w = rng.uniform(0.36, 0.46) * s, rng.uniform(0.18, 0.26) * s
        green = (int(rng.integers(40, 90)), int(rng.integers(120, 180)), int(rng.integers(30, 70)))
        leaf = [cx - half_w, cy - half_len, cx + half_w, cy + half_len]
        draw.ellipse(leaf, fill=green)
        vein = tuple(min(255, c + 40) for c in green)
        draw.line([cx, cy - half_len, cx, cy + half_len], fill=vein, width=max(1, s // 64))
        for t in np.linspace(-0.6, 0.6, 5):
            y = cy + t * half_len
            draw.line([cx, y, cx - half_w * 0.8, y - half_len * 0.2], fill=vein, width=1)
            draw.line([cx, y, cx + half_w * 0.8, y - half_len * 0.2], fill=vein, width=1)

        def inside():
            a = rng.uniform(0, 2 * np.pi)
            r = np.sqrt(rng.uniform(0, 0.8))
            return cx + r * half_w * np.cos(a), cy + r * half_len * np.sin(a)

        condition = self.classes[label]
        if condition == "rust":  # many small orange-brown pustules
            for _ in range(int(rng.integers(15, 30))):
                x, y = inside()
                rad = rng.uniform(0.01, 0.025) * s
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=(190, int(rng.integers(80, 120)), 30))
        elif condition == "blight":  # a few large dark-brown lesions with a yellow halo
            for _ in range(int(rng.integers(2, 4))):
                x, y = inside()
                rad = rng.uniform(0.06, 0.11) * s
                draw.ellipse([x - rad * 1.3, y - rad * 1.3, x + rad * 1.3, y + rad * 1.3], fill=(200, 190, 60))
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=(90, 55, 25))
        elif condition == "powdery_mildew":  # diffuse white powdery patches
            overlay = Image.new("L", (s, s), 0)
            od = ImageDraw.Draw(overlay)
            for _ in range(int(rng.integers(4, 8))):
                x, y = inside()
                rad = rng.uniform(0.05, 0.1) * s
                od.ellipse([x - rad, y - rad, x + rad, y + rad], fill=int(rng.integers(150, 220)))
            overlay = overlay.filter(ImageFilter.GaussianBlur(s / 40))
            image = Image.composite(Image.new("RGB", (s, s), (235, 235, 225)), image, overlay)
        noise = rng.normal(0, 8, size=(s, s, 3))
        return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def synthetic_leaves(*, train_per_class: int = 30, val_per_class: int = 10, test_per_class: int = 20,
                     image_size: int = 64, seed: int = 0, name: str = "leaf_disease_synthetic",
                     class_names=None, **meta) -> Dataset:
    """Procedurally generated leaves: healthy, rust spots, blight patches, powdery mildew.

    An offline stand-in for the agriculture domain (no small permissively licensed real set
    could be shipped); the patterns follow the usual visual descriptions of those diseases.
    """
    conditions = list(LEAF_CONDITIONS)
    names = list(class_names) if class_names is not None else [c.replace("_", " ") for c in conditions]
    splits = _generated_splits(conditions, {"train": train_per_class, "val": val_per_class, "test": test_per_class})
    return Dataset(name=name, class_ids=conditions, class_names=names, splits=splits,
                   reader=LeafReader(conditions, image_size, seed),
                   source={"kind": "synthetic", "generator": "leaves", "seed": seed, "image_size": image_size}, **meta)
