"""Image–text pairs from the user's side: the listing, the command line (retrieve, finetune-pairs)."""
import json
import subprocess
import sys

import pandas as pd
import pytest

import workbench as wb
from workbench.cli import main
from workbench.data.pairs import pair_specs_dir
from workbench.errors import ConfigError


def test_list_datasets_lists_the_pair_yamls_with_their_task_kind():
    table = wb.list_datasets()
    pair_names = {p.stem for p in pair_specs_dir()}
    assert pair_names >= {"rsicd", "rsitmd", "ucm_captions", "roco_radiology", "whu_rs19_pairs"}
    pairs = table[table["task"] == "retrieval"]
    assert set(pairs["name"]) == pair_names
    assert set(pairs["metric"]) == {"mean_recall"} and set(pairs["classes"]) == {0}
    offline = pairs.set_index("name").loc["whu_rs19_pairs"]
    assert offline["offline"] and offline["domain"] == "remote_sensing" and offline["source"] == "offline_pairs"
    assert "karpathy_json:" in pairs.set_index("name").loc["rsicd", "source"]   # every source, in order
    # the classification rows are as before: kinds from their YAMLs, one row per YAML under domains/<domain>/
    rest = table[table["task"] != "retrieval"]
    assert len(rest) == len(list(wb.domains.domains_dir().glob("*/*.yaml")))
    assert set(rest["task"]) == {"single_label", "multi_label"}
    assert rest.set_index("name").loc["whu_rs19_mini", "classes"] == 19
    # filters: a domain, a task kind (aliases accepted); the notebooks' offline default stays a classification set
    assert set(wb.list_datasets("medical", "pairs")["name"]) == {"roco_radiology"}
    assert set(wb.list_datasets(task="multi-label")["task"]) == {"multi_label"}
    assert wb.domains.offline_dataset("remote_sensing") != "whu_rs19_pairs"
    with pytest.raises(ConfigError, match="unknown task kind|task"):
        wb.list_datasets(task="captions")


def test_a_pair_name_given_to_load_dataset_says_how_to_load_it():
    with pytest.raises(ConfigError, match=r"image–text pair dataset.*wb\.load_pairs\('whu_rs19_pairs'\)"):
        wb.load_dataset("whu_rs19_pairs")


