"""The captioned-scene corpus and the shifted target domains (workbench.data.scenes)."""
import numpy as np
import pytest

import workbench as wb
from workbench.data.scenes import (COLOURS, PLURALS, SHAPES, SHIFTED_DOMAINS, SceneCorpus, caption_scene,
                                   sample_scene, shifted_scenes)
from workbench.errors import DataError


def test_corpus_is_a_pure_function_of_seed_and_index():
    a, b = SceneCorpus(5, seed=3, image_size=32), SceneCorpus(5, seed=3, image_size=32)
    for i in (4, 0, 2):  # any order
        (ia, ca, sa), (ib, cb, sb) = a[i], b[i]
        assert ca == cb and sa == sb and np.array_equal(np.asarray(ia), np.asarray(ib))
    assert a[0][1] != SceneCorpus(5, seed=4, image_size=32)[0][1] or a[0][2] != SceneCorpus(5, seed=4)[0][2]
    with pytest.raises(IndexError):
        a[5]


def test_every_caption_names_the_shape_and_colour_it_draws():
    rng = np.random.default_rng(0)
    seen_shapes, seen_colours = set(), set()
    for _ in range(300):
        scene = sample_scene(rng)
        caption = caption_scene(scene, rng)
        noun = scene.shape if scene.count == 1 else PLURALS.get(scene.shape, scene.shape + "s")
        assert f" {scene.colour} " in f" {caption} " and noun in caption, (scene, caption)
        seen_shapes.add(scene.shape), seen_colours.add(scene.colour)
    assert seen_shapes == set(SHAPES) and seen_colours == set(COLOURS)


def test_images_show_their_colour():
    corpus = SceneCorpus(40, seed=0, image_size=48)
    for i in range(40):
        image, _, scene = corpus[i]
        if scene.colour in ("red", "blue") and scene.size == "large" and scene.texture == "plain":
            arr = np.asarray(image, dtype=float)
            channel = {"red": 0, "blue": 2}[scene.colour]
            other = {"red": 1, "blue": 0}[scene.colour]
            assert ((arr[..., channel] - arr[..., other]) > 80).mean() > 0.02, scene


@pytest.mark.parametrize("shift", sorted(SHIFTED_DOMAINS))
def test_shifted_domains_load_from_their_yaml_and_carry_a_class_signal(shift):
    ds = wb.load_dataset(f"{shift}_scenes", train_per_class=6, test_per_class=6, val_per_class=1, image_size=32)
    assert ds.class_names == list(SHIFTED_DOMAINS[shift]["classes"])
    again = shifted_scenes(shift, train_per_class=6, test_per_class=6, val_per_class=1, image_size=32)
    first = ds.split("test")[0]
    assert np.array_equal(np.asarray(ds.reader(first.ref)), np.asarray(again.reader(first.ref)))

    def colour_features(image):  # the ground's colour and the colour of what stands out from it
        arr = np.asarray(image, dtype=float).reshape(-1, 3)
        median = np.median(arr, axis=0)
        far = np.argsort(((arr - median) ** 2).sum(1))[-max(4, len(arr) // 30):]
        return np.concatenate([median, arr[far].mean(0)])

    def pixels(samples):
        return np.stack([colour_features(ds.reader(s.ref)) for s in samples])

    train, test = ds.split("train"), ds.split("test")
    xtr, ytr = pixels(train), np.array([s.label for s in train])
    xte, yte = pixels(test), np.array([s.label for s in test])
    if shift == "xray_like":  # the class is a faint shape, not a colour: only check the images vary
        assert xte.std(axis=0).mean() > 1.0
        return
    centroids = np.stack([xtr[ytr == c].mean(0) for c in range(len(ds.class_names))])
    pred = ((xte[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yte).mean() > 2.0 / len(ds.class_names)  # well above chance


def test_unknown_shift_is_a_data_error_with_a_suggestion():
    with pytest.raises(DataError, match="unknown shifted domain 'xray_lik'.*Did you mean 'xray_like'"):
        shifted_scenes("xray_lik")
