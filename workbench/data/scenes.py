"""A captioned-scene corpus drawn procedurally: pretraining data for the offline model.

Every scene is a few objects on a background. Each object has a shape, a colour, a size and a
fill texture; the scene has a count (1–3 objects of one kind), a position for a lone object, and
a background. The caption is composed from those attributes with one of several phrasings,
and some phrasings leave attributes out, so a model trained contrastively on (image, caption)
pairs must tie each word to what it shows rather than to a fixed sentence.

Everything is a pure function of ``(seed, index)``: the corpus is the same on every machine,
costs no disk, and any slice of it can be drawn in any order (a resumed pretraining run sees
exactly the images it would have seen).

Grammar (``{}`` = one word from the vocabulary below; ``[...]`` = optional):

    caption   := phrasing(scene), one of PHRASINGS, chosen per scene
    object    := [size] [texture] colour shape          e.g. "small striped red circle"
    objects   := count-word [size] colour shape-plural   e.g. "two large blue squares"
    where     := "in the" position | "on a" background "background"

Vocabulary: :data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`, :data:`TEXTURES`,
:data:`POSITIONS`, :data:`BACKGROUNDS`, count words "one", "two", "three". All are common
English words, so the CLIP BPE tokenizer keeps each as one or two tokens.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon")
PLURALS = {"cross": "crosses"}
#: colour name -> (hue in [0, 1), saturation, value); grey/white/black have no hue
COLOURS = {
    "red": (0.0, 0.85, 0.9), "orange": (0.08, 0.9, 0.95), "yellow": (0.16, 0.85, 0.95),
    "green": (0.33, 0.8, 0.75), "blue": (0.62, 0.8, 0.9), "purple": (0.78, 0.65, 0.75),
    "pink": (0.92, 0.45, 0.95), "white": (0.0, 0.0, 0.97), "black": (0.0, 0.0, 0.08), "grey": (0.0, 0.0, 0.55),
}
SIZES = ("small", "large")
TEXTURES = ("plain", "striped", "dotted")
POSITIONS = ("left", "right", "top", "bottom", "centre")
#: background name -> base RGB (a noisy field of that colour is drawn)
BACKGROUNDS = {"dark": (25, 25, 30), "light": (215, 215, 210), "sand": (194, 170, 120),
               "grass": (70, 120, 50), "water": (40, 80, 140), "brick": (150, 70, 50)}
COUNT_WORDS = ("one", "two", "three")

PHRASINGS = (
    "a photo of {objects} on a {background} background.",
    "{objects} on {background}.",
    "a picture of {objects}.",
    "{objects}.",
    "an image with {objects} {where}.",
    "a {background} background with {objects}.",
)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    texture: str
    count: int
    position: str
    background: str


def sample_scene(rng: np.random.Generator) -> Scene:
    """One scene with every attribute drawn uniformly (the background never equals the object's colour)."""
    colour = str(rng.choice(list(COLOURS)))
    backgrounds = [b for b in BACKGROUNDS if not (b, colour) in {("dark", "black"), ("light", "white"),
                                                                 ("grass", "green"), ("water", "blue")}]
    return Scene(shape=str(rng.choice(SHAPES)), colour=colour, size=str(rng.choice(SIZES)),
                 texture=str(rng.choice(TEXTURES)), count=int(rng.integers(1, 4)),
                 position=str(rng.choice(POSITIONS)), background=str(rng.choice(backgrounds)))


def _rgb(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    h, s, v = COLOURS[colour]
    h = (h + rng.uniform(-0.02, 0.02)) % 1.0
    s = float(np.clip(s + rng.uniform(-0.08, 0.08), 0, 1))
    v = float(np.clip(v + rng.uniform(-0.08, 0.08), 0, 1))
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, s, v))


def _polygon(cx: float, cy: float, r: float, shape: str, angle: float) -> list[tuple[float, float]]:
    if shape == "star":
        pts = [(r if i % 2 == 0 else 0.45 * r, angle + i * math.pi / 5) for i in range(10)]
    else:
        n, offset = {"triangle": (3, -math.pi / 2), "square": (4, math.pi / 4), "diamond": (4, 0.0),
                     "hexagon": (6, 0.0)}[shape]
        pts = [(r, angle + offset + i * 2 * math.pi / n) for i in range(n)]
    return [(cx + d * math.cos(a), cy + d * math.sin(a)) for d, a in pts]


