"""CLIP-SVD, Comp-LoRA and WiSE-FT as methods: they learn, save/reload, merge, interpolate."""
import copy

import pytest
import torch

import workbench as wb
from workbench.data import sample_few_shot, synthetic_shapes
from workbench.errors import ConfigError
from workbench.predictor import Predictor
from workbench.task import FewShotTask

TEMPLATE = ["a photo of a {}."]


@pytest.fixture(scope="module")
def shapes16():
    return synthetic_shapes(4, train_per_class=20, val_per_class=4, test_per_class=15)


@pytest.fixture(scope="module")
def cache(backbone):
    return wb.FeatureCache(backbone, None, show_progress=False)


# The least compute that still shows learning (suite time, issue 22): 4 shots and batch 8; a step's cost is
# mostly the per-step text encode and weight build, so fewer steps is what saves time. Measured (seed 1):
# zero-shot 0.267, CLIP-SVD 0.633 after 20 steps, Comp-LoRA 0.983 after 30.
@pytest.fixture(scope="module")
def zero_shot(backbone, shapes16, cache):
    return wb.run_experiment(shapes16, backbone, "zero_shot", 4, 1, cache=cache,
                             method_params={"templates": TEMPLATE})


@pytest.fixture(scope="module")
def svd_run(backbone, shapes16, cache):
    return wb.run_experiment(shapes16, backbone, "clip_svd", 4, 1, cache=cache,
                             method_params={"iterations": 20, "lr": 5e-3, "batch_size": 8, "templates": TEMPLATE})


@pytest.fixture(scope="module")
def comp_run(backbone, shapes16, cache):
    return wb.run_experiment(shapes16, backbone, "clip_lora", 4, 1, cache=cache,
                             method_params={"iterations": 30, "lr": 5e-3, "batch_size": 8, "subspace": "complement",
                                            "protected_rank": 8})


def _pixels(backbone, ds, n=6):
    return torch.stack([backbone.preprocess(ds.load_image(s)) for s in ds.split("test")[:n]])


def _logits(method, backbone, pixels):
    return method.predict_logits(method.image_backbone(backbone).encode_images(pixels))


# -- CLIP-SVD -----------------------------------------------------------------------------------

def test_clip_svd_defaults_follow_the_reference():
    cfg = wb.get_method("clip_svd").config
    assert (cfg.lr, cfg.weight_decay, cfg.iterations_per_shot, cfg.batch_size, cfg.eta_min) == (5e-4, 0.01, 200, 32, 1e-6)
    assert cfg.params == ["q", "k", "v", "o", "fc1", "fc2"] and cfg.encoder == "both" and cfg.blocks == "all"
    assert cfg.aug_scale == [0.08, 1.0] and cfg.templates == "dataset_first"
    from workbench.methods.weights.clip_svd import apply_preset

    biomed = apply_preset(wb.get_method("clip_svd", preset="biomedclip:ctkidney").config)
    assert (biomed.lr, biomed.epochs, biomed.weight_decay) == (0.001, 200, 0.0)
    # each preset's template from the reference config (configs/few_shot/<dataset>.yaml ``template``)
    assert biomed.templates == ["a photo of a {}."]
    covid = wb.get_method("clip_svd", preset="biomedclip:covid")
    assert apply_preset(covid.config).templates == ["a chest xray of {}."]
    assert covid._templates(None) == ["a chest xray of {}."]            # what training encodes
    mine = apply_preset(wb.get_method("clip_svd", preset="biomedclip:covid", templates=["{}."]).config)
    assert mine.templates == ["{}."]                                     # a user's own templates win
    with pytest.raises(ConfigError, match="unknown preset .biomedclip:kvasr.*Did you mean .biomedclip:kvasir."):
        apply_preset(wb.get_method("clip_svd", preset="biomedclip:kvasr").config)


def test_clip_svd_trainable_count_on_vit_b16_matches_the_reference():
    import open_clip

    from workbench.towers import linear_layers, split_attention

    model = open_clip.create_model("ViT-B-16", pretrained=None)
    split_attention(model)
    names = linear_layers(model, "both", ["q", "k", "v", "o", "fc1", "fc2"])
    modules = dict(model.named_modules())
    # one singular value per min(out, in): 12 x 6 x 768 (vision) + 12 x 6 x 512 (text)
    assert sum(min(modules[n].weight.shape) for n in names) == 92_160


def test_clip_svd_learns_and_beats_zero_shot(svd_run, zero_shot):
    info = svd_run.method.fit_info
    assert info["iterations"] == 20 and info["trainable_parameters"] == 4608
    assert svd_run.row["accuracy"] > zero_shot.row["accuracy"] + 0.2
    assert info["final_loss"] < info["epoch_loss"][0]


