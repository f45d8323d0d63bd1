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
