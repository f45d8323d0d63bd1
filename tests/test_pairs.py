"""Image–text pairs: data sources and their bad input, chunked retrieval recalls vs a float64 brute force."""
import shutil

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.retrieval import caption_truncation
from workbench.data.pairs import (OFFLINE_CARD, load_pair_spec, load_pairs, pair_specs_dir,
                                  pairs_from_csv, pairs_from_hub, pairs_from_karpathy_json, validate_pair_spec)
from workbench.errors import ConfigError, DataError
from workbench.retrieval import retrieval_recalls

FIXTURE = wb.repo_root() / "data" / "whu_rs19_mini"


@pytest.fixture
def images(tmp_path):
    """Six distinct small images copied into tmp_path/imgs."""
    src = sorted(FIXTURE.glob("*/*.jpg"))[:60:10]
    out = tmp_path / "imgs"
    out.mkdir()
    for i, p in enumerate(src):
        shutil.copy(p, out / f"im{i}.jpg")
    return out


def _csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


# -- data -------------------------------------------------------------------------------------

def test_csv_with_several_caption_columns_and_splits(images, tmp_path):
    rows = [(f"imgs/im{i}.jpg", f"a scene {i}", f"another view {i}", "train" if i < 3 else "val" if i < 4 else "test")
            for i in range(6)]
    ds = pairs_from_csv(_csv(tmp_path / "p.csv", ["image", "c1", "c2", "split"], rows),
                        caption_columns=["c1", "c2"], split_column="split")
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 3, "val": 1, "test": 2}
    assert ds.split("test")[0].captions == ("a scene 4", "another view 4")
    texts, owner = ds.texts("test")
    assert texts[2] == "a scene 5" and owner == [0, 0, 1, 1]
    # one caption per row, the same image on several rows: grouped into one image
    rows = [("imgs/im0.jpg", "first"), ("imgs/im0.jpg", "second"), ("imgs/im1.jpg", "third")] + \
           [(f"imgs/im{i}.jpg", f"x{i}") for i in range(2, 6)]
    ds = pairs_from_csv(_csv(tmp_path / "q.csv", ["image", "caption"], rows), test_fraction=0.3, val_fraction=0.0)
    merged = [s for ss in ds.splits.values() for s in ss if s.id == "imgs/im0.jpg"][0]
    assert merged.captions == ("first", "second") and sum(len(v) for v in ds.splits.values()) == 6


def test_bad_pair_input_is_refused_with_rows_and_columns(images, tmp_path):
    header = ["image", "caption", "label"]
    rows = [(f"imgs/im{i}.jpg", f"scene {i}" if i != 2 else "", i) for i in range(6)]
    path = _csv(tmp_path / "p.csv", header, rows)
    with pytest.raises(DataError, match=r"1 image\(s\) have no caption: 'imgs/im2.jpg' \(row 4\).*drop_uncaptioned"):
        pairs_from_csv(path)
    with pytest.warns(UserWarning, match="skipped 1 image"):
        ds = pairs_from_csv(path, drop_uncaptioned=True)
    assert ds.skipped == [{"id": "imgs/im2.jpg", "row": 4, "reason": "no caption", "kind": "caption"}]
    with pytest.raises(DataError, match="caption column 'label' holds only numbers"):
        pairs_from_csv(path, caption_columns=["label"])
    empty = _csv(tmp_path / "e.csv", ["image", "caption"], [(f"imgs/im{i}.jpg", "") for i in range(3)])
    with pytest.raises(DataError, match="caption column 'caption' is empty"):
        pairs_from_csv(empty)
    with pytest.raises(DataError, match="no column 'captions'.*Did you mean"):
        pairs_from_csv(path, caption_columns="captions")


def test_the_same_image_in_two_splits_is_refused_naming_the_rows(images, tmp_path):
    shutil.copy(images / "im0.jpg", images / "copy_of_im0.jpg")   # identical bytes, another name
    rows = [("imgs/im0.jpg", "a", "train"), ("imgs/im1.jpg", "b", "train"), ("imgs/copy_of_im0.jpg", "c", "test"),
            ("imgs/im3.jpg", "d", "test")]
    with pytest.raises(DataError, match=r"1 image\(s\) appear in two splits.*'imgs/im0.jpg' \(train, row 2\) = "
                                        r"'imgs/copy_of_im0.jpg' \(test, row 4\)"):
        pairs_from_csv(_csv(tmp_path / "d.csv", ["image", "caption", "split"], rows), split_column="split")
    rows = [("imgs/im0.jpg", "a", "train"), ("imgs/im0.jpg", "b", "test"), ("imgs/im1.jpg", "c", "test")]
    with pytest.raises(DataError, match=r"'imgs/im0.jpg' is listed in split 'train' \(row 2\) and in split 'test' "
                                        r"\(row 3\)"):
        pairs_from_csv(_csv(tmp_path / "s.csv", ["image", "caption", "split"], rows), split_column="split")


