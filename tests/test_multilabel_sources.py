"""Hub sources for multi-label sets (a list column) and group columns for audits, with in-memory datasets."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from workbench.data.multilabel import MultiLabelDataset
from workbench.data.sources import from_hub
from workbench.errors import DataError


def _images(n):
    return [Image.fromarray(np.full((8, 8, 3), 20 * i, dtype=np.uint8)) for i in range(n)]


@pytest.fixture
def hub_lists():
    import datasets as hfds

    train = hfds.Dataset.from_dict({
        "image": _images(6),
        "labels": [["water", "tree"], [], ["building"], ["tree", "No Finding"], ["water"], ["building", "tree"]],
        "sex": ["F", "M", "F", "M", "F", "M"],
    }, features=hfds.Features({"image": hfds.Image(), "labels": hfds.Sequence(hfds.Value("string")),
                               "sex": hfds.Value("string")}))
    test = hfds.Dataset.from_dict({"image": _images(2), "labels": [["tree"], ["water", "building"]],
                                   "sex": ["F", "M"]}, features=train.features)
    return hfds.DatasetDict({"train": train, "test": test})


def test_hub_list_column_is_multi_label_with_groups(hub_lists):
    ds = from_hub(hub_lists, name="lists", label_column="labels", groups=["sex"])
    assert isinstance(ds, MultiLabelDataset) and ds.task == "multi_label"
    assert ds.class_ids == ["building", "tree", "water"]               # every name seen, sorted
    np.testing.assert_array_equal(ds.targets("train"), [[0, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1],
                                                        [1, 1, 0]])   # "No Finding" and [] = no finding
    np.testing.assert_array_equal(ds.targets("test"), [[0, 1, 0], [1, 0, 1]])
    assert ds.groups["sex"]["train/1"] == "M" and ds.groups["sex"]["test/0"] == "F"
    assert ds.load_image(ds.split("train")[2]).size == (8, 8)
    fixed = from_hub(hub_lists, name="lists", label_column="labels", findings=["water", "tree", "building"])
    assert fixed.class_ids == ["water", "tree", "building"]
    np.testing.assert_array_equal(fixed.targets("test"), [[0, 1, 0], [1, 0, 1]])


def test_hub_class_label_lists_and_bad_input_named(hub_lists):
    import datasets as hfds

    ids = hfds.Dataset.from_dict({"image": _images(4), "y": [[0, 1], [1], [2], [0]]},
                                 features=hfds.Features({"image": hfds.Image(),
                                                         "y": hfds.Sequence(hfds.ClassLabel(names=["a", "b", "c"]))}))
    ds = from_hub(ids, name="ids", label_column="y", test_fraction=0.25)
    assert ds.class_ids == ["a", "b", "c"] and ds.targets("train").shape[1] == 3
    with pytest.raises(DataError, match=r"no column 'site' \(set by groups\).*'sex'"):
        from_hub(hub_lists, name="lists", label_column="labels", groups=["site"])
    with pytest.raises(DataError, match=r"finding 'tree' is not in findings=\['water', 'building'\]"):
        from_hub(hub_lists, name="lists", label_column="labels", findings=["water", "building"])


def test_hub_single_label_keeps_groups_and_names_a_missing_one():
    import datasets as hfds

    one = hfds.Dataset.from_dict({"image": _images(8), "label": [0, 1] * 4, "site": list("ABABABAB")},
                                 features=hfds.Features({"image": hfds.Image(),
                                                         "label": hfds.ClassLabel(names=["cat", "dog"]),
                                                         "site": hfds.Value("string")}))
    ds = from_hub(one, name="pets", groups=["site"], test_fraction=0.25)
    assert not isinstance(ds, MultiLabelDataset) and ds.class_ids == ["cat", "dog"]
    every = [s.id for ss in ds.splits.values() for s in ss]
    assert {ds.groups["site"][i] for i in every} == {"A", "B"}
    with pytest.raises(DataError, match=r"no column 'sex' \(set by groups\)"):
        from_hub(one, name="pets", groups=["sex"])
    with pytest.raises(DataError, match="findings= is for a multi-label set"):
        from_hub(one, name="pets", findings=["cat"])


def test_mlrsnet_yaml_reads_the_concatenated_label_csvs(tmp_path):
    """The YAML's 60 findings are the label CSVs' column names (cugbrs/MLRSNet labels/*.csv header)."""
    import csv

    from workbench.domains import dataset_from_spec, load_spec

    spec = load_spec("mlrsnet")
    findings = list(spec["classes"])
    assert len(findings) == 60 and spec["task"] == "multi_label" and "habor" in findings
    (tmp_path / "Images" / "airplane").mkdir(parents=True)

    def write(n):
        rows = []
        for i in range(n):
            name = f"airplane_{i:05d}.jpg"
            Image.fromarray(np.full((8, 8, 3), i % 250, dtype=np.uint8)).save(tmp_path / "Images" / "airplane" / name)
            cells = {f: int(j in (i % 60, 1)) for j, f in enumerate(findings)}   # finding i mod 60, and 'airport'
            rows.append({"image": name, "path": f"airplane/{name}", **cells})
        with open(tmp_path / "labels.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["image", *findings, "path"])
            w.writeheader()
            w.writerows(rows)

    spec["source"].update(path=str(tmp_path / "labels.csv"), root=str(tmp_path / "Images"), test_fraction=0.1)
    write(240)
    ds = dataset_from_spec(spec)
    assert ds.class_ids == findings and ds.class_names[findings.index("habor")] == "harbor"
    assert len(ds.split("train")) + len(ds.split("test")) == 240 and (ds.targets("train")[:, 1] == 1).all()
    write(12)
    with pytest.raises(DataError, match="no positive image in the 'train' split"):
        dataset_from_spec(spec)   # 12 images cannot show 60 findings: named, not silently dropped


def test_multi_label_yaml_with_a_hub_source_and_groups(hub_lists, tmp_path):
    """A ``task: multi_label`` YAML over a Hub repo (here a local parquet copy): list column + groups."""
    from workbench.domains import dataset_from_spec, validate_spec

    (tmp_path / "repo" / "data").mkdir(parents=True)
    for split, table in hub_lists.items():
        table.to_parquet(str(tmp_path / "repo" / "data" / f"{split}-00000-of-00001.parquet"))
    spec = validate_spec({"name": "hub_lists", "domain": "remote_sensing", "task": "multi_label",
                          "source": {"kind": "hub", "repo_id": str(tmp_path / "repo"), "label_column": "labels",
                                     "groups": ["sex"]},
                          "classes": {"water": "water", "tree": "trees", "building": "buildings"},
                          "templates": ["a photo of {}."], "licence": "test", "citation": "test"}, "hub_lists.yaml")
    spec["_file"] = "hub_lists.yaml"
    ds = dataset_from_spec(spec)
    assert ds.class_ids == ["water", "tree", "building"] and ds.class_names[1] == "trees"
    np.testing.assert_array_equal(ds.targets("test"), [[0, 1, 0], [1, 0, 1]])
    assert ds.groups["sex"]["test/1"] == "M"
    spec["source"]["groups"] = ["age"]
    with pytest.raises(DataError, match=r"no column 'age' \(set by groups\)"):
        dataset_from_spec(spec)


def test_offline_mosaic_set_supports_k_up_to_8_and_refuses_16():
    import warnings

    import workbench as wb
    from workbench.data.multilabel import sample_multilabel_few_shot

    ds = wb.load_dataset("whu_rs19_mosaic")
    counts = ds.counts()
    assert counts["train"].min() >= 15 and counts["test"].min() >= 6      # balanced: every finding is testable
    for seed in (1, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")                                   # no validation shortfall either
            split = sample_multilabel_few_shot(ds, 8, seed)
        assert min(split.per_class.values()) >= 8
    with pytest.raises(DataError, match="positive"):
        sample_multilabel_few_shot(ds, 16, 1)


def test_the_three_csv_readers_share_one_reader_and_its_errors(tmp_path):
    """Single-label, multi-label and pair CSVs: the same encoding and missing-column errors (data/csvfile.py)."""
    from workbench.data.multilabel import from_csv_multilabel
    from workbench.data.pairs import pairs_from_csv
    from workbench.data.sources import from_csv

    bad = tmp_path / "bad.csv"
    bad.write_bytes("path,label,Edema,caption\nx.png,caf\xe9,1,a\n".encode("latin-1"))
    calls = [lambda: from_csv(bad), lambda: from_csv_multilabel(bad, findings=["Edema"]),
             lambda: pairs_from_csv(bad, image_column="path", caption_columns="caption")]
    for call in calls:
        with pytest.raises(DataError, match=r"is not valid utf-8-sig text \(byte \d+ is .*encoding='latin-1'"):
            call()
    good = tmp_path / "good.csv"
    good.write_text("file,label,Edema,caption\nx.png,a,1,a\n")
    for call, param in [(lambda: from_csv(good), "path_column"),
                        (lambda: from_csv_multilabel(good, findings=["Edema"]), "path_column"),
                        (lambda: pairs_from_csv(good, image_column="path", caption_columns="caption"), "image_column")]:
        with pytest.raises(DataError, match=rf"has no column 'path' \(set by {param}\); its columns are \['file'"):
            call()
