"""Multi-label feature methods: fit + predict time at 14 findings x K=16, against a plain one-vs-rest baseline.

Synthetic features (no encoder): 14 findings with random directions in D dimensions, each image
holding each finding with probability ``--prevalence``; the support set is drawn by the workbench's
greedy K-positives rule (>= K positives per finding), the K-shot validation set the same way with
min(K, 4), and ``--n-test`` test images. For each multi-label method (``chexzero``,
``ovr_linear_probe``) it times ``fit`` + ``predict_logits`` on the test set, and in the same run the
baseline: scikit-learn ``OneVsRestClassifier(LogisticRegression(C=1, lbfgs))`` fitted on the
support set and ``decision_function`` on test (no C search, no thresholds). Prints min and median
of ``--repeats`` timed runs after a warm-up, the ratio method / baseline (median), and each one's
test macro AUROC (so the time is not bought with a worse model).

Usage: python bench/multilabel.py [--findings 14] [--shots 16] [--dim 512] [--n-test 2000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import workbench as wb
from workbench.metrics import compute_multilabel_metrics
from workbench.methods.features.multilabel import MultiLabelTensorTask


def greedy(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    counts = np.zeros(y.shape[1], int)
    take = []
    for i in rng.permutation(len(y)):
        if ((y[i] == 1) & (counts < k)).any():
            take.append(i)
            counts += y[i] == 1
        if (counts >= k).all():
            break
    return np.array(take)


def make(findings, shots, dim, n_test, prevalence, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    dirs = F.normalize(torch.randn(findings, dim, generator=g), dim=-1)

    def draw(n):
        y = (torch.rand(n, findings, generator=g) < prevalence).long()
        x = F.normalize(y.float() @ dirs + noise * torch.randn(n, dim, generator=g), dim=-1)
        return x, y

    pool_x, pool_y = draw(40 * shots * findings)
    s = greedy(pool_y.numpy(), shots, rng)
    rest = np.setdiff1d(np.arange(len(pool_y)), s)
    v = rest[greedy(pool_y[rest].numpy(), min(shots, 4), rng)]
    tx, ty = draw(n_test)
    neg = F.normalize(torch.randn(findings, dim, generator=g), dim=-1)
    # text: the finding's direction blurred by an unrelated one (a zero-shot classifier that is right, not perfect)
    pos = dirs + 1.5 * F.normalize(torch.randn(findings, dim, generator=g), dim=-1)
    task = MultiLabelTensorTask(pool_x[s], pool_y[s], pool_x[v], pool_y[v], pos, neg)
    return task, tx, ty


def timed(fn, repeats):
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--findings", type=int, default=14)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--prevalence", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--noise", type=float, default=0.5, help="per-dimension std of the feature noise")
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    task, tx, ty = make(args.findings, args.shots, args.dim, args.n_test, args.prevalence, args.noise)
    sx = task.support().x.numpy()
    sy = task.targets_for(task.support().ids).numpy()
    print(f"{args.findings} findings, K={args.shots}: {len(sx)} support images (greedy), {len(task.validation())} "
          f"validation, {len(tx)} test, D={args.dim}; torch threads {torch.get_num_threads()}")
    base = {}

    def baseline():
        clf = OneVsRestClassifier(LogisticRegression(C=1.0, max_iter=1000)).fit(sx, sy)
        base["logits"] = clf.decision_function(tx.numpy())

    bt = timed(baseline, args.repeats)
    b_auc = compute_multilabel_metrics(base["logits"], ty)["macro_auroc"]
    print(f"baseline one-vs-rest LogisticRegression(C=1): fit+predict min {min(bt) * 1e3:.1f} ms, median "
          f"{statistics.median(bt) * 1e3:.1f} ms; test macro AUROC {b_auc:.4f}")
    for name in ("chexzero", "ovr_linear_probe"):
        out = {}

        def run():
            m = wb.get_method(name).fit(task)
            with torch.no_grad():
                out["logits"] = m.predict_logits(tx)
            out["m"] = m

        t = timed(run, args.repeats)
        auc = compute_multilabel_metrics(out["logits"], ty, out["m"].fit_info["thresholds"])["macro_auroc"]
        print(f"{name}: fit+predict min {min(t) * 1e3:.1f} ms, median {statistics.median(t) * 1e3:.1f} ms; "
              f"ratio to baseline (median) {statistics.median(t) / statistics.median(bt):.2f}; "
              f"test macro AUROC {auc:.4f}")


if __name__ == "__main__":
    main()
