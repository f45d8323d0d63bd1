"""Build a tutorial notebook from a list of (kind, source, tags) cells, stripped of outputs.

Used to (re)write the notebooks in ``notebooks/`` with consistent metadata; the notebooks
themselves are the committed artefacts and may be edited in JupyterLab too.
"""
from __future__ import annotations

import sys

import nbformat


def build(cells, path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, src, tags in cells:
        if "parameters" in (tags or []):
            src = "\n".join(_help_safe(line) for line in src.splitlines())
        cell = nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        if tags:
            cell.metadata["tags"] = list(tags)
        nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    nbformat.validate(nb)
    nbformat.write(nb, path)


def _help_safe(line: str) -> str:
    """papermill's parameter parser gives up on a line whose help comment contains ' = '."""
    if "#" not in line:
        return line
    code, comment = line.split("#", 1)
    return code + "#" + comment.replace('"" = ', "empty means ").replace("[] = ", "empty means ").replace(" = ", " means ")


def strip(path):
    """Remove outputs and execution counts (what the notebook check in the tests expects)."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
    nb.metadata.pop("papermill", None)
    nbformat.write(nb, path)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        strip(p)
