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
    import json

    thresholds = [json.loads(t) for t in table["thresholds"]]   # chosen on the K-shot validation set, per finding
    assert all(len(t) == 5 and all(0 <= v <= 1 for v in t) for t in thresholds)
    assert not table["transductive"].any() and table["unlabeled_source"].fillna("").eq("").all()
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


def test_a_sweep_with_an_unlabeled_pool_keys_and_flags_the_methods_that_use_it(tmp_path, quiet):
    from workbench.sweep import SweepSpec, cells

    base = {"datasets": ["pneumoniamnist_mini"], "methods": ["zero_shot", "transclip"], "shots": [2], "seeds": [1],
            "output_dir": str(tmp_path / "s")}
    first = sweep({**base, "unlabeled": "test"}, show_progress=False)
    assert (first.done, first.failed) == (2, 0)
    table = first.table.set_index("method")
    assert table.loc["transclip", "transductive"] and table.loc["transclip", "unlabeled_source"] == "test"
    assert not table.loc["zero_shot", "transductive"] and table.loc["zero_shot", "unlabeled_source"] == ""
    # the pool is part of the key of the methods that use it only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = {c["method"]: c["cell_id"] for c in cells(SweepSpec(**base))}
    keyed = {c["method"]: c for c in cells(SweepSpec(**base, unlabeled="test"))}
    assert keyed["zero_shot"]["cell_id"] == plain["zero_shot"] and "unlabeled" not in keyed["zero_shot"]
    assert keyed["transclip"]["unlabeled"] == "test"
    # the same keys as compare() gives the same runs: the two share one table
    assert keyed["transclip"]["cell_id"] == plain["transclip"]   # no pool named: "test", as compare defaults
    second = sweep({**base, "unlabeled": "train"}, show_progress=False)
    assert (second.done, second.skipped) == (1, 1)               # only transclip, with its new pool, runs
    rows = second.table[second.table["method"] == "transclip"].set_index("unlabeled_source")
    assert set(rows.index) == {"test", "split:train"} and not rows.loc["split:train", "transductive"]
    s = wb.summarize(second.table)
    assert "transclip [transductive]" in set(s["method"]) and "transclip" in set(s["method"])


def test_unlabeled_test_under_the_paper_protocol_is_refused_in_the_spec(tmp_path):
    base = {"datasets": ["pneumoniamnist_mini"], "methods": ["zero_shot", "transclip"], "shots": [1], "seeds": [1],
            "output_dir": str(tmp_path / "s"), "protocol": "paper"}
    with pytest.raises(ConfigError, match="protocol='paper'"):
        sweep({**base, "unlabeled": "test"}, show_progress=False)
    with pytest.raises(ConfigError, match="protocol='paper'"):   # transclip would fall back to "test"
        sweep(base, show_progress=False)
    with pytest.raises(ConfigError, match="'tda'.*takes unlabeled='test'"):
        sweep({**base, "protocol": "default", "methods": ["tda"], "unlabeled": "train"}, show_progress=False)
    with pytest.raises(ConfigError, match="'unlabeled' .*does not exist"):
        sweep({**base, "protocol": "default", "unlabeled": "no/such/folder"}, show_progress=False)


