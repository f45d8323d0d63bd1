"""Pretrain the offline model ``workbench-tiny-scenes``: a small CLIP taught by the workbench itself.

The model is the ``workbench-tiny-scenes`` open_clip architecture (``model_configs/``: 48 px
images, 6 px patches, two 64-wide blocks per tower, a 24-token text context, the open_clip BPE
tokenizer and its full 49 408-token vocabulary), initialised from a recorded seed and trained with
the workbench's own contrastive trainer (:func:`workbench.methods.pairs.contrastive.fine_tune_pairs`,
``pairs_full``: symmetric InfoNCE with a learned logit scale, AdamW, cosine schedule, the
training loop's checkpoints) on the captioned-scene corpus :class:`workbench.data.scenes.SceneCorpus`.

Run it with ``make pretrain`` or ``python -m workbench.pretrain`` (``--help`` for the knobs). It
prints the wall time and the size of the shipped weights, evaluates zero-shot accuracy before
and after on held-out corpus scenes and on the shifted domains, and writes
``workbench/assets/workbench-tiny-scenes/`` (weights, ``model.json``, ``MODEL_CARD.md``).
Interrupted, the same command resumes from the last finished epoch (``--checkpoint-dir``).

What is shipped (≤ 10 MB in git, no pickle): every tensor in fp16 safetensors, except the token
embedding, of which only the rows of tokens that occur in the training captions are stored (the
only rows training changed, apart from weight decay); the other rows are re-created from the
recorded init seed when loading. Deliberate difference, with its effect: a row the captions never
used is the seed's random init, not that init shrunk by AdamW weight decay; texts made of words
outside the corpus vocabulary therefore get (meaningless) features of a slightly larger norm
before the final projection — they carried no meaning either way.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .backbones import load_scenes_backbone
from .scenes_model import (ASSET_DIR, CARD_FILE, META_FILE, RANDOM_TAG, SCENES_MODEL, SCENES_TAG, export_weights,
                           used_token_ids)

#: the corpus seed of the held-out evaluation scenes (training uses the corpus seed of the run, 0 by default)
HELDOUT_SEED = 1_000_003

DEFAULTS = {"n_scenes": 60000, "steps": 2500, "batch_size": 128, "lr": 1.5e-3, "weight_decay": 0.1, "seed": 0,
            "init_seed": 0, "grad_clip": 1.0}


# -- the corpus as data the workbench reads --------------------------------------------------------

class CorpusImages:
    """Reader: ``ref`` (a corpus index) -> the image of that scene (picklable: holds the corpus only)."""

    def __init__(self, corpus):
        self.corpus = corpus

    def __call__(self, ref):
        return self.corpus[int(ref)][0]


def scene_pairs(n: int, *, seed: int = 0, image_size: int = 48):
    """The first ``n`` scenes of corpus ``seed`` as image–text pairs (one caption each; train split only)."""
    from .data.pairs import PairDataset, PairSample
    from .data.scenes import SceneCorpus, caption_scene

    corpus = SceneCorpus(n, seed=seed, image_size=image_size)
    samples = [PairSample(f"scene/{i}", i, (caption_scene(corpus.scene(i), np.random.default_rng([seed, i, 2])),))
               for i in range(n)]
    return PairDataset(f"scene_corpus_{seed}_{n}", {"train": samples}, reader=CorpusImages(corpus),
                       source={"kind": "synthetic", "generator": "scenes", "seed": seed, "n": n,
                               "image_size": image_size},
                       card="procedurally generated captioned scenes (workbench.data.scenes)")


#: attribute -> (class values, templates) of the held-out in-domain classification sets
HELDOUT_TASKS = {
    "shape": (None, ("a photo of a {}.", "a {} on a background.")),
    "colour": (None, ("a photo of a {} object.", "a {} shape.")),
    "background": (None, ("a photo of objects on a {} background.", "a {} background.")),
    "texture": (None, ("a photo of a {} shape.", "a {} object.")),
    "size": (None, ("a photo of a {} shape.", "a {} object.")),
}


def heldout_scenes(attribute: str = "shape", *, train_per_class: int = 16, val_per_class: int = 4,
                   test_per_class: int = 24, seed: int = HELDOUT_SEED, image_size: int = 64):
    """Held-out corpus scenes (a corpus seed training never used) labelled by one attribute.

    The in-domain reference for the shifted domains: same generator, same words, new scenes.
    """
    from .data.dataset import Dataset, Sample
    from .data.scenes import BACKGROUNDS, COLOURS, SHAPES, SIZES, TEXTURES, SceneCorpus
    from .errors import DataError

    values = {"shape": list(SHAPES), "colour": list(COLOURS), "background": list(BACKGROUNDS),
              "texture": list(TEXTURES), "size": list(SIZES)}
    if attribute not in values:
        raise DataError(f"heldout_scenes: attribute {attribute!r} is not one of {sorted(values)}.")
    classes = values[attribute]
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    need = sum(counts.values())
    corpus = SceneCorpus(10 ** 9, seed=seed, image_size=image_size)
    by_class: dict[int, list[int]] = {c: [] for c in range(len(classes))}
    index = 0
    while any(len(v) < need for v in by_class.values()):
        label = classes.index(getattr(corpus.scene(index), attribute))
        if len(by_class[label]) < need:
            by_class[label].append(index)
        index += 1
    splits, start = {}, 0
    for split, k in counts.items():
        if k > 0:
            splits[split] = [Sample(f"{split}/{classes[c]}/{i}", c, i) for c in by_class for i in
                             by_class[c][start:start + k]]
        start += k
    return Dataset(name=f"heldout_scenes_{attribute}", class_ids=classes, class_names=classes, splits=splits,
                   reader=CorpusImages(corpus), templates=list(HELDOUT_TASKS[attribute][1]),
                   source={"kind": "synthetic", "generator": "scenes_heldout", "attribute": attribute, "seed": seed,
                           "image_size": image_size})


# -- evaluation -------------------------------------------------------------------------------------

def zero_shot_accuracy(backbone, dataset, split: str = "test") -> float:
    """Top-1 accuracy of the zero-shot method (the dataset's templates, averaged) on ``split``."""
    from .experiment import compare

    rows = compare(dataset, backbone, ["zero_shot"], shots=[1], seeds=[1])
    return float(rows["accuracy"].iloc[0]) if split == "test" else float("nan")


def evaluation_sets(test_per_class: int = 24) -> dict:
    from .data.scenes import SHIFTED_DOMAINS, shifted_scenes

    sets = {f"heldout_{a}": heldout_scenes(a, test_per_class=test_per_class) for a in HELDOUT_TASKS}
    for shift in SHIFTED_DOMAINS:
        sets[f"{shift}_scenes"] = shifted_scenes(shift, test_per_class=test_per_class)
    return sets


def evaluate(backbone, test_per_class: int = 24) -> dict:
    """Zero-shot accuracy (%) and chance (%) per evaluation set."""
    out = {}
    for name, ds in evaluation_sets(test_per_class).items():
        out[name] = {"zero_shot": round(100 * zero_shot_accuracy(backbone, ds), 1),
                     "chance": round(100 / len(ds.class_names), 1), "classes": len(ds.class_names)}
    return out


# -- the run -----------------------------------------------------------------------------------------

def pretrain(*, n_scenes: int, steps: int, batch_size: int, lr: float, weight_decay: float, seed: int,
             init_seed: int, grad_clip: float, checkpoint_dir: str | None, out: Path, evaluate_sets: bool = True,
             test_per_class: int = 24) -> dict:
    from .backbones import load_backbone
    from .methods.pairs.contrastive import fine_tune_pairs

    t_start = time.perf_counter()
    torch.manual_seed(seed)
    base = load_backbone(SCENES_MODEL, RANDOM_TAG, device="auto", seed=init_seed)
    print(f"[pretrain] {SCENES_MODEL}: {sum(p.numel() for p in base.model.parameters()):,} parameters, "
          f"init seed {init_seed}, device {base.device}", flush=True)
    pairs = scene_pairs(n_scenes, seed=seed, image_size=base.image_size)
    t_train = time.perf_counter()
    fitted = fine_tune_pairs(pairs, base, "pairs_full", steps=steps, batch_size=batch_size, lr=lr,
                             weight_decay=weight_decay, grad_clip=grad_clip, seed=seed, aug_scale=[0.8, 1.0],
                             checkpoint_dir=checkpoint_dir)
    train_seconds = time.perf_counter() - t_train
    trained = fitted.backbone_
    texts, _ = pairs.texts("train")
    ids = used_token_ids(texts, base.tokenizer)
    weights = export_weights(trained.model, ids, out)
    loss = fitted.fit_info["loss"]
    every = max(1, len(loss) // 24)
    curve = [{"step": i + 1, "loss": round(float(np.mean(loss[max(0, i + 1 - every):i + 1])), 3)}
             for i in range(every - 1, len(loss), every)]
    meta = {"model": SCENES_MODEL, "tag": SCENES_TAG, "init_seed": init_seed,
            "corpus": {"generator": "workbench.data.scenes.SceneCorpus", "n": n_scenes, "seed": seed,
                       "image_size": base.image_size},
            "trainer": "workbench.methods.pairs.contrastive (pairs_full)", "steps": fitted.fit_info["steps"],
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "grad_clip": grad_clip,
            "aug_scale": [0.8, 1.0], "schedule": "cosine per step, no warm-up", "seed": seed,
            "token_rows_shipped": int(len(ids)), "loss_curve": curve,
            "captions_truncated": fitted.fit_info["captions_truncated"],
            "train_seconds": round(train_seconds, 1), "weights_bytes": weights.stat().st_size,
            "logit_scale": round(trained.logit_scale, 2), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    meta.update({"zero_shot_before": {}, "zero_shot_after": {}, "wall_seconds": round(time.perf_counter() - t_start, 1)})
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    (out / CARD_FILE).write_text(model_card(meta))
    print(f"[pretrain] wall time {meta['wall_seconds']:.0f} s (training {train_seconds:.0f} s); weights "
          f"{weights.stat().st_size / 1e6:.2f} MB ({weights})", flush=True)
    return evaluate_shipped(out, test_per_class) if evaluate_sets else meta   # before/after, into the card


def evaluate_shipped(out: Path, test_per_class: int = 24) -> dict:
    """Zero-shot before (the init seed's random weights) and after (the weights in ``out``); rewrites
    ``model.json`` and the card. Used after ``--no-eval`` runs and to re-measure shipped weights."""
    from .backbones import load_backbone

    meta = json.loads((out / META_FILE).read_text())
    before = evaluate(load_backbone(SCENES_MODEL, RANDOM_TAG, device="auto", seed=meta["init_seed"]), test_per_class)
    after = evaluate(load_scenes_backbone(device="auto", folder=out), test_per_class)
    meta.update({"zero_shot_before": before, "zero_shot_after": after})
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    (out / CARD_FILE).write_text(model_card(meta))
    print("[pretrain] zero-shot before:", json.dumps({k: v["zero_shot"] for k, v in before.items()}), flush=True)
    print("[pretrain] zero-shot after:", json.dumps({k: v["zero_shot"] for k, v in after.items()}), flush=True)
    return meta


def model_card(meta: dict) -> str:
    c = meta["corpus"]
    lines = [f"# Model card: {meta['model']} ({meta['tag']})", "",
             "A tiny CLIP pretrained from random init by this workbench's own contrastive trainer "
             f"({meta['trainer']}) on its procedurally generated captioned-scene corpus. Made by "
             "`make pretrain` (`python -m workbench.pretrain`); loaded offline by "
             f"`wb.load_backbone({meta['model']!r})`.", "",
             "## How it was made", "",
             f"- corpus: {c['generator']}(n={c['n']}, seed={c['seed']}, image_size={c['image_size']}): shapes, "
             "colours, sizes, textures, counts, positions and backgrounds, one caption per scene in one of six "
             "phrasings (grammar and vocabulary: workbench/data/scenes.py)",
             f"- init seed {meta['init_seed']}; training seed {meta['seed']}; {meta['steps']} steps of "
             f"{meta['batch_size']} pairs; AdamW lr {meta['lr']}, weight decay {meta['weight_decay']}, "
             f"grad clip {meta['grad_clip']}, {meta['schedule']}; crops scale {meta['aug_scale']}",
             f"- training time {meta['train_seconds']} s, run without evaluation {meta.get('wall_seconds')} s "
             f"({meta.get('threads', '?')} "
             f"torch thread(s) on 2 shared CPU cores, torch {meta['torch']}); final logit scale {meta['logit_scale']}",
             f"- shipped: fp16 safetensors, {meta['weights_bytes'] / 1e6:.2f} MB; {meta['token_rows_shipped']} "
             "token-embedding rows (the tokens of the training captions), the others re-created from the init seed",
             f"- captions longer than the 24-token context: {meta['captions_truncated']}", "",
             "## Loss curve (mean training loss over the preceding steps)", "",
             "| step | loss |", "|---:|---:|"]
    lines += [f"| {p['step']} | {p['loss']} |" for p in meta["loss_curve"]]
    lines += ["", "## Zero-shot accuracy (%), test split, before (random init) and after pretraining", "",
              "| set | classes | chance | before | after |", "|---|---:|---:|---:|---:|"]
    after = meta.get("zero_shot_after") or {}
    before = meta.get("zero_shot_before") or {}
    for name, a in after.items():
        b = before.get(name, {})
        lines.append(f"| {name} | {a['classes']} | {a['chance']} | {b.get('zero_shot', '–')} | {a['zero_shot']} |")
    lines += ["", "`heldout_*`: corpus scenes of a seed training never saw, labelled by one attribute; "
              "`*_scenes`: the shifted target domains (workbench.data.scenes.shifted_scenes, YAMLs in domains/).", "",
              "## What it can and cannot show", "",
              "It knows the corpus words (shapes, colours, backgrounds, sizes, textures) and nothing else: any other "
              "word is noise to it, and it never saw a photograph, an X-ray or a satellite tile. Use it to see "
              "adaptation work offline on the shifted scene domains; use a real CLIP for any claim about real data.",
              ""]
    weak = [f"{name} ({a['zero_shot']} % at chance {a['chance']} %)" for name, a in after.items()
            if a["zero_shot"] < a["chance"] + 15]
    if weak:
        lines += ["Learned weakly or not at all (zero-shot less than 15 points above chance): " + "; ".join(weak)
                  + ". More steps or a larger model are what `python -m workbench.pretrain --help` offers.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.pretrain", description=__doc__.splitlines()[0])
    for key, value in DEFAULTS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--checkpoint-dir", default="outputs/pretrain_checkpoints",
                   help="the training loop's checkpoints (rerun the same command to resume); '' = none")
    p.add_argument("--out", default=str(ASSET_DIR), help="where the weights, model.json and the card go")
    p.add_argument("--no-eval", action="store_true", help="skip the zero-shot evaluation before and after")
    p.add_argument("--evaluate-only", action="store_true",
                   help="no training: measure zero-shot before/after for the weights in --out and rewrite its card")
    p.add_argument("--test-per-class", type=int, default=24)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest for this tiny model on a shared 2-core machine: the "
                        "matrices are too small to split, and busy cores make threads wait on each other)")
    args = p.parse_args(argv)
    for key, low in (("steps", 1), ("batch_size", 2), ("n_scenes", 2), ("threads", 1), ("test_per_class", 1)):
        if getattr(args, key) < low:   # before any work: the trainer would otherwise start on nonsense
            p.error(f"--{key.replace('_', '-')} must be at least {low}, got {getattr(args, key)}")
    for key in ("lr", "weight_decay", "grad_clip"):
        if not getattr(args, key) >= 0 or (key == "lr" and args.lr == 0):
            p.error(f"--{key.replace('_', '-')} must be {'positive' if key == 'lr' else 'zero or more'}, "
                    f"got {getattr(args, key)}")
    if args.n_scenes < args.batch_size:
        p.error(f"--n-scenes ({args.n_scenes}) must be at least --batch-size ({args.batch_size})")
    if args.evaluate_only and not (Path(args.out) / META_FILE).is_file():
        p.error(f"--evaluate-only: {Path(args.out) / META_FILE} does not exist; point --out at a folder a "
                "pretraining run wrote (weights.safetensors, model.json)")
    torch.set_num_threads(args.threads)
    if args.evaluate_only:
        evaluate_shipped(Path(args.out), args.test_per_class)
        return 0
    pretrain(n_scenes=args.n_scenes, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
             weight_decay=args.weight_decay, seed=args.seed, init_seed=args.init_seed, grad_clip=args.grad_clip,
             checkpoint_dir=args.checkpoint_dir or None, out=Path(args.out), evaluate_sets=not args.no_eval,
             test_per_class=args.test_per_class)
    return 0


if __name__ == "__main__":
    sys.exit(main())