def test_karpathy_json_merges_repeated_filenames(images, tmp_path):
    import json

    data = {"images": [{"filename": f"im{i}.jpg", "split": "train" if i < 4 else "test",
                        "sentences": [{"raw": f"caption {i}.{j}"} for j in range(5)]} for i in range(6)]}
    data["images"].append({"filename": "im5.jpg", "split": "test", "sentences": [{"raw": "one more"}]})
    path = tmp_path / "dataset_x.json"
    path.write_text(json.dumps(data))
    ds = pairs_from_karpathy_json(path, image_root=images, val_fraction=0.25)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 3, "val": 1, "test": 2}
    assert len(ds.split("test")[1].captions) == 6
    data["images"][0]["filename"] = "../outside.jpg"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="points outside image_root"):
        pairs_from_karpathy_json(path, image_root=images)


def test_hub_pairs_with_a_list_caption_column_up_to_the_network_boundary(tmp_path):
    import datasets as hfds
    from PIL import Image

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    imgs = [Image.new("RGB", (16, 16), (i * 40, 10, 10)) for i in range(6)]
    feats = hfds.Features({"image": hfds.Image(), "captions": hfds.Sequence(hfds.Value("string")),
                           "path": hfds.Value("string")})
    for split, idx in (("train", range(4)), ("val", range(4, 6))):
        hfds.Dataset.from_dict({"image": [imgs[i] for i in idx], "captions": [[f"c{i}a", f"c{i}b"] for i in idx],
                                "path": [f"p{i}.png" for i in idx]}, features=feats
                               ).to_parquet(str(repo / "data" / f"{split}-00000.parquet"))
    ds = pairs_from_hub(str(repo), caption_column="captions", id_column="path", splits={"train": "train", "val": "validation"},
                        test_fraction=0.25, cache_dir=str(tmp_path / "hf"))
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 3, "val": 2, "test": 1}
    sample = ds.split("val")[0]
    assert sample.captions == ("c4a", "c4b") and ds.reader(sample.ref).size == (16, 16)
    with pytest.raises(DataError, match="no column 'caption'"):
        pairs_from_hub(str(repo), splits={"train": "train"}, cache_dir=str(tmp_path / "hf"))


def test_offline_pairs_card_and_every_pair_yaml_validates():
    names = {load_pair_spec(p)["name"] for p in pair_specs_dir()}
    assert {"rsicd", "rsitmd", "ucm_captions", "roco_radiology", "whu_rs19_pairs"} <= names
    for p in pair_specs_dir():
        spec = load_pair_spec(p)
        assert spec["licence"] and spec["citation"] and spec["task"] == "retrieval"
    ds = load_pairs("whu_rs19_pairs")
    assert "not language understanding" in ds.card and "templated" in ds.card.lower()
    assert "not language understanding" in OFFLINE_CARD
    assert sum(len(v) for v in ds.splits.values()) == 190 and all(len(s.captions) == 5 for s in ds.split("test"))
    assert any("football field" in c for s in ds.split("train") + ds.split("test") + ds.split("val")
               for c in s.captions)
    with pytest.raises(ConfigError, match="unknown key 'sorce'"):
        validate_pair_spec({"name": "x", "sorce": {}}, "x.yaml")


def test_captions_longer_than_the_context_are_counted(backbone):
    info = caption_truncation(["short caption", "word " * 100], backbone.tokenizer)
    assert info["truncated"] == 1 and info["context_length"] == 77 and info["longest_tokens"] > 77


def test_a_pair_dataset_given_to_a_classification_method_is_a_clear_error():
    from workbench.methods.registry import check_method_task

    with pytest.raises(ConfigError, match=r"method 'gda' does not support retrieval tasks.*support it: \['pairs_full', "
                                          r"'pairs_lora', 'pairs_svd'\]"):
        check_method_task("gda", "retrieval")


# -- retrieval metrics ------------------------------------------------------------------------