def test_a_pair_dataset_in_a_sweep_adds_retrieval_rows_to_the_same_table(tmp_path, quiet):
    out = tmp_path / "s"
    summary = sweep({"datasets": ["whu_rs19_mini", "whu_rs19_pairs"], "methods": ["zero_shot"], "shots": [1, 2],
                     "seeds": [1], "output_dir": str(out)}, show_progress=False)
    assert (summary.done, summary.failed) == (3, 0)        # K=1, K=2 on the classes; one retrieval cell
    table = pd.read_csv(out / "results.csv")
    retrieval = table[table["protocol"] == "retrieval"].iloc[0]
    assert retrieval["dataset"] == "whu_rs19_pairs" and retrieval["metric"] == "mean_recall"
    assert 0 <= retrieval["mean_recall"] <= 1 and retrieval["n_captions"] > 0 and retrieval["shots"] == 0
    for col in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
        assert 0 <= retrieval[col] <= 1
    direct = wb.compare(wb.load_pairs("whu_rs19_pairs"), wb.load_backbone(device="cpu"), ["zero_shot"], [1], [1],
                        protocol="retrieval")
    assert retrieval["mean_recall"] == pytest.approx(direct["mean_recall"].iloc[0])
    classification = table[table["protocol"] != "retrieval"]
    assert set(classification["metric"]) == {"accuracy"} and classification["mean_recall"].isna().all()
    s = wb.summarize(table).set_index("dataset")
    assert s.loc["whu_rs19_pairs", "metric"] == "mean_recall" and set(s.loc["whu_rs19_mini", "metric"]) == {"accuracy"}
    again = sweep({"datasets": ["whu_rs19_mini", "whu_rs19_pairs"], "methods": ["zero_shot"], "shots": [1, 2],
                   "seeds": [1], "output_dir": str(out)}, show_progress=False)
    assert (again.done, again.skipped) == (0, 3)


def test_a_retrieval_sweep_fine_tunes_a_pairs_method_and_refuses_classification_only_methods(tmp_path, quiet):
    summary = sweep({"datasets": ["whu_rs19_pairs"], "protocol": "retrieval", "shots": [1], "seeds": [1],
                     "methods": [{"name": "pairs_lora", "params": {"steps": 1, "batch_size": 8, "lr": 1e-2}}],
                     "output_dir": str(tmp_path / "s")}, show_progress=False)
    assert (summary.done, summary.failed) == (1, 0)
    row = summary.table.iloc[0]
    assert row["method"] == "pairs_lora" and row["protocol"] == "retrieval" and row["fit_seconds"] > 0
    with pytest.raises(ConfigError, match=r"'linear_probe' does not support retrieval.*pairs_lora"):
        sweep({"datasets": ["whu_rs19_pairs"], "methods": ["linear_probe"], "shots": [1], "seeds": [1],
               "output_dir": str(tmp_path / "t")}, show_progress=False)
    with pytest.raises(ConfigError, match="runner 'notebook' runs classification cells"):
        sweep({"datasets": ["whu_rs19_pairs"], "runner": "notebook", "methods": ["zero_shot"], "shots": [1],
               "seeds": [1], "output_dir": str(tmp_path / "v")}, show_progress=False)
    with pytest.raises(ConfigError, match="protocol 'retrieval' needs an image–text pair dataset"):
        sweep({"datasets": ["whu_rs19_mini"], "protocol": "retrieval", "methods": ["zero_shot"], "shots": [1],
               "seeds": [1], "output_dir": str(tmp_path / "u")}, show_progress=False)


def test_rows_that_name_no_metric_are_summarised_on_their_task_kinds_primary_metric():
    from workbench.experiment import _primary_metric

    ml = pd.DataFrame({"dataset": ["m", "m"], "method": ["chexzero"] * 2, "shots": [1, 1], "metric": ["", None],
                       "task": ["multi_label"] * 2, "macro_auroc": [0.6, 0.8], "accuracy": [np.nan, np.nan]})
    assert _primary_metric(ml) == "macro_auroc"
    assert wb.summarize(ml)["mean"].iloc[0] == pytest.approx(70.0)
    pairs = pd.DataFrame({"dataset": ["p"], "protocol": ["retrieval"], "metric": [np.nan]})
    assert _primary_metric(pairs) == "mean_recall"
    assert _primary_metric(pd.DataFrame({"dataset": ["d"]})) == "accuracy"


def test_recommend_refuses_a_pair_dataset_naming_what_to_use(backbone):
    from workbench.recommend import recommend

    with pytest.raises(ConfigError, match="image–text pair dataset.*protocol='retrieval'"):
        recommend(wb.load_pairs("whu_rs19_pairs"), backbone, ["zero_shot"], shots=1, seeds=[1], budget="seconds")
    with pytest.raises(ConfigError, match="image–text pair dataset"):
        recommend("whu_rs19_pairs", backbone, None, shots=1, seeds=[1], budget="seconds")
