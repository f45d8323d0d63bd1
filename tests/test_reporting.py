"""Reports and plots: each dataset's own metric, chance levels, readable figures, calibration flags,
and choosing a method on validation scores only. Built on small hand-made results tables (no runs)."""
import json

import numpy as np
import pandas as pd
import pytest

import workbench as wb
from workbench import report
from workbench.errors import ConfigError

METHODS = ["zero_shot", "linear_probe", "gda"]


def _table(datasets=(("pneumoniamnist_mini", "balanced_accuracy", 2),), shots=(1, 2, 4), seeds=(1, 2, 3),
           ece=0.05, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for name, metric, n_classes in datasets:
        for method in METHODS:
            for k in shots:
                for s in seeds:
                    scores = {m: float(rng.uniform(0.2, 0.9)) for m in
                              ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")}
                    rows.append({"dataset": name, "domain": "medical", "backbone": "workbench-tiny", "pretrained": "",
                                 "method": method, "shots": k, "seed": s, "metric": metric, **scores, "ece": ece,
                                 "n_classes": n_classes, "fit_seconds": 1.0,
                                 **{f"val_{m}": v for m, v in scores.items()},
                                 "run_id": f"{name}-{method}-K{k}-s{s}"})
    return pd.DataFrame(rows)


# -- the dataset's primary metric everywhere ----------------------------------------------------

def test_summaries_use_each_datasets_metric_and_name_it():
    table = _table((("pneumoniamnist_mini", "balanced_accuracy", 2), ("whu_rs19_mini", "accuracy", 19)))
    summary = report.summary_table(table)
    named = summary.set_index("dataset")["metric"].to_dict()
    assert named == {"pneumoniamnist_mini": "balanced accuracy (%)", "whu_rs19_mini": "accuracy (%)"}
    pneu = table[table.dataset == "pneumoniamnist_mini"]
    gda_k4 = pneu[(pneu.method == "gda") & (pneu.shots == 4)]["balanced_accuracy"].mean() * 100
    cell = summary[(summary.dataset == "pneumoniamnist_mini") & (summary.method == "gda")]["K=4"].iloc[0]
    assert cell.startswith(f"{gda_k4:.2f} ±")
    text = report.summary_text(table)
    assert "pneumoniamnist_mini — balanced accuracy (%)" in text and "whu_rs19_mini — accuracy (%)" in text
    assert "workbench-tiny · 3 seeds" in text
    # an explicit metric wins for every dataset
    assert set(report.summary_table(table, "macro_f1")["metric"]) == {"macro-F1 (%)"}


def test_cli_summarize_defaults_to_the_primary_metric(tmp_path, capsys):
    from workbench.cli import main

    path = tmp_path / "results.csv"
    _table().to_csv(path, index=False)
    assert main(["summarize", str(path)]) == 0
    out = capsys.readouterr().out
    assert "balanced accuracy (%)" in out and "accuracy (%)" not in out.replace("balanced accuracy (%)", "")
    assert main(["summarize", str(path), "--metric", "macro_auroc"]) == 0
    assert "macro AUROC (%)" in capsys.readouterr().out


def test_chance_levels():
    assert report.chance_level("accuracy", 4) == 0.25
    assert report.chance_level("balanced_accuracy", 2) == 0.5
    assert report.chance_level("macro_f1", 10) == pytest.approx(0.1)
    assert report.chance_level("macro_auroc", 19) == 0.5
    assert report.chance_level("macro_auroc", None) == 0.5
    assert report.chance_level("accuracy", None) is None and report.chance_level("ece", 3) is None


# -- plots: figure objects, not pixels -----------------------------------------------------------

def test_curve_names_metric_backbone_seeds_and_draws_chance_with_offset_error_bars():
    table = _table((("whu_rs19_mini", "accuracy", 19),), seeds=(1, 2))
    fig = report.plot_accuracy_vs_shots(table)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "accuracy (%)"
    assert "whu_rs19_mini" in ax.get_title() and "workbench-tiny" in ax.get_title() and "2 seeds" in ax.get_title()
    chance = [line for line in ax.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1 and chance[0].get_ydata()[0] == pytest.approx(100 / 19)
    # one error-bar series per method, shifted sideways around the true K so they do not overlap
    xs = np.array([c.lines[0].get_xdata() for c in ax.containers], dtype=float)
    assert xs.shape == (3, 3)
    for column, k in zip(xs.T, (1, 2, 4)):
        assert len(set(np.round(column, 6))) == 3 and column.min() < k < column.max()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4"]


def test_curve_uses_the_primary_metric_and_auroc_chance(tmp_path):
    table = _table()
    ax = report.plot_accuracy_vs_shots(table).axes[0]
    assert ax.get_ylabel() == "balanced accuracy (%)"
    assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_label().startswith("chance")] == [50.0]
    ax = report.plot_accuracy_vs_shots(table.drop(columns="n_classes"), "macro_auroc").axes[0]
    assert ax.get_ylabel() == "macro AUROC (%)"
    assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_label().startswith("chance")] == [50.0]
    with pytest.raises(ConfigError, match="one dataset"):
        report.plot_accuracy_vs_shots(_table((("a", "accuracy", 2), ("b", "accuracy", 2))))


def test_curves_panel_per_dataset_each_on_its_metric():
    two = (("pneumoniamnist_mini", "balanced_accuracy", 2), ("whu_rs19_mini", "accuracy", 19))
    fig = report.plot_curves(_table(two))
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_visible() and ax.axison]
    assert labels == ["balanced accuracy (%)", "accuracy (%)"]


