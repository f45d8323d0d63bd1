"""LP++, ZS-LP, CLAP and CLIP-Adapter (issue 13) against independent float64 computations of the references' math."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench.data import sample_few_shot
from workbench.errors import ConfigError
from workbench.methods.base import Method
from workbench.task import FewShotTask, TensorTask

NEW_METHODS = ["lp_plus_plus", "zs_lp", "clap", "clip_adapter"]


def informative_text_task(n_classes=8, shots=16, dim=48, views=20, seed=0, n_test=800, text_noise=2.0, noise=1.2):
    """Features around class centres; the text embedding of a class is its centre plus noise, so the
    text classifier is informative but imperfect (zero-shot well above chance, well below the support's)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)

    def draw(y):
        return centres[y] * 1.5 + torch.randn(len(y), dim, generator=g) * noise / dim ** 0.5

    labels = torch.arange(n_classes).repeat_interleave(shots)
    raw = torch.stack([draw(labels) for _ in range(views)])
    val_y = torch.arange(n_classes).repeat_interleave(min(shots, 4))
    test_y = torch.arange(n_classes).repeat_interleave(n_test // n_classes)
    text = centres + text_noise * torch.randn(n_classes, dim, generator=g) / dim ** 0.5
    task = TensorTask(raw, labels, F.normalize(draw(labels), dim=-1), F.normalize(draw(val_y), dim=-1), val_y, text,
                      seed=seed + 1)
    return task, F.normalize(draw(test_y), dim=-1), test_y


def _acc(logits, y):
    return float((logits.argmax(-1) == y).double().mean())


# -- LP++ -------------------------------------------------------------------------------------

def _reference_lp_plus_plus(x, y, text, n_classes, epochs, prototype_init, alpha_gradient, alpha_scale=250.0):
    """LP++ in float64 with autograd and torch.optim.SGD, as methods/linear_probe_p2.py runs it."""
    x, text = x.double(), text.double()
    n = x.shape[0]
    one_hot = F.one_hot(y, n_classes).double()
    sums = one_hot.T @ x
    w0 = sums if prototype_init == "sum" else sums / one_hot.sum(0)[:, None]
    lam_max = np.linalg.eigh((x.T @ x).numpy())[0].max()
    lr_w = 4 * n / lam_max
    sims = x @ text.T
    lr_alpha = n / (4 * (sims ** 2).sum(0).max().item())
    own = (sims * one_hot).sum(0) / one_hot.sum(0)
    alpha0 = alpha_scale * own.mean().item()
    linear = torch.nn.Linear(x.shape[1], n_classes).double()
    with torch.no_grad():
        linear.weight.copy_(w0)
        linear.bias.zero_()
    alpha = torch.full((n_classes,), alpha0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD(linear.parameters(), lr=lr_w, momentum=0.9)
    for epoch in range(epochs):
        loss = F.cross_entropy(linear(x) + sims * alpha, y)
        opt.zero_grad()
        if alpha_gradient == "current" and alpha.grad is not None:
            alpha.grad = None
        loss.backward()
        opt.step()
        if (epoch + 1) % 10 == 0:
            with torch.no_grad():
                alpha -= lr_alpha * alpha.grad
    return linear.weight.detach(), linear.bias.detach(), alpha.detach(), lr_w, lr_alpha, alpha0


@pytest.mark.parametrize("prototype_init,alpha_gradient", [("mean", "current"), ("sum", "accumulated")])
def test_lp_plus_plus_matches_a_float64_autograd_run(prototype_init, alpha_gradient):
    task, test_x, _ = informative_text_task(n_classes=5, shots=8, dim=8, views=1, noise=4.0)
    # init_alpha_scale 5 (reference 250) keeps this tiny, separable task off a saturated loss, so α moves
    m = wb.get_method("lp_plus_plus", epochs=25, epoch_selection="last", prototype_init=prototype_init,
                      alpha_gradient=alpha_gradient, init_alpha_scale=5.0).fit(task)
    assert task.requests == [(1, "")]   # one augmented pass of the support set, as the reference's train loader
    x = F.normalize(task.raw_views[0].double(), dim=-1)
    w, b, alpha, lr_w, lr_alpha, alpha0 = _reference_lp_plus_plus(x, task.labels, task.text, 5, 25, prototype_init,
                                                                   alpha_gradient, alpha_scale=5.0)
    info = m.fit_info
    assert info["lr_w"] == pytest.approx(lr_w, rel=1e-6) and info["lr_alpha"] == pytest.approx(lr_alpha, rel=1e-6)
    assert info["init_alpha"] == pytest.approx(alpha0, rel=1e-6)
    assert torch.allclose(m.weight.double(), w, rtol=1e-3, atol=1e-3)
    assert torch.allclose(m.bias.double(), b, rtol=1e-3, atol=1e-3)
    assert torch.allclose(m.alpha.double(), alpha, rtol=1e-4, atol=1e-3)
    assert (alpha - alpha0).abs().max() > 5e-3   # the two α steps moved it
    tx = test_x.double()
    expected = tx @ w.T + b + (tx @ task.text.double().T) * alpha
    assert torch.allclose(m.predict_logits(test_x).double(), expected, rtol=1e-3, atol=1e-2)


def test_lp_plus_plus_reference_options_change_the_fit():
    task, _, _ = informative_text_task(n_classes=5, shots=8, dim=8, views=1, noise=4.0)
    common = {"epochs": 10, "epoch_selection": "last", "init_alpha_scale": 5.0}
    paper = wb.get_method("lp_plus_plus", **common).fit(task)
    sums = wb.get_method("lp_plus_plus", prototype_init="sum", **common).fit(task)
    accumulated = wb.get_method("lp_plus_plus", alpha_gradient="accumulated", **common).fit(task)
    assert not torch.allclose(paper.weight, sums.weight)
    # the first α step comes after the 10th W step: same W, but α moved by the 10-epoch sum of gradients
    assert torch.allclose(paper.weight, accumulated.weight, atol=1e-6)
    assert not torch.allclose(paper.alpha, accumulated.alpha, atol=1e-4)


def test_lp_plus_plus_picks_the_latest_best_validation_epoch():
    task, _, _ = informative_text_task(n_classes=5, shots=4, dim=16, views=1)
    m = wb.get_method("lp_plus_plus", epochs=30).fit(task)
    accs = []
    for e in range(30):   # refit to each epoch and score on the K-shot val set
        f = wb.get_method("lp_plus_plus", epochs=e + 1, epoch_selection="last").fit(task)
        accs.append(_acc(f.predict_logits(task.val.x), task.val.labels))
    best = max(accs)
    assert m.fit_info["chosen_epoch"] == max(i for i, a in enumerate(accs) if a == best)
    assert m.fit_info["best_val_accuracy"] == pytest.approx(best)


# -- ZS-LP / CLAP -----------------------------------------------------------------------------

def test_clap_multipliers_are_the_zero_shot_true_class_probability_over_all_views():
    task, _, _ = informative_text_task(n_classes=4, shots=3, dim=12, views=20)
    m = wb.get_method("clap", epochs=2, warmup_epochs=0).fit(task)
    assert task.requests == [(20, "")]
    views = F.normalize(task.raw_views.double(), dim=-1).reshape(-1, 12).numpy()
    y = task.labels.repeat(20).numpy()
    logits = 100 * views @ task.text.double().numpy().T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = [p[y == c, c].mean() for c in range(4)]
    assert np.allclose(m.multipliers.numpy(), expected, atol=1e-5)
    balanced = wb.get_method("clap", epochs=1, warmup_epochs=0, multipliers="balanced").fit(task)
    corrected = wb.get_method("clap", epochs=1, warmup_epochs=0, multipliers="corrected").fit(task)
    assert torch.equal(balanced.multipliers, torch.ones(4))
    assert corrected.multipliers.sum().item() == pytest.approx(4.0, rel=1e-5)


@pytest.mark.parametrize("name", ["zs_lp", "clap"])
def test_one_sgd_step_matches_the_float64_gradient_of_ce_plus_penalty(name):
    """A batch larger than the pool = one full-batch step: w₁ = t − lr·∇(CE + [CLAP] mean_c λ_c‖w_c − t_c‖²)."""
    task, _, _ = informative_text_task(n_classes=4, shots=3, dim=12, views=20)
    lr = 0.5
    m = wb.get_method(name, epochs=1, warmup_epochs=0, lr=lr, batch_size=1024, text_norm=2.0).fit(task)
    x = F.normalize(task.raw_views.double(), dim=-1).reshape(-1, 12)
    y = task.labels.repeat(20)
    t = 2.0 * task.text.double()
    w = t.clone().requires_grad_(True)
    loss = F.cross_entropy(100 * x @ (w / w.norm(dim=-1, keepdim=True)).T, y)
    if name == "clap":
        probs = torch.softmax(100 * x @ task.text.double().T, -1)
        lam = torch.stack([probs[y == c, c].mean() for c in range(4)])
        loss = loss + (lam * ((w - t) ** 2).sum(-1)).sum() / 4
    loss.backward()
    expected = t - lr * w.grad
    assert torch.allclose(m.prototypes.double(), expected, atol=1e-5)
    assert m.fit_info["steps"] == 1 and m.fit_info["n_views"] == 240
    if name == "zs_lp":   # the L2 penalty's gradient is zero at w = t, so only a second step can tell the two apart
        assert m.multipliers.numel() == 0


def test_clap_penalty_holds_the_prototypes_nearer_the_text_than_zs_lp():
    task, _, _ = informative_text_task(n_classes=6, shots=8, dim=24, views=20, text_noise=3.0)
    zs_lp = wb.get_method("zs_lp", epochs=60).fit(task)
    clap = wb.get_method("clap", epochs=60, multipliers="balanced").fit(task)
    dist = lambda m: (F.normalize(m.prototypes, dim=-1) - task.text).norm(dim=-1).mean()  # noqa: E731
    assert dist(clap) < dist(zs_lp)


def test_an_epoch_is_as_many_batches_as_the_unaugmented_support_set_gives():
    from workbench.methods.features.zs_lp import batches_per_epoch

    assert batches_per_epoch(1600, 256) == 6 and batches_per_epoch(160, 256) == 1 and batches_per_epoch(512, 256) == 2
    task, _, _ = informative_text_task(n_classes=4, shots=3, dim=12, views=20)
    m = wb.get_method("zs_lp", epochs=7, batch_size=5).fit(task)
    assert m.fit_info["steps"] == 7 * 2


# -- CLIP-Adapter -----------------------------------------------------------------------------

def test_clip_adapter_logits_are_the_residual_blend():
    task, test_x, _ = informative_text_task(n_classes=5, shots=4, dim=16, views=20)
    m = wb.get_method("clip_adapter", epochs=3).fit(task)
    assert m.down.shape == (4, 16) and m.up.shape == (16, 4) and m.fit_info["trainable_parameters"] == 128
    x, w1, w2 = test_x.double(), m.down.double(), m.up.double()
    hidden = np.maximum(x.numpy() @ w1.numpy().T, 0)
    blended = 0.2 * np.maximum(hidden @ w2.numpy().T, 0) + 0.8 * x.numpy()
    blended /= np.linalg.norm(blended, axis=1, keepdims=True)
    expected = 100 * blended @ task.text.double().numpy().T
    assert np.allclose(m.predict_logits(test_x).numpy(), expected, atol=1e-4)
    # bias-free ReLU MLP: raw (unnormalised) features, as the reference feeds them, give the same logits
    assert torch.allclose(m.predict_logits(test_x * 7.3), m.predict_logits(test_x), atol=1e-4)


def test_clip_adapter_one_sgd_step_matches_float64_autograd():
    from workbench.methods.features.clip_adapter import Adapter

    task, _, _ = informative_text_task(n_classes=4, shots=3, dim=12, views=20)
    lr = 0.5
    m = wb.get_method("clip_adapter", epochs=1, warmup_epochs=0, lr=lr, batch_size=1024, reduction=3).fit(task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(task.seed)
        init = Adapter(12, 3).double()
    x = F.normalize(task.raw_views.double(), dim=-1).reshape(-1, 12)
    y = task.labels.repeat(20)
    blended = 0.2 * init(x) + 0.8 * x
    loss = F.cross_entropy(100 * F.normalize(blended, dim=-1) @ task.text.double().T, y)
    loss.backward()
    assert torch.allclose(m.down.double(), init.down.weight - lr * init.down.weight.grad, atol=1e-5)
    assert torch.allclose(m.up.double(), init.up.weight - lr * init.up.weight.grad, atol=1e-5)
    assert not torch.allclose(init.up.weight.grad, torch.zeros(12, 4, dtype=torch.float64))


def test_clip_adapter_with_ratio_zero_is_zero_shot():
    task, test_x, _ = informative_text_task(n_classes=5, shots=4, dim=16, views=20)
    m = wb.get_method("clip_adapter", epochs=2, ratio=0.0).fit(task)
    zs = wb.get_method("zero_shot").fit(task)
    assert torch.allclose(m.predict_logits(test_x), zs.predict_logits(test_x), atol=1e-4)


# -- all four ---------------------------------------------------------------------------------

def test_each_new_method_beats_zero_shot_at_16_shots_where_the_text_is_informative():
    task, test_x, test_y = informative_text_task()
    zero_shot = _acc(wb.get_method("zero_shot").fit(task).predict_logits(test_x), test_y)
    assert 0.3 < zero_shot < 0.8   # informative but imperfect text
    for name in NEW_METHODS:
        acc = _acc(wb.get_method(name).fit(task).predict_logits(test_x), test_y)
        assert acc > zero_shot + 0.1, (name, acc, zero_shot)


def test_save_load_and_predictor_give_the_same_probabilities(shapes, backbone, cache, tmp_path, quiet):
    from workbench.predictor import Predictor

    task = FewShotTask(shapes, sample_few_shot(shapes, 4, 1), backbone, cache, templates=["a photo of a {}."])
    images = [shapes.load_image(s) for s in shapes.split("test")[:5]]
    feats = cache.get(shapes, shapes.split("test")[:5]).x
    small = {"augment_views": 2, "epochs": 4}
    for name in NEW_METHODS:
        m = wb.get_method(name, **({"epochs": 20} if name == "lp_plus_plus" else small)).fit(task)
        back = Method.load(m.save(tmp_path / name))
        assert type(back) is type(m) and back.class_names == m.class_names and back.fit_info == m.fit_info
        assert torch.allclose(back.predict_logits(feats), m.predict_logits(feats), atol=1e-6)
        Predictor(backbone, m, templates=task.templates).save(tmp_path / f"model_{name}")
        table = wb.load(tmp_path / f"model_{name}", device="cpu").predict(images)
        expected = torch.softmax(m.predict_logits(feats), -1).numpy()
        assert np.abs(table[shapes.class_names].to_numpy() - expected).max() < 1e-5, name


@pytest.mark.parametrize("name,params,match", [
    ("lp_plus_plus", {"prototype_init": "centroid"}, "prototype_init must be one of"),
    ("lp_plus_plus", {"alpha_gradient": "summed"}, "alpha_gradient must be one of"),
    ("lp_plus_plus", {"epochs": 0}, "epochs must be an integer >= 1"),
    ("lp_plus_plus", {"momentum": 1.5}, r"momentum must be in \[0, 1\)"),
    ("lp_plus_plus", {"alpha_step": 5}, "unknown parameter 'alpha_step'.*Did you mean 'alpha_every'"),
    ("zs_lp", {"lr": -0.1}, "lr must be > 0"),
    ("zs_lp", {"text_norm": 0}, "text_norm must be a number > 0"),
    ("zs_lp", {"multipliers": "balanced"}, "unknown parameter 'multipliers'"),
    ("clap", {"multipliers": "zero-shot"}, "multipliers must be one of.*Did you mean 'zero_shot'"),
    ("clap", {"batch_size": 0}, "batch_size must be an integer >= 1"),
    ("clip_adapter", {"ratio": 1.5}, r"ratio must be in \[0, 1\]"),
    ("clip_adapter", {"reduction": 0}, "reduction must be an integer >= 1"),
    ("clip_adapter", {"aug_scale": [0.9, 0.1]}, "aug_scale must be"),
    ("clip_adapter", {"warmup_epochs": 300}, r"warmup_epochs must be an integer in \[0, epochs\)"),
])
def test_bad_options_raise_a_clear_config_error_before_fitting(name, params, match):
    with pytest.raises(ConfigError, match=match):
        wb.get_method(name, **params)


def test_the_new_methods_are_listed_as_feature_methods():
    table = wb.available_methods(details=True)
    assert set(NEW_METHODS) <= set(table.index)
    assert (table.loc[NEW_METHODS, "family"] == "features").all()


# -- the fast cached-view loop against a straightforward one (issue 13 speed work) ------------------

def _straightforward_cached_run(name, task, **params):
    """The loop as one would first write it (autograd, torch.optim.SGD, a gather per step), shared with
    the benchmark, where it is the baseline: ``bench/training_free.py``'s ``plain_cached_sgd``."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "training_free.py"
    spec = importlib.util.spec_from_file_location("bench_training_free", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.plain_cached_sgd(name, task, **params)[0]


@pytest.mark.parametrize("name", ["zs_lp", "clap", "clip_adapter"])
def test_the_fast_loop_equals_a_straightforward_autograd_loop_over_several_epochs_and_batches(name):
    task, test_x, _ = informative_text_task(n_classes=4, shots=6, dim=12, views=20)
    params = {"epochs": 5, "batch_size": 5, "lr": 0.05}   # 24 images: 4 batches of 5 an epoch from 480 views
    fast = wb.get_method(name, **params).fit(task)
    assert fast.fit_info["steps"] == 5 * 4
    reference = _straightforward_cached_run(name, task, **params)
    got = [fast.down, fast.up] if name == "clip_adapter" else [fast.prototypes]
    for a, b in zip(got, reference):
        assert torch.allclose(a, b, atol=2e-5), (a - b).abs().max()
    assert not torch.allclose(got[0], _straightforward_cached_run(name, task, **{**params, "epochs": 4})[0], atol=1e-4)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_clip_adapter_gradient_through_the_rescaled_blend_is_exact_at_any_ratio(ratio):
    """Training on x + ρ/(1−ρ)·a (or on a alone at ρ = 1) gives the same step as the ρa + (1−ρ)x of the paper."""
    task, _, _ = informative_text_task(n_classes=4, shots=3, dim=12, views=20)
    params = {"epochs": 3, "batch_size": 1024, "lr": 0.3, "ratio": ratio, "reduction": 3}
    fast = wb.get_method("clip_adapter", **params).fit(task)
    reference = _straightforward_cached_run("clip_adapter", task, **params)
    assert torch.allclose(fast.down, reference[0], atol=2e-5) and torch.allclose(fast.up, reference[1], atol=2e-5)
