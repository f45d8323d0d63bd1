"""Trained multi-label methods: DualCoOp, and CLIP-LoRA / CLIP-SVD on the positive/negative text head."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.errors import ConfigError


@pytest.fixture(scope="module")
def small_mosaic():
    from workbench.data.multilabel import mosaic_dataset
    from workbench.paths import repo_root

    return mosaic_dataset(repo_root() / "data" / "whu_rs19_mini", n_images=30, seed=1, name="mini_mosaic",
                          classes=["airport", "beach", "forest", "port", "river"], templates=["aerial imagery of {}."])


@pytest.fixture(scope="module")
def ml_task(backbone, small_mosaic, tmp_path_factory):
    from workbench.data.multilabel import sample_multilabel_few_shot
    from workbench.task import FewShotTask

    cache = wb.FeatureCache(backbone, tmp_path_factory.mktemp("mlm_features"), show_progress=False)
    split = sample_multilabel_few_shot(small_mosaic, 2, 1, split_dir=tmp_path_factory.mktemp("mlm_splits"))
    return FewShotTask(small_mosaic, split, backbone, cache, templates=["aerial imagery of {}."])


# -- DualCoOp ---------------------------------------------------------------------------------------

def _asl_by_hand(s_pos, s_neg, y, gp=1.0, gn=2.0, clip=0.05, eps=1e-6):
    """The reference's ASL written out per entry in float64: softmax over (negative, positive) scores."""
    total = 0.0
    for i in range(y.shape[0]):
        for c in range(y.shape[1]):
            if y[i, c] < 0:
                continue
            e_pos, e_neg = np.exp(s_pos[i, c]), np.exp(s_neg[i, c])
            p = e_pos / (e_pos + e_neg)
            if y[i, c] == 1:
                total -= (1 - p) ** gp * np.log(max(p, eps))
            else:
                pm = max(p - clip, 0.0)
                total -= pm ** gn * np.log(max(1 - pm, eps))
    return total


def test_asymmetric_loss_matches_the_pair_softmax_by_hand_float64():
    from workbench.methods.prompts.dualcoop import asymmetric_loss

    g = torch.Generator().manual_seed(0)
    s_pos = torch.randn(7, 4, generator=g, dtype=torch.float64) * 3
    s_neg = torch.randn(7, 4, generator=g, dtype=torch.float64) * 3
    y = torch.randint(-1, 2, (7, 4), generator=g)
    got = asymmetric_loss(s_pos - s_neg, y)
    want = _asl_by_hand(s_pos.numpy(), s_neg.numpy(), y.numpy())
    assert float(got) == pytest.approx(want, rel=1e-10)
    # unknown entries do not count, whatever their score
    y2 = y.clone()
    y2[y2 < 0] = 1
    assert float(asymmetric_loss(s_pos - s_neg, y2)) != pytest.approx(want)
    # the focusing weights carry no gradient (the reference's disable_torch_grad_focal_loss=True): with p = σ(z),
    # d/dz of −(1−p)^γ+·log p is −(1−p)^γ+·(1−p), and of −p^γ−·log(1−p) (clip 0) is p^γ−·p
    z = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    yy = torch.tensor([[1, 0], [0, 1]])
    asymmetric_loss(z, yy, gamma_pos=1.0, gamma_neg=2.0, clip=0.0).backward()
    pz = torch.sigmoid(z.detach())
    want_grad = torch.where(yy == 1, -(1 - pz) ** 2, pz ** 3)
    torch.testing.assert_close(z.grad, want_grad, rtol=1e-12, atol=1e-12)
    # other focusing and no margin: the same formula
    got = asymmetric_loss(s_pos - s_neg, y, gamma_pos=0.0, gamma_neg=4.0, clip=0.0)
    assert float(got) == pytest.approx(_asl_by_hand(s_pos.numpy(), s_neg.numpy(), y.numpy(), 0.0, 4.0, 0.0), rel=1e-10)


def test_dualcoop_registered_for_multi_label_only():
    from workbench.methods.registry import check_method_task, methods_for_task

    assert "dualcoop" in methods_for_task("multi_label") and "dualcoop" not in methods_for_task("single_label")
    with pytest.raises(ConfigError, match="'dualcoop' does not support single_label"):
        check_method_task("dualcoop", "single_label")


