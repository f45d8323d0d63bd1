"""Does the offline model show adaptation? Margins of the shipped ``workbench-tiny-scenes`` on the
shifted scene domains, over several data seeds — the evidence behind tests/test_offline_model.py.

Per shifted domain (``xray_like``, ``aerial_like``, ``leaf_like``; workbench/data/scenes.py) and
data seed it prints the test accuracy (%) of zero-shot, linear probe, Tip-Adapter and GDA at
K = 1, 4, 16 and of CoOp, CLIP-LoRA and CLIP-SVD at K = 16 (the tests' few-step settings,
``FAST`` below), zero-shot on the in-domain reference (held-out corpus scenes labelled by the same
kind of word), and base-to-new (CoOp vs linear probe, K = 16). Then, per domain, the smallest
margin over the seeds for each claim the tests make: the tests assert about half of it.

    python bench/offline_model.py [--seeds 0,1,2] [--shifts xray_like,aerial_like,leaf_like]
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAST = {"coop": {"epochs": 20}, "clip_lora": {"iterations": 100, "lr": 1e-3}, "clip_svd": {"iterations": 100, "lr": 2e-3}}
IN_DOMAIN = {"xray_like": "shape", "aerial_like": "background", "leaf_like": "colour"}
TRAINING_FREE = ["zero_shot", "linear_probe", "tip_adapter", "gda"]
TRAINED = ["coop", "clip_lora", "clip_svd"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--shifts", default="xray_like,aerial_like,leaf_like")
    parser.add_argument("--backbone", default="workbench-tiny-scenes")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import pandas as pd
    import torch

    import workbench as wb
    from workbench.base2new import compare_base_to_new
    from workbench.data.scenes import shifted_scenes
    from workbench.pretrain import heldout_scenes

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    backbone = wb.load_backbone(args.backbone, device="cpu")
    print(f"backbone {args.backbone} ({backbone.pretrained}); load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    margins = []
    for shift in args.shifts.split(","):
        ref_data = heldout_scenes(IN_DOMAIN[shift], train_per_class=16, val_per_class=4, test_per_class=20)
        ref = wb.compare(ref_data, backbone, ["zero_shot"], shots=[16], seeds=[1])["accuracy"].iloc[0]
        for seed in (int(s) for s in args.seeds.split(",")):
            data = shifted_scenes(shift, train_per_class=16, val_per_class=4, test_per_class=20, seed=seed)
            t0 = time.perf_counter()
            rows = pd.concat([wb.compare(data, backbone, TRAINING_FREE, shots=[1, 4, 16], seeds=[1]),
                              wb.compare(data, backbone, TRAINED, shots=[16], seeds=[1], method_params=FAST)])
            acc = rows.pivot_table(index="method", columns="shots", values="accuracy")
            b2n = compare_base_to_new(data, backbone, ["linear_probe", "coop"], shots=16, seed=1,
                                      method_params=FAST).set_index("method")
            zs, chance = acc.loc["zero_shot", 16], 1 / len(data.class_names)
            print(f"\n== {shift}, data seed {seed} ({time.perf_counter() - t0:.0f} s); chance {100 * chance:.1f} %, "
                  f"in-domain zero-shot ({IN_DOMAIN[shift]} words on corpus scenes) {100 * ref:.1f} %")
            print((100 * acc).round(1).to_string())
            print("base-to-new (K=16):", "; ".join(f"{m}: base {100 * r.base_accuracy:.1f} new {100 * r.new_accuracy:.1f} "
                                                   f"HM {100 * r.hm:.1f}" for m, r in b2n.iterrows()))
            margins.append({"shift": shift, "seed": seed, "zs_over_chance": zs - chance, "in_domain_over_zs": ref - zs,
                            **{f"{m}_k16_over_zs": acc.loc[m, 16] - zs for m in TRAINING_FREE[1:] + TRAINED},
                            **{f"{m}_k16_over_k1": acc.loc[m, 16] - acc.loc[m, 1] for m in ("linear_probe", "gda")},
                            "coop_new_over_chance": b2n.loc["coop", "new_accuracy"] - 1 / b2n.loc["coop", "new_classes"]})
    table = pd.DataFrame(margins)
    print("\nSmallest margin over the data seeds (accuracy points):")
    print((100 * table.drop(columns="seed").groupby("shift").min()).round(1).T.to_string())


if __name__ == "__main__":
    main()
