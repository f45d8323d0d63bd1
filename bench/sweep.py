"""How many images a sweep encodes, against running every cell on its own.

Runs a sweep spec (default: sweeps/offline_demo.yaml, 2 datasets x 4 methods x 2 shots x 2 seeds)
into a temporary folder and prints the images it encoded (the one pass over every dataset's
images, plus the support sets' augmented views), then runs every cell again with its own fresh
in-memory cache (what a loop of independent scripts would do) and prints that count too.

Usage: python bench/sweep.py [--spec sweeps/offline_demo.yaml]
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import warnings

import workbench as wb
from workbench.sweep import SweepSpec, cells


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="sweeps/offline_demo.yaml")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    spec = SweepSpec.from_yaml(wb.resolve(args.spec))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        summary = wb.sweep(dataclasses.replace(spec, output_dir=tmp, workers=1, engine="local"), show_progress=False)
        sweep_s = time.perf_counter() - t
    total = summary.pool_encoded + summary.cell_encoded
    grid = cells(spec)
    naive = 0
    backbones, datasets = {}, {}
    t = time.perf_counter()
    for cell in grid:
        key = (cell["backbone"], cell["pretrained"])
        if key not in backbones:
            backbones[key] = wb.load_backbone(cell["backbone"], cell["pretrained"] or None)
        if cell["dataset"] not in datasets:
            datasets[cell["dataset"]] = wb.load_dataset(cell["dataset"])
        cache = wb.FeatureCache(backbones[key], None, show_progress=False)
        wb.run_experiment(datasets[cell["dataset"]], backbones[key], cell["method"], cell["shots"], cell["seed"],
                          cache=cache, method_params=cell["params"] or None, templates=cell["templates"])
        naive += cache.stats["images_encoded"]
    naive_s = time.perf_counter() - t
    print(f"sweep {args.spec}: {len(grid)} cells ({summary.done} run)")
    print(f"  images encoded by the sweep : {total:7d}  (one pass over all splits: {summary.pool_encoded}, "
          f"augmented support views: {summary.cell_encoded})  {sweep_s:6.1f} s")
    print(f"  images encoded cell by cell : {naive:7d}  (each cell with its own fresh cache)       {naive_s:6.1f} s")
    print(f"  ratio naive / sweep         : {naive / max(total, 1):7.2f}")


if __name__ == "__main__":
    main()