def _run_record(out_dir, run_id, ece, counts):
    edges = np.linspace(0, 1, len(counts) + 1)
    bins = [{"low": float(lo), "high": float(hi), "count": n, "confidence": (lo + hi) / 2 if n else None,
             "accuracy": 0.5 if n else None} for lo, hi, n in zip(edges[:-1], edges[1:], counts)]
    row = {"dataset": "pneumoniamnist_mini", "method": "gda", "shots": 4, "seed": 1, "ece": ece}
    folder = out_dir / "runs" / run_id
    folder.mkdir(parents=True)
    (folder / "provenance.json").write_text(json.dumps({"row": row, "metrics": {"calibration": bins}}))


def test_reliability_diagram_names_dataset_counts_bins_and_flags_poor_calibration(tmp_path):
    _run_record(tmp_path, "r1", 0.23, [0, 0, 3, 0, 12, 5])
    ax = report.plot_reliability(tmp_path, "r1").axes[0]
    assert "pneumoniamnist_mini" in ax.get_title() and "gda K=4" in ax.get_title()
    assert "ECE 23.0%" in ax.get_title() and "poorly calibrated" in ax.get_title()
    assert sorted(t.get_text() for t in ax.texts) == ["12", "3", "5"]  # images per non-empty bin
    _run_record(tmp_path, "r2", 0.04, [1, 1])
    assert "poorly" not in report.plot_reliability(tmp_path, "r2").axes[0].get_title()


def test_report_flags_poor_calibration_with_its_threshold(tmp_path):
    table = _table()
    table.loc[table.method == "gda", "ece"] = 0.25
    table.to_csv(tmp_path / "results.csv", index=False)
    text = (report.write_report(tmp_path / "results.csv", tmp_path / "rep") / "README.md").read_text()
    assert "balanced accuracy (%)" in text
    assert "ECE above 10%" in text and "Warning: 3 of 9 settings are poorly calibrated" in text
    assert "gda K=1 (25.0%)" in text and "zero_shot K=1 (" not in text
    calibration = report.calibration_table(table)
    assert calibration.set_index(["method", "shots"])["poorly_calibrated"].to_dict()[("gda", 2)]
    assert not report.calibration_table(table, threshold=0.3)["poorly_calibrated"].any()
    ok = (report.write_report(_table(), tmp_path / "rep2") / "README.md").read_text()
    assert "Warning" not in ok


# -- choosing a method without the test split ----------------------------------------------------

def test_choice_is_made_on_validation_and_ignores_test_scores():
    table = _table(shots=(4,))
    table.loc[table.method == "linear_probe", "val_balanced_accuracy"] = 0.95  # best on validation
    assert report.choose_on_validation(table) == "linear_probe"
    poisoned = table.copy()
    for m in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"):  # test scores say: gda, by far
        poisoned[m] = np.where(poisoned.method == "gda", 1.0, 0.0)
    assert report.choose_on_validation(poisoned) == "linear_probe"
    assert report.choose_on_validation(poisoned, metric="accuracy") == report.choose_on_validation(table, "accuracy")
    line = report.chosen_test_score(poisoned, "linear_probe")
    assert "linear_probe at K=4: test balanced accuracy (%) 0.00 ± 0.00 over 3 seed(s)" in line