def _shape_mask(size: int, shape: str, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    else:
        draw.polygon(_polygon(cx, cy, r, shape, angle), fill=255)
    return mask


def _texture_mask(size: int, texture: str, rng: np.random.Generator) -> np.ndarray | None:
    """Where a textured fill shows the lighter shade: stripes or a dot grid, at a random phase."""
    if texture == "plain":
        return None
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = max(4.0, size / 10)
    phase = rng.uniform(0, period)
    if texture == "striped":
        return ((xx + yy + phase) % period) < period / 2
    gx, gy = (xx + phase) % period - period / 2, (yy + phase) % period - period / 2
    return gx ** 2 + gy ** 2 < (period / 4) ** 2


def _centres(scene: Scene, size: int, r: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    lo, hi = r + 1, size - r - 1
    if scene.count == 1:
        third = size / 3
        x, y = {"left": (third * 0.75, size / 2), "right": (size - third * 0.75, size / 2),
                "top": (size / 2, third * 0.75), "bottom": (size / 2, size - third * 0.75),
                "centre": (size / 2, size / 2)}[scene.position]
        jitter = rng.uniform(-0.05, 0.05, size=2) * size
        return [(float(np.clip(x + jitter[0], lo, hi)), float(np.clip(y + jitter[1], lo, hi)))]
    centres: list[tuple[float, float]] = []
    for _ in range(scene.count):
        for _attempt in range(30):  # spread the objects apart when there is room
            c = tuple(float(v) for v in rng.uniform(lo, hi, size=2))
            if all((c[0] - a) ** 2 + (c[1] - b) ** 2 > (1.6 * r) ** 2 for a, b in centres):
                break
        centres.append(c)
    return centres


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` at ``image_size`` pixels (noise, jitter and rotation from ``rng``)."""
    s = image_size
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    canvas = base + rng.normal(0, 10, size=(s, s, 3)).astype(np.float32)
    scale = {"small": 0.15, "large": 0.25}[scene.size] * (0.8 if scene.count == 3 else 1.0)
    r = scale * s * rng.uniform(0.9, 1.1)
    colour = np.array(_rgb(scene.colour, rng), dtype=np.float32)
    lighter = np.clip(colour * 0.55 + 255 * 0.45, 0, 255) if scene.colour != "white" else colour * 0.6
    texture = _texture_mask(s, scene.texture, rng)
    for cx, cy in _centres(scene, s, r, rng):
        mask = np.asarray(_shape_mask(s, scene.shape, cx, cy, r, rng.uniform(-0.3, 0.3)), dtype=np.float32) / 255.0
        fill = np.broadcast_to(colour, (s, s, 3)).copy()
        if texture is not None:
            fill[texture] = lighter
        canvas = canvas * (1 - mask[..., None]) + fill * mask[..., None]
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(0.4))


def _object_phrase(scene: Scene, rng: np.random.Generator) -> str:
    words = []
    if rng.random() < 0.6:
        words.append(scene.size)
    if scene.texture != "plain" and rng.random() < 0.7:
        words.append(scene.texture)
    words.append(scene.colour)
    if scene.count == 1:
        noun = scene.shape
        article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article, *words, noun])
    noun = PLURALS.get(scene.shape, scene.shape + "s")
    return " ".join([COUNT_WORDS[scene.count - 1], *words, noun])


def caption_scene(scene: Scene, rng: np.random.Generator) -> str:
    """One caption of ``scene`` in one of :data:`PHRASINGS` (some leave the background or size out)."""
    phrasing = PHRASINGS[int(rng.integers(len(PHRASINGS)))]
    where = f"in the {scene.position}" if scene.count == 1 and rng.random() < 0.7 else f"on a {scene.background} background"
    return phrasing.format(objects=_object_phrase(scene, rng), background=scene.background, where=where)


class SceneCorpus:
    """``corpus[i]`` -> ``(image, caption, scene)``: the i-th captioned scene of this seed.

    Picklable (it holds only its seed and size), so it can feed DataLoader workers.
    """

    def __init__(self, n: int, *, seed: int = 0, image_size: int = 64):
        if n < 1:
            raise ValueError(f"SceneCorpus: n must be at least 1, got {n}.")
        self.n, self.seed, self.image_size = int(n), int(seed), int(image_size)

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int) -> Scene:
        return sample_scene(np.random.default_rng([self.seed, index, 0]))

    def __getitem__(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(index)
        scene = self.scene(index)
        image = render_scene(scene, self.image_size, np.random.default_rng([self.seed, index, 1]))
        caption = caption_scene(scene, np.random.default_rng([self.seed, index, 2]))
        return image, caption, scene

    def describe(self) -> dict:
        return {"generator": "scenes", "n": self.n, "seed": self.seed, "image_size": self.image_size,
                "vocabulary": {"shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES),
                               "textures": list(TEXTURES), "positions": list(POSITIONS),
                               "backgrounds": list(BACKGROUNDS), "counts": list(COUNT_WORDS)},
                "phrasings": list(PHRASINGS)}


def scene_attributes(scene: Scene) -> dict:
    return asdict(scene)


# --- Target domains that shift away from the corpus ------------------------------------------
#
# Each shifted domain keeps words the pretrained text tower knows as class names (so zero-shot
# is above chance) but draws images the corpus never showed (so zero-shot is clearly worse than
# in-domain, and adaptation has something to do). The shifts follow how real domains differ
# from web photos:
#
# * ``xray_like``   grayscale, blurred, noisy, low contrast; the class is a shape, the cue is
#                   subtle (medical images: few classes, fine differences, no colour);
# * ``aerial_like`` top-down tiles covered by many small rotated objects; the class is the
#                   ground (remote sensing: texture and layout, arbitrary orientation);
# * ``leaf_like``   a green field with many small lesion-like spots; the class is the spot colour
#                   (plant disease: small, local cues on a uniform background).

SHIFTED_DOMAINS = {
    "xray_like": {"classes": ("circle", "ring", "square", "triangle", "cross"),
                  "templates": ("a photo of a {}.", "a grey {}.")},
    "aerial_like": {"classes": ("grass", "water", "sand", "brick"),
                    "templates": ("a photo of objects on a {} background.", "a {} background.")},
    "leaf_like": {"classes": ("red", "orange", "yellow", "white", "black"),
                  "templates": ("a photo of small {} circles on a grass background.", "many small {} circles.")},
}


def _xray_like(label_name: str, s: int, rng: np.random.Generator) -> Image.Image:
    scene = Scene(shape=label_name, colour="white", size=str(rng.choice(SIZES)), texture="plain", count=1,
                  position=str(rng.choice(POSITIONS)), background="dark")
    image = np.asarray(render_scene(scene, s, rng).convert("L"), dtype=np.float32)
    contrast = rng.uniform(*XRAY_CONTRAST)  # faint structures, as in a radiograph
    image = image.mean() + contrast * (image - image.mean()) + 60 * rng.uniform(0.6, 1.0)
    image = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(s * XRAY_BLUR))
    image = np.asarray(image, dtype=np.float32) + rng.normal(0, XRAY_NOISE, size=(s, s))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).convert("RGB")


XRAY_CONTRAST, XRAY_BLUR, XRAY_NOISE = (0.25, 0.45), 1 / 48, 14.0


def _aerial_like(label_name: str, s: int, rng: np.random.Generator) -> Image.Image:
    base = np.array(BACKGROUNDS[label_name], dtype=np.float32) * rng.uniform(0.8, 1.15)
    canvas = base + rng.normal(0, 22, size=(s, s, 3)).astype(np.float32)  # coarse ground texture
    for _ in range(int(rng.integers(14, 28))):  # buildings, trees, boats: small objects of any colour
        r = rng.uniform(0.03, 0.07) * s
        cx, cy = rng.uniform(r, s - r, size=2)
        mask = np.asarray(_shape_mask(s, str(rng.choice(("square", "circle", "diamond"))), cx, cy, r,
                                      rng.uniform(0, math.pi)), dtype=np.float32)[..., None] / 255.0
        colour = np.array(_rgb(str(rng.choice(list(COLOURS))), rng), dtype=np.float32)
        canvas = canvas * (1 - mask) + colour * mask
    # another sensor and another season: per-channel gains and haze, so the ground's colour is
    # only roughly the colour the corpus taught for its name
    canvas = canvas * rng.uniform(1 - AERIAL_GAIN, 1 + AERIAL_GAIN, size=3).astype(np.float32)
    haze = rng.uniform(0.0, AERIAL_HAZE)
    canvas = (1 - haze) * canvas + haze * 170.0
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return image.rotate(float(rng.choice((0, 90, 180, 270))) + rng.uniform(-10, 10), resample=Image.BILINEAR,
                        fillcolor=tuple(int(c) for c in base))


AERIAL_GAIN, AERIAL_HAZE = 0.6, 0.6


def _leaf_like(label_name: str, s: int, rng: np.random.Generator) -> Image.Image:
    green = np.array(BACKGROUNDS["grass"], dtype=np.float32) * rng.uniform(0.85, 1.2)
    canvas = green + rng.normal(0, 10, size=(s, s, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    canvas += 15 * np.sin((xx * 0.7 + yy) / s * math.pi * rng.uniform(3, 6))[..., None]  # veins
    colour = np.array(_rgb(label_name, rng), dtype=np.float32)
    for _ in range(int(rng.integers(8, 20))):  # lesion-like spots with a soft edge
        r = rng.uniform(0.015, 0.04) * s
        cx, cy = rng.uniform(0, s, size=2)
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        alpha = np.clip(1.5 - d2 / (r * r), 0, 1)[..., None]
        canvas = canvas * (1 - alpha) + colour * alpha
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


_SHIFT_DRAW = {"xray_like": _xray_like, "aerial_like": _aerial_like, "leaf_like": _leaf_like}


class ShiftedSceneReader:
    """Draws image ``ref = (split_code, index, label)`` of one shifted domain from a seed alone (picklable)."""

    def __init__(self, domain: str, classes: list[str], image_size: int, seed: int):
        if domain not in _SHIFT_DRAW:
            raise ValueError(f"unknown shifted domain {domain!r}; choose from {sorted(_SHIFT_DRAW)}")
        self.domain, self.classes, self.image_size, self.seed = domain, list(classes), int(image_size), int(seed)

    def __call__(self, ref) -> Image.Image:
        split_code, index, label = ref
        rng = np.random.default_rng([self.seed, split_code, index, 11])
        return _SHIFT_DRAW[self.domain](self.classes[label], self.image_size, rng)


def shifted_scenes(shift: str, *, train_per_class: int = 24, val_per_class: int = 8, test_per_class: int = 24,
                   image_size: int = 64, seed: int = 0, name: str | None = None, class_names=None, **meta):
    """A labelled set of the shifted domain ``shift`` (:data:`SHIFTED_DOMAINS`), drawn from ``seed`` alone."""
    from ..errors import DataError, did_you_mean
    from .dataset import Dataset
    from .synthetic import _generated_splits

    if shift not in SHIFTED_DOMAINS:
        raise DataError(f"shifted_scenes: unknown shifted domain {shift!r}; choose from {sorted(SHIFTED_DOMAINS)}."
                        + did_you_mean(shift, SHIFTED_DOMAINS))
    classes = list(SHIFTED_DOMAINS[shift]["classes"])
    splits = _generated_splits(classes, {"train": train_per_class, "val": val_per_class, "test": test_per_class})
    meta.setdefault("templates", list(SHIFTED_DOMAINS[shift]["templates"]))
    return Dataset(name=name or f"{shift}_scenes", class_ids=classes,
                   class_names=list(class_names) if class_names is not None else classes, splits=splits,
                   reader=ShiftedSceneReader(shift, classes, image_size, seed),
                   source={"kind": "synthetic", "generator": f"scenes_{shift}", "seed": seed,
                           "image_size": image_size}, **meta)