def test_dualcoop_learns_on_tiny_mosaic_and_scores_the_pair_softmax(ml_task, backbone, tmp_path):
    from workbench.methods.prompts.dualcoop import asymmetric_loss
    from workbench.metrics import per_finding_auroc

    # the offline backbone is random: scale 100 saturates the pair softmax at once (ASL's clamped log then has
    # no gradient), so the test learns at scale 10 with one context pair per finding (csc)
    m = wb.get_method("dualcoop", n_ctx_pos=4, n_ctx_neg=4, csc=True, logit_scale=10.0, epochs=6, lr=0.001,
                      warmup_epochs=0, augment_views=1)
    m.fit(ml_task)
    width = backbone.model.token_embedding.weight.shape[1]
    assert m.fit_info["trainable_parameters"] == 2 * 5 * 4 * width   # a context pair per finding, nothing else
    assert m.fit_info["final_loss"] < 0.65 * m.fit_info["first_epoch_loss"]
    sup = ml_task.support()
    y = ml_task.targets_for(sup.ids)
    logits = m.predict_logits(sup.x)
    # the log-odds are those of the softmax over (10 f.t-, 10 f.t+), recomputed in float64
    f = sup.x.double()
    s_pos, s_neg = 10 * f @ m.pos.double().T, 10 * f @ m.neg.double().T
    p = torch.softmax(torch.stack([s_neg, s_pos], -1), -1)[..., 1]
    np.testing.assert_allclose(torch.sigmoid(logits.double()).numpy(), p.numpy(), atol=1e-5)
    # learning: the trained contexts separate the support findings better than the initial ones
    aucs = [a for a in per_finding_auroc(logits.double().numpy(), y.numpy()) if a is not None]
    assert np.mean(aucs) > 0.75
    assert float(asymmetric_loss(logits.double(), y)) < m.fit_info["first_epoch_loss"]
    m.save(tmp_path / "dc")
    from workbench.methods.base import Method
    again = Method.load(tmp_path / "dc")
    assert torch.equal(again.predict_logits(sup.x), logits)
    assert again.fit_info["thresholds"] == m.fit_info["thresholds"]


# -- CLIP-LoRA and CLIP-SVD on multi-label tasks: the text head decided by the task kind --------------

def test_multi_label_head_is_the_pair_softmax_with_masked_bce_float64():
    from workbench.methods.heads import text_head

    g = torch.Generator().manual_seed(1)
    head = text_head("multi-label", ["a", "b", "c"], ["x {}.", "y {}."])
    assert head.prompts() == ["x a.", "y a.", "x b.", "y b.", "x c.", "y c.",
                              "x no a.", "y no a.", "x no b.", "y no b.", "x no c.", "y no c."]
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    y = torch.tensor([[1, 0, -1], [0, 0, 1], [1, 1, 0], [-1, 0, 0], [0, 1, 1]])
    logits = head.logits(img, text, 5.0, bias=3.0)
    f, t = img.numpy(), text.numpy()
    s_pos, s_neg = 5 * f @ t[:3].T, 5 * f @ t[3:].T
    p = np.exp(s_pos) / (np.exp(s_pos) + np.exp(s_neg))            # softmax over the pair; the bias cancels
    np.testing.assert_allclose(torch.sigmoid(logits).numpy(), p, rtol=1e-12)
    yn = y.numpy()
    known = yn >= 0
    bce = -(yn * np.log(p) + (1 - yn) * np.log(1 - p))
    assert float(head.loss(logits, y)) == pytest.approx(bce[known].mean(), rel=1e-10)
    single = text_head("single_label", ["a", "b", "c"], ["x {}."])
    assert single.prompts() == ["x a.", "x b.", "x c."]
    with pytest.raises(ConfigError, match="exactly one"):
        text_head("multi_label", ["a"], ["{}"], negative="no finding")