def test_cli_datasets_shows_the_pair_sets_and_filters_by_task(capsys):
    assert main(["datasets", "--task", "retrieval"]) == 0
    out = capsys.readouterr().out
    assert "whu_rs19_pairs" in out and "rsicd" in out and "retrieval" in out and "whu_rs19_mini" not in out
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "whu_rs19_mini" in out and "whu_rs19_pairs" in out
    code = ("import sys\nfrom workbench.cli import main\nmain(['datasets', '--task', 'retrieval'])\n"
            "print('TORCH LOADED' if 'torch' in sys.modules else 'NO TORCH')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("NO TORCH"), proc.stderr   # the listing stays light


@pytest.fixture
def pair_csv(tmp_path):
    """12 bundled images with two captions each; every third one is a test image."""
    images = sorted((wb.repo_root() / "data" / "whu_rs19_mini").glob("*/*.jpg"))[:12]
    rows = [{"image": str(p), "a": f"a photo of {p.parent.name}", "b": f"{p.parent.name} from above",
             "split": "test" if i % 3 == 0 else "train"} for i, p in enumerate(images)]
    pd.DataFrame(rows).to_csv(tmp_path / "pairs.csv", index=False)
    return tmp_path / "pairs.csv"


def test_cli_finetune_pairs_on_the_offline_set_saves_a_backbone(backbone, tmp_path, capsys, monkeypatch, quiet):
    monkeypatch.chdir(tmp_path)   # --out is taken from the current directory
    assert main(["finetune-pairs", "--pairs", "whu_rs19_pairs", "--steps", "1", "--batch-size", "8", "--lr", "1e-2",
                 "--out", "adapted"]) == 0
    out = capsys.readouterr().out
    assert "pairs_lora on whu_rs19_pairs" in out and ": 1 steps" in out and '"test": 0' in out
    assert "next: workbench retrieve --pairs whu_rs19_pairs --backbone " + str(tmp_path / "adapted") in out
    meta = json.loads((tmp_path / "adapted" / "backbone.json").read_text())
    assert meta["adapted_by"]["method"] == "pairs_lora" and meta["adapted_by"]["fit_info"]["steps"] == 1
    assert meta["weights_hash"] != backbone.weights_hash


def test_cli_retrieve_scores_the_base_and_the_fine_tuned_backbone_in_one_table(pair_csv, capsys, monkeypatch, quiet):
    monkeypatch.chdir(pair_csv.parent)
    common = ["--pairs", "pairs.csv", "--caption-columns", "a,b", "--split-column", "split"]
    assert main(["finetune-pairs", *common, "--method", "pairs_svd", "--steps", "2", "--batch-size", "8",
                 "--lr", "1e-2", "--out", "adapted"]) == 0
    assert main(["retrieve", *common, "--out", "r"]) == 0
    assert main(["retrieve", *common, "--backbone", "adapted", "--out", "r"]) == 0
    out = capsys.readouterr().out
    assert "i2t_R@1" in out and "t2i_R@10" in out and "mean_recall" in out   # the R@K table
    table = pd.read_csv(pair_csv.parent / "r" / "results.csv", keep_default_na=False)
    assert list(table["pretrained"]) == ["", str(pair_csv.parent / "adapted")]   # before and after
    assert set(table["protocol"]) == {"retrieval"}
    assert list(table["n_test"]) == [4, 4] and list(table["n_captions"]) == [8, 8]
    printed = out.strip().splitlines()[-2].split()   # the adapted backbone's row, as printed
    assert float(printed[printed.index("zero_shot") + 7]) == pytest.approx(100 * table["mean_recall"].iloc[1], abs=0.01)
    # the folder fine-tuned again (WiSE-FT alpha 0: the base weights): retrieve scores the new weights, not an old row
    assert main(["finetune-pairs", *common, "--steps", "1", "--batch-size", "8", "--wise-alpha", "0",
                 "--out", "adapted"]) == 0
    assert main(["retrieve", *common, "--backbone", "adapted", "--out", "r"]) == 0
    again = pd.read_csv(pair_csv.parent / "r" / "results.csv", keep_default_na=False)
    # new weights in the same folder: a new key (their fingerprint), so a new row beside the old one's
    assert len(again) == 3 and again["cell_id"].iloc[2] != table["cell_id"].iloc[1]
    assert again["mean_recall"].iloc[2] == table["mean_recall"].iloc[0]   # alpha 0 scores as the base


def test_cli_pairs_commands_give_clear_errors(pair_csv, capsys, monkeypatch):
    monkeypatch.chdir(pair_csv.parent)
    assert main(["retrieve", "--pairs", "pairs.csv", "--caption-columns", "caption", "--out", "r"]) == 2
    assert "has no column 'caption'" in capsys.readouterr().err
    assert main(["retrieve", "--pairs", "whu_rs19_mini", "--out", "r"]) == 2
    assert "no pair dataset named 'whu_rs19_mini'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["finetune-pairs", "--pairs", "whu_rs19_pairs", "--wise-alpha", "2"])
    assert "expected a number in [0, 1] or 'val'" in capsys.readouterr().err


def test_pairs_notebook_parameters_are_checked_before_any_work():
    from workbench.notebook import check_parameters, declared_parameters

    nb = "12_image_text_pairs.ipynb"
    defaults = {k: v["default"] for k, v in declared_parameters(nb).items()}
    assert check_parameters(dict(defaults), nb)["wise_alpha"] == "val"
    assert check_parameters(dict(defaults, wise_alpha=0.5), nb)["wise_alpha"] == 0.5   # papermill -p wise_alpha 0.5
    assert check_parameters(dict(defaults, pairs="domains/remote_sensing/pairs/rsicd.yaml"), nb)   # from the root
    for bad, message in [({"wise_alpha": [0.5]}, r"'wise_alpha' should be Union\[float, str\]"),
                         ({"wise_alpha": 2}, "'wise_alpha': expected 'val'.*got 2"),
                         ({"wise_alpha": "best"}, "'wise_alpha': expected 'val'"),
                         ({"pairs": "whu_rs19_mini"}, "no pair dataset named 'whu_rs19_mini'"),
                         ({"pairs": "no/such.yaml"}, "pair-dataset YAML 'no/such.yaml' does not exist"),
                         ({"pairs_method": "clip_lora"}, "does not support retrieval"),
                         ({"steps": -1}, "'steps': expected a non-negative integer")]:
        with pytest.raises(ConfigError, match=message):
            check_parameters(dict(defaults, **bad), nb)


def test_pairs_bench_takes_vit_b16_at_a_cpu_batch_and_says_so(monkeypatch):
    import argparse
    import importlib

    monkeypatch.syspath_prepend(str(wb.repo_root() / "bench"))
    bench = importlib.import_module("pairs")
    args = argparse.Namespace(device="cpu", batch=64, vit_batch=None, configs="pairs_lora,plain_full")
    assert bench.batch_for("workbench-tiny", args) == (64, "")
    batch, note = bench.batch_for("ViT-B-16", args)
    assert batch == bench.VIT_CPU_BATCH < 64 and "not the issue's 64" in note and "too slow on this CPU" in note
    assert bench.batch_for("ViT-B-16", argparse.Namespace(**{**vars(args), "vit_batch": 64})) == (64, "")
    assert bench.batch_for("ViT-B-16", argparse.Namespace(**{**vars(args), "device": "cuda:1"})) == (64, "")
