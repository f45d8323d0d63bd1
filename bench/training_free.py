"""Speed of the training-free methods from cached features (encoding excluded).

Prints fit + hyper-parameter search + predict time for Tip-Adapter and GDA at the size the
issue sets: 100 classes x 16 shots x 10 augmented views, 512-d features (ViT-B/16), a K-shot
validation set of 4 per class, and a test set of --test images. Goal: <= 1 s each on 2 cores.
Tip-Adapter's search evaluates 200 x 20 = 4,000 (beta, alpha) pairs.

Usage: python bench/training_free.py [--classes 100] [--shots 16] [--views 10] [--dim 512] [--test 2500]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import workbench as wb
from workbench.task import TensorTask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--test", type=int, default=2500)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    c, k, d = args.classes, args.shots, args.dim
    centres = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    labels = torch.arange(c).repeat_interleave(k)
    raw = centres[labels][None] * 2 + torch.randn(args.views, c * k, d, generator=g) / d ** 0.5 * 4
    val_y = torch.arange(c).repeat_interleave(min(k, 4))
    val_x = F.normalize(centres[val_y] * 2 + torch.randn(len(val_y), d, generator=g) / d ** 0.5 * 4, dim=-1)
    test_y = torch.randint(0, c, (args.test,), generator=g)
    test_x = F.normalize(centres[test_y] * 2 + torch.randn(args.test, d, generator=g) / d ** 0.5 * 4, dim=-1)
    text = centres + 0.5 * torch.randn(c, d, generator=g) / d ** 0.5 * 4
    task = TensorTask(raw, labels, F.normalize(raw[0], dim=-1), val_x, val_y, text)
    print(f"{c} classes x {k} shots x {args.views} views, dim {d}; K-shot val {len(val_y)}, test {args.test}; "
          f"torch threads {torch.get_num_threads()}")
    for name in ("tip_adapter", "gda"):
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            method = wb.get_method(name).fit(task)
            logits = method.predict_logits(test_x)
            best = min(best, time.perf_counter() - t)
        acc = float((logits.argmax(-1) == test_y).float().mean())
        chosen = {k: v for k, v in method.fit_info.items() if k in ("alpha", "beta")}
        print(f"{name:12s} fit + search + predict: {best:.3f} s (goal <= 1 s)  chosen {chosen}  test acc {acc:.3f}")


if __name__ == "__main__":
    main()
