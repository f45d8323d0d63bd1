"""Feature-extraction benchmark: workbench path vs a bare ``model.encode_image`` loop, and a cached request.

Prints, in one run:
* images/s of ``Backbone.encode_images`` over pre-processed tensors vs a bare
  ``model.encode_image`` loop on the same tensors (goal: ratio >= 0.9);
* images/s of the full ``FeatureCache.get`` path (decode + preprocess + encode + write) on
  image files, for context;
* the time of a second identical ``FeatureCache.get`` and how many images it encoded (goal: 0).

Usage: python bench/features.py [--backbone workbench-tiny] [--pretrained ""] [--n 512] [--batch 64] [--device auto]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

import workbench as wb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="workbench-tiny")
    ap.add_argument("--pretrained", default="")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    backbone = wb.load_backbone(args.backbone, args.pretrained or None, device=args.device)
    size = backbone.image_size
    torch.manual_seed(0)
    pixels = torch.randn(args.n, 3, size, size)
    print(f"backbone {backbone.name} ({backbone.pretrained or 'random-init'}), device {backbone.device}, "
          f"precision {backbone.precision}, {args.n} images at {size}px, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}")

    def bare():
        model = backbone.model
        with torch.no_grad(), backbone.autocast():
            for i in range(0, args.n, args.batch):
                model.encode_image(pixels[i:i + args.batch].to(backbone.device))
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()

    def workbench_path():
        for i in range(0, args.n, args.batch):
            backbone.encode_images(pixels[i:i + args.batch]).cpu()

    def best_rate(fn):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return args.n / min(times)

    # Interleave to spread machine noise evenly over both.
    rates_bare, rates_wb = [], []
    for _ in range(2):
        rates_bare.append(best_rate(bare))
        rates_wb.append(best_rate(workbench_path))
    r_bare, r_wb = max(rates_bare), max(rates_wb)
    print(f"bare model.encode_image loop        : {r_bare:9.1f} img/s")
    print(f"workbench Backbone.encode_images    : {r_wb:9.1f} img/s   ratio {r_wb / r_bare:.3f} (goal >= 0.9)")

    dataset = wb.load_dataset("whu_rs19_mini")
    samples = (dataset.split("train") + dataset.split("test"))
    with tempfile.TemporaryDirectory() as tmp:
        cache = wb.FeatureCache(backbone, tmp, batch_size=args.batch, show_progress=False)
        t = time.perf_counter()
        cache.get(dataset, samples)
        first = time.perf_counter() - t
        print(f"FeatureCache.get, {len(samples)} JPEG files : {len(samples) / first:9.1f} img/s "
              f"(decode + preprocess + encode + atomic write), {first:.3f} s")
        fresh = wb.FeatureCache(backbone, tmp, batch_size=args.batch, show_progress=False)
        t = time.perf_counter()
        fresh.get(dataset, samples)
        second = time.perf_counter() - t
        print(f"second identical request (new cache object, same disk): {second * 1000:.1f} ms, "
              f"images encoded: {fresh.stats['images_encoded']} (goal 0)")


if __name__ == "__main__":
    main()
