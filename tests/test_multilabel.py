"""Multi-label task kind: sources, greedy few-shot sampling, metrics, methods (issue 23)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import workbench as wb
from workbench.data.multilabel import (MultiLabelDataset, from_csv_multilabel, from_npz_multilabel,
                                       sample_multilabel_few_shot)
from workbench.data.sources import from_csv
from workbench.errors import ConfigError, DataError
from workbench.methods.features.multilabel import MultiLabelTensorTask
from workbench.metrics import best_f1_thresholds, binary_ece, compute_multilabel_metrics, sigmoid


def _images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 10 % 255, 0, 0)).save(folder / f"{i}.png")


@pytest.fixture
def columns_csv(tmp_path):
    _images(tmp_path / "img", 6)
    rows = ["path,Edema,Effusion,sex",
            "img/0.png,1,0,F", "img/1.png,0,1,M", "img/2.png,-1,1,F",
            "img/3.png,1,,M", "img/4.png,0,0,F", "img/5.png,1.0,1,M"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "m.csv"


def test_csv_columns_uncertain_policies(columns_csv):
    got = {}
    for policy in ("ignore", "zeros", "ones"):
        ds = from_csv(columns_csv, findings=["Edema", "Effusion"], uncertain=policy, test_fraction=0.2,
                      groups=["sex"])
        assert isinstance(ds, MultiLabelDataset) and ds.task == "multi_label"
        allv = {s.id: s.targets for ss in ds.splits.values() for s in ss}
        got[policy] = (allv["img/2.png"], allv["img/3.png"])
        assert ds.groups["sex"]["img/0.png"] == "F"
    assert got == {"ignore": ((-1, 1), (1, -1)), "zeros": ((0, 1), (1, 0)), "ones": ((1, 1), (1, 1))}


def test_csv_bad_input_named(columns_csv, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(columns_csv.read_text().replace("img/4.png,0,0,F", "img/4.png,0,yes,F"))
    with pytest.raises(DataError, match=r"row 6.*'Effusion'.*'yes'"):
        from_csv(bad, findings=["Edema", "Effusion"])
    with pytest.raises(DataError, match="no column 'age'.*groups"):
        from_csv(columns_csv, findings=["Edema", "Effusion"], groups=["age"])
    none = tmp_path / "none.csv"
    none.write_text(columns_csv.read_text().replace(",1,0,F", ",0,0,F").replace(",1,0", ",0,0")
                    .replace("img/3.png,1,,M", "img/3.png,0,,M").replace("img/5.png,1.0,1,M", "img/5.png,0,1,M"))
    with pytest.raises(DataError, match=r"finding\(s\) \['Edema'\] have no positive"):
        from_csv(none, findings=["Edema", "Effusion"], test_fraction=0.2)
    with pytest.raises(ConfigError, match="uncertain must be one of"):
        from_csv(columns_csv, findings=["Edema"], uncertain="maybe")


def test_csv_separated_list_no_finding_is_empty(tmp_path):
    _images(tmp_path / "img", 8)
    lists = ["Effusion|Infiltration", "No Finding", "Effusion", "", "Infiltration", "Effusion|Mass", "Mass", "No Finding"]
    (tmp_path / "c.csv").write_text("path,findings\n" + "".join(f"img/{i}.png,{v}\n" for i, v in enumerate(lists)))
    ds = from_csv(tmp_path / "c.csv", label_column="findings", label_separator="|", test_fraction=0.25)
    assert ds.class_ids == ["Effusion", "Infiltration", "Mass"]
    allv = {s.id: s.targets for ss in ds.splits.values() for s in ss}
    assert allv["img/0.png"] == (1, 1, 0) and allv["img/1.png"] == (0, 0, 0) and allv["img/3.png"] == (0, 0, 0)
    with pytest.raises(DataError, match="finding 'Mass' .* not in findings"):
        from_csv(tmp_path / "c.csv", label_column="findings", label_separator="|", findings=["Effusion", "Infiltration"])


def test_npz_matrix_and_bad_shape(tmp_path):
    rng = np.random.default_rng(0)
    y = (rng.random((20, 3)) < 0.4).astype(np.uint8)
    y[0] = 1
    np.savez(tmp_path / "chest.npz", train_images=rng.integers(0, 255, (20, 8, 8), dtype=np.uint8), train_labels=y,
             test_images=rng.integers(0, 255, (6, 8, 8), dtype=np.uint8), test_labels=y[:6])
    ds = from_npz_multilabel(tmp_path / "chest.npz", class_names=["a", "b", "c"])
    np.testing.assert_array_equal(ds.targets("train"), y)
    np.savez(tmp_path / "flat.npz", train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros((4, 1)))
    with pytest.raises(DataError, match=r"shape \(4, 1\).*\[4, 3\]"):
        from_npz_multilabel(tmp_path / "flat.npz", class_names=["a", "b", "c"])


@pytest.fixture(scope="module")
def mosaic():
    return wb.load_dataset("whu_rs19_mosaic")


def test_mosaic_yaml_deterministic_and_tiles_never_cross_splits(mosaic):
    again = wb.load_dataset("whu_rs19_mosaic")
    assert mosaic.fingerprint() == again.fingerprint() and mosaic.n_findings == 19
    tiles = {split: {f for s in ss for f in s.ref} for split, ss in mosaic.splits.items()}
    assert not tiles["train"] & tiles["test"]
    t = mosaic.targets("train")
    assert set(np.unique(t)) <= {0, 1} and 1 <= t.sum(1).min() and t.sum(1).max() <= 3
    assert mosaic.load_image(mosaic.split("test")[0]).size == (224, 224)
    assert set(mosaic.groups["site"].values()) == {"A", "B", "C"}


def test_greedy_sampling_k_positives_recorded(mosaic, tmp_path):
    split = sample_multilabel_few_shot(mosaic, 2, seed=3, split_dir=tmp_path)
    support = mosaic.samples(split.train_ids)
    pos = np.array([s.targets for s in support]).sum(0)
    assert (pos >= 2).all() and split.per_class == dict(zip(mosaic.class_ids, pos.tolist()))
    assert not set(split.train_ids) & set(split.val_ids)
    assert not set(split.train_ids) & {s.id for s in mosaic.split("test")}
    assert len(split.train_ids) <= 2 * 19
    assert sample_multilabel_few_shot(mosaic, 2, seed=3, split_dir=tmp_path).train_ids == split.train_ids
    assert sample_multilabel_few_shot(mosaic, 2, seed=4).train_ids != split.train_ids
    fewest = int(mosaic.counts()["train"].min())
    with pytest.raises(DataError, match=f"finding '.*' has only {fewest} positive"):
        sample_multilabel_few_shot(mosaic, fewest + 1, seed=1)


# -- metrics -----------------------------------------------------------------------------------

def _scores(seed=0, n=60, l=4):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, l)) < 0.35).astype(int)
    logits = 2.0 * y + rng.normal(size=(n, l))
    y[0, 0], y[1, 2] = -1, -1
    return logits, y


def test_multilabel_metrics_match_sklearn():
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    logits, y = _scores()
    p = 1 / (1 + np.exp(-logits))
    thr = [0.3, 0.5, 0.6, 0.7]
    m = compute_multilabel_metrics(logits, y, thresholds=thr)
    aucs, aps, f1s, sens, spec = [], [], [], [], []
    for j in range(4):
        k = y[:, j] >= 0
        aucs.append(roc_auc_score(y[k, j], p[k, j]))
        aps.append(average_precision_score(y[k, j], p[k, j]))
        f1s.append(f1_score(y[k, j], p[k, j] >= thr[j]))
        tp = ((p[k, j] >= thr[j]) & (y[k, j] == 1)).sum()
        sens.append(tp / (y[k, j] == 1).sum())
        spec.append(((p[k, j] < thr[j]) & (y[k, j] == 0)).sum() / (y[k, j] == 0).sum())
    np.testing.assert_allclose(m["per_finding_auroc"], aucs)
    np.testing.assert_allclose(m["macro_auroc"], np.mean(aucs))
    np.testing.assert_allclose(m["mAP"], np.mean(aps))
    np.testing.assert_allclose(m["per_finding_f1"], f1s)
    np.testing.assert_allclose(m["sensitivity"], sens)
    np.testing.assert_allclose(m["specificity"], spec)
    known = y >= 0
    np.testing.assert_allclose(m["micro_auroc"], roc_auc_score(y[known], p[known]))
    full = np.where(y < 0, 0, y)   # with no uncertain entries it is sklearn's micro average
    m2 = compute_multilabel_metrics(logits, full)
    np.testing.assert_allclose(m2["micro_auroc"], roc_auc_score(full, p, average="micro"))
    np.testing.assert_allclose(m2["macro_auroc"], roc_auc_score(full, p, average="macro"))


def test_binary_ece_by_hand_and_thresholds():
    p = np.array([0.05, 0.1, 0.55, 0.65, 0.95, 0.97])
    y = np.array([0, 1, 1, 0, 1, 1])
    # 15 equal bins of width 1/15: {0.05}, {0.1}, {0.55}, {0.65}, {0.95, 0.97}
    hand = (abs(0 - .05) + abs(1 - .1) + abs(1 - .55) + abs(0 - .65) + 2 * abs(1 - .96)) / 6
    assert binary_ece(p, y) == pytest.approx(hand, abs=1e-12)
    probs = np.array([[0.1], [0.2], [0.7], [0.8]])
    t = best_f1_thresholds(probs, np.array([[0], [0], [1], [1]]))
    assert 0.2 < t[0] <= 0.7
    assert best_f1_thresholds(probs, np.array([[0], [0], [0], [0]])) == [0.5]


# -- methods ----------------------------------------------------------------------------------

def _ml_task(seed=0, n_find=5, dim=24, n=40, n_val=20):
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(n_find, dim, generator=g), dim=-1)

    def draw(m):
        y = (torch.rand(m, n_find, generator=g) < 0.4).long()
        y[torch.arange(n_find) % m, torch.arange(n_find)] = 1
        x = y.float() @ dirs * 2 + 0.5 * torch.randn(m, dim, generator=g)
        return F.normalize(x, dim=-1), y

    sx, sy = draw(n)
    vx, vy = draw(n_val)
    tx, ty = draw(60)
    neg = F.normalize(torch.randn(n_find, dim, generator=g), dim=-1)
    return MultiLabelTensorTask(sx, sy, vx, vy, dirs, neg), (tx, ty)


def test_chexzero_is_softmax_over_the_pair_float64():
    task, (tx, _) = _ml_task()
    m = wb.get_method("chexzero").fit(task)
    pos, neg = task.pos_neg_text()
    f = tx.double()
    sp, sn = f @ pos.double().T, f @ neg.double().T
    ref = np.exp(sp.numpy()) / (np.exp(sp.numpy()) + np.exp(sn.numpy()))
    np.testing.assert_allclose(m.predict_proba(tx).double().numpy(), ref, atol=1e-6)
    assert len(m.fit_info["thresholds"]) == 5


def test_ovr_probe_learns_and_selects_c_on_validation(tmp_path):
    from sklearn.linear_model import LogisticRegression

    task, (tx, ty) = _ml_task(seed=1)
    m = wb.get_method("ovr_linear_probe", c_grid=[0.01, 1.0, 100.0]).fit(task)
    tried = m.fit_info["val_macro_auroc_per_C"]
    assert m.fit_info["C"] == max(tried, key=lambda c: (tried[c], -c))
    metrics = compute_multilabel_metrics(m.predict_logits(tx), ty, m.fit_info["thresholds"])
    assert metrics["macro_auroc"] > 0.9
    ref = LogisticRegression(C=m.fit_info["C"], max_iter=1000).fit(task.support().x.double().numpy(),
                                                                     task.targets_for(task.support().ids)[:, 2].numpy())
    np.testing.assert_allclose(m.predict_logits(tx)[:, 2].double().numpy(),
                               ref.decision_function(tx.double().numpy()), atol=1e-4)
    loaded = wb.methods.base.Method.load(m.save(tmp_path / "m"))
    torch.testing.assert_close(loaded.predict_logits(tx), m.predict_logits(tx))
    assert loaded.predict_findings(tx[:3]) == m.predict_findings(tx[:3])


def test_registry_refuses_single_label_methods_on_multi_label():
    from workbench.methods.registry import check_method_task, methods_for_task

    assert {"chexzero", "ovr_linear_probe"} <= set(methods_for_task("multi_label"))
    with pytest.raises(ConfigError, match=r"'coop' does not support multi_label.*\['chexzero', 'ovr_linear_probe'"):
        check_method_task("coop", "multi-label")
    with pytest.raises(ConfigError, match="'chexzero' does not support single_label"):
        check_method_task("chexzero", "single_label")


# -- runs -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_mosaic():
    from workbench.data.multilabel import mosaic_dataset
    from workbench.paths import repo_root

    return mosaic_dataset(repo_root() / "data" / "whu_rs19_mini", n_images=30, seed=1, name="mini_mosaic",
                          classes=["airport", "beach", "forest", "port", "river"], templates=["aerial imagery of {}."])


@pytest.fixture(scope="module")
def ml_cache(backbone, tmp_path_factory):
    """One feature cache for the module: the mosaics are encoded once."""
    return wb.FeatureCache(backbone, tmp_path_factory.mktemp("ml_features"), show_progress=False)


def test_run_experiment_multilabel_rows_and_predict(backbone, small_mosaic, ml_cache, tmp_path, quiet):
    mosaic = small_mosaic
    cache = ml_cache
    res = wb.run_experiment(mosaic, backbone, "ovr_linear_probe", 2, 1, cache=cache, out_dir=tmp_path / "out",
                            save_model=True)
    row = res.row
    assert row["metric"] == "macro_auroc" and row["task"] == "multi_label"
    assert 0 <= row["macro_auroc"] <= 1 and 0 <= row["mAP"] <= 1 and np.isnan(row["accuracy"])
    m = res.record["metrics"]
    assert len(m["per_finding_auroc"]) == 5 and m["thresholds"] == res.method.fit_info["thresholds"]
    assert min(res.record["split"]["positives_per_finding"].values()) >= 2
    again = compute_multilabel_metrics(res.logits, res.labels, m["thresholds"])
    assert again["macro_auroc"] == pytest.approx(row["macro_auroc"])
    with pytest.raises(ConfigError, match=r"'linear_probe' does not support multi_label.*chexzero"):
        wb.run_experiment(mosaic, backbone, "linear_probe", 2, 1, cache=cache)
    predictor = wb.load(res.model_dir, device="cpu")
    images = [mosaic.load_image(s) for s in mosaic.split("test")[:3]]
    table = predictor.predict(images)
    assert list(table.columns[:2]) == ["image", "findings"] and list(table.columns[2:]) == mosaic.class_names
    thr = dict(zip(mosaic.class_names, res.method.fit_info["thresholds"]))
    for _, r in table.iterrows():
        assert r["findings"] == [n for n in mosaic.class_names if r[n] >= thr[n]]
    feats = backbone.encode_images(torch.stack([backbone.preprocess(i) for i in images])).cpu()
    np.testing.assert_allclose(table[mosaic.class_names].to_numpy(), res.method.predict_proba(feats).numpy(),
                               atol=1e-5)


# -- subgroup audits ----------------------------------------------------------------------------

def test_audit_es_auc_gap_worst_and_flags_float64():
    from sklearn.metrics import roc_auc_score

    from workbench.audit import subgroup_audit

    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, n)
    groups = np.array(["F"] * 90 + ["M"] * 90 + ["X"] * 19 + ["Z"])
    noise = np.where(groups == "M", 2.5, 0.8)
    s = y + noise * rng.normal(size=n)
    logits = np.stack([-s, s], 1)   # single-label, 2 classes
    a = subgroup_audit(logits, y, groups, attribute="sex", n_boot=100)
    t = a.table.set_index("group")
    auc = {g: roc_auc_score(y[groups == g], s[groups == g]) for g in ("F", "M")}
    overall = roc_auc_score(y, s)
    assert a.overall == pytest.approx(overall) and t.loc["F", "value"] == pytest.approx(auc["F"])
    assert a.worst_group == "M" and a.gap == pytest.approx(auc["F"] - auc["M"])
    assert a.es_auc == pytest.approx(overall / (1 + abs(auc["F"] - overall) + abs(auc["M"] - overall)))
    assert t.loc["X", "flag"].startswith("small") and t.loc["Z", "flag"] == "one image"
    assert np.isnan(t.loc["Z", "value"])
    assert t.loc["F", "ci_low"] < auc["F"] < t.loc["F", "ci_high"]
    assert a.plot() is not None
    from workbench.audit import fast_auroc
    ties = np.round(s, 1)
    assert fast_auroc(y, ties) == pytest.approx(roc_auc_score(y, ties))


def test_audit_run_on_multilabel_and_missing_column(backbone, small_mosaic, ml_cache, quiet):
    from workbench.audit import audit_run

    cache = ml_cache
    res = wb.run_experiment(small_mosaic, backbone, "chexzero", 2, 1, cache=cache)
    a = audit_run(res, small_mosaic, "site", n_boot=50, min_group=2)
    assert set(a.table["group"]) <= {"A", "B", "C"} and a.table["n"].sum() == len(res.test_ids)
    with pytest.raises(DataError, match="no group column 'sex'.*'site'"):
        audit_run(res, small_mosaic, "sex")


def test_compare_on_multilabel_and_refusal_before_work(backbone, small_mosaic, ml_cache, quiet):
    cache = ml_cache
    with pytest.raises(ConfigError, match="'tip_adapter' does not support multi_label"):
        wb.compare(small_mosaic, backbone, ["chexzero", "tip_adapter"], [2], [1], cache=cache)
    table = wb.compare(small_mosaic, backbone, ["chexzero", "ovr_linear_probe"], [2], [1], cache=cache)
    assert list(table["method"]) == ["chexzero", "ovr_linear_probe"]
    assert table["macro_auroc"].between(0, 1).all() and table["mAP"].between(0, 1).all()
    assert (table["metric"] == "macro_auroc").all() and table["accuracy"].isna().all()


def test_single_label_csv_groups_and_audit(backbone, tmp_path, quiet):
    from workbench.audit import audit_run

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = ["path,label,sex"]
    for i in range(24):
        colour = (200, 30, 30) if i % 2 else (30, 30, 200)
        Image.fromarray((np.array(colour) + rng.integers(0, 40, (16, 16, 3))).clip(0, 255).astype(np.uint8)).save(
            tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{'red' if i % 2 else 'blue'},{'F' if i % 3 else 'M'}")
    (tmp_path / "s.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="no column 'age'.*groups"):
        from_csv(tmp_path / "s.csv", groups=["age"])
    ds = from_csv(tmp_path / "s.csv", groups=["sex"], test_fraction=0.5)
    assert ds.groups["sex"]["3.png"] == "M" and len(ds.groups["sex"]) == 24   # ids relative to the data root
    res = wb.run_experiment(ds, backbone, "linear_probe", 2, 1, cache=wb.FeatureCache(backbone, None, show_progress=False))
    a = audit_run(res, ds, "sex", metric="accuracy", n_boot=50, min_group=2)
    t = a.table.set_index("group")
    pred = res.logits.argmax(1).numpy()
    sex = np.array([ds.groups["sex"][i] for i in res.test_ids])
    assert t.loc["F", "value"] == pytest.approx((pred == res.labels.numpy())[sex == "F"].mean())
    assert a.es_auc is None and t["n"].sum() == 12


def test_multilabel_yaml_csv_source_with_groups(tmp_path, monkeypatch):
    import yaml

    _images(tmp_path / "imgs", 10)
    lists = ["Effusion", "Mass", "Effusion|Mass", "No Finding", "Effusion", "Mass", "Effusion", "Mass|Effusion",
             "No Finding", "Mass"]
    (tmp_path / "entry.csv").write_text("Image Index,Finding Labels,Patient Gender\n" + "".join(
        f"{i}.png,{v},{'MF'[i % 2]}\n" for i, v in enumerate(lists)))
    spec = {"name": "cxr_tiny", "domain": "medical", "task": "multi_label",
            "source": {"kind": "csv", "path": str(tmp_path / "entry.csv"), "root": str(tmp_path / "imgs"),
                       "path_column": "Image Index", "label_column": "Finding Labels", "label_separator": "|",
                       "groups": ["Patient Gender"], "test_fraction": 0.3},
            "classes": {"Effusion": "effusion", "Mass": "mass"}, "templates": ["a chest X-ray showing {}."],
            "metric": "macro_auroc", "licence": "test", "citation": "test"}
    (tmp_path / "cxr.yaml").write_text(yaml.safe_dump(spec))
    ds = wb.load_dataset(str(tmp_path / "cxr.yaml"))
    assert ds.task == "multi_label" and ds.class_names == ["effusion", "mass"] and ds.metric == "macro_auroc"
    assert ds.groups["Patient Gender"]["3.png"] == "F"
    single = dict(spec, task="single_label")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(single))
    with pytest.raises(DataError, match="multi-label set; add 'task: multi_label'"):
        wb.load_dataset(str(tmp_path / "bad.yaml"))
