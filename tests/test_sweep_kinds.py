"""Sweeps over the task kinds beyond one label per image: multi-label sets, unlabeled pools, image–text pairs."""
import warnings

import numpy as np
import pandas as pd
import pytest
import yaml

import workbench as wb
from workbench.errors import ConfigError
from workbench.paths import repo_root
from workbench.sweep import sweep


@pytest.fixture(scope="module")
def mosaic_yaml(tmp_path_factory):
    """The offline mosaic YAML (domains/remote_sensing/whu_rs19_mosaic.yaml), with fewer images and findings."""
    spec = yaml.safe_load((repo_root() / "domains" / "remote_sensing" / "whu_rs19_mosaic.yaml").read_text())
    spec["name"] = "sweep_mosaic"
    spec["source"].update(n_images=36, seed=3)
    spec["classes"] = {k: spec["classes"][k] for k in ("airport", "beach", "forest", "port", "river")}
    path = tmp_path_factory.mktemp("mosaic") / "sweep_mosaic.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_a_multi_label_sweep_keeps_its_columns_and_summarises_on_macro_auroc(mosaic_yaml, tmp_path, quiet):
    out = tmp_path / "sweep"
    summary = sweep({"datasets": [mosaic_yaml], "methods": ["chexzero", {"name": "ovr_linear_probe",
                                                                         "params": {"c_grid": [0.1, 10.0]}}],
                     "shots": [1], "seeds": [1], "output_dir": str(out)}, show_progress=False)
    assert (summary.done, summary.failed) == (2, 0)
    table = pd.read_csv(out / "results.csv")
    for col in ("macro_auroc", "micro_auroc", "mAP", "macro_sensitivity", "macro_specificity"):
        assert table[col].between(0, 1).all(), col
    assert table["accuracy"].isna().all() and set(table["metric"]) == {"macro_auroc"}
    assert set(table["task"]) == {"multi_label"}
    # the pool held the greedy K-positives splits: the cells encoded nothing more
    assert summary.cell_encoded == 0 and summary.pool_encoded > 0
    s = wb.summarize(table)
    assert set(s["metric"]) == {"macro_auroc"} and len(s) == 2
    got = s.set_index("method").loc["chexzero", "mean"]
    assert got == pytest.approx(100 * table[table["method"] == "chexzero"]["macro_auroc"].mean(), abs=0.01)
    ax = wb.report.plot_accuracy_vs_shots(table)
    assert "macro AUROC" in ax.figure.axes[0].get_ylabel() or "AUROC" in ax.figure.axes[0].get_ylabel()


def test_a_method_of_another_kind_is_refused_before_any_encoding(mosaic_yaml, tmp_path, monkeypatch):
    from workbench.features import FeatureCache

    def no_encoding(*args, **kwargs):
        raise AssertionError("an image was encoded before the task kinds were checked")

    monkeypatch.setattr(FeatureCache, "get", no_encoding)
    monkeypatch.setattr(FeatureCache, "pool", no_encoding)
    with pytest.raises(ConfigError, match=r"sweep_mosaic.yaml' \(multi_label\).*'linear_probe' does not support "
                                          r"multi_label.*'ovr_linear_probe'"):
        sweep({"datasets": [mosaic_yaml], "methods": ["chexzero", "linear_probe"], "shots": [1], "seeds": [1],
               "output_dir": str(tmp_path / "s")}, show_progress=False)