def test_clip_svd_saves_only_singular_values_and_reloads(backbone, shapes16, svd_run, tmp_path):
    Predictor(backbone, svd_run.method, templates=TEMPLATE).save(tmp_path / "model")
    folder = tmp_path / "model" / "method"
    size = (folder / "singular_values.safetensors").stat().st_size
    assert 4608 * 4 <= size < 4608 * 4 + 20_000                # float32 singular values + header
    assert not (folder / "adapter").exists()
    loaded = wb.load(tmp_path / "model")
    images = [shapes16.load_image(s) for s in shapes16.split("test")[:5]]
    expected = torch.softmax(Predictor(backbone, svd_run.method).predict_logits(images), -1).numpy()
    assert abs(loaded.predict(images)[shapes16.class_names].to_numpy() - expected).max() < 1e-5


def test_clip_svd_merge_gives_the_same_logits(backbone, shapes16, svd_run):
    method = copy.deepcopy(svd_run.method)
    pixels = _pixels(backbone, shapes16)
    before = _logits(method, backbone, pixels)
    method.merge()
    assert torch.allclose(_logits(method, backbone, pixels), before, atol=1e-4)
    assert not any(n.endswith(".s") for n, _ in method.model.named_parameters())
    with pytest.raises(ConfigError, match="before merge"):
        method.interpolate(0.5)


def test_clip_svd_trains_on_timm_and_bert_towers(biomed_like):
    ds = synthetic_shapes(3, train_per_class=8, val_per_class=2, test_per_class=4, image_size=32)
    run = wb.run_experiment(ds, biomed_like, "clip_svd", 2, 1,
                            method_params={"iterations": 2, "batch_size": 4, "blocks": [0, 1], "templates": TEMPLATE})
    info = run.method.fit_info
    assert info["target_modules"] == 2 * 6 + 2 * 6 and info["iterations"] == 2


# -- CLIP-SVD step cost: the cheaper of the two forms, W built at most once per layer per step -----

def _counting_svd(monkeypatch):
    from workbench.towers import svd

    calls = {"build": 0, "weight": 0}
    build, weight = svd.SVDLinear.weight_from_factors, svd.SVDLinear.weight

    def counting_build(self):
        calls["build"] += 1
        return build(self)

    monkeypatch.setattr(svd.SVDLinear, "weight_from_factors", counting_build)
    monkeypatch.setattr(svd.SVDLinear, "weight",
                        property(lambda self: calls.update(weight=calls["weight"] + 1) or weight.fget(self)))
    return calls


