"""Faithfulness differences found by the method audit (issue 28): each method follows its reference
by default, and the earlier behaviour stays available as an option."""
import pytest
import torch

import workbench as wb
from workbench.data import sample_few_shot, synthetic_shapes
from workbench.task import FewShotTask


@pytest.fixture(scope="module")
def small32():
    return synthetic_shapes(3, train_per_class=6, val_per_class=2, test_per_class=3, image_size=32)


def _task(ds, backbone, shots=2, seed=1):
    return FewShotTask(ds, sample_few_shot(ds, shots, seed), backbone, wb.FeatureCache(backbone, None, show_progress=False),
                       templates=["a photo of a {}."])


# -- BiomedCoOp: the text tower in train mode (dropout active) while the context learns ---------

@pytest.mark.parametrize("train_mode", [True, False])
def test_biomedcoop_trains_with_the_text_tower_in_the_references_mode(biomed_like, small32, train_mode, quiet):
    task = _task(small32, biomed_like)
    task.descriptions = {c: [f"a photo of a {c}.", f"{c}."] for c in task.class_names}
    modes = []
    hook = biomed_like.model.text.transformer.register_forward_hook(lambda m, i, o: modes.append(m.training))
    try:
        bio = wb.get_method("biomedcoop", epochs=2, batch_size=4, warmup_epochs=0, augment_views=1,
                            train_mode=train_mode).fit(task)
    finally:
        hook.remove()
    assert wb.get_method("biomedcoop").config.train_mode is True            # the reference's default
    drop = [m for m in biomed_like.model.text.modules() if isinstance(m, torch.nn.Dropout)]
    assert drop and drop[0].p > 0                                            # the BERT tower has dropout
    steps = bio.fit_info["steps"]
    assert steps >= 2 and sum(modes) == (steps if train_mode else 0)         # every training step, or none
    assert modes[-1] is False                                                # the classifier: eval mode
    assert not any(m.training for m in biomed_like.model.modules())          # the shared backbone is left in eval


# -- LP++: the epoch chosen on K validation images per class (reference) via val_shots=K --------

def test_lp_plus_plus_selects_on_k_validation_images_with_val_shots_k(backbone, quiet):
    data = synthetic_shapes(3, train_per_class=10, val_per_class=8, test_per_class=2, name="lpp_val")
    params = {"epochs": 20}
    default = wb.run_experiment(data, backbone, "lp_plus_plus", 8, 1, method_params=params)
    reference = wb.run_experiment(data, backbone, "lp_plus_plus", 8, 1, method_params=params, val_shots=8)
    assert default.method.fit_info["val_per_class"] == 4 and default.record["split"]["val_shots"] == 4
    assert reference.method.fit_info["val_per_class"] == 8 and reference.record["split"]["val_shots"] == 8
    assert reference.record["split"]["train_ids"] != [] and reference.row["run_id"] != default.row["run_id"]


# -- MaPLe: deep coupling layers start as clones; MaPLe / IVLP / VPT-deep drop the partial batch --

@pytest.fixture(scope="module")
def shapes16():
    return synthetic_shapes(4, train_per_class=20, val_per_class=4, test_per_class=6)


def test_maple_deep_coupling_layers_start_as_identical_copies(backbone, shapes16):
    names = shapes16.class_names
    _, _, prompts = wb.get_method("maple", prompt_depth=3)._build(backbone, names, seed=1)
    first, *deep = prompts.couple
    assert len(deep) == 2
    for layer in deep[1:]:   # the reference's _get_clones(single_layer, depth - 1)
        assert torch.equal(layer.weight, deep[0].weight) and torch.equal(layer.bias, deep[0].bias)
        assert layer.weight.data_ptr() != deep[0].weight.data_ptr()   # copies, not one shared layer
    assert not torch.equal(first.weight, deep[0].weight)            # the first block's proj is its own
    _, _, old = wb.get_method("maple", prompt_depth=3, coupling_init="independent")._build(backbone, names, seed=1)
    assert not torch.equal(old.couple[1].weight, old.couple[2].weight)
    with pytest.raises(wb.errors.ConfigError, match="coupling_init must be 'clones'"):
        wb.get_method("maple", prompt_depth=3, coupling_init="copies")._build(backbone, names, seed=1)


