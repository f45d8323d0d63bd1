import pandas as pd

from workbench.cli import main


def test_cli_datasets_run_and_summarize(tmp_path, capsys, quiet):
    assert main(["datasets"]) == 0
    assert "whu_rs19_mini" in capsys.readouterr().out
    assert main(["run", "--dataset", "pneumoniamnist_mini", "--shots", "1", "--seeds", "1",
                 "--out", str(tmp_path)]) == 0
    assert len(pd.read_csv(tmp_path / "results.csv")) == 2
    capsys.readouterr()
    assert main(["summarize", str(tmp_path / "results.csv")]) == 0
    assert "linear_probe" in capsys.readouterr().out
    assert main(["run", "--dataset", "nope"]) == 2
    assert "no dataset named 'nope'" in capsys.readouterr().err
