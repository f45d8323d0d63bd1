"""Tables and plots from a results table (one row per run)."""
from __future__ import annotations

import pandas as pd

from .errors import ConfigError
from .experiment import summarize
from .unlabeled import TRANSDUCTIVE_MARK, _transductive_flag, mark_transductive  # noqa: F401 (re-exported)


def _pyplot():
    import matplotlib

    if not matplotlib.get_backend().lower().startswith(("module://", "inline", "nbagg", "widget", "ipympl")):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- which metric, and what chance is on it ---------------------------------------------------

POOR_CALIBRATION_ECE = 0.10
"""A run whose expected calibration error exceeds this (10 points of confidence) is flagged in reports."""

METRIC_LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro-F1",
                 "macro_auroc": "macro AUROC", "ece": "ECE"}


def metric_label(metric: str) -> str:
    """``balanced_accuracy`` -> ``balanced accuracy (%)``: how tables and axes name a metric."""
    if metric.startswith("val_"):
        return "K-shot validation " + metric_label(metric[len("val_"):])
    return f"{METRIC_LABELS.get(metric, metric.replace('_', ' '))} (%)"


def dataset_metric(table: pd.DataFrame, metric: str | None = None) -> str:
    """The metric to report for a table of one dataset: ``metric`` if given, else the dataset's primary one."""
    if metric:
        return metric
    from .experiment import _primary_metric  # the one rule summarize() uses: the rows' ``metric`` column

    return _primary_metric(table)


def n_classes_of(table: pd.DataFrame) -> int | None:
    """Number of classes of the (one) dataset of ``table``: from the rows, else its YAML; None if unknown."""
    if "n_classes" in table.columns and table["n_classes"].notna().any():
        return int(table["n_classes"].dropna().iloc[0])
    from .domains import load_spec

    try:
        return len(load_spec(str(table["dataset"].iloc[0]))["classes"])
    except (ConfigError, OSError):
        return None


def chance_level(metric: str, n_classes: int | None) -> float | None:
    """The score of guessing, as a fraction: 0.5 for AUROC; 1/C for accuracy, balanced accuracy and macro-F1.

    For accuracy, 1/C is a uniform random guess (on an imbalanced test set always predicting the
    majority class scores more — which is why imbalanced sets report balanced accuracy, whose
    chance level is 1/C for any guessing rule). For macro-F1 we draw 1/C: the expected macro-F1 of
    uniform guessing on balanced classes (per class precision 1/C and recall 1/C). ECE has none.
    """
    metric = metric[len("val_"):] if metric.startswith("val_") else metric
    if metric == "macro_auroc":
        return 0.5
    if metric in ("accuracy", "balanced_accuracy", "macro_f1") and n_classes:
        return 1.0 / n_classes
    return None


def _any_transductive(table: pd.DataFrame) -> bool:
    return "transductive" in table.columns and bool(_transductive_flag(table).any())


def _transductive_column(frame: pd.DataFrame) -> pd.DataFrame:
    frame["transductive"] = frame["method"].astype(str).str.endswith(TRANSDUCTIVE_MARK)
    return frame


def _describe_runs(table: pd.DataFrame) -> str:
    backbones = sorted({f"{b} ({p})" if isinstance(p, str) and p else str(b)
                        for b, p in zip(table["backbone"], table.get("pretrained", [""] * len(table)))})
    n_seeds = table["seed"].nunique()
    return f"{', '.join(backbones)} · {n_seeds} seed{'s' if n_seeds != 1 else ''}"


