"""The ``retrieval`` protocol's runs: rows of the one results table for image–text pairs.

Kept apart from :mod:`workbench.retrieval` (the recall metrics and embeddings), which the
contrastive fine-tuning methods use to choose WiSE-FT's alpha: the runs fine-tune with those
methods, so the two halves in one module would import each other.
"""
from __future__ import annotations

import time
from typing import Sequence

from .errors import ConfigError
from .retrieval import RETRIEVAL_COLUMNS, evaluate_retrieval  # noqa: F401


def retrieval_row(pairs, backbone, method: str = "zero_shot", seed: int = 0, *, cache=None, adapted=None,
                  fit_seconds: float = float("nan"), fit_info: dict | None = None, out_dir=None,
                  domain: str | None = None) -> dict:
    """One ``protocol="retrieval"`` row of the results table: the test split's recalls.

    ``method="zero_shot"`` scores ``backbone`` as it is; for a pairs method pass the fine-tuned
    backbone as ``adapted`` (what it saw while fitting goes into ``fit_info``: the train split,
    and the val split for WiSE-FT's α — never test).
    """
    from .protocols import _blank_row, _run_id, _save_record

    class _Named:  # _blank_row wants a dataset with a name, domain, metric, class count
        name, n_classes, metric = pairs.name, 0, "mean_recall"
        domain = pairs.domain

    row = _blank_row(_Named, backbone, method, 0, seed, "retrieval", domain)
    row["metric"] = "mean_recall"
    t0 = time.perf_counter()
    scores = evaluate_retrieval(pairs, adapted or backbone, "test", cache)
    # the table holds fractions, as accuracy does (summaries show x100); n_captions, captions_truncated: counts
    row.update({k: scores[k] / 100 if k.startswith(("mean_recall", "i2t_", "t2i_")) else scores[k]
                for k in RETRIEVAL_COLUMNS})
    row.update({"n_test": scores["n_images"], "fit_seconds": fit_seconds,
                "predict_seconds": time.perf_counter() - t0, "skipped_images": len(pairs.skipped),
                "note": pairs.card or ""})
    row["run_id"] = _run_id(f"{pairs.name}-{method}-s{seed}-retrieval",
                            [backbone.provenance_id, (adapted or backbone).provenance_id, pairs.fingerprint()])
    _save_record(out_dir, row, {"protocol": {"protocol": "retrieval", "split": "test",
                                             "reference": "RemoteCLIP retrieval.py / clip_benchmark recall_at_k"},
                                "data": {"fingerprint": pairs.fingerprint(), "source": pairs.source,
                                         "notes": pairs.notes, "card": pairs.card,
                                         "truncation": scores["truncation"]},
                                "fit": fit_info or {}, "backbone": (adapted or backbone).provenance()},
                 backbone.device)
    return row


def retrieval_run(pairs, backbone, method: str, seed: int, *, params: dict | None = None, cache=None, out_dir=None,
                  domain: str | None = None) -> dict:
    """One (method, seed) of the ``retrieval`` protocol, as :func:`compare_retrieval` and a sweep cell run it:
    ``"zero_shot"`` scores ``backbone`` as it is; a ``pairs`` method is fitted on the train split (val for
    WiSE-FT's α) and its fine-tuned backbone scored on test. Returns the row (``retrieval_row``)."""
    from .methods.pairs.contrastive import fine_tune_pairs

    if method == "zero_shot":
        return retrieval_row(pairs, backbone, method, int(seed), cache=cache, out_dir=out_dir, domain=domain,
                             fit_seconds=0.0, fit_info={"saw": "nothing (the backbone as it is)"})
    t0 = time.perf_counter()
    fitted = fine_tune_pairs(pairs, backbone, method, cache=cache, **{"seed": int(seed), **dict(params or {})})
    return retrieval_row(pairs, backbone, method, int(seed), cache=cache, adapted=fitted.backbone_,
                         fit_seconds=time.perf_counter() - t0, fit_info=fitted.fit_info, out_dir=out_dir,
                         domain=domain)


def check_retrieval_methods(pairs, methods: Sequence[str]) -> None:
    """Refuse a classification dataset, or a method that cannot run on pairs, naming those that can."""
    from .data.pairs import PairDataset
    from .methods.registry import check_method_task

    if not isinstance(pairs, PairDataset):
        raise ConfigError(f"protocol 'retrieval' needs an image–text pair dataset (wb.load_pairs(...)); "
                          f"{getattr(pairs, 'name', pairs)!r} is a classification dataset.")
    for m in methods:
        if m != "zero_shot":
            check_method_task(m, "retrieval")


def compare_retrieval(pairs, backbone, methods: Sequence[str], seeds: Sequence[int] = (0,), *, cache=None,
                      method_params: dict | None = None, out_dir=None, domain: str | None = None,
                      resume: bool = True):
    """``compare(pairs, ..., protocol="retrieval")``: one row per (method, seed) in the one results table.

    ``"zero_shot"`` scores the backbone as it is; a ``pairs`` method (``pairs_lora``, ``pairs_svd``,
    ``pairs_full``) is fitted on the train split (val for WiSE-FT) and its fine-tuned backbone
    scored on test. A classification-only method is refused, naming the methods that support pairs.
    """
    import pandas as pd

    from .features import FeatureCache
    from .results import ResultsTable, backbone_weights_key, make_cell

    check_retrieval_methods(pairs, methods)
    unknown = sorted(set(method_params or {}) - set(methods))
    if unknown:
        raise ConfigError(f"method_params names {unknown}, which are not among the methods {list(methods)}.")
    cache = cache if cache is not None else FeatureCache(backbone, None, show_progress=False)
    table = ResultsTable(out_dir) if out_dir is not None else None
    done = table.done_rows() if (table is not None and resume) else {}
    rows = []
    for m in methods:
        params = dict((method_params or {}).get(m) or {})
        for seed in seeds:
            cell = make_cell(pairs.name, backbone.name, backbone.pretrained, m, 0, int(seed), params=params,
                             protocol="retrieval", extra={"backbone_weights": backbone_weights_key(backbone)})
            if cell["cell_id"] in done:
                rows.append(done[cell["cell_id"]])
                continue
            row = retrieval_run(pairs, backbone, m, int(seed), params=params, cache=cache, out_dir=out_dir,
                                domain=domain)
            row.update({"cell_id": cell["cell_id"], "method_label": m})
            if table is not None:
                table.append(row, replace=not resume)
            rows.append(row)
    from .record import TABLE_COLUMNS

    return pd.DataFrame(rows).reindex(columns=TABLE_COLUMNS)
