"""Speed and memory of the feature methods from cached features (encoding excluded), each against a plain
reference-style baseline run in the same process on the same features.

Default run (issue 13 + 16): 100 classes x 16 shots, 512-d features (ViT-B/16), 20 augmented views
(Tip-Adapter and GDA use 10 of them, as their references), a K-shot validation set of 4 per class and
--test test images. For every method it prints fit + predict time, min and median over --repeats
(>= 5), the same for the baseline and the ratio of the medians (baseline / workbench: > 1 is faster):

* Tip-Adapter: the reference's search_hp loop (a Python loop over the 200 beta and 20 alpha values,
  the dense one-hot product) over the same cache; same (beta, alpha) must come out.
* GDA: a straightforward float32 computation (per-class masks, torch.cov, pinv, alpha loop).
* LP++: nn.Linear + autograd + torch.optim.SGD, full batch, validation every epoch.
* ZS-LP, CLAP, CLIP-Adapter: autograd + torch.optim.SGD with a pool[idx] gather per step.

Goals: LP++, ZS-LP, CLAP, CLIP-Adapter <= 2 s on 2 cores (issue 13). For ZS-LP, CLAP and CLIP-Adapter
the run also times the matrix products their 1,800 steps cannot skip, alone (``products_floor``):
the fit's time over that floor is what any rewrite could still remove. ``gda_float32`` is GDA with
``gram_dtype="float32"`` against the same plain float32 baseline. Then Tip-Adapter's peak memory at
--tip-memory-classes (default 1,000) classes x 16 shots, measured as the peak RSS of a child process
(goal <= 2 GiB), next to the baseline loop's at a class count where it runs in reasonable time.
Threads: --threads (default 2, torch.set_num_threads). The load average is printed: on a shared
machine wall times overstate the cost, so the process CPU time is printed as well.

Usage: python bench/training_free.py [--classes 100] [--shots 16] [--dim 512] [--test 2500] [--repeats 5]

``--linear-probe``: the linear probe's C search (CoOp ``lpclip/linear_probe.py``) as the
reference script runs it (scikit-learn, 23 fits, default threads) against the workbench's
(each distinct C fitted once, BLAS single-threaded), on the offline sets with the offline
backbone, every K and seed: chosen C, test accuracy and time per run (min / median over
--repeats), then the quickstart's compare (zero-shot + linear probe, K 1/2/4, seeds 1/2/3,
whu_rs19_mini) end to end from an empty feature cache (goal: <= 60 s on 2 idle cores).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import workbench as wb
from workbench.task import TensorTask


def _reference_lpclip(x, y, xv, yv, steps: int = 8):
    """The search as CoOp's lpclip/linear_probe.py runs it: every grid C and both ends of every
    bisection step fitted afresh with sklearn (23 fits), threads as the machine gives them."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    def fit(c):
        clf = LogisticRegression(solver="lbfgs", max_iter=1000, C=c).fit(x, y)
        return clf, (clf.predict(xv) == yv).mean()

    grid = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
    peak = grid[int(np.argmax([fit(c)[1] for c in grid]))]
    left, right = 0.1 * peak, 10 * peak
    for _ in range(steps):
        (clf_l, acc_l), (clf_r, acc_r) = fit(left), fit(right)
        mid = 0.5 * (np.log10(right) + np.log10(left))
        if acc_l < acc_r:
            c_final, clf, left, right = right, clf_r, 10 ** mid, right
        else:
            c_final, clf, left, right = left, clf_l, left, 10 ** mid
    return c_final, clf


