"""One place that builds progress bars, so notebooks, scripts and CI behave alike.

Uses ``tqdm.auto`` (a widget in JupyterLab, text elsewhere). ``TQDM_DISABLE=1`` in the
environment (set in CI) turns every bar off.
"""
from __future__ import annotations

import os


def progress(iterable=None, **kwargs):
    from tqdm.auto import tqdm

    if os.environ.get("TQDM_DISABLE", "").strip() not in ("", "0", "false", "False"):
        kwargs["disable"] = True
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
