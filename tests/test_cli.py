import subprocess
import sys

import pandas as pd
import pytest

import workbench as wb
from workbench.cli import main


def test_cli_datasets_run_and_summarize(tmp_path, capsys, monkeypatch, quiet):
    assert main(["datasets"]) == 0
    assert "whu_rs19_mini" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--dataset", "pneumoniamnist_mini", "--shots", "1", "--seeds", "1", "--out", "rel"]) == 0
    out = capsys.readouterr().out
    # --out is taken from the current directory, not the repository
    assert len(pd.read_csv(tmp_path / "rel" / "results.csv")) == 2
    assert f"results: {tmp_path / 'rel' / 'results.csv'}" in out
    # the summary is on the dataset's primary metric (its YAML says balanced_accuracy), named in the header
    assert "pneumoniamnist_mini — balanced accuracy (%)" in out and "workbench-tiny-scenes (scenes-v1) · 1 seed" in out
    assert main(["summarize", "rel/results.csv"]) == 0
    out = capsys.readouterr().out
    assert "linear_probe" in out and "balanced accuracy (%)" in out
    assert main(["run", "--dataset", "nope"]) == 2
    assert "no dataset named 'nope'" in capsys.readouterr().err


def test_run_takes_a_data_path_relative_to_the_current_directory(tmp_path, capsys, monkeypatch, quiet):
    monkeypatch.chdir(wb.repo_root() / "data")
    assert main(["run", "--dataset", "pneumoniamnist_mini/pneumoniamnist_mini.npz", "--methods", "zero_shot",
                 "--shots", "1", "--seeds", "1", "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "results.csv")
    assert list(table["dataset"]) == ["pneumoniamnist_mini"] and list(table["method"]) == ["zero_shot"]


def test_help_does_not_load_torch_and_documents_the_run_options():
    code = ("import sys\nfrom workbench.cli import main\n"
            "for argv in (['--help'], ['run', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('TORCH LOADED' if 'torch' in sys.modules else 'NO TORCH')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("NO TORCH")
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for option, default in (("--methods", "zero_shot,linear_probe"), ("--shots", "1,2,4"), ("--seeds", "1,2,3")):
        assert option in text and f"(default: {default})" in text
    assert "comma-separated K, support images per class" in text
    assert "a CSV manifest or a MedMNIST" in text and ".npz" in text and "relative to the current directory" in text
    assert "methods" in text.split("run")[0]  # the command list names the methods command


def test_methods_command_prints_the_details_table(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    details = wb.available_methods(details=True)
    for column in details.columns:
        assert column in out
    for name in ("zero_shot", "linear_probe", "gda", "coop", "clip_lora"):
        assert name in out


@pytest.mark.parametrize("raised, expected", [
    (KeyboardInterrupt(), "interrupted — rerun the same command to resume"),
    (wb.errors.Interrupted("interrupted — rerun the same command to resume (3 of 8 runs done, saved in x).", 3, 8),
     "(3 of 8 runs done, saved in x)"),
])
def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path, capsys, monkeypatch, raised, expected):
    def interrupted(*args, **kwargs):
        raise raised

    monkeypatch.setattr(wb, "load_dataset", interrupted)
    assert main(["run", "--dataset", "pneumoniamnist_mini", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_bad_shots_are_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--dataset", "pneumoniamnist_mini", "--shots", "1,two"])
    assert exit_.value.code == 2
    assert "expected comma-separated integers such as 1,2,4; got '1,two'" in capsys.readouterr().err
