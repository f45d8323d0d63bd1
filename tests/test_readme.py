"""The README's code blocks marked runnable run as written, offline (issue 22: a newcomer's first hour)."""
import re
import warnings

import pytest

import workbench as wb

MARK = "<!-- runnable:"


def runnable_blocks() -> list[str]:
    text = (wb.repo_root() / "README.md").read_text()
    return [m.group(1) for m in re.finditer(re.escape(MARK) + r"[^\n]*\n```python\n(.*?)```", text, re.S)]


def test_the_in_python_snippet_is_marked_runnable():
    blocks = runnable_blocks()
    assert blocks and any("wb.compare(" in b and "predict(" in b for b in blocks)


@pytest.mark.parametrize("code", runnable_blocks(), ids=lambda c: c.strip().splitlines()[1][:40])
def test_readme_block_runs_as_written_offline_without_warnings(code, tmp_path, monkeypatch, capsys):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)          # its outputs/ go to a scratch folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "fewer validation images than asked"
        # the one warning the snippet is meant to show: validation scores of tuned methods are optimistic
        warnings.filterwarnings("default", message=r"choose_on_validation: the K-shot validation scores", category=UserWarning)
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "workbench-tiny-scenes" in out and "whu_rs19_mini" in out   # the closing line names backbone and data
    assert "never saw images like these" in out                     # ... and says the offline model knows no real images
    assert "prediction_set" in out and "top classes" in out   # predict() reads well
    assert (tmp_path / "outputs" / "my_run" / "results.csv").is_file()