def bench_linear_probe(repeats: int, shots=(1, 2, 4), seeds=(1, 2, 3)) -> None:
    import statistics
    import warnings

    from workbench.data import sample_few_shot, synthetic_shapes
    from workbench.task import FewShotTask

    warnings.simplefilter("ignore")
    backbone = wb.load_backbone("workbench-tiny", device="cpu")
    sets = {"pneumoniamnist_mini": wb.load_dataset("pneumoniamnist_mini"),
            "whu_rs19_mini": wb.load_dataset("whu_rs19_mini"),
            "shapes (synthetic)": synthetic_shapes(4, train_per_class=20, val_per_class=6, test_per_class=10)}
    print(f"linear probe C search, backbone workbench-tiny, raw features, torch threads {torch.get_num_threads()}; "
          f"time per run = fit + search, min / median of {repeats} (the reference: of 1 when a run takes > 2 s)")
    print(f"{'dataset':20s} {'K':>2s} {'seed':>4s} | {'reference C':>12s} {'acc':>6s} {'min s':>6s} {'med s':>6s} | "
          f"{'workbench C':>12s} {'acc':>6s} {'min s':>6s} {'med s':>6s} {'fits':>4s} | same")
    all_same, totals = True, [0.0, 0.0]
    for name, ds in sets.items():
        cache = wb.FeatureCache(backbone, None, show_progress=False)
        test = cache.get(ds, ds.split("test"))
        for k in shots:
            for seed in seeds:
                task = FewShotTask(ds, sample_few_shot(ds, k, seed), backbone, cache, templates=["a photo of a {}."])
                sup, val = task.support(), task.validation()
                x, y = sup.raw[0].double().numpy(), sup.labels.numpy()
                xv, yv = val.raw[0].double().numpy(), val.labels.numpy()
                ref_times, new_times = [], []
                for i in range(repeats):
                    if i == 0 or ref_times[0] <= 2.0:   # a slow reference run is timed once
                        t = time.perf_counter()
                        c_ref, clf = _reference_lpclip(x, y, xv, yv)
                        ref_times.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    lp = wb.get_method("linear_probe").fit(task)
                    new_times.append(time.perf_counter() - t)
                pred_ref = clf.predict(test.raw[0].double().numpy())
                pred_new = lp.predict_logits(test.raw[0]).argmax(-1).numpy()
                acc_ref = float((pred_ref == test.labels.numpy()).mean())
                acc_new = float((pred_new == test.labels.numpy()).mean())
                # same C (up to the last bits of 10 ** log10) and the same prediction on every test image
                same = abs(lp.fit_info["C"] / c_ref - 1) < 1e-9 and bool((pred_ref == pred_new).all())
                all_same &= same
                totals[0] += statistics.median(ref_times)
                totals[1] += statistics.median(new_times)
                print(f"{name:20s} {k:2d} {seed:4d} | {c_ref:12.5g} {acc_ref:6.3f} {min(ref_times):6.3f} "
                      f"{statistics.median(ref_times):6.3f} | {lp.fit_info['C']:12.5g} {acc_new:6.3f} "
                      f"{min(new_times):6.3f} {statistics.median(new_times):6.3f} {lp.fit_info['fits']:4d} | "
                      f"{'yes' if same else 'NO'}")
    print(f"sum of medians: reference {totals[0]:.2f} s, workbench {totals[1]:.2f} s; "
          f"chosen C and test accuracy identical in every cell: {all_same}")


def bench_quickstart() -> None:
    """The quickstart notebook's defaults, end to end from an empty feature cache (loading included)."""
    import tempfile
    import warnings

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    backbone = wb.load_backbone("workbench-tiny", device="cpu")
    data = wb.load_dataset("whu_rs19_mini")
    with tempfile.TemporaryDirectory() as tmp:
        cache = wb.FeatureCache(backbone, tmp, show_progress=False)
        table = wb.compare(data, backbone, ["zero_shot", "linear_probe"], [1, 2, 4], [1, 2, 3], cache=cache)
    total = time.perf_counter() - t0
    fits = table.groupby("method")["fit_seconds"].sum()
    print(f"quickstart (whu_rs19_mini, zero_shot + linear_probe, K 1/2/4, seeds 1/2/3): {total:.1f} s in all "
          f"(goal <= 60 s on 2 idle cores); linear-probe fits {fits.get('linear_probe', 0):.1f} s")