def _brute_force(img, txt, owner, ks=(1, 5, 10)):
    """RemoteCLIP / clip_benchmark recall_at_k in float64 on the full matrix, with argsort."""
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    scores = txt @ img.T                                  # texts x images
    pos = np.zeros_like(scores, dtype=bool)
    pos[np.arange(len(txt)), owner] = True
    out = {}
    for k in ks:
        top = np.argsort(-scores.T, axis=1, kind="stable")[:, :k]          # images -> texts
        out[f"i2t_R@{k}"] = 100 * np.mean([pos.T[i, top[i]].any() for i in range(len(img))])
    for k in ks:
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out[f"t2i_R@{k}"] = 100 * np.mean([pos[t, top[t]].any() for t in range(len(txt))])
    out["mean_recall"] = np.mean(list(out.values()))
    return out


@pytest.mark.parametrize("memory_mb", [1e-4, 0.01, 256])
def test_chunked_recalls_equal_a_float64_brute_force(memory_mb):
    g = torch.Generator().manual_seed(0)
    n_img, d = 40, 16
    owner = torch.repeat_interleave(torch.arange(n_img), torch.randint(1, 6, (n_img,), generator=g))
    img = torch.randn(n_img, d, generator=g)
    txt = img[owner] + 1.2 * torch.randn(len(owner), d, generator=g)   # noisy captions: recalls between 0 and 100
    got = retrieval_recalls(img, txt, owner, memory_mb=memory_mb)
    ref = _brute_force(img.numpy(), txt.numpy(), owner.numpy())
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key
    assert 0 < got["t2i_R@1"] < got["t2i_R@10"] < 100


def test_recalls_refuse_an_image_without_caption():
    with pytest.raises(DataError, match=r"image\(s\) \[1\] have no caption"):
        retrieval_recalls(torch.randn(3, 4), torch.randn(2, 4), [0, 2])


def test_retrieval_rows_join_the_results_table_and_resume(backbone, tmp_path):
    from workbench.data.pairs import PairDataset

    full = load_pairs("whu_rs19_pairs")
    small = PairDataset("whu_small_pairs", {"train": full.split("train")[:8], "test": full.split("test")[:6]},
                        reader=full.reader, card=full.card)
    out = tmp_path / "results"
    table = wb.compare(small, backbone, ["zero_shot", "pairs_svd"], shots=[1], seeds=[0], out_dir=out,
                       method_params={"pairs_svd": {"steps": 1, "batch_size": 8}})
    assert list(table.columns) == wb.experiment.TABLE_COLUMNS and list(table["method"]) == ["zero_shot", "pairs_svd"]
    assert (table["protocol"] == "retrieval").all() and (table["metric"] == "mean_recall").all()
    zs = table.iloc[0]
    assert zs["n_test"] == 6 and zs["n_captions"] == 30 and 0 <= zs["mean_recall"] <= 1
    emb = wb.retrieval.pair_embeddings(small, backbone, "test")
    ref = _brute_force(emb["image"].numpy(), emb["text"].numpy(), np.array(emb["owner"]))
    assert zs["mean_recall"] == pytest.approx(ref["mean_recall"] / 100, abs=1e-9)
    assert "not language understanding" in zs["note"]
    summary = wb.summarize(wb.results.read_table(out / "results.csv"))
    assert set(summary["metric"]) == {"mean_recall"} and (summary["mean"] <= 100).all()
    again = wb.compare(small, backbone, ["zero_shot", "pairs_svd"], shots=[1], seeds=[0], out_dir=out,
                       method_params={"pairs_svd": {"steps": 1, "batch_size": 8}})
    assert list(again["run_id"]) == list(table["run_id"])   # resumed from the table, not refitted
    with pytest.raises(ConfigError, match="method 'gda' does not support retrieval tasks"):
        wb.compare(small, backbone, ["gda"], shots=[1], seeds=[0])
    with pytest.raises(ConfigError, match="needs an image–text pair dataset"):
        wb.compare(wb.load_dataset("whu_rs19_mini"), backbone, ["zero_shot"], shots=[1], seeds=[0],
                   protocol="retrieval")


def test_tied_scores_are_broken_by_index_as_a_stable_sort():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = torch.tensor([[0.6, 0.8], [0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])   # two identical captions
    owner = [1, 2, 0, 2]
    got = retrieval_recalls(img, txt, owner)
    ref = _brute_force(img.numpy(), txt.numpy(), np.array(owner))
    assert {k: round(v, 9) for k, v in got.items()} == {k: round(v, 9) for k, v in ref.items()}
    # image 2's own caption (index 1) ties with image 1's identical caption (index 0), which comes first
    assert got["i2t_R@1"] == pytest.approx(100 / 3)
