"""Image–text pairs from the user's side: the listing, the command line (retrieve, finetune-pairs)."""
import json

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