def plot_accuracy_vs_shots(table: pd.DataFrame, metric: str | None = None, ax=None, title: str | None = None,
                           legend: bool = True):
    """Mean ± std over seeds against K, one line per method, for one dataset.

    ``metric`` defaults to the dataset's primary metric. The title names the dataset, the
    backbone and the number of seeds; the dotted line is the metric's chance level
    (:func:`chance_level`); error bars of different methods are shifted sideways so they do not
    hide each other (the K tick marks the true position). The legend sits outside the axes, to
    their right, so it never covers a point (``legend=False`` leaves it to the caller).
    """
    plt = _pyplot()
    if table.empty:
        raise ConfigError("the results table is empty; nothing to plot.")
    if table["dataset"].nunique() > 1:
        raise ConfigError(f"plot_accuracy_vs_shots draws one dataset; the table has "
                          f"{sorted(table['dataset'].unique())}. "
                          "Filter it to one, or use plot_curves for a panel per dataset.")
    metric = dataset_metric(table, metric)
    summary = summarize(table, metric)   # transductive rows marked in the legend
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.6))
    methods = list(dict.fromkeys(summary["method"]))
    for i, method in enumerate(methods):
        g = summary[summary["method"] == method].sort_values("shots")
        shift = 2 ** (0.06 * (i - (len(methods) - 1) / 2))  # multiplicative: the K axis is log2
        ax.errorbar(g["shots"] * shift, g["mean"], yerr=g["std"], marker="o", capsize=3, label=method)
    chance = chance_level(metric, n_classes_of(table))
    if chance is not None:
        ax.axhline(100 * chance, linestyle=":", color="gray", label=f"chance ({100 * chance:.1f}%)")
    ax.set_xscale("log", base=2)
    shots = sorted(summary["shots"].unique())
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.minorticks_off()
    ax.set_xlabel("shots per class (K)")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{title or table['dataset'].iloc[0]}\n{_describe_runs(table)}", fontsize=9)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    ax.figure.tight_layout()
    return ax.figure


