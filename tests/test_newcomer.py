"""A newcomer's first hour (issue 22): plain messages, readable outputs, listings without torch."""
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import workbench as wb
from workbench.errors import ConfigError, DataError


@pytest.mark.parametrize("command", ["datasets", "methods"])
def test_listing_commands_answer_without_importing_torch(command):
    code = (f"import sys\nfrom workbench.cli import main\nassert main([{command!r}]) == 0\n"
            "print('TORCH LOADED' if 'torch' in sys.modules else 'NO TORCH')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("NO TORCH")
    assert ("whu_rs19_mini" if command == "datasets" else "clip_lora") in proc.stdout


def test_a_relative_path_that_does_not_exist_says_so_then_lists_the_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"path 'my_images/' does not exist \(looked for it as a path") as err:
        wb.load_dataset("my_images/")
    assert "whu_rs19_mini" in str(err.value)  # then the dataset names
    with pytest.raises(ConfigError, match=r"no dataset named 'my_images'.*does not exist as a path"):
        wb.load_dataset("my_images")


def test_a_csv_manifest_inside_an_image_folder_is_mentioned(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "labels.csv").write_text("path,label\ncat/0.png,cat\n")
    with pytest.warns(UserWarning, match=r"found CSV file\(s\) \['labels.csv'\].*from_csv"):
        ds = wb.data.from_folder(tmp_path, test_fraction=0.34)
    assert any("labels.csv" in n for n in ds.notes)


def test_compare_checks_every_k_before_any_encoding(backbone, whu, monkeypatch):
    def no_encoding(*a, **k):
        raise AssertionError("encoded before checking every K")

    monkeypatch.setattr(wb.FeatureCache, "get", no_encoding)
    with pytest.raises(DataError, match=r"shots=8 .* has only 7 training"):
        wb.compare(whu, backbone, ["zero_shot"], shots=[1, 8], seeds=[1])


def test_closing_line_names_backbone_data_and_what_numbers_can_show():
    rows = pd.DataFrame({"dataset": ["whu_rs19_mini"] * 2, "backbone": ["workbench-tiny"] * 2, "pretrained": ["", ""],
                         "seed": [1, 2], "n_classes": [19, 19], "n_test": [57, 57]})
    line = wb.report.what_the_numbers_show(rows)
    assert "workbench-tiny (random weights" in line and "whu_rs19_mini (19 classes, 57 test images)" in line
    assert "not CLIP's accuracy" in line and "fractions (0–1)" in line and "percentages (%)" in line
    real = wb.report.what_the_numbers_show(rows.assign(backbone="ViT-B-16-quickgelu", pretrained="openai"))
    assert "ViT-B-16-quickgelu (openai)" in real and "random" not in real and "2 seed(s)" in real


def test_predictions_print_label_confidence_and_top_classes_and_keep_every_column():
    from workbench.predictor import Predictions

    table = Predictions(pd.DataFrame({"image": ["a.jpg"], "label": ["viaduct"], "confidence": [0.6],
                                      "prediction_set": [["viaduct", "bridge"]], "set_size": [2],
                                      "bridge": [0.3], "viaduct": [0.6], "river": [0.1]}))
    text = repr(table)
    assert "viaduct" in text and "60.0%" in text and "[viaduct, bridge]" in text
    assert "viaduct 60%, bridge 30%, river 10%" in text
    assert list(table.columns)[-3:] == ["bridge", "viaduct", "river"] and table["viaduct"].iloc[0] == 0.6
    assert "<table" in table._repr_html_() and "top classes" in table._repr_html_()
    assert "top classes" not in repr(table[["bridge", "river"]])  # a slice without 'label' prints as a plain frame


def test_saved_model_and_run_have_readable_reprs(backbone, whu, tmp_path, quiet):
    run = wb.run_experiment(whu, backbone, "zero_shot", shots=1, seed=1, out_dir=tmp_path, save_model=True)
    text = repr(run)
    assert text.startswith("RunResult(zero_shot on whu_rs19_mini with workbench-tiny (random weights), K=1, seed=1")
    assert "test accuracy" in text and "%" in text and "K-shot val" in text
    model = wb.load(run.model_dir, device="cpu")
    text = repr(model)
    assert "Predictor(zero_shot on workbench-tiny (random weights), 19 classes: airport" in text
    assert "prediction sets: yes" in text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.predict([whu.load_image(whu.split("test")[0])])
    assert "top classes" in repr(out) and "coverage=0.9" in repr(out)