def test_validation_ties_go_to_the_cheaper_method_and_missing_scores_are_an_error():
    table = _table(shots=(2,))
    table["val_balanced_accuracy"] = 0.5
    table.loc[table.method == "gda", "fit_seconds"] = 0.1
    assert report.choose_on_validation(table) == "gda"
    with pytest.raises(ConfigError, match="no validation scores"):
        report.choose_on_validation(table.drop(columns=[c for c in table if c.startswith("val_")]))
    with pytest.raises(ConfigError, match="no runs at K=8"):
        report.choose_on_validation(table, shots=8)
    assert "K=2" in report.validation_table(table).columns


def test_a_method_tuned_on_its_validation_images_is_flagged_as_optimistic():
    import warnings

    table = _table(shots=(4,))
    table["val_tuned"] = table["method"] == "linear_probe"
    table["val_balanced_accuracy"] = table["balanced_accuracy"] + np.where(table["val_tuned"], 0.2, 0.0)
    with pytest.warns(UserWarning, match=r"validation scores of linear_probe are optimistic"):
        report.choose_on_validation(table)
    gap = report.validation_gap(table).set_index("method")
    assert gap.loc["linear_probe", "gap"] == pytest.approx(20.0) and gap.loc["linear_probe", "tuned_on_val"]
    others = gap.drop(index="linear_probe")
    assert np.allclose(others["gap"], 0.0) and not others["tuned_on_val"].any()
    assert "linear_probe *" in set(report.validation_table(table)["method"])
    table["val_tuned"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # nothing to say when no candidate tuned on its validation images
        report.choose_on_validation(table)
    assert "linear_probe" in set(report.validation_table(table)["method"])


def test_notebook_07_chooses_on_validation():
    nb = json.loads((wb.repo_root() / "notebooks" / "07_bring_your_own_data.ipynb").read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "choose_on_validation" in code and "best_method" not in code
    assert "wb.load_dataset(" in code


def test_runs_record_their_k_shot_validation_scores_and_class_count(backbone, shapes, cache, tmp_path, quiet):
    from workbench.metrics import compute_metrics

    run = wb.run_experiment(shapes, backbone, "linear_probe", 2, 1, cache=cache, split_dir=tmp_path)
    split = wb.sample_few_shot(shapes, 2, 1, split_dir=tmp_path)
    val = cache.get(shapes, split.val(shapes))
    assert len(val.labels) == 2 * shapes.n_classes
    x = val.x if run.method.normalized_input else val.raw.mean(0)
    expected = compute_metrics(run.method.predict_logits(x), val.labels, shapes.n_classes)
    for m in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"):
        assert run.row[f"val_{m}"] == pytest.approx(expected[m])
    assert run.row["n_classes"] == shapes.n_classes == 4


def _points_under_legend(fig, legend) -> int:
    """How many plotted data points (markers and error-bar ends) lie under ``legend`` on the canvas."""
    fig.canvas.draw()
    box = legend.get_window_extent()
    count = 0
    for ax in fig.axes:
        for line in ax.get_lines():
            xy = np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float)
            if line.get_label().startswith("chance"):
                continue
            for x, y in ax.transData.transform(xy):
                count += box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1
    return count


def test_legends_cover_no_data_point_in_one_panel_or_many():
    # many methods with high scores: the case where an inside-the-axes legend sat on the points (notebooks 02, 06)
    table = _table((("whu_rs19_mini", "accuracy", 19),), shots=(1, 2, 4, 8, 16))
    table["accuracy"] = 0.8 + 0.1 * np.random.default_rng(1).uniform(size=len(table))
    fig = report.plot_accuracy_vs_shots(table)
    legend = fig.axes[0].get_legend()
    assert legend is not None and len(legend.get_texts()) == len(METHODS) + 1
    assert _points_under_legend(fig, legend) == 0
    fig.canvas.draw()  # outside the axes: no data can ever sit under it
    assert legend.get_window_extent().x0 >= fig.axes[0].get_window_extent().x1
    two = (("pneumoniamnist_mini", "balanced_accuracy", 2), ("whu_rs19_mini", "accuracy", 19))
    fig = report.plot_curves(_table(two))
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sorted(labels) == sorted([*METHODS, "chance level (dotted)"])
    assert _points_under_legend(fig, fig.legends[0]) == 0
    for ax in fig.axes:  # nor does it overlap a panel
        a, b = ax.get_window_extent(), fig.legends[0].get_window_extent()
        assert not (a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1) or not ax.axison
