import csv

import numpy as np
import pytest
from PIL import Image

from workbench.data import from_csv, from_folder, from_hub, from_npz
from workbench.data.dataset import Dataset, Sample
from workbench.errors import DataError


def _img(path, colour=(100, 150, 200), size=16, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), colour if mode == "RGB" else 128).save(path)


@pytest.fixture
def folder(tmp_path):
    for cls in ("footballfield", "sea_lake"):
        for i in range(10):
            _img(tmp_path / "imgs" / cls / f"{i}.png", (i * 20, 50, 90))
    return tmp_path / "imgs"


def test_folder_readable_names_and_stratified_holdout(folder):
    ds = from_folder(folder, class_names={"footballfield": "football field"})
    assert ds.class_ids == ["footballfield", "sea_lake"]
    assert ds.class_names == ["football field", "sea lake"]  # mapped, then derived
    assert len(ds.split("test")) == 6 and len(ds.split("train")) == 14  # 30% of each class
    assert {s.label for s in ds.split("test")} == {0, 1}
    again = from_folder(folder)
    assert [s.id for s in again.split("test")] == [s.id for s in ds.split("test")]  # deterministic
    assert "held out" in ds.notes[0]


def test_folder_with_split_subfolders(tmp_path):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            _img(tmp_path / split / cls / "x.png")
    ds = from_folder(tmp_path)
    assert sorted(ds.splits) == ["test", "train"]
    assert ds.split("train")[0].id == "train/a/x.png"


def test_corrupt_images_are_skipped_and_recorded(folder):
    (folder / "sea_lake" / "broken.jpg").write_bytes(b"garbage")
    (folder / "sea_lake" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = from_folder(folder)
    assert ds.skipped == [{"id": "sea_lake/broken.jpg", "reason": ds.skipped[0]["reason"]}]
    assert "UnidentifiedImageError" in ds.skipped[0]["reason"]
    assert any("ignored 1 file" in n for n in ds.notes)
    with pytest.raises(DataError, match="max_bad_fraction"):
        from_folder(folder, max_bad_fraction=0.01)


def test_folder_errors_name_the_problem(tmp_path, folder):
    with pytest.raises(DataError, match="does not exist"):
        from_folder(tmp_path / "nope")
    (folder / "empty_class").mkdir()
    with pytest.raises(DataError, match="'empty_class' has no readable images"):
        from_folder(folder)
    (folder / "empty_class").rmdir()
    with pytest.raises(DataError, match="not classes of the data"):
        from_folder(folder, class_names={"footbalfield": "football field"})


def test_duplicate_readable_names_rejected(folder):
    with pytest.raises(DataError, match="duplicate readable class name"):
        from_folder(folder, class_names={"footballfield": "x", "sea_lake": "x"})


def test_csv_manifest(tmp_path):
    rows = []
    for i in range(6):
        _img(tmp_path / "im" / f"{i}.png", (i * 30, 0, 0))
        rows.append({"file": f"im/{i}.png", "diagnosis": "normal" if i % 2 else "pneumonia",
                     "split": "test" if i >= 4 else "train"})
    rows.append({"file": "im/missing.png", "diagnosis": "normal", "split": "train"})
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "diagnosis", "split"])
        w.writeheader()
        w.writerows(rows)
    with pytest.warns(UserWarning, match="missing"):
        ds = from_csv(path, path_column="file", label_column="diagnosis", split_column="split",
                      classes=["normal", "pneumonia"], max_bad_fraction=0.5)
    assert ds.class_names == ["normal", "pneumonia"]
    assert len(ds.split("train")) == 4 and len(ds.split("test")) == 2
    assert ds.skipped[0]["id"] == "im/missing.png"
    with pytest.raises(DataError, match=r"no column 'path' \(set by path_column\); its columns are \['file'"):
        from_csv(path, label_column="diagnosis")
    with pytest.raises(DataError, match=r"label 'pneumonia' \(row 2\) is not in the class list"):
        from_csv(path, path_column="file", label_column="diagnosis", classes=["normal", "covid"])