@pytest.mark.parametrize("name,params", [("maple", {"prompt_depth": 1}), ("ivlp", {"prompt_depth": 1,
                                                                                   "prompt_depth_vision": 1}),
                                         ("vpt_deep", {"prompt_depth": 1, "n_ctx": 1})])
def test_image_prompt_learners_drop_the_last_partial_batch_as_dassl(name, params, backbone, shapes16):
    task = _task(shapes16, backbone, shots=3)   # 12 support images, batches of 8
    common = {**params, "epochs": 1, "batch_size": 8, "warmup_epochs": 0}
    dassl = wb.get_method(name, **common).fit(task)
    kept = wb.get_method(name, drop_last=False, **common).fit(task)
    assert (dassl.fit_info["steps_per_epoch"], dassl.fit_info["steps"]) == (1, 1)   # 12 // 8
    assert (kept.fit_info["steps_per_epoch"], kept.fit_info["steps"]) == (2, 2)     # ceil(12 / 8)


# -- ZS-LP / CLAP: text_norm="raw" gives each class its own raw norm, as the reference -----------

@pytest.mark.parametrize("name", ["zs_lp", "clap"])
def test_text_norm_raw_anchors_each_class_at_its_raw_text_embedding(name, backbone, shapes16, quiet):
    task = _task(shapes16, backbone, shots=1)
    task.templates = ["a photo of a {}.", "a drawing of a {}."]
    m = wb.get_method(name, text_norm="raw", epochs=1, warmup_epochs=0, augment_views=1).fit(task)
    expected = []
    with torch.no_grad():   # independent: float64 mean of the raw per-template embeddings
        for c in task.class_names:
            raw = backbone.model.encode_text(backbone.tokenizer([t.format(c) for t in task.templates]))
            expected.append(raw.double().mean(0))
    expected = torch.stack(expected)
    assert torch.allclose(m.anchors.double(), expected, rtol=1e-5, atol=1e-5)
    norms = expected.norm(dim=-1)
    assert (norms - norms.mean()).abs().max() > 1e-3          # per-class norms differ: no scalar reproduces them
    unit = wb.get_method(name, text_norm=float(norms.mean()), epochs=1, warmup_epochs=0, augment_views=1).fit(task)
    assert torch.allclose(unit.anchors.norm(dim=-1), torch.full((4,), float(norms.mean())), atol=1e-4)
    with pytest.raises(wb.errors.ConfigError, match="text_norm must be a number > 0 or 'raw'"):
        wb.get_method(name, text_norm="unit")


# -- GDA: the float32 covariance product moves the parameters by float tolerance only ------------

def test_gda_float32_gram_matches_the_float64_fit_to_float_tolerance(quiet):
    from tests.fakes import random_task

    task, _ = random_task(n_classes=20, shots=8, dim=64, views=10, n_val=4, seed=3)
    exact = wb.get_method("gda").fit(task)
    fast = wb.get_method("gda", gram_dtype="float32").fit(task)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    assert 0 < rel(fast.cov_inv, exact.cov_inv) < 1e-5 and rel(fast.weight, exact.weight) < 1e-5
    assert fast.fit_info["alpha"] == exact.fit_info["alpha"]
    test = torch.nn.functional.normalize(torch.randn(200, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert torch.equal(fast.predict_logits(test).argmax(-1), exact.predict_logits(test).argmax(-1))
    with pytest.raises(wb.errors.ConfigError, match="gram_dtype must be"):
        wb.get_method("gda", gram_dtype="half").fit(task)