@pytest.mark.parametrize("out_features,in_features,tokens,factored", [
    (16, 16, 8, True),      # a few class prompts: U(s ⊙ Vᵀx) costs 4·T·k² < 3·T·k² + 2·k³
    (16, 16, 200, False),   # image tokens through a square layer: build W once, one matmul
    (64, 16, 200, True),    # the MLP's 4d x d layer trains cheaper factored at any T (10·T·d² < 12·T·d² + 8·d³)
    (16, 64, 200, True),
])
def test_svd_layer_trains_in_its_cheaper_form_with_the_same_math(monkeypatch, out_features, in_features, tokens,
                                                                 factored):
    from workbench.towers.svd import SVDLinear, factored_is_cheaper

    torch.manual_seed(0)
    layer = SVDLinear(torch.nn.Linear(in_features, out_features).double())
    with torch.no_grad():
        layer.s.mul_(torch.linspace(0.5, 1.5, layer.rank, dtype=torch.float64))  # trained-looking values
    assert factored_is_cheaper(tokens, out_features, in_features, layer.rank, training=True) is factored
    calls = _counting_svd(monkeypatch)
    x = torch.randn(2, tokens // 2, in_features, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, tokens // 2, out_features, dtype=torch.float64)
    y = layer(x)
    assert calls == {"build": 0 if factored else 1, "weight": 0}
    (y * dy).sum().backward()
    assert calls == {"build": 0 if factored else 1, "weight": 0}  # backward never rebuilds W
    # independent float64 math: y = x W(s)ᵀ + b, ∂L/∂s_i = Σ_t (dy U)_ti (x Vᵀ)_ti, ∂L/∂x = dy W(s)
    u, vh, s = layer.U, layer.Vh, layer.s.detach()
    w = u @ torch.diag(s) @ vh
    assert torch.allclose(y, x.detach() @ w.T + layer.bias, atol=1e-12)
    assert torch.allclose(layer.s.grad, ((dy @ u) * (x.detach() @ vh.T)).sum((0, 1)), atol=1e-10)
    assert torch.allclose(x.grad, dy @ w, atol=1e-12)


def test_svd_training_step_builds_each_weight_at_most_once(backbone, monkeypatch):
    import torch.nn.functional as F

    model, names = wb.get_method("clip_svd")._build(backbone)
    calls = _counting_svd(monkeypatch)
    pixels = torch.randn(8, 3, backbone.image_size, backbone.image_size)
    tokens = backbone.tokenize([f"a photo of a {c}." for c in ("circle", "square", "triangle")])
    img = F.normalize(model.encode_image(pixels), dim=-1)
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    F.cross_entropy(100 * img @ txt.T, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()
    # q/k/v/out of the 3 vision blocks (8 x 65 tokens > 2 x 128) build W once each; the MLP layers
    # and the 3 x 77 text tokens run factored; nothing reads the .weight property (open_clip asks
    # c_fc for its dtype through int8_original_dtype) and backward builds nothing
    assert calls == {"build": 3 * 4, "weight": 0}
    assert all(m.s.grad is not None for n, m in model.named_modules() if n in names)


# -- Comp-LoRA ----------------------------------------------------------------------------------

def test_comp_lora_learns_and_beats_zero_shot(comp_run, zero_shot):
    info = comp_run.method.fit_info
    assert info["trainable_parameters"] == 9216                  # same count as CLIP-LoRA
    assert comp_run.row["accuracy"] > zero_shot.row["accuracy"] + 0.2


def test_comp_lora_trained_update_avoids_the_protected_subspace(comp_run):
    model = comp_run.method.model
    checked = 0
    for name, layer in model.named_modules():
        if not hasattr(layer, "lora_A") or "default" not in getattr(layer, "lora_A", {}):
            continue
        w = layer.base_layer.weight.detach().double()
        delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().double()
        u, _, vh = torch.linalg.svd(w)
        assert delta.abs().max() > 0
        assert (u[:, :8].T @ delta).abs().max() < 1e-5 * delta.abs().max()
        assert (delta @ vh[:8].T).abs().max() < 1e-5 * delta.abs().max()
        checked += 1
    assert checked == 18


def test_bad_subspace_options_are_clear_errors_before_training(backbone, shapes16):
    task = FewShotTask(shapes16, sample_few_shot(shapes16, 2, 1), backbone,
                       wb.FeatureCache(backbone, None, show_progress=False), templates=TEMPLATE)
    with pytest.raises(ConfigError, match="subspace must be 'full'.*or 'complement'"):
        wb.get_method("clip_lora", subspace="orthogonal").fit(task)
    with pytest.raises(ConfigError, match="protected_rank=4096 leaves no complement"):
        wb.get_method("clip_lora", subspace="complement", protected_rank=4096).fit(task)
    with pytest.raises(ConfigError, match="wise_alpha must be None, a number in \\[0, 1\\] or 'val'"):
        wb.get_method("clip_svd", wise_alpha="best").fit(task)
    with pytest.raises(ConfigError, match="alpha must be a number in \\[0, 1\\]"):
        wb.get_method("clip_svd", wise_alpha=1.5).fit(task)


# -- WiSE-FT ------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["svd", "comp"])
def test_wise_ft_alpha_0_is_zero_shot_and_alpha_1_the_adapted_model(backbone, shapes16, svd_run, comp_run,
                                                                     zero_shot, which):
    run = svd_run if which == "svd" else comp_run
    method = copy.deepcopy(run.method)
    pixels = _pixels(backbone, shapes16)
    adapted = _logits(method, backbone, pixels)
    zs = zero_shot.method.predict_logits(backbone.encode_images(pixels))
    assert not torch.allclose(adapted, zs, atol=1e-2)
    method.interpolate(0.0)
    assert torch.allclose(_logits(method, backbone, pixels), zs, atol=1e-3)
    assert method.fit_info["wise_ft"] == {"alpha": 0.0, "chosen_on": "given"}
    method.interpolate(1.0)
    assert torch.allclose(_logits(method, backbone, pixels), adapted, atol=1e-4)
    with pytest.raises(ConfigError, match="alpha must be a number in \\[0, 1\\]"):
        method.interpolate(-0.5)


def test_wise_ft_alpha_chosen_on_validation_is_recorded_and_reloaded(backbone, shapes16, cache, tmp_path):
    run = wb.run_experiment(shapes16, backbone, "clip_svd", 4, 1, cache=cache,
                            method_params={"iterations": 4, "batch_size": 8, "lr": 5e-3, "templates": TEMPLATE,
                                           "wise_alpha": "val"})
    wise = run.method.fit_info["wise_ft"]
    assert wise["chosen_on"] == "val" and len(wise["val_accuracy"]) == 11
    assert wise["val_accuracy"][str(wise["alpha"])] == max(wise["val_accuracy"].values())
    assert run.record["method"]["fit_info"]["wise_ft"]["alpha"] == wise["alpha"]
    Predictor(backbone, run.method, templates=TEMPLATE).save(tmp_path / "m")
    loaded = wb.load(tmp_path / "m")
    images = [shapes16.load_image(s) for s in shapes16.split("test")[:4]]
    expected = torch.softmax(Predictor(backbone, run.method).predict_logits(images), -1).numpy()
    assert abs(loaded.predict(images)[shapes16.class_names].to_numpy() - expected).max() < 1e-5
