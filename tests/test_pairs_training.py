"""Contrastive fine-tuning on pairs: the loss against independent float64 computations, zero steps =
the base model, the result is a backbone (saved, loaded, used by a classification method), WiSE-FT on
val mean recall, and the same trainer pretrains the tiny model from random init."""
import copy

import pandas as pd

import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench.data.pairs import PairDataset, PairSample, load_pairs
from workbench.errors import ConfigError
from workbench.methods.pairs.contrastive import PairTask, clip_loss, fine_tune_pairs


@pytest.fixture(scope="module")
def pairs():
    return load_pairs("whu_rs19_pairs")


@pytest.fixture(scope="module")
def small(pairs):
    """16 training images (5 captions each), the set's val and test."""
    return PairDataset("small", {"train": pairs.split("train")[:16], "val": pairs.split("val")[:8],
                                 "test": pairs.split("test")[:8]}, reader=pairs.reader)


def _batch(pairs, backbone, n=8):
    samples = pairs.split("train")[:n]
    pixels = torch.stack([backbone.preprocess(pairs.reader(s.ref)) for s in samples])
    return pixels, [s.captions[0] for s in samples]


def _infonce64(model, pixels, tokens):
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        img = F.normalize(m.encode_image(pixels.double()), dim=-1)
        txt = F.normalize(m.encode_text(tokens), dim=-1)
        logits = m.logit_scale.exp().clamp(max=100) * img @ txt.T
    n = len(logits)
    rows = -(logits.diag() - torch.logsumexp(logits, 1)).sum() / n
    cols = -(logits.diag() - torch.logsumexp(logits, 0)).sum() / n
    return float((rows + cols) / 2)


@pytest.mark.parametrize("method", ["pairs_lora", "pairs_svd", "pairs_full"])
def test_loss_is_symmetric_infonce_with_the_models_logit_scale(backbone, small, method):
    before = backbone.weights_hash
    fitted = fine_tune_pairs(small, backbone, method, steps=0, batch_size=8)
    pixels, texts = _batch(small, backbone)
    tokens = backbone.tokenize(texts)
    train_texts, _ = small.texts("train")
    idx = torch.tensor([train_texts.index(t) for t in texts])
    with torch.no_grad():
        got = float(fitted._loss_fn((pixels, idx)))
    assert got == pytest.approx(_infonce64(backbone.model, pixels, tokens), abs=2e-5)
    # zero steps: the result is the base model (LoRA B = 0, singular values unchanged, no update)
    base = backbone.model.state_dict()
    for key, value in fitted.backbone_.model.state_dict().items():
        assert torch.allclose(value.float(), base[key].float(), atol=2e-5), key
    assert backbone.weights_hash == before   # the base backbone is never changed in place


def test_sigmoid_loss_for_siglip_towers(backbone, small):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    expected = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            expected -= float(torch.log(torch.sigmoid(z * (scale * img[i] @ txt[j] + bias))))
    assert float(clip_loss(img, txt, scale, bias)) == pytest.approx(expected / 5, rel=1e-12)
    # a model with a logit bias (SigLIP) trains with the sigmoid loss and learns its bias
    siglip = copy.deepcopy(backbone)
    siglip.model.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
    siglip._weights_hash = None
    fitted = fine_tune_pairs(small, siglip, "pairs_lora", steps=2, batch_size=8, lr=1e-2)
    assert "logit_bias" in fitted._end and "logit_scale" in fitted._end   # both learnt
    pixels, texts = _batch(small, siglip, 4)
    train_texts, _ = small.texts("train")
    idx = torch.tensor([train_texts.index(t) for t in texts])
    fresh = fine_tune_pairs(small, siglip, "pairs_lora", steps=0, batch_size=8)
    with torch.no_grad():
        got = float(fresh._loss_fn((pixels, idx)))
        m = siglip.model.eval()
        i = F.normalize(m.encode_image(pixels).double(), dim=-1)
        t = F.normalize(m.encode_text(siglip.tokenize(texts)).double(), dim=-1)
        ref = clip_loss(i, t, m.logit_scale.exp().clamp(max=100).double(), m.logit_bias.double())
    assert got == pytest.approx(float(ref), abs=2e-5)


def test_result_is_a_backbone_saved_loaded_and_used_by_a_classification_method(backbone, small, tmp_path, shapes):
    fitted = fine_tune_pairs(small, backbone, "pairs_lora", steps=2, batch_size=16, lr=1e-2)
    assert fitted.fit_info["steps"] == 2 and fitted.fit_info["saw"]["test"] == 0
    assert fitted.backbone_.weights_hash != backbone.weights_hash
    folder = fitted.save(tmp_path / "adapted")
    loaded = wb.load_backbone(str(folder), device="cpu")
    assert loaded.weights_hash == fitted.backbone_.weights_hash
    x = torch.stack([loaded.preprocess(small.reader(small.split("test")[0].ref))])
    assert torch.allclose(loaded.encode_images(x), fitted.backbone_.encode_images(x), atol=1e-6)
    res = wb.run_experiment(shapes, loaded, "gda", 2, 1, cache=wb.FeatureCache(loaded, None, show_progress=False))
    assert 0 <= res.row["accuracy"] <= 1 and res.row["backbone"] == "workbench-tiny"
    assert res.row["pretrained"] == str(folder)   # the adapted weights are named in the row
    with pytest.raises(ConfigError, match="produces a backbone, not a classifier"):
        fitted.predict_logits(torch.zeros(1, 128))
    with pytest.raises(ConfigError, match="fits on image–text pairs"):
        fitted.fit(object())
    (folder / "open_clip_model.safetensors").write_bytes(b"broken")
    with pytest.raises(wb.BackboneError, match="truncated or altered"):
        wb.load_backbone(str(folder))