@pytest.mark.parametrize("name, params", [
    ("clip_lora", {"iterations": 8, "lr": 2e-2, "batch_size": 8, "dropout": 0.0}),
    ("clip_svd", {"iterations": 8, "lr": 2e-2, "batch_size": 8, "params": ["q", "v"]}),
])
def test_weight_methods_learn_a_multi_label_task_with_bce(name, params, ml_task, backbone, small_mosaic, tmp_path):
    from workbench.methods.base import Method

    m = wb.get_method(name, templates=["aerial imagery of {}."], **params).fit(ml_task)
    info = m.fit_info
    assert info["task"] == "multi_label" and "binary cross-entropy" in info["loss"]
    assert info["epoch_loss"][-1] < 0.9 * info["epoch_loss"][0]
    # the same encoder surgery as on a single-label task: only the LoRA factors / the singular values train,
    # counted from the adapted layers' shapes (the head adds no parameter)
    if name == "clip_svd":
        from workbench.towers.svd import svd_layers

        expected = sum(min(layer.U.shape[0], layer.Vh.shape[1]) for layer in svd_layers(m.model).values())
    else:
        layers = [mod for mod in m.model.modules() if hasattr(mod, "lora_A") and hasattr(mod, "base_layer")]
        expected = sum(2 * (mod.base_layer.in_features + mod.base_layer.out_features) for mod in layers)  # r = 2
        assert len(layers) == info["target_modules"]
    assert info["trainable_parameters"] == expected > 0
    assert len(info["thresholds"]) == 5 and info["thresholds_from"].startswith("best F1")
    pixels = torch.stack([backbone.preprocess(small_mosaic.load_image(s)) for s in small_mosaic.split("test")[:4]])
    feats = m.image_backbone(backbone).encode_images(pixels)
    logits = m.predict_logits(feats)
    assert logits.shape == (4, 5)
    n = 5
    want = m.scale * (feats.float() @ m.text_weights[:n].T - feats.float() @ m.text_weights[n:].T)
    torch.testing.assert_close(logits, want)
    m.save(tmp_path / name)
    again = Method.load(tmp_path / name, backbone=backbone)
    torch.testing.assert_close(again.predict_logits(again.image_backbone(backbone).encode_images(pixels)), logits)
    assert again.predict_findings(feats) == m.predict_findings(feats)


def test_clip_lora_multi_label_run_row_and_predictor(backbone, small_mosaic, tmp_path, quiet):
    cache = wb.FeatureCache(backbone, tmp_path / "f", show_progress=False)
    res = wb.run_experiment(small_mosaic, backbone, "clip_lora", 2, 1, cache=cache, out_dir=tmp_path / "out",
                            save_model=True, method_params={"iterations": 4, "batch_size": 8,
                                                            "templates": ["aerial imagery of {}."]})
    assert res.row["task"] == "multi_label" and 0 <= res.row["macro_auroc"] <= 1
    # test features come from the adapted image encoder, not the frozen cache
    pixels = torch.stack([backbone.preprocess(small_mosaic.load_image(s)) for s in small_mosaic.split("test")[:3]])
    feats = res.method.image_backbone(backbone).encode_images(pixels)
    torch.testing.assert_close(res.logits[:3], res.method.predict_logits(feats), atol=1e-5, rtol=1e-4)
    table = wb.load(res.model_dir, device="cpu").predict([small_mosaic.load_image(s)
                                                          for s in small_mosaic.split("test")[:3]])
    assert list(table.columns[2:]) == small_mosaic.class_names
    thr = dict(zip(small_mosaic.class_names, res.method.fit_info["thresholds"]))
    for _, r in table.iterrows():
        assert r["findings"] == [c for c in small_mosaic.class_names if r[c] >= thr[c]]


def test_dualcoop_runs_as_a_multi_label_experiment_and_refuses_single_label(backbone, small_mosaic, shapes, tmp_path,
                                                                            quiet):
    cache = wb.FeatureCache(backbone, tmp_path / "f", show_progress=False)
    res = wb.run_experiment(small_mosaic, backbone, "dualcoop", 1, 1, cache=cache,
                            method_params={"epochs": 2, "n_ctx_pos": 2, "n_ctx_neg": 2, "augment_views": 1})
    assert res.row["method"] == "dualcoop" and res.row["task"] == "multi_label" and 0 <= res.row["macro_auroc"] <= 1
    assert res.record["method"]["fit_info"]["steps"] == 2 and len(res.record["metrics"]["thresholds"]) == 5
    with pytest.raises(ConfigError, match=r"'dualcoop' does not support single_label.*'coop'"):
        wb.run_experiment(shapes, backbone, "dualcoop", 1, 1, cache=cache)