def results_table(path) -> pd.DataFrame:
    """Read a results CSV written by ``compare``/``run_experiment``."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"results file {str(path)!r} does not exist.")
    from .results import read_table

    table = read_table(path)   # malformed lines named and left out, other separators refused
    if table.empty:
        raise ConfigError(f"results file {str(path)!r} holds no rows.")
    return table


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

def _by_dataset(table: pd.DataFrame, metric: str | None):
    """``(dataset, its rows, the metric to report for it)``, dataset by dataset."""
    for name in sorted(table["dataset"].unique()):
        rows_ = table[table["dataset"] == name]
        yield name, rows_, dataset_metric(rows_, metric)


def _metrics_used(table: pd.DataFrame, metric: str | None) -> dict[str, str]:
    return {name: m for name, _, m in _by_dataset(table, metric)}


def summary_table(table: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """"mean ± std" over seeds, one row per (dataset, method), one column per K; the ``metric`` column names
    what is reported (each dataset's primary metric unless ``metric`` is given)."""
    s = summarize(table, metric)   # transductive rows come back marked (mark_transductive)
    s["value"] = s.apply(lambda r: f"{r['mean']:.2f} ± {r['std']:.2f}", axis=1)
    s["metric"] = s["metric"].map(metric_label)
    out = s.pivot(index=["dataset", "method", "metric"], columns="shots", values="value").reset_index()
    out.columns = [c if isinstance(c, str) else f"K={c}" for c in out.columns]
    return _transductive_column(out) if _any_transductive(table) else out   # the column only when some row is


def retrieval_table(table: pd.DataFrame) -> pd.DataFrame:
    """The ``retrieval`` rows of a results table as the R@K table of the literature (percent).

    One row per (dataset, backbone, pretrained weights or backbone folder, method): image→text and
    text→image R@1/5/10 and mean recall, mean over seeds (the rows hold fractions; shown ×100), with
    the test images and captions counted and the captions longer than the text context.
    """
    from .retrieval import KS

    rows_ = table[table["protocol"] == "retrieval"] if "protocol" in table else table.iloc[:0]
    if rows_.empty:
        raise ConfigError("retrieval_table: the table has no retrieval rows (protocol 'retrieval'); run "
                          "wb.compare(wb.load_pairs(...), backbone, ['zero_shot'], [0], [0], protocol='retrieval').")
    recalls = [*(f"i2t_R@{k}" for k in KS), *(f"t2i_R@{k}" for k in KS), "mean_recall"]
    keys = ["dataset", "backbone", "pretrained", "method"]
    rows_ = rows_.assign(pretrained=rows_["pretrained"].fillna("")) if "pretrained" in rows_ else rows_
    out = rows_.groupby(keys, sort=False).agg(
        {**{c: "mean" for c in recalls}, "seed": "nunique", "n_test": "first", "n_captions": "first",
         "captions_truncated": "first"}).reset_index()
    out[recalls] = (out[recalls].astype(float) * 100).round(2)
    return out.rename(columns={"seed": "seeds", "n_test": "images", "n_captions": "captions",
                               "captions_truncated": "truncated"})


def summary_text(table: pd.DataFrame, metric: str | None = None) -> str:
    """The command line's summary: per dataset, a header naming metric, backbone and seeds, then mean ± std per K."""
    blocks = []
    for name, rows_, m in _by_dataset(table, metric):
        s = summarize(rows_, m).drop(columns=["dataset", "metric"])
        s = s.rename(columns={"mean": metric_label(m), "std": "± std"})
        blocks.append(f"{name} — {metric_label(m)}, mean ± std over seeds; {_describe_runs(rows_)}\n"
                      + s.to_string(index=False))
    return "\n\n".join(blocks)


def what_the_numbers_show(table: pd.DataFrame) -> str:
    """One closing line for a results table: backbone(s), data, and what the numbers can and cannot show.

    A backbone without pretrained weights (``pretrained`` empty, e.g. the offline ``workbench-tiny``)
    is random: its numbers show that the workflow runs and how methods fare on random features,
    not CLIP's accuracy. The pretrained offline model ``workbench-tiny-scenes`` gets its own line:
    meaningful on the synthetic scene domains, not on real images. States the units: results rows hold fractions (0–1); summaries, reports
    and plots show percentages.
    """
    pairs = sorted({(str(b), p if isinstance(p, str) else "")
                    for b, p in zip(table["backbone"], table.get("pretrained", [""] * len(table)))})
    random_ = [b for b, p in pairs if not p or p == "random-init"]
    named = ", ".join(f"{b} ({p})" if p and p != "random-init" else f"{b} (random weights, no pretraining)"
                      for b, p in pairs)
    data = []
    for name, rows_ in table.groupby("dataset", sort=True):
        n_test = int(rows_["n_test"].dropna().iloc[0]) if "n_test" in rows_ and rows_["n_test"].notna().any() else None
        n_cls = n_classes_of(rows_)
        data.append(f"{name} ({n_cls} classes" + (f", {n_test} test images)" if n_test else ")"))
    seeds = table["seed"].nunique() if "seed" in table else 0
    scenes = [b for b, p in pairs if b == "workbench-tiny-scenes" and p not in ("", "random-init")]
    if random_:
        meaning = ("the backbone is random, so these numbers show that the workflow runs and how methods do on random "
                   "features — not CLIP's accuracy on this data; for real numbers pass pretrained weights "
                   "(e.g. backbone='ViT-B-16-quickgelu', pretrained='openai')")
    elif scenes:
        card = "its card: workbench/assets/workbench-tiny-scenes/MODEL_CARD.md"
        if all(str(d).endswith("_scenes") for d in table["dataset"].unique()):
            meaning = ("workbench-tiny-scenes is the offline model the workbench pretrained itself on synthetic captioned "
                       f"scenes ({card}): on these shifted scene domains the numbers show what adaptation adds to "
                       "zero-shot; they say nothing about real images — for real numbers pass real weights (e.g. "
                       "backbone='ViT-B-16-quickgelu', pretrained='openai')")
        else:
            meaning = ("workbench-tiny-scenes was pretrained on synthetic captioned scenes only and never saw images like "
                       f"these ({card}): its zero-shot here is noise and the numbers show the workflow, not CLIP's "
                       "accuracy — for real numbers pass real weights (e.g. backbone='ViT-B-16-quickgelu', "
                       "pretrained='openai')")
    else:
        meaning = (f"test scores of K-shot runs over {seeds} seed(s) (± std over seeds): they estimate this backbone's "
                   "accuracy on this dataset's test split, not on your own images, and with few seeds or test images "
                   "small differences between methods are noise")
    return (f"Backbone {named}; data {', '.join(data)}; {meaning}. Units: results rows hold fractions (0–1); "
            "summaries, reports and plots show percentages (%).")


def plot_curves(table: pd.DataFrame, metric: str | None = None, columns: int = 3):
    """Metric-vs-shots curves, one panel per dataset, each on its own primary metric unless ``metric`` is given."""
    plt = _pyplot()
    datasets = sorted(table["dataset"].unique())
    cols = min(columns, len(datasets))
    rows_ = -(-len(datasets) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.6 * cols, 3.4 * rows_), squeeze=False)
    for ax in axes.flat[len(datasets):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, datasets):
        plot_accuracy_vs_shots(table[table["dataset"] == name], metric, ax=ax, title=name, legend=False)
    # one legend for all panels, below them, so that it covers no panel's points
    entries = {}
    for ax in axes.flat[:len(datasets)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault("chance level (dotted)" if label.startswith("chance") else label, handle)
    ncol = min(len(entries), 4)
    fig.tight_layout()
    if entries:
        height = fig.get_figheight()
        legend_in = 0.28 * -(-len(entries) // ncol) + 0.2
        fig.set_figheight(height + legend_in)
        fig.legend(list(entries.values()), list(entries), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, legend_in / (height + legend_in), 1, 1))
    return fig


def ranking(table: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Methods ranked within every (dataset, K) by mean over seeds, then averaged: lower rank is better.

    Each dataset is ranked on its own primary metric (unless ``metric`` is given), so ranks are
    comparable across datasets; ``mean_metric`` averages those metrics (%).
    """
    s = summarize(table, metric)   # transductive rows come back marked (mark_transductive)
    s["rank"] = s.groupby(["dataset", "shots"])["mean"].rank(ascending=False, method="average")
    out = s.groupby("method").agg(mean_rank=("rank", "mean"), mean_metric=("mean", "mean"),
                                  wins=("rank", lambda r: int((r == 1).sum())), settings=("rank", "size"))
    out = out.sort_values(["mean_rank", "mean_metric"], ascending=[True, False]).round(2).reset_index()
    return _transductive_column(out) if _any_transductive(table) else out   # the column only when some row is


def calibration_table(table: pd.DataFrame, threshold: float = POOR_CALIBRATION_ECE) -> pd.DataFrame:
    """Mean ECE (15 bins, %) per (dataset, method, K): lower is better calibrated.

    ``poorly_calibrated`` is True where the mean ECE exceeds ``threshold`` (a fraction; 0.10 = 10 points).
    """
    out = summarize(table, "ece").drop(columns="metric").rename(columns={"mean": "ece_mean", "std": "ece_std"})
    out["poorly_calibrated"] = out["ece_mean"] > 100 * threshold
    return out


def _record(out_dir, run_id: str) -> dict:
    import json
    from pathlib import Path

    from .paths import safe_name

    path = Path(out_dir) / "runs" / safe_name(run_id, "run id") / "provenance.json"
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


def top_run(table: pd.DataFrame, metric: str | None = None, dataset: str | None = None) -> str:
    """The ``run_id`` with the highest test score of one dataset (default: the first by name), on its primary
    metric unless ``metric`` is given — a run to look at up close, not a choice of method (see
    :func:`choose_on_validation`)."""
    name = dataset or sorted(table["dataset"].unique())[0]
    rows_ = table[table["dataset"] == name]
    if rows_.empty:
        raise ConfigError(f"no runs of dataset {name!r}; the table has {sorted(table['dataset'].unique())}.")
    return str(rows_.sort_values(dataset_metric(rows_, metric), ascending=False)["run_id"].iloc[0])


def plot_reliability(out_dir, run_id: str, ax=None):
    """Reliability diagram of one run: accuracy against confidence per bin, each bar labelled with its
    number of test images; the title names dataset, method, K, seed and the ECE."""
    plt = _pyplot()
    rec = _record(out_dir, run_id)
    bins = [b for b in rec["metrics"]["calibration"] if b["count"]]
    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 3.8))
    width = rec["metrics"]["calibration"][0]["high"] - rec["metrics"]["calibration"][0]["low"]
    bars = ax.bar([b["low"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge", alpha=0.7,
                  edgecolor="black", label="accuracy per bin (n = images)")
    ax.bar_label(bars, labels=[str(b["count"]) for b in bins], fontsize=6, padding=1)
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    row = rec["row"]
    flag = " — poorly calibrated" if row["ece"] > POOR_CALIBRATION_ECE else ""
    ax.set_title(f"{row['dataset']}: {row['method']} K={row['shots']} seed {row['seed']}\n"
                 f"ECE {100 * row['ece']:.1f}%{flag}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.figure.tight_layout()
    return ax.figure


def validation_column(table: pd.DataFrame, metric: str | None = None) -> str:
    """The column holding each run's K-shot validation score on ``metric`` (default: the primary metric)."""
    metric = dataset_metric(table, metric)
    column = f"val_{metric}"
    if column not in table.columns or table[column].isna().all():
        raise ConfigError(f"the results have no validation scores ({column!r}): they were written before the "
                          "workbench recorded each run's K-shot validation score. Rerun the comparison (finished "
                          "runs are recomputed once) to choose a method without looking at the test split.")
    return column


def choose_on_validation(table: pd.DataFrame, metric: str | None = None, shots: int | None = None) -> str:
    """The method to use, chosen on the K-shot validation sets only — never on a test score.

    For one dataset at ``shots`` (default: the largest K in the table), the method with the best
    mean validation ``metric`` over seeds (each run's score on its split file's K-shot validation
    images, which fitting also used for its own hyper-parameters). Ties — frequent, as the
    validation set holds min(K, 4) images per class — go to the method with the smaller mean fit
    time, then to the one listed first. Report the chosen method's test score once, afterwards
    (:func:`chosen_test_score`): choosing by test score and reporting that same score overstates it.

    The validation illusion: a method that chose its own hyper-parameters (β/α, C, epochs, WiSE-FT
    α) on those same validation images (the rows' ``val_tuned``) looks better on them than it is
    (FewTrans, 2026), which favours tuned methods over untuned ones. A warning names them when
    they are among the candidates; :func:`validation_gap` shows the size of the effect against
    test, and :func:`workbench.recommend` estimates every candidate out of fold instead.
    """
    if table.empty:
        raise ConfigError("the results table is empty; there is nothing to choose from.")
    if table["dataset"].nunique() > 1:
        raise ConfigError(f"choose_on_validation chooses for one dataset; the table has "
                          f"{sorted(table['dataset'].unique())}. Filter it to one.")
    column = validation_column(table, metric)
    k = int(shots) if shots is not None else int(table["shots"].max())
    at_k = table[table["shots"] == k]
    if at_k.empty:
        raise ConfigError(f"no runs at K={k}; the table has K in {sorted(table['shots'].unique())}.")
    order = {m: i for i, m in enumerate(dict.fromkeys(at_k["method"]))}
    means = at_k.groupby("method").agg(val=(column, "mean"), cost=("fit_seconds", "mean")).reset_index()
    means["order"] = means["method"].map(order)
    best = means.sort_values(["val", "cost", "order"], ascending=[False, True, True]).iloc[0]
    tuned = _tuned_on_validation(at_k)
    if tuned:
        import warnings

        warnings.warn(f"choose_on_validation: the K-shot validation scores of {', '.join(tuned)} are optimistic — these "
                      "methods chose hyper-parameters on the same images — so the choice favours them; "
                      "wb.recommend(...) estimates each candidate out of fold.", stacklevel=2)
    return str(best["method"])


def _tuned_on_validation(table: pd.DataFrame) -> list[str]:
    """Methods whose rows say they read (and may have tuned on) their K-shot validation images."""
    if "val_tuned" not in table.columns:
        return []
    tuned = table["val_tuned"].astype(str).str.lower().isin(["true", "1", "1.0"])
    return sorted(table.loc[tuned, "method"].unique())


def validation_gap(table: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """The validation illusion, per (dataset, method, K): mean K-shot validation score, mean test score
    (both %, over seeds), ``gap`` = validation − test, and ``tuned_on_val`` (the method chose its
    hyper-parameters on those validation images, so part of its gap is selection optimism).

    Use it after choosing (:func:`choose_on_validation`), to see how far each method's validation
    score overstates its test score; not to choose by test score.
    """
    parts = []
    for _, rows_ in table.groupby("dataset", sort=True):   # each dataset on its own primary metric
        column = validation_column(rows_, metric)
        test_column = column[len("val_"):]
        tuned = set(_tuned_on_validation(rows_))
        out = (rows_.groupby(["dataset", "method", "shots"], sort=False)
               .agg(validation=(column, "mean"), test=(test_column, "mean"), runs=(column, "size")).reset_index())
        out[["validation", "test"]] *= 100
        out["gap"] = out["validation"] - out["test"]
        out["tuned_on_val"] = out["method"].isin(tuned)
        out["metric"] = metric_label(test_column)
        parts.append(out)
    if not parts:
        raise ConfigError("the results table is empty; there is no validation gap to show.")
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values(["dataset", "shots", "gap"], ascending=[True, True, False]).reset_index(drop=True)


def validation_table(table: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Like :func:`summary_table` on the K-shot validation scores (what :func:`choose_on_validation` sees).

    A method marked ``*`` chose its hyper-parameters on those images: its validation score is
    optimistic (:func:`validation_gap`)."""
    column = validation_column(table, metric)
    s = summarize(table, column)
    s["value"] = s.apply(lambda r: f"{r['mean']:.2f} ± {r['std']:.2f}", axis=1)
    s["metric"] = metric_label(column)
    out = s.pivot(index=["dataset", "method", "metric"], columns="shots", values="value").reset_index()
    out.columns = [c if isinstance(c, str) else f"K={c}" for c in out.columns]
    tuned = set(_tuned_on_validation(table))
    out["method"] = [f"{m} *" if m in tuned else m for m in out["method"]]
    return out


def chosen_test_score(table: pd.DataFrame, method: str, metric: str | None = None, shots: int | None = None) -> str:
    """One line: the chosen method's test score at ``shots`` (default: largest K), mean ± std over seeds."""
    metric = dataset_metric(table, metric)
    k = int(shots) if shots is not None else int(table["shots"].max())
    runs = table[(table["method"] == method) & (table["shots"] == k)]
    if runs.empty:
        raise ConfigError(f"no runs of method {method!r} at K={k} in the results.")
    s = summarize(runs, metric).iloc[0]
    return (f"{method} at K={k}: test {metric_label(metric)} {s['mean']:.2f} ± {s['std']:.2f} "
            f"over {int(s['runs'])} seed(s) — chosen on validation, test scored once")


def write_report(results, out, metric: str | None = None, ece_threshold: float = POOR_CALIBRATION_ECE):
    """Write the comparison tables (Markdown) and figures (PNG) of a results CSV to ``out``.

    Every dataset is reported on its own primary metric unless ``metric`` is given; runs whose
    ECE exceeds ``ece_threshold`` are listed as poorly calibrated.
    """
    from pathlib import Path

    table = results_table(results) if not isinstance(results, pd.DataFrame) else results
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    used = _metrics_used(table, metric)
    named = "; ".join(f"{d}: {metric_label(m)}" for d, m in used.items())
    plot_curves(table, metric).savefig(out / "curves.png", dpi=120)
    calibration = calibration_table(table, ece_threshold)
    poor = calibration[calibration["poorly_calibrated"]]
    lines = [f"# Results ({named})", "",
             f"{len(table)} runs; datasets: {', '.join(used)}; {_describe_runs(table)}.", "",
             "## Mean ± std over seeds (%), on each dataset's metric", "", f"Metric — {named}.", "",
             summary_table(table, metric).to_markdown(index=False), "",
             "![metric vs shots](curves.png)", "", "## Ranking across datasets and shots", "",
             f"Ranked within each (dataset, K) on: {named}; `mean_metric` averages those (%).", "",
             ranking(table, metric).to_markdown(index=False), "", "## Calibration (ECE, %)", "",
             f"Poorly calibrated: mean ECE above {100 * ece_threshold:.0f}% — its confidences should not be "
             "read as probabilities.", ""]
    if not poor.empty:
        lines += [f"**Warning: {len(poor)} of {len(calibration)} settings are poorly calibrated:** "
                  + ", ".join(f"{r.dataset} / {r.method} K={r.shots} ({r.ece_mean:.1f}%)" for r in poor.itertuples())
                  + ".", ""]
    lines += [calibration.to_markdown(index=False), ""]
    runs_dir = Path(results).parent if not isinstance(results, pd.DataFrame) else None
    if runs_dir is not None and (runs_dir / "runs").is_dir():
        best = top_run(table, metric)
        try:
            plot_reliability(runs_dir, best).savefig(out / "reliability.png", dpi=120)
            lines += [f"## One run up close (best test score of {sorted(used)[0]}): {best}", "",
                      per_class_recall(runs_dir, best).to_markdown(index=False),
                      "", "![reliability](reliability.png)", ""]
        except ConfigError:
            pass
    (out / "README.md").write_text("\n".join(lines))
    return out
