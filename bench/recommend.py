"""Is the recommendation worth following? Recommended vs the best single fixed method vs the test oracle.

For every offline set (by default the shifted scene domains, on the pretrained offline model
``workbench-tiny-scenes``, where zero-shot is meaningful and the methods genuinely differ) and every seed, ``wb.recommend`` chooses a
method from that seed's K-shot split alone (nested re-splits of support + validation); its
phase 2 then scores every candidate once on the test split. From those test scores this prints,
averaged over (dataset, seed) on each dataset's primary metric:

* **recommended**: the test score of the method recommend chose;
* **best fixed**: the best single method used everywhere (the one with the highest average);
* **oracle**: the method with the best *test* score in each (dataset, seed) — unreachable honestly;

and the ratios recommended / best fixed and recommended / oracle (goal: ≥ 1 and ≥ 0.98), once
per selection rule (``--rules``; every rule's choice comes from the same nested fits, recorded
by recommend in ``design["choice_by_rule"]``, so the rules are compared on identical evidence).
Timing (issue 16): recommend's wall time per (dataset, seed), min and median, against its own
plain baseline in the same process — phase 2, which is exactly a ``compare`` of the candidates.

    python bench/recommend.py [--seeds 1,2,3] [--shots 4] [--resplits 3] [--rules mean,pooled,p_best]
                              [--backbone workbench-tiny-scenes] [--datasets xray_like_scenes,...]

One torch thread by default: the offline models' matrices are too small to split, and on a busy
2-core machine a second thread made small matmuls ~15x slower (OMP_NUM_THREADS overrides).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: the shifted scene domains of the offline model (the real bundled sets, e.g. whu_rs19_mini, via --datasets)
DATASETS = ["xray_like_scenes", "aerial_like_scenes", "leaf_like_scenes"]
METHODS = ["zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f", "gda"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--backbone", default="workbench-tiny-scenes",
                        help="NAME or NAME@PRETRAINED (default: the pretrained offline model)")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--resplits", type=int, default=3)
    parser.add_argument("--rules", default="mean,pooled,p_best", help="selection rules to score (workbench.recommend.RULES)")
    args = parser.parse_args()

    import pandas as pd
    import torch

    import workbench as wb
    from workbench.recommend import RULES

    rules = args.rules.split(",")
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        parser.error(f"--rules: unknown {unknown}; choose from {RULES}")

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    name_, _, tag = args.backbone.partition("@")
    backbone = wb.load_backbone(name_, tag or None, device="cpu")
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    rows, walls, refits = [], [], []
    work = tempfile.mkdtemp(prefix="bench-recommend-")
    print(f"load: {os.getloadavg()[0]:.1f} (1-min average, {os.cpu_count()} cores); backbone {args.backbone}; "
          f"K={args.shots}; {args.resplits} re-splits; candidates {methods}")
    for name in args.datasets.split(","):
        dataset = wb.load_dataset(name)
        for seed in seeds:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rec = wb.recommend(dataset, backbone, methods, shots=args.shots, seeds=[seed], budget="minutes",
                                   rule=rules[0],
                                   resplits=args.resplits, n_boot=1000, out_dir=f"{work}/{name}/s{seed}",
                                   cache_dir=f"{work}/features/{name}")
            walls.append(time.perf_counter() - t0)
            refits.append(rec.design["refit_test_seconds"])
            t = rec.table
            by_rule = rec.design["choice_by_rule"]
            for r in t.itertuples():
                rows.append({"dataset": name, "seed": seed, "method": r.method, "test": r.test,
                             "estimate": r.estimate, "metric": rec.metric,
                             **{f"chosen_{rule}": by_rule[rule] == r.candidate for rule in rules}})
            picks = "; ".join(f"{rule}: {t[t.candidate == by_rule[rule]]['method'].iloc[0]} (test "
                              f"{100 * t[t.candidate == by_rule[rule]]['test'].iloc[0]:.1f}%)" for rule in rules)
            print(f"  {name} seed {seed}: {picks}; best by test {t.sort_values('test').iloc[-1]['method']} "
                  f"{100 * t['test'].max():.1f}% — {walls[-1]:.0f} s")
    table = pd.DataFrame(rows)
    per_run = table.groupby(["dataset", "seed"])
    fixed = table.groupby("method")["test"].mean().sort_values(ascending=False)
    oracle = per_run["test"].max().mean()
    print("\nTest score, each dataset's primary metric, mean over", len(per_run), "(dataset, seed) decisions:")
    print(f"  best fixed       {100 * fixed.iloc[0]:.2f}%  ({fixed.index[0]}; every fixed method: "
          + ", ".join(f"{m} {100 * v:.2f}" for m, v in fixed.items()) + ")")
    print(f"  oracle (by test) {100 * oracle:.2f}%")
    for rule in rules:
        picked = table[table[f"chosen_{rule}"]]
        recommended = picked["test"].mean()
        print(f"  rule {rule!r}: recommended {100 * recommended:.2f}%; recommended / best fixed = "
              f"{recommended / fixed.iloc[0]:.3f} (goal >= 1); recommended / oracle = {recommended / oracle:.3f} "
              f"(goal >= 0.98); choices {picked.groupby('method').size().to_dict()}")
    print(f"\nrecommend wall time per (dataset, seed) over {len(walls)} runs: min {min(walls):.1f} s, median "
          f"{statistics.median(walls):.1f} s; its plain compare of the same candidates (phase 2): min "
          f"{min(refits):.1f} s, median {statistics.median(refits):.1f} s; ratio of medians "
          f"{statistics.median(walls) / statistics.median(refits):.1f}x. load now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