def synthetic_task(classes: int, shots: int, dim: int, views: int, n_test: int, seed: int = 0):
    """Features around class centres, text embeddings = centres + noise (an informative, imperfect text classifier)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    labels = torch.arange(classes).repeat_interleave(shots)
    raw = centres[labels][None] * 2 + torch.randn(views, classes * shots, dim, generator=g) / dim ** 0.5 * 4
    val_y = torch.arange(classes).repeat_interleave(min(shots, 4))
    val_x = F.normalize(centres[val_y] * 2 + torch.randn(len(val_y), dim, generator=g) / dim ** 0.5 * 4, dim=-1)
    test_y = torch.randint(0, classes, (n_test,), generator=g)
    test_x = F.normalize(centres[test_y] * 2 + torch.randn(n_test, dim, generator=g) / dim ** 0.5 * 4, dim=-1)
    text = centres + 0.5 * torch.randn(classes, dim, generator=g) / dim ** 0.5 * 4
    return TensorTask(raw, labels, F.normalize(raw[0], dim=-1), val_x, val_y, text), test_x, test_y


# -- reference-style baselines: the plain way to write each method, on the same cached features ----------

def baseline_tip_adapter(task, test_x, views=10):
    """gaopengcuhk/Tip-Adapter search_hp: nested Python loops over beta and alpha, dense one-hot values."""
    from workbench.methods.features.tip_adapter import search_grid

    keys = F.normalize(task.raw_views[:views].mean(0), dim=-1)
    values = F.one_hot(task.labels, task.n_classes).float()
    val_x, val_y, text = task.val.x, task.val.labels, task.text
    affinity, clip = val_x @ keys.T, 100 * val_x @ text.T
    best, best_beta, best_alpha = 0.0, 1.0, 1.17
    for beta in search_grid(7.0, 200).tolist():
        cache = torch.exp(-beta * (1 - affinity)) @ values
        for alpha in search_grid(3.0, 20).tolist():
            acc = float(((clip + cache * alpha).argmax(-1) == val_y).float().mean())
            if acc > best:
                best, best_beta, best_alpha = acc, beta, alpha
    logits = 100 * test_x @ text.T + best_alpha * torch.exp(-best_beta * (1 - test_x @ keys.T)) @ values
    return logits, {"beta": best_beta, "alpha": best_alpha}


def baseline_gda(task, test_x, views=10):
    """mrflogs/ICLR24 main_few_shots.py written plainly in float32: per-class masks, torch.cov, pinv, alpha loop."""
    x = F.normalize(task.raw_views[:views], dim=-1).reshape(-1, task.raw_views.shape[-1])
    y = task.labels.repeat(views)
    c, d = task.n_classes, x.shape[1]
    means = torch.stack([x[y == k].mean(0) for k in range(c)])
    centred = x - means[y]
    cov = torch.cov(centred.T)
    inv = d * torch.linalg.pinv((len(x) - 1) * cov + torch.trace(cov) * torch.eye(d))
    w = means @ inv
    b = torch.log(torch.tensor(1.0 / c)) - 0.5 * (w * means).sum(-1)
    best, best_alpha = 0.0, 0.1
    zs = 100 * task.val.x @ task.text.T
    g = task.val.x @ w.T + b
    for alpha in [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]:
        acc = float(((zs + alpha * g).argmax(-1) == task.val.labels).float().mean())
        if acc > best:
            best, best_alpha = acc, alpha
    return 100 * test_x @ task.text.T + best_alpha * (test_x @ w.T + b), {"alpha": best_alpha}


def baseline_lp_plus_plus(task, test_x, epochs=300):
    """LP++ as methods/linear_probe_p2.py runs it (paper options): nn.Linear, autograd, torch.optim.SGD, full batch."""
    from workbench.methods.features.lp_plus_plus import initial_alpha, step_sizes

    x, y, text = F.normalize(task.raw_views[0], dim=-1), task.labels, task.text
    c = task.n_classes
    sims = x @ text.T
    lr_w, lr_alpha = step_sizes(x, sims)
    linear = torch.nn.Linear(x.shape[1], c)
    with torch.no_grad():
        linear.weight.copy_(F.one_hot(y, c).float().T @ x / torch.bincount(y, minlength=c)[:, None])
        linear.bias.zero_()
    alpha = torch.full((c,), initial_alpha(sims, y, c, 250.0), requires_grad=True)
    opt = torch.optim.SGD(linear.parameters(), lr=lr_w, momentum=0.9)
    val_sims = task.val.x @ text.T
    best = (-1.0, None)
    for epoch in range(epochs):
        loss = F.cross_entropy(linear(x) + sims * alpha, y)
        opt.zero_grad()
        alpha.grad = None
        loss.backward()
        opt.step()
        if (epoch + 1) % 10 == 0:
            with torch.no_grad():
                alpha -= lr_alpha * alpha.grad
        with torch.no_grad():
            acc = float(((linear(task.val.x) + val_sims * alpha).argmax(-1) == task.val.labels).float().mean())
            if acc >= best[0]:
                best = (acc, (linear.weight.clone(), linear.bias.clone(), alpha.detach().clone()))
    w, b, a = best[1]
    return test_x @ w.T + b + (test_x @ text.T) * a, {}


def plain_cached_sgd(name, task, **params):
    """jusiro/CLAP's loop written plainly: autograd, torch.optim.SGD, a pool[idx] gather per step and
    F.normalize on the [B, D] features, with the workbench's shuffles and warm-up + cosine schedule.

    Returns the trained tensors (CLIP-Adapter: down, up; ZS-LP/CLAP: the prototypes) and the logits
    function. The benchmark's baseline, and the oracle that tests/test_new_feature_methods.py holds
    the fast hand-written loop to.
    """
    from workbench.methods.features.clip_adapter import Adapter
    from workbench.methods.features.zs_lp import batches_per_epoch, lagrangian_multipliers
    from workbench.training import TrainConfig, learning_rate

    cfg = wb.get_method(name, **params).config
    v, n, d = task.raw_views[:cfg.augment_views].shape
    pool = F.normalize(task.raw_views[:cfg.augment_views], dim=-1).reshape(-1, d)
    labels, text = task.labels.repeat(v), task.text.float()
    lam = None
    if name == "clip_adapter":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(task.seed)
            module = Adapter(d, cfg.reduction)
        trained = list(module.parameters())

        def logits_of(x):
            return 100 * F.normalize(cfg.ratio * module(x) + (1 - cfg.ratio) * x, dim=-1) @ text.T
    else:
        w = text.clone().requires_grad_(True)
        trained = [w]
        lam = lagrangian_multipliers(100 * pool @ text.T, labels, len(text)) if name == "clap" else None

        def logits_of(x):
            return 100 * x @ F.normalize(w, dim=-1).T
    opt = torch.optim.SGD(trained, lr=cfg.lr, momentum=cfg.momentum)
    tcfg = TrainConfig(epochs=cfg.epochs, optimizer="sgd", lr=cfg.lr, schedule="cosine_epoch",
                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr)
    steps = batches_per_epoch(n, cfg.batch_size)
    for epoch in range(cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = learning_rate(tcfg, epoch * steps, epoch, cfg.epochs * steps)
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(task.seed * 100_003 + epoch))
        for i in range(steps):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = F.cross_entropy(logits_of(pool[idx]), labels[idx])
            if lam is not None:
                loss = loss + (lam * (w - text).pow(2).sum(-1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return [t.detach() for t in trained], logits_of


def baseline_cached_sgd(name, task, test_x):
    _, logits_of = plain_cached_sgd(name, task)
    with torch.no_grad():
        return logits_of(test_x), {}


def products_floor(name, task, repeats: int = 3) -> float:
    """Seconds of the matrix products alone that one fit's steps must do (same shapes, same count, nothing
    else): the arithmetic floor of ZS-LP / CLAP (2 per step: logits and the prototypes' gradient) and
    CLIP-Adapter (7 per step: 2 forward through the MLP, the text projection, and 4 backward)."""
    from workbench.methods.features.zs_lp import batches_per_epoch

    cfg = wb.get_method(name).config
    steps = cfg.epochs * batches_per_epoch(task.raw_views.shape[1], cfg.batch_size)
    b, d, c = cfg.batch_size, task.raw_views.shape[-1], task.n_classes
    g = torch.Generator().manual_seed(0)
    x, t, gc = (torch.randn(b, d, generator=g), torch.randn(c, d, generator=g), torch.randn(b, c, generator=g))
    if name == "clip_adapter":
        h = d // cfg.reduction
        w1, w2, gh = torch.randn(h, d, generator=g), torch.randn(d, h, generator=g), torch.randn(b, h, generator=g)

        def step():
            hid = x @ w1.T
            a = hid @ w2.T
            a @ t.T
            ga = gc @ t
            ga @ w2
            gh.T @ x
            ga.T @ hid
    else:
        def step():
            x @ t.T
            gc.T @ x
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, time.perf_counter() - start)
    return best


def _timed(fn, repeats: int):
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t, p = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - p)
    return walls, cpus, out


def _load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def bench_methods(args) -> None:
    task, test_x, test_y = synthetic_task(args.classes, args.shots, args.dim, 20, args.test)
    print(f"{args.classes} classes x {args.shots} shots, dim {args.dim}, 20 cached views; K-shot val "
          f"{len(task.val.labels)}, test {args.test}; torch threads {torch.get_num_threads()}; "
          f"{args.repeats} runs each; {_load()}")
    print(f"{'method':13s} | {'workbench min':>13s} {'median':>7s} {'cpu med':>7s} | {'baseline min':>12s} "
          f"{'median':>7s} {'cpu med':>7s} | {'ratio':>5s} | {'goal':>6s} | same choice / test acc (wb, baseline)")
    baselines = {"tip_adapter": lambda: baseline_tip_adapter(task, test_x),
                 "gda": lambda: baseline_gda(task, test_x),
                 "gda_float32": lambda: baseline_gda(task, test_x),
                 "lp_plus_plus": lambda: baseline_lp_plus_plus(task, test_x),
                 "zs_lp": lambda: baseline_cached_sgd("zs_lp", task, test_x),
                 "clap": lambda: baseline_cached_sgd("clap", task, test_x),
                 "clip_adapter": lambda: baseline_cached_sgd("clip_adapter", task, test_x)}
    goals = {"lp_plus_plus": 2.0, "zs_lp": 2.0, "clap": 2.0, "clip_adapter": 2.0}
    variants = {"gda_float32": ("gda", {"gram_dtype": "float32"})}   # GDA with its covariance product in float32
    floors = {}
    for name in args.methods:
        def run():
            method_name, params = variants.get(name, (name, {}))
            method = wb.get_method(method_name, **params).fit(task)
            return method.predict_logits(test_x), method.fit_info
        walls, cpus, (logits, info) = _timed(run, args.repeats)
        base_repeats = args.repeats if name != "tip_adapter" else max(5, args.repeats // 2)
        b_walls, b_cpus, (b_logits, b_info) = _timed(baselines[name], base_repeats)
        acc = float((logits.argmax(-1) == test_y).float().mean())
        b_acc = float((b_logits.argmax(-1) == test_y).float().mean())
        same = ("yes" if all(abs(info[k] - v) < 1e-9 for k, v in b_info.items()) else "NO") if b_info else "-"
        ratio = statistics.median(b_walls) / statistics.median(walls)
        goal = f"<= {goals[name]:.0f} s" if name in goals else "-"
        print(f"{name:13s} | {min(walls):11.3f} s {statistics.median(walls):7.3f} {statistics.median(cpus):7.3f} | "
              f"{min(b_walls):10.3f} s {statistics.median(b_walls):7.3f} {statistics.median(b_cpus):7.3f} | "
              f"{ratio:5.2f} | {goal:>6s} | {same} {b_info or ''} / {acc:.3f}, {b_acc:.3f}",
              flush=True)
        if name in ("zs_lp", "clap", "clip_adapter"):
            floors[name] = (products_floor(name, task), statistics.median(walls), min(walls))
    for name, (floor, median, low) in floors.items():   # how much of each fit is the arithmetic it cannot skip
        print(f"{name:13s} | its steps' matrix products alone: {floor:.3f} s (best of 3) = {low / floor:.2f}x of "
              f"the fit's min, {median / floor:.2f}x of its median; the 2 s goal needs the products at "
              f"{floor / 2.0:.2f}x their measured time")
    print(_load())


def _peak_rss_child(which: str, classes: int, shots: int, dim: int, threads: int) -> str:
    """Runs one Tip-Adapter fit (search included) in a fresh process; returns its report line."""
    cmd = [sys.executable, __file__, "--tip-memory-child", which, "--classes", str(classes), "--shots", str(shots),
           "--dim", str(dim), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip()[-500:]


def tip_memory_child(which: str, args) -> None:
    import resource

    def rss_mib():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    task, test_x, _ = synthetic_task(args.classes, args.shots, args.dim, 10, 1000)
    before = rss_mib()
    t = time.perf_counter()
    if which == "workbench":
        method = wb.get_method("tip_adapter").fit(task)
        method.predict_logits(test_x)
        chosen = {"beta": method.fit_info["beta"], "alpha": method.fit_info["alpha"]}
    else:
        chosen = baseline_tip_adapter(task, test_x)[1]
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    print(f"tip_adapter {which:9s} {args.classes} classes x {args.shots} shots: fit + search + predict "
          f"{seconds:.1f} s, peak RSS {peak / 1024:.2f} GiB (features and interpreter before the fit "
          f"{before / 1024:.2f} GiB, so the fit adds <= {(peak - before) / 1024:.2f} GiB); chosen {chosen}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--linear-probe", action="store_true",
                    help="benchmark the linear probe's C search against the reference, and the quickstart")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--test", type=int, default=2500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+",
                    default=["tip_adapter", "gda", "lp_plus_plus", "zs_lp", "clap", "clip_adapter"])
    ap.add_argument("--tip-memory-classes", type=int, default=1000,
                    help="class count of the Tip-Adapter peak-memory run (0: skip)")
    ap.add_argument("--tip-baseline-classes", type=int, default=300,
                    help="class count at which the reference-style search loop's memory and time are measured")
    ap.add_argument("--tip-memory-child", choices=["workbench", "baseline"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.tip_memory_child:
        tip_memory_child(args.tip_memory_child, args)
        return
    if args.linear_probe:
        bench_linear_probe(max(args.repeats, 5))
        bench_quickstart()
        return
    args.repeats = max(args.repeats, 5)
    bench_methods(args)
    if args.tip_memory_classes:
        print(f"\nTip-Adapter peak memory, one process each (goal <= 2 GiB at 1,000 classes x 16 shots); {_load()}")
        print(_peak_rss_child("workbench", args.tip_memory_classes, args.shots, args.dim, args.threads))
        if args.tip_baseline_classes:
            for which in ("workbench", "baseline"):
                print(_peak_rss_child(which, args.tip_baseline_classes, args.shots, args.dim, args.threads))
        print(_load())


if __name__ == "__main__":
    main()