def test_wise_ft_alpha_is_chosen_on_val_mean_recall(backbone, small):
    tiny_val = PairDataset("v", {"train": small.split("train"), "val": small.split("val")[:4],
                                 "test": small.split("test")[:2]}, reader=small.reader)
    fitted = fine_tune_pairs(tiny_val, backbone, "pairs_full", steps=1, batch_size=16, lr=1e-3, wise_alpha="val")
    wise = fitted.fit_info["wise_ft"]
    assert wise["chosen_on"] == "val mean recall" and len(wise["val_mean_recall"]) == 11
    assert wise["val_mean_recall"][str(wise["alpha"])] == max(wise["val_mean_recall"].values())
    fitted.interpolate(0.0)
    base = backbone.model.state_dict()
    for key, value in fitted.backbone_.model.state_dict().items():
        assert torch.allclose(value, base[key], atol=1e-6), key
    with pytest.raises(ConfigError, match="wise_alpha must be"):
        fine_tune_pairs(small, backbone, "pairs_full", steps=0, wise_alpha="best")


def test_the_same_trainer_pretrains_the_tiny_model_from_random_init(pairs):
    scratch = wb.load_backbone("workbench-tiny", device="cpu", seed=123)   # random init
    one_per_class = {}
    for s in pairs.split("train"):
        one_per_class.setdefault(s.id.split("/")[0], PairSample(s.id, s.ref, s.captions[:1]))
    corpus = PairDataset("corpus", {"train": list(one_per_class.values())[:8], "test": pairs.split("test")[:2]},
                         reader=pairs.reader)
    fitted = fine_tune_pairs(corpus, scratch, "pairs_full", blocks="all", steps=6, batch_size=8, lr=5e-4,
                             weight_decay=0.0)
    # the loss of the corpus as one batch (eval mode: no augmentation), before and after
    pixels, texts = _batch(corpus, scratch, 8)
    idx = torch.arange(8)
    before = fine_tune_pairs(corpus, scratch, "pairs_full", blocks="all", steps=0, batch_size=8)
    with torch.no_grad():
        loss_before = float(before._loss_fn((pixels, idx)))
        loss_after = float(fitted._loss_fn((pixels, idx)))
    assert loss_after < loss_before - 0.2, (loss_before, loss_after)
    assert fitted.fit_info["trainable_parameters"] == sum(p.numel() for p in scratch.model.parameters())


def test_a_pairs_run_checkpoints_and_resumes_through_the_one_loop(backbone, small, tmp_path):
    corpus = PairDataset("c", {"train": small.split("train")[:4], "test": small.split("test")[:2]},
                         reader=small.reader)
    params = dict(steps=2, batch_size=8, lr=1e-2, checkpoint_dir=str(tmp_path / "ckpt"))
    first = fine_tune_pairs(corpus, backbone, "pairs_svd", **params)
    assert list((tmp_path / "ckpt").glob("run-*/last.safetensors"))
    again = fine_tune_pairs(corpus, backbone, "pairs_svd", **params)
    assert again.fit_info["resumed_from_epoch"] == 1 and again.fit_info["steps"] == 2
    assert again.backbone_.weights_hash == first.backbone_.weights_hash


def test_fine_tuning_again_into_the_same_folder_never_reuses_the_old_rows(backbone, small, shapes, tmp_path):
    from workbench.methods.pairs.contrastive import fine_tune_pairs
    from workbench.results import backbone_weights_key

    folder = tmp_path / "ft"
    fine_tune_pairs(small, backbone, "pairs_lora", steps=1, batch_size=8, lr=1e-2, seed=0).save(folder)
    first = wb.compare(shapes, wb.load_backbone(str(folder), device="cpu"), ["zero_shot"], [1], [1],
                       out_dir=tmp_path / "runs")
    key = backbone_weights_key(str(folder))
    assert key and key == backbone_weights_key(wb.load_backbone(str(folder), device="cpu"))
    assert backbone_weights_key(backbone) is None and backbone_weights_key("workbench-tiny") is None
    fine_tune_pairs(small, backbone, "pairs_lora", steps=3, batch_size=8, lr=1e-2, seed=1).save(folder)
    assert backbone_weights_key(str(folder)) != key
    again = wb.compare(shapes, wb.load_backbone(str(folder), device="cpu"), ["zero_shot"], [1], [1],
                       out_dir=tmp_path / "runs")                          # resume=True: a new key, a new run
    assert list(again["cell_id"]) != list(first["cell_id"])
    assert len(pd.read_csv(tmp_path / "runs" / "results.csv")) == 2