def test_npz_medmnist_layout(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "x.npz"
    np.savez(path, train_images=rng.integers(0, 255, (8, 28, 28), dtype=np.uint8),
             train_labels=np.array([[0], [1]] * 4), test_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
             test_labels=np.array([[0], [1], [0], [1]]))
    ds = from_npz(path, class_names=["normal", "pneumonia"])
    assert len(ds.split("train")) == 8 and ds.load_image(ds.split("train")[0]).mode == "RGB"
    with pytest.raises(DataError, match="label 1 at index 1 is not a class index 0..0"):
        from_npz(path, class_names=["normal"])  # one class: label 1 is invalid
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match="no 'train_images' key"):
        from_npz(bad, class_names=["a"])


def test_dataset_checks_labels_and_unique_ids():
    with pytest.raises(DataError, match="outside 0..1"):
        Dataset("d", ["a", "b"], ["a", "b"], {"train": [Sample("x", 2, None)]})
    with pytest.raises(DataError, match="appears in split"):
        Dataset("d", ["a"], ["a"], {"train": [Sample("x", 0, None)], "test": [Sample("x", 0, None)]})
    ds = Dataset("d", ["a"], ["a"], {"train": [Sample("x", 0, None)]})
    with pytest.raises(DataError, match="no split 'tset'.*Did you mean 'test'|no split 'tset'"):
        ds.split("tset")


def _parquet_repo(tmp_path, label_feature="classlabel"):
    import datasets as hfds

    images = [Image.new("RGB", (12, 12), (i * 40, 10, 10)) for i in range(6)]
    feats = hfds.Features({"img": hfds.Image(),
                           "target": hfds.ClassLabel(names=["angular_leaf_spot", "healthy"])
                           if label_feature == "classlabel" else hfds.Value("string")})
    labels = [0, 1, 0, 1, 0, 1] if label_feature == "classlabel" else ["rust", "healthy"] * 3
    root = tmp_path / "repo" / "data"
    root.mkdir(parents=True)
    for split, idx in (("train", range(4)), ("validation", range(4, 6))):
        d = hfds.Dataset.from_dict({"img": [images[i] for i in idx], "target": [labels[i] for i in idx]},
                                   features=feats)
        d.to_parquet(str(root / f"{split}-00000.parquet"))
    return tmp_path / "repo"


def test_hub_loader_up_to_the_network_boundary(tmp_path):
    repo = _parquet_repo(tmp_path)
    ds = from_hub(str(repo), image_column="img", label_column="target", cache_dir=str(tmp_path / "hf"),
                  class_names={"angular_leaf_spot": "angular leaf spot"}, test_fraction=0.5)
    assert ds.class_names == ["angular leaf spot", "healthy"]
    assert sorted(ds.splits) == ["test", "train", "val"]
    assert len(ds.split("val")) == 2 and ds.load_image(ds.split("val")[0]).size == (12, 12)
    with pytest.raises(DataError, match="no column 'image'.*Did you mean"):
        from_hub(str(repo), cache_dir=str(tmp_path / "hf"), label_column="target")
    with pytest.raises(DataError, match="no split 'tets'"):
        from_hub(str(repo), image_column="img", label_column="target", cache_dir=str(tmp_path / "hf"),
                 splits={"train": "train", "test": "tets"})


def test_hub_string_labels_and_missing_repo(tmp_path):
    repo = _parquet_repo(tmp_path, "string")
    ds = from_hub(str(repo), image_column="img", label_column="target", cache_dir=str(tmp_path / "hf"))
    assert ds.class_ids == ["healthy", "rust"]
    with pytest.raises(DataError, match="could not load Hub dataset"):
        from_hub("no-such-org/no-such-dataset-xyz", cache_dir=str(tmp_path / "hf"))
