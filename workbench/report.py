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
