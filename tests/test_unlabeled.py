"""Methods that use unlabeled images (TransCLIP, TDA) and ProKeR: their math against plain float64
implementations of the references' updates, their behaviour on synthetic features, and the unlabeled pool
of a run (sources, label spy, overlap, bad input, result rows)."""
import math
import operator
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench.methods.base import Method
from workbench.task import TensorTask
from tests.fakes import random_task
from workbench.errors import ConfigError, DataError
from workbench.methods import get_method
from workbench.methods.features.transclip import transclip_solve


# -- plain dense references (float64), written from the papers' reference code, not from our modules ------

def dense_transclip(x, yhat, lmbda, support=None, labels=None, gammas=(0.0,), val=None, k=3, max_iter=10,
                    z_iter=5, n_conf=8):
    """TransCLIP_solver with a dense affinity matrix and [N, K, d] broadcasts (rows and z in the same order)."""
    n, d = x.shape
    kc = yhat.shape[1]
    z = yhat.clone()
    fs = support is not None
    rows = torch.cat([x, support]) if fs else x
    aff = rows @ x.T
    W = torch.zeros(rows.shape[0], n, dtype=x.dtype)
    top = aff.topk(k + 1, dim=-1).indices[:, 1:]
    for r in range(rows.shape[0]):
        for j in top[r].tolist():
            W[r, j] = aff[r, j]
    if fs:
        y1h = F.one_hot(labels, kc).double()
        mu = y1h.T @ support
    else:
        mu = torch.zeros(kc, d, dtype=x.dtype)
        for c in range(kc):
            idx = z[:, c].topk(min(n_conf, n)).indices
            mu[c] = (x[idx] * z[idx, c:c + 1]).mean(0)
    mu = mu / mu.norm(dim=-1, keepdim=True)
    std = torch.full((d,), 1.0 / d, dtype=x.dtype)
    best_acc, best = -1.0, None
    for gamma in gammas:
        for it in range(max_iter + 1):
            like = -0.5 * (((x[:, None, :] - mu[None]) ** 2) / std).sum(-1)
            for _ in range(z_iter):
                zall = torch.cat([z, y1h]) if fs else z
                inter = like + (50 / (2 * k)) * (W.T @ zall + W[:n] @ z)
                inter = inter - inter.max(1, keepdim=True).values
                inter = yhat ** lmbda * torch.exp(inter / 50)
                z = inter / inter.sum(1, keepdim=True)
            if it == max_iter:
                break
            wq = z / n
            num = wq.T @ x
            den = wq.sum(0)[:, None]
            if fs and gamma > 0:
                ws = y1h * gamma * 50 / support.shape[0]
                num, den = num + ws.T @ support, den + ws.sum(0)[:, None]
            mu = num / den
            mu = mu / mu.norm(dim=-1, keepdim=True)
            sq = torch.einsum("ik,ikd->d", wq, (x[:, None, :] - mu[None]) ** 2)
            tot = wq.sum()
            if fs and gamma > 0:
                sq = sq + torch.einsum("ik,ikd->d", ws, (support[:, None, :] - mu[None]) ** 2)
                tot = tot + ws.sum()
            std = sq / tot
        if val is not None:
            nb = (val[0] @ x.T).argmax(-1)
            acc = float((z[nb].argmax(-1) == val[1]).double().mean())
            if acc > best_acc:
                best_acc, best = acc, z.clone()
        else:
            best = z.clone()
    return best


