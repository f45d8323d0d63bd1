"""Tables and plots from a results table (one row per run)."""
from __future__ import annotations

import pandas as pd

from .errors import ConfigError
from .experiment import summarize


def plot_accuracy_vs_shots(table: pd.DataFrame, metric: str = "accuracy", ax=None, title: str | None = None):
    """Mean ± std over seeds against K, one line per method (one panel's worth: filter to one dataset)."""
    import matplotlib

    if not matplotlib.get_backend().lower().startswith(("module://", "inline", "nbagg", "widget", "ipympl")):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if table.empty:
        raise ConfigError("the results table is empty; nothing to plot.")
    summary = summarize(table, metric)
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.6))
    for (dataset, method), g in summary.groupby(["dataset", "method"]):
        g = g.sort_values("shots")
        label = method if summary["dataset"].nunique() == 1 else f"{dataset} / {method}"
        ax.errorbar(g["shots"], g["mean"], yerr=g["std"], marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    shots = sorted(summary["shots"].unique())
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("shots per class (K)")
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
    ax.set_title(title or ", ".join(sorted(summary["dataset"].unique())))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


def results_table(path) -> pd.DataFrame:
    """Read a results CSV written by ``compare``/``run_experiment``."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"results file {str(path)!r} does not exist.")
    return pd.read_csv(path)


def fit_choices(out_dir, methods=None) -> pd.DataFrame:
    """What fitting chose in each run (β, α, C, epochs, selection set), read from the provenance records."""
    import json
    from pathlib import Path

    rows = []
    for path in sorted(Path(out_dir).glob("runs/*/provenance.json")):
        record = json.loads(path.read_text())
        row = record["row"]
        if methods and row["method"] not in methods:
            continue
        info = {k: v for k, v in record["method"]["fit_info"].items()
                if isinstance(v, (int, float, str, bool)) or v is None}
        rows.append({"method": row["method"], "shots": row["shots"], "seed": row["seed"],
                     "accuracy": row["accuracy"], **info})
    table = pd.DataFrame(rows)
    return table.sort_values(["method", "shots", "seed"]).reset_index(drop=True) if not table.empty else table


def sample_images(dataset, split: str = "test", n: int = 6, seed: int = 0):
    """``n`` (image, readable true label) pairs from a split, drawn with a fixed seed."""
    import random

    samples = sorted(dataset.split(split), key=lambda s: s.id)
    chosen = random.Random(f"show/{seed}").sample(samples, min(n, len(samples)))
    return [(dataset.load_image(s), dataset.class_names[s.label]) for s in chosen]


def show_predictions(images, predictions: pd.DataFrame, columns: int = 6):
    """A grid of images titled with predicted label, confidence and (if known) the true label."""
    import matplotlib

    if not matplotlib.get_backend().lower().startswith(("module://", "inline", "nbagg", "widget", "ipympl")):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item, (_, row) in zip(axes.flat, images, predictions.iterrows()):
        image, truth = item if isinstance(item, tuple) else (item, None)
        ax.imshow(image)
        ok = truth is None or truth == row["label"]
        title = f"{row['label']} ({row['confidence']:.0%})" + ("" if truth is None else f"\ntrue: {truth}")
        ax.set_title(title, fontsize=8, color="black" if ok else "firebrick")
    fig.tight_layout()
    return fig


def plot_loss(run, ax=None):
    """Training loss per epoch of a trained method's run (``fit_info['epoch_loss']``)."""
    import matplotlib

    if not matplotlib.get_backend().lower().startswith(("module://", "inline", "nbagg", "widget", "ipympl")):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = run.method.fit_info.get("epoch_loss")
    if not losses:
        raise ConfigError(f"method {run.method.name!r} records no training loss.")
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(f"{run.method.name}, K={run.row['shots']}, seed {run.row['seed']}")
    ax.grid(alpha=0.3)
    ax.figure.tight_layout()
    return ax.figure


def rows(*runs) -> pd.DataFrame:
    """The result rows of several runs as one table."""
    from .experiment import RESULT_COLUMNS

    return pd.DataFrame([r.row for r in runs], columns=RESULT_COLUMNS)


# -- comparing methods across datasets (results tables from compare() or sweep()) -------------

def _pyplot():
    import matplotlib

    if not matplotlib.get_backend().lower().startswith(("module://", "inline", "nbagg", "widget", "ipympl")):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def summary_table(table: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """"mean ± std (n)" over seeds, one row per (dataset, method), one column per K."""
    s = summarize(table, metric)
    s["value"] = s.apply(lambda r: f"{r['mean']:.2f} ± {r['std']:.2f}", axis=1)
    out = s.pivot(index=["dataset", "method"], columns="shots", values="value").reset_index()
    out.columns = [c if isinstance(c, str) else f"K={c}" for c in out.columns]
    return out


def plot_curves(table: pd.DataFrame, metric: str = "accuracy", columns: int = 3):
    """Accuracy-vs-shots curves, one panel per dataset."""
    plt = _pyplot()
    datasets = sorted(table["dataset"].unique())
    cols = min(columns, len(datasets))
    rows = -(-len(datasets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(datasets):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, datasets):
        plot_accuracy_vs_shots(table[table["dataset"] == name], metric, ax=ax, title=name)
    fig.tight_layout()
    return fig


def ranking(table: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Methods ranked within every (dataset, K) by mean over seeds, then averaged: lower rank is better."""
    s = summarize(table, metric)
    s["rank"] = s.groupby(["dataset", "shots"])["mean"].rank(ascending=False, method="average")
    out = s.groupby("method").agg(mean_rank=("rank", "mean"), mean_metric=("mean", "mean"),
                                  wins=("rank", lambda r: int((r == 1).sum())), settings=("rank", "size"))
    return out.sort_values(["mean_rank", "mean_metric"], ascending=[True, False]).round(2).reset_index()


def calibration_table(table: pd.DataFrame) -> pd.DataFrame:
    """Mean ECE (15 bins, %) per (dataset, method, K): lower is better calibrated."""
    return summarize(table, "ece").rename(columns={"mean": "ece_mean", "std": "ece_std"})


def _record(out_dir, run_id: str) -> dict:
    import json
    from pathlib import Path

    path = Path(out_dir) / "runs" / run_id / "provenance.json"
    if not path.is_file():
        raise ConfigError(f"no provenance record for run {run_id!r} in {str(out_dir)!r}.")
    return json.loads(path.read_text())


def per_class_recall(out_dir, run_id: str) -> pd.DataFrame:
    """Recall per class of one run (from its provenance record), worst first."""
    rec = _record(out_dir, run_id)
    names = rec["dataset"]["class_names"]
    recall = rec["metrics"]["per_class_recall"]
    table = pd.DataFrame({"class": names, "recall": recall})
    return table.sort_values("recall", na_position="first").reset_index(drop=True)


def plot_reliability(out_dir, run_id: str, ax=None):
    """Reliability diagram of one run: accuracy against confidence per bin, with the ECE."""
    plt = _pyplot()
    rec = _record(out_dir, run_id)
    bins = [b for b in rec["metrics"]["calibration"] if b["count"]]
    if ax is None:
        _, ax = plt.subplots(figsize=(3.8, 3.6))
    width = rec["metrics"]["calibration"][0]["high"] - rec["metrics"]["calibration"][0]["low"]
    ax.bar([b["low"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge", alpha=0.7,
           edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    row = rec["row"]
    ax.set_title(f"{row['method']} K={row['shots']} seed {row['seed']}\nECE {100 * row['ece']:.1f}%", fontsize=9)
    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    return ax.figure


def best_method(table: pd.DataFrame, metric: str = "accuracy", shots: int | None = None) -> str:
    """The method with the best mean ``metric`` at ``shots`` (default: the largest K in the table)."""
    k = shots if shots is not None else int(table["shots"].max())
    s = summarize(table[table["shots"] == k], metric)
    return str(s.sort_values("mean", ascending=False)["method"].iloc[0])


def write_report(results, out, metric: str = "accuracy"):
    """Write the comparison tables (Markdown) and figures (PNG) of a results CSV to ``out``."""
    from pathlib import Path

    table = results_table(results) if not isinstance(results, pd.DataFrame) else results
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(table, metric).savefig(out / "curves.png", dpi=120)
    lines = [f"# Results: {metric}", "", f"{len(table)} runs; datasets: {', '.join(sorted(table['dataset'].unique()))}.",
             "", "## Mean ± std over seeds (%)", "", summary_table(table, metric).to_markdown(index=False), "",
             "![accuracy vs shots](curves.png)", "", "## Ranking across datasets and shots", "",
             ranking(table, metric).to_markdown(index=False), "", "## Calibration (ECE, %)", "",
             calibration_table(table).to_markdown(index=False), ""]
    runs_dir = Path(results).parent if not isinstance(results, pd.DataFrame) else None
    if runs_dir is not None and (runs_dir / "runs").is_dir():
        best = table.sort_values(metric, ascending=False).iloc[0]
        try:
            plot_reliability(runs_dir, best["run_id"]).savefig(out / "reliability.png", dpi=120)
            lines += [f"## Best run: {best['run_id']}", "", per_class_recall(runs_dir, best["run_id"]).to_markdown(index=False),
                      "", "![reliability](reliability.png)", ""]
        except ConfigError:
            pass
    (out / "README.md").write_text("\n".join(lines))
    return out