def clustered(n_classes=4, per_class=40, dim=12, noise=0.35, text_noise=1.0, seed=0):
    """Tight clusters per class; text prototypes that are noisy (zero-shot well below what clusters allow)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_classes, dim, generator=g, dtype=torch.float64), dim=-1)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = F.normalize(centres[y] + noise * torch.randn(len(y), dim, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(centres + text_noise * torch.randn(n_classes, dim, generator=g, dtype=torch.float64), dim=-1)
    return x, y, text, centres


def cliplike(n_classes=5, per_class=60, dim=128, noise=1.5, text_noise=4.0, gap=0.15, seed=3):
    """CLIP-shaped features: image clusters, and text prototypes sharing one direction (the modality gap) with a
    weak, noisy class part, so that 100·cosine is a soft, often wrong prior (zero-shot ≈ 75 % here)."""
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    centres = unit(n_classes, dim)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = F.normalize(centres[y] + noise * unit(len(y), dim), dim=-1)
    text = F.normalize(unit(dim)[None] + gap * (centres + text_noise * unit(n_classes, dim)), dim=-1)
    return x, y, text, centres


def test_transclip_zero_shot_matches_dense_float64():
    x, y, text, _ = clustered(per_class=15, dim=10)
    logits = 30.0 * x @ text.T
    ours = transclip_solve(x, torch.log_softmax(logits, -1), lmbda=1.0)["z"]
    ref = dense_transclip(x, logits.softmax(-1), 1.0)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, ref, atol=1e-10, rtol=0)


def test_transclip_few_shot_matches_dense_float64():
    x, y, text, centres = clustered(per_class=12, dim=10, seed=1)
    g = torch.Generator().manual_seed(5)
    sy = torch.arange(4).repeat_interleave(2)
    sx = F.normalize(centres[sy] + 0.35 * torch.randn(len(sy), 10, generator=g, dtype=torch.float64), dim=-1)
    vy = torch.arange(4)
    vx = F.normalize(centres[vy] + 0.35 * torch.randn(4, 10, generator=g, dtype=torch.float64), dim=-1)
    logits = 30.0 * x @ text.T
    gammas = (0.002, 0.01, 0.02, 0.2)
    ours = transclip_solve(x, torch.log_softmax(logits, -1), lmbda=0.5, support=sx, support_labels=sy,
                           gammas=gammas, val=(vx, vy))["z"]
    ref = dense_transclip(x, logits.softmax(-1), 0.5, support=sx, labels=sy, gammas=gammas, val=(vx, vy))
    assert torch.allclose(ours, ref, atol=1e-10, rtol=0)


def test_transclip_beats_noisy_zero_shot_on_clusters():
    x, y, text, _ = cliplike()
    logits = 100.0 * x @ text.T
    zs = float((logits.argmax(-1) == y).double().mean())
    z = transclip_solve(x.float(), torch.log_softmax(logits.float(), -1), lmbda=1.0)["z"]
    tc = float((z.argmax(-1) == y).double().mean())
    assert zs < 0.8 and tc > zs + 0.05, (zs, tc)


def _tensor_task(x, text, shots=2, seed=0, unlabeled=None):
    """A TensorTask whose support/val come from the clustered features (first images of each class)."""
    n_classes = text.shape[0]
    per = len(x) // n_classes
    y = torch.arange(n_classes).repeat_interleave(per)
    sup = torch.cat([torch.arange(c * per, c * per + shots) for c in range(n_classes)])
    val = torch.cat([torch.arange(c * per + shots, c * per + shots + 2) for c in range(n_classes)])
    return TensorTask(x[sup].float()[None].repeat(10, 1, 1), y[sup], x[sup].float(), x[val].float(), y[val],
                         text.float(), seed=seed, unlabeled=unlabeled)


def test_transclip_method_transductive_and_pool_modes():
    x, y, text, _ = cliplike()
    task = _tensor_task(x, text)
    m = get_method("transclip").fit(task)
    assert m.transductive and m.uses_unlabeled == "pool"
    z = m.predict_logits(x.float()).softmax(-1)
    ref = transclip_solve(x.float(), torch.log_softmax(100.0 * x.float() @ F.normalize(text.float(), dim=-1).T, -1))["z"]
    assert torch.allclose(z, ref, atol=1e-5)
    # a separate pool: solved at fit time; predictions are per image (batch-independent)
    pooled = get_method("transclip").fit(_tensor_task(x, text, unlabeled=x[1::2]))
    assert not pooled.transductive
    one = pooled.predict_logits(x[:5].float())
    assert torch.allclose(one[:2], pooled.predict_logits(x[:2].float()))
    acc = float((pooled.predict_logits(x.float()).argmax(-1) == y).double().mean())
    zs = float(((x @ text.T).argmax(-1) == y).double().mean())
    assert acc > zs + 0.05


def test_transclip_on_top_of_base_and_save_load(tmp_path):
    task, _ = random_task(n_classes=4, shots=4, dim=16, views=10)
    m = get_method("transclip", base="gda").fit(task)
    assert m.fit_info["base"] == "gda" and "alpha" in m.fit_info["base_fit_info"]
    q = F.normalize(torch.randn(30, 16), dim=-1)
    base_logits = m.base_method.predict_logits(q)
    ours = m.predict_logits(q).softmax(-1)
    ref = transclip_solve(q, torch.log_softmax(base_logits.float(), -1), lmbda=1.0)["z"]
    assert torch.allclose(ours, ref, atol=1e-6)
    m.save(tmp_path / "tc")
    back = Method.load(tmp_path / "tc")
    assert torch.allclose(back.predict_logits(q), m.predict_logits(q), atol=1e-6)
    with pytest.raises(ConfigError, match="inductive"):
        get_method("transclip", base="tda").fit(task)


# -- TDA -----------------------------------------------------------------------------------------------------

def dense_tda(x, text, scale=100.0, pos=(3, 2.0, 5.0), neg=(2, 0.117, 1.0), ent=(0.2, 0.5), mask=(0.03, 1.0),
              order=None):
    """run_test_tda with dict-of-sorted-lists caches (float64)."""
    def update(cache, pred, item, cap):
        if pred in cache:
            if len(cache[pred]) < cap:
                cache[pred].append(item)
            elif item[1] < cache[pred][-1][1]:
                cache[pred][-1] = item
            cache[pred] = sorted(cache[pred], key=operator.itemgetter(1))
        else:
            cache[pred] = [item]

    def cache_logits(f, cache, alpha, beta, k, negative):
        keys, values = [], []
        for c in sorted(cache):
            for item in cache[c]:
                keys.append(item[0])
                values.append(((item[2] > mask[0]) & (item[2] < mask[1])).double() if negative
                              else F.one_hot(torch.tensor(c), k).double())
        keys, values = torch.stack(keys), torch.stack(values)
        return alpha * torch.exp(-(beta - beta * (f @ keys.T))) @ values

    k = text.shape[0]
    out = torch.zeros(len(x), k, dtype=torch.float64)
    pos_c, neg_c = {}, {}
    for i in order:
        s = scale * x[i] @ text.T
        p = s.softmax(-1)
        loss = float(-(p * s.log_softmax(-1)).sum())
        h = loss / math.log2(k)
        pred = int(s.argmax())
        update(pos_c, pred, [x[i], loss], pos[0])
        if ent[0] < h < ent[1]:
            update(neg_c, pred, [x[i], loss, p], neg[0])
        final = s.clone()
        if pos_c:
            final += cache_logits(x[i], pos_c, pos[1], pos[2], k, False)
        if neg_c:
            final -= cache_logits(x[i], neg_c, neg[1], neg[2], k, True)
        out[i] = final
    return out


def test_tda_matches_dense_float64_and_records_the_stream():
    x, y, text, _ = clustered(n_classes=5, per_class=20, dim=12, noise=0.5, text_noise=0.6, seed=2)
    task = _tensor_task(x.float(), text.float())
    m = get_method("tda", stream_seed=7).fit(task)
    m.text_weights = text    # float64 prototypes and features: the method computes in the features' dtype
    ours = m.predict_logits(x)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(7)).tolist()
    ref = dense_tda(x, text, order=order)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, ref, atol=1e-9, rtol=0)
    assert not torch.allclose(ours, 100.0 * x @ text.T, atol=1e-3)   # the caches did change the logits
    assert m.fit_info["last_stream"]["negative_updates"] > 0     # the negative cache was exercised
    assert m.fit_info["stream_seed"] == 7 and len(m.fit_info["last_stream"]["order_sha1"]) == 12
    # another order is another stream: other predictions
    other = get_method("tda", stream_seed=8).fit(task).predict_logits(x.float())
    assert not torch.allclose(other, ours.float(), atol=1e-4)


def test_tda_helps_on_clusters():
    x, y, text, _ = cliplike()
    task = _tensor_task(x.float(), text.float())
    zs = float(((x @ text.T).argmax(-1) == y).double().mean())
    tda = float((get_method("tda").fit(task).predict_logits(x.float()).argmax(-1) == y).double().mean())
    assert tda > zs, (zs, tda)


# -- ProKeR ---------------------------------------------------------------------------------------------------

def test_proker_matches_dense_float64_and_beats_zero_shot():
    task, centres = random_task(n_classes=5, shots=2, dim=16, views=10, n_val=4, seed=3)
    m = get_method("proker").fit(task)
    beta, lmbda = m.fit_info["beta"], m.fit_info["lmbda"]
    s = F.normalize(task.raw_views, dim=-1).reshape(-1, 16).double().numpy()
    yv = F.one_hot(task.labels.repeat(10), 5).double().numpy()
    t = task.text.double().numpy()
    q = F.normalize(torch.randn(40, 16, generator=torch.Generator().manual_seed(9)), dim=-1).double().numpy()
    kss = np.exp(-beta * (1 - s @ s.T))
    a = np.linalg.solve(kss / lmbda + np.eye(len(s)), yv - s @ t.T)
    ref = q @ t.T + np.exp(-beta * (1 - q @ s.T)) @ a
    ours = m.predict_logits(torch.from_numpy(q)).double().numpy()
    assert np.allclose(ours, ref, atol=1e-5)
    # on held-out images of the same clusters, ProKeR beats the noisy zero-shot classifier
    g = torch.Generator().manual_seed(11)
    ty = torch.arange(5).repeat_interleave(30)
    tx = F.normalize(centres[ty] * 3 + torch.randn(len(ty), 16, generator=g), dim=-1)
    zs = float(((tx @ task.text.T).argmax(-1) == ty).double().mean())
    pk = float((m.predict_logits(tx).argmax(-1) == ty).double().mean())
    assert pk > zs + 0.05, (zs, pk)


def test_proker_fixed_selection_uses_reference_values():
    task, _ = random_task(n_classes=3, shots=2, dim=8, views=2)
    m = get_method("proker", selection="fixed", augment_views=2).fit(task)
    assert (m.fit_info["beta"], m.fit_info["lmbda"]) == (3.0, 0.05)
    with pytest.raises(ConfigError, match="selection"):
        get_method("proker", selection="test").fit(task)


# -- the unlabeled pool of a run -------------------------------------------------------------------------------

def _with_extra_split(shuffle_labels: bool, n_classes=4):
    """Shapes with an 'extra' split of 24 images whose labels are true, or a permutation of them."""
    from workbench.data import synthetic_shapes
    from workbench.data.dataset import Dataset, Sample

    ds = synthetic_shapes(n_classes, train_per_class=4, val_per_class=2, test_per_class=4, image_size=32)
    true = [i % n_classes for i in range(16)]
    labels = list(reversed(true)) if shuffle_labels else true
    extra = [Sample(f"extra/{i}", labels[i], (3, 500_000 + i, true[i])) for i in range(16)]
    return Dataset(name=ds.name, class_ids=ds.class_ids, class_names=ds.class_names,
                   splits={**ds.splits, "extra": extra}, reader=ds.reader, source=ds.source, templates=ds.templates)


def test_pool_labels_are_never_read(backbone, tmp_path, quiet):
    rows = []
    for shuffle in (False, True):
        ds = _with_extra_split(shuffle)
        run = wb.run_experiment(ds, backbone, "transclip", 2, 1, unlabeled="extra",
                                cache=wb.FeatureCache(backbone, tmp_path / str(shuffle), show_progress=False))
        rows.append(run)
    a, b = rows
    assert a.row["unlabeled_source"] == "split:extra" and a.row["transductive"] is False
    assert a.record["unlabeled"]["images"] == 16
    assert torch.equal(a.logits, b.logits)          # other labels on the pool: the very same predictions
    assert a.method.fit_info["pool"] == b.method.fit_info["pool"]


def test_transductive_rows_and_compare_columns(backbone, tmp_path, quiet):
    from workbench.data import synthetic_shapes

    ds = synthetic_shapes(4, train_per_class=6, val_per_class=2, test_per_class=6, image_size=32)
    table = wb.compare(ds, backbone, ["zero_shot", "transclip", "tda"], shots=[2], seeds=[1], unlabeled="test",
                       out_dir=tmp_path / "out", cache=wb.FeatureCache(backbone, tmp_path / "f", show_progress=False))
    t = table.set_index("method")
    assert list(table.columns) == wb.experiment.TABLE_COLUMNS
    assert (t.loc["zero_shot", "unlabeled_source"], bool(t.loc["zero_shot", "transductive"])) == ("", False)
    assert (t.loc["transclip", "unlabeled_source"], bool(t.loc["transclip", "transductive"])) == ("test", True)
    assert (t.loc["tda", "unlabeled_source"], bool(t.loc["tda", "transductive"])) == ("test (stream)", True)
    # resumed from results.csv: the same columns come back
    again = wb.compare(ds, backbone, ["zero_shot", "transclip", "tda"], shots=[2], seeds=[1], unlabeled="test",
                       out_dir=tmp_path / "out", cache=wb.FeatureCache(backbone, tmp_path / "f", show_progress=False))
    assert list(again["transductive"].astype(bool)) == [False, True, True]
    assert list(again["unlabeled_source"]) == ["", "test", "test (stream)"]
    # summaries and rankings mark transductive rows
    from workbench import report

    summary = report.summary_table(table)
    assert "transductive" in summary.columns and summary["transductive"].sum() == 2
    assert set(report.ranking(table).query("transductive")["method"]) == {"transclip [transductive]",
                                                                          "tda [transductive]"}
    fig = report.plot_accuracy_vs_shots(table)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "tda [transductive]" in labels and "zero_shot" in labels
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_folder_csv_npz_pools_and_overlap_with_support(backbone, tmp_path, quiet):
    from PIL import Image

    from workbench.data import synthetic_shapes

    ds = synthetic_shapes(4, train_per_class=6, val_per_class=2, test_per_class=4, image_size=32)
    cache = wb.FeatureCache(backbone, None, show_progress=False)
    folder = tmp_path / "pool"
    (folder / "deep").mkdir(parents=True)
    other = synthetic_shapes(4, train_per_class=3, val_per_class=0, test_per_class=0, seed=5, image_size=32)  # images nobody labelled
    pool_samples = other.split("train")[:10]
    for i, s in enumerate(pool_samples):
        img = other.load_image(s)
        (img.convert("L") if i == 0 else img.resize((40, 40)) if i == 1 else img).save(
            folder / ("deep" if i % 2 else "") / f"{i}.png")
    run = wb.run_experiment(ds, backbone, "transclip", 2, 1, unlabeled=str(folder), cache=cache)
    assert run.row["unlabeled_source"] == f"folder:{folder}" and run.record["unlabeled"]["images"] == 10
    (tmp_path / "pool.csv").write_text("path\n" + "\n".join(f"pool/{'deep/' if i % 2 else ''}{i}.png"
                                                             for i in range(10)) + "\n")
    assert wb.run_experiment(ds, backbone, "transclip", 2, 1, unlabeled=str(tmp_path / "pool.csv"),
                             cache=cache).record["unlabeled"]["images"] == 10
    arrays = np.stack([np.asarray(other.load_image(s)) for s in pool_samples])
    np.savez(tmp_path / "pool.npz", images=arrays)
    assert wb.run_experiment(ds, backbone, "transclip", 2, 1, unlabeled=str(tmp_path / "pool.npz"),
                             cache=cache).record["unlabeled"]["images"] == 10
    # the train split as pool holds the support images: they are removed with a warning naming the count
    with pytest.warns(UserWarning, match=r"8 of its 24 image\(s\) are also support or validation"):
        run = wb.run_experiment(ds, backbone, "transclip", 2, 1, unlabeled="train", cache=cache)
    assert run.record["unlabeled"]["removed_overlap"] == 8 and run.record["unlabeled"]["images"] == 16


def test_bad_unlabeled_input_is_refused_clearly(backbone, tmp_path):
    from workbench.data import synthetic_shapes

    ds = synthetic_shapes(4, train_per_class=6, val_per_class=2, test_per_class=4, image_size=32)
    cache = wb.FeatureCache(backbone, None, show_progress=False)
    with pytest.raises(ConfigError, match="inductive"):
        wb.run_experiment(ds, backbone, "transclip", 2, 1, unlabeled="test", protocol="paper", cache=cache)
    with pytest.raises(ConfigError, match="'transclip' uses images nobody labelled.*protocol='paper'"):
        wb.compare(ds, backbone, ["zero_shot", "transclip"], shots=[2], seeds=[1], protocol="paper")
    with pytest.warns(UserWarning, match="runs transductively on the test images"):   # no pool: the test images
        run = wb.run_experiment(ds, backbone, "transclip", 2, 1, cache=cache)
    assert run.row["unlabeled_source"] == "test" and run.row["transductive"] is True
    with pytest.raises(ConfigError, match="unlabeled='test'"):
        wb.run_experiment(ds, backbone, "tda", 2, 1, unlabeled="train", cache=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        wb.run_experiment(ds, backbone, "transclip", 2, 1, unlabeled=str(tmp_path / "empty"), cache=cache)
    with pytest.raises(DataError, match="neither a split"):
        wb.run_experiment(ds, backbone, "transclip", 2, 1, unlabeled="nowhere_at_all", cache=cache)
    (tmp_path / "bad.csv").write_text("path\n../../etc/passwd\n")
    with pytest.raises(DataError, match="outside"):
        wb.run_experiment(ds, backbone, "transclip", 2, 1, unlabeled=str(tmp_path / "bad.csv"), cache=cache)
    # the support set itself as pool: nothing unlabeled is left
    own = tmp_path / "own"
    own.mkdir()
    from workbench.data.sampling import sample_few_shot

    split = sample_few_shot(ds, 2, 1)
    for s in split.train(ds) + split.val(ds):
        ds.load_image(s).save(own / f"{s.id.replace('/', '_')}.png")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="empty once"):
        wb.run_experiment(ds, backbone, "transclip", 2, 1, unlabeled=str(own), cache=cache)


def test_cli_run_takes_unlabeled(tmp_path, capsys, quiet):
    from workbench.cli import main

    assert main(["run", "--dataset", "pneumoniamnist_mini", "--methods", "zero_shot,tda", "--shots", "1", "--seeds", "1",
                 "--unlabeled", "test", "--out", str(tmp_path)]) == 0
    assert "tda [transductive]" in capsys.readouterr().out
    assert main(["run", "--dataset", "pneumoniamnist_mini", "--methods", "tda", "--shots", "1", "--seeds", "1",
                 "--unlabeled", "train", "--out", str(tmp_path)]) == 2
    assert "unlabeled='test'" in capsys.readouterr().err


def test_transclip_fs_method_uses_the_shots_and_chooses_gamma_on_validation():
    x, y, text, _ = cliplike()
    task = _tensor_task(x, text, shots=2)
    m = get_method("transclip", use_shots=True).fit(task)
    assert m.lmbda == 0.5
    z = m.predict_logits(x.float()).softmax(-1)
    sx, sy = task.eval_feats, task.labels
    ref = transclip_solve(x.float(), torch.log_softmax(100.0 * x.float() @ task.text.T, -1), lmbda=0.5, support=sx,
                          support_labels=sy, gammas=[0.002, 0.01, 0.02, 0.2], val=(task.val.x, task.val.labels))
    assert torch.allclose(z, ref["z"], atol=1e-5)
    assert m.fit_info["last_batch"]["gamma"] == ref["gamma"] and ref["val_accuracy"] >= 0
    zs = float(((x @ text.T).argmax(-1) == y).double().mean())
    assert float((z.argmax(-1) == y).double().mean()) > zs + 0.05


def test_transclip_solver_stays_finite_when_a_class_gets_no_image():
    # every zero-shot prediction says class 0 with certainty: class 1's mass underflows to 0 in
    # float32 (the reference divides 0/0 there); the solver keeps finite assignments and statistics
    from workbench.methods.features.transclip import transclip_solve

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 16, generator=g) * 0.01 + torch.ones(16), dim=-1)
    log_yhat = torch.tensor([[0.0, -1e4]]).repeat(40, 1)
    out = transclip_solve(x, log_yhat)
    assert torch.isfinite(out["z"]).all() and torch.isfinite(out["mu"]).all() and (out["std"] > 0).all()
