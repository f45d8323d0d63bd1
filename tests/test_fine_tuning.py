"""CLIP-LoRA and CoOp: attention splitting, LoRA algebra, CoOp initialisation, the training loop, saved models."""
import copy
import functools

import pytest
import torch
import torch.nn as nn

import workbench as wb
from workbench import training
from workbench.data import sample_few_shot, synthetic_shapes
from workbench.errors import ConfigError
from workbench.towers import SplitAttention, SplitQKV, split_attention
from workbench.towers.select import linear_layers as lora_target_names
from workbench.methods.prompts.coop import PromptLearner, default_epochs
from workbench.towers.text import TextTower
from workbench.task import FewShotTask


@pytest.fixture(scope="module")
def shapes16():
    return synthetic_shapes(4, train_per_class=20, val_per_class=4, test_per_class=15)


def _task(ds, backbone, shots=4, seed=1):
    return FewShotTask(ds, sample_few_shot(ds, shots, seed), backbone, wb.FeatureCache(backbone, None,
                                                                                        show_progress=False),
                       templates=["a photo of a {}."])


# -- attention splitting and LoRA algebra -----------------------------------------------------

def test_split_attention_changes_no_output(backbone):
    model = copy.deepcopy(backbone.model)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # fixed: independent of test order
    tokens = backbone.tokenize(["a photo of a cat.", "aerial imagery of a river."])
    with torch.no_grad():
        img0, txt0 = model.encode_image(x), model.encode_text(tokens)
        assert split_attention(model) == 6  # 3 vision + 3 text blocks
        img1, txt1 = model.encode_image(x), model.encode_text(tokens)
    # equal to float32 rounding: outputs are O(1) and the split sums in another order (seen: up to 1.6e-6)
    assert (img0 - img1).abs().max() < 1e-5 and (txt0 - txt1).abs().max() < 1e-5
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def test_split_attention_module_with_masks_and_seq_first():
    mha = nn.MultiheadAttention(16, 4, batch_first=False)
    split = SplitAttention(mha)
    q = torch.randn(5, 2, 16)  # (L, N, E)
    causal = torch.full((5, 5), float("-inf")).triu(1)
    pad = torch.tensor([[False] * 4 + [True], [False] * 5])
    ref = mha(q, q, q, need_weights=False, attn_mask=causal, key_padding_mask=pad)[0]
    out = split(q, q, q, need_weights=False, attn_mask=causal, key_padding_mask=pad)[0]
    assert torch.allclose(ref, out, atol=1e-6)


def test_split_qkv_for_timm_attention():
    from timm.models.vision_transformer import Attention

    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 7, 32)
    ref = attn(x)
    assert split_attention(attn) == 1 and isinstance(attn.qkv, SplitQKV)
    assert torch.allclose(attn(x), ref, atol=1e-6)


def test_lora_targets_follow_encoder_matrices_and_blocks(backbone):
    model = copy.deepcopy(backbone.model)
    split_attention(model)
    assert len(lora_target_names(model)) == 18
    vis = lora_target_names(model, encoder="vision", matrices=["q", "v"], blocks=[0, 2])
    assert vis == ["visual.transformer.resblocks.0.attn.q_proj", "visual.transformer.resblocks.0.attn.v_proj",
                   "visual.transformer.resblocks.2.attn.q_proj", "visual.transformer.resblocks.2.attn.v_proj"]
    assert all(n.endswith("out_proj") for n in lora_target_names(model, encoder="text", matrices=["o"]))
    with pytest.raises(ConfigError, match="unknown matrix 'x'"):
        lora_target_names(model, matrices=["x"])


def test_lora_init_equals_base_and_uses_rslora_scaling(backbone):
    m = wb.get_method("clip_lora")
    peft_model, names = m._build(backbone)
    layer = dict(peft_model.named_modules())["base_model.model." + names[0]]
    assert layer.scaling["default"] == pytest.approx(1.0 / 2 ** 0.5)         # alpha / sqrt(r)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0           # B = 0
    assert layer.lora_A["default"].weight.abs().sum() > 0                     # A kaiming-uniform
    assert layer.lora_dropout["default"].p == 0.25
    peft_model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(peft_model.encode_image(x), backbone.model.encode_image(x), atol=1e-5)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == 6 * 3 * 2 * 2 * 128  # blocks x (q,k,v) x 2·r·d, as the reference's count


# -- CLIP-LoRA training, merge, save/load -----------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(backbone, shapes16):
    # the least compute that still shows learning (suite time, issue 22): 4 shots, batch 8, 30 steps
    # (was 16 shots, batch 32, 60 steps: 8x the images through the encoder) reach 0.95 against 0.27 zero-shot
    return wb.run_experiment(shapes16, backbone, "clip_lora", 4, 1,
                             method_params={"iterations": 30, "lr": 5e-3, "batch_size": 8})


def test_clip_lora_learns_and_beats_zero_shot(backbone, shapes16, lora_run):
    zs = wb.run_experiment(shapes16, backbone, "zero_shot", 4, 1)
    info = lora_run.method.fit_info
    assert info["iterations"] == 30 and info["trainable_parameters"] == 9216
    assert lora_run.row["accuracy"] > zs.row["accuracy"] + 0.2
    assert info["final_loss"] < 1.0  # from log(4) = 1.39 at the start


def test_clip_lora_merge_gives_the_same_logits(backbone, shapes16, lora_run):
    method = copy.deepcopy(lora_run.method)
    pixels = torch.stack([backbone.preprocess(shapes16.load_image(s)) for s in shapes16.split("test")[:6]])
    before = method.predict_logits(method.image_backbone(backbone).encode_images(pixels))
    method.merge()
    after = method.predict_logits(method.image_backbone(backbone).encode_images(pixels))
    assert torch.allclose(before, after, atol=1e-5)
    assert not any("lora_" in n for n, _ in method.model.named_parameters())


def test_clip_lora_save_load_predict_equals_in_memory(backbone, shapes16, lora_run, tmp_path):
    from workbench.predictor import Predictor

    Predictor(backbone, lora_run.method, templates=["a photo of a {}."]).save(tmp_path / "model")
    assert (tmp_path / "model" / "method" / "adapter" / "adapter_config.json").is_file()  # peft format
    loaded = wb.load(tmp_path / "model")
    images = [shapes16.load_image(s) for s in shapes16.split("test")[:5]]
    expected = torch.softmax(Predictor(backbone, lora_run.method).predict_logits(images), -1).numpy()
    table = loaded.predict(images)
    assert abs(table[shapes16.class_names].to_numpy() - expected).max() < 1e-5


# -- CoOp -------------------------------------------------------------------------------------

def test_coop_from_a_photo_of_a_equals_zero_shot_before_training(backbone, shapes16):
    task = _task(shapes16, backbone)
    tower = TextTower(backbone.model)
    learner = PromptLearner(tower, backbone.tokenizer, task.class_names, 16, "a photo of a", False, "end", 0.02,
                            torch.Generator())
    assert learner.n_ctx == 4
    with torch.no_grad():
        txt = torch.nn.functional.normalize(tower.encode(learner(), learner.tokens), dim=-1)
    feats = wb.FeatureCache(backbone, None, show_progress=False).get(shapes16, shapes16.split("test")).x
    zero_shot = wb.get_method("zero_shot", templates=["a photo of a {}."]).fit(task).predict_logits(feats)
    assert torch.allclose(backbone.logit_scale * feats @ txt.T, zero_shot, atol=1e-5)


@pytest.mark.parametrize("position", ["middle", "front"])
def test_coop_class_token_positions_keep_every_token(backbone, position):
    tower = TextTower(backbone.model)
    end = PromptLearner(tower, backbone.tokenizer, ["sea or lake", "river"], 4, "", False, "end", 0.02,
                        torch.Generator().manual_seed(0))
    other = PromptLearner(tower, backbone.tokenizer, ["sea or lake", "river"], 4, "", False, position, 0.02,
                          torch.Generator().manual_seed(0))
    assert end.name_lens == [3, 1]
    a, b = end(), other()
    assert a.shape == b.shape
    # same multiset of rows per prompt: only the order of context and class tokens differs
    assert torch.allclose(a.sum(1), b.sum(1), atol=1e-5)
    assert not torch.allclose(a, b)


def test_coop_defaults_follow_the_reference():
    cfg = wb.get_method("coop").config
    assert (cfg.n_ctx, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size) == (16, 0.002, 0.9, 5e-4, 32)
    assert (cfg.warmup_epochs, cfg.warmup_lr, cfg.csc, cfg.class_token_position) == (1, 1e-5, False, "end")
    assert [default_epochs(k) for k in (1, 2, 4, 8, 16, 3, 32)] == [50, 100, 100, 200, 200, 100, 200]
    tc = training.TrainConfig(epochs=10, lr=0.002, schedule="cosine_epoch", warmup_epochs=1, warmup_lr=1e-5)
    assert training.learning_rate(tc, 0, 0, 100) == 1e-5                     # constant warm-up epoch
    assert training.learning_rate(tc, 10, 1, 100) == pytest.approx(0.002)     # cosine starts after it
    assert training.learning_rate(tc, 99, 9, 100) == pytest.approx(0.001 * (1 + torch.cos(torch.tensor(0.8 * torch.pi))).item())


def test_coop_learns_and_beats_zero_shot(backbone, shapes16):
    cache = wb.FeatureCache(backbone, None, show_progress=False)
    zs = wb.run_experiment(shapes16, backbone, "zero_shot", 16, 1, cache=cache)
    run = wb.run_experiment(shapes16, backbone, "coop", 16, 1, cache=cache, method_params={"epochs": 20, "lr": 0.02})
    info = run.method.fit_info
    assert info["final_loss"] < info["first_epoch_loss"]
    assert run.row["accuracy"] > zs.row["accuracy"] + 0.2


def test_unsupported_text_tower_is_a_clear_error():
    class Fake(nn.Module):
        pass

    with pytest.raises(ConfigError, match="Prompt learning supports"):
        TextTower(Fake())


# -- the training loop: resume, NaN guard ----------------------------------------------------

def test_interrupted_coop_run_resumes_to_the_same_weights(backbone, shapes16, tmp_path, monkeypatch):
    params = {"epochs": 6, "lr": 0.02, "checkpoint_every": 1}
    task = _task(shapes16, backbone)
    full = wb.get_method("coop", checkpoint_dir=str(tmp_path / "a"), **params).fit(task)
    real_train = training.train
    import workbench.methods.prompts.coop as coop_module

    monkeypatch.setattr(coop_module, "train", functools.partial(real_train, stop_after_epoch=3))
    wb.get_method("coop", checkpoint_dir=str(tmp_path / "b"), **params).fit(task)  # killed after epoch 3
    monkeypatch.setattr(coop_module, "train", real_train)
    resumed = wb.get_method("coop", checkpoint_dir=str(tmp_path / "b"), **params).fit(task)
    assert resumed.fit_info["resumed_from_epoch"] == 3
    assert torch.equal(resumed.ctx, full.ctx)


def test_interrupted_lora_run_with_dropout_resumes_to_the_same_weights(backbone, shapes16, tmp_path, monkeypatch):
    import workbench.methods.weights.clip_lora as lora_module

    params = {"iterations": 8, "batch_size": 8, "checkpoint_every": 1}
    task = _task(shapes16, backbone, shots=4)  # 16 images: 2 batches per epoch, 4 epochs
    full = wb.get_method("clip_lora", checkpoint_dir=str(tmp_path / "a"), **params).fit(task)
    real_train = training.train
    monkeypatch.setattr(lora_module, "train", functools.partial(real_train, stop_after_epoch=2))
    wb.get_method("clip_lora", checkpoint_dir=str(tmp_path / "b"), **params).fit(task)
    monkeypatch.setattr(lora_module, "train", real_train)
    resumed = wb.get_method("clip_lora", checkpoint_dir=str(tmp_path / "b"), **params).fit(task)
    assert resumed.fit_info["resumed_from_epoch"] == 2
    a = {k: v for k, v in full.model.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in resumed.model.state_dict().items() if "lora_" in k}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_with_step_and_hint():
    module = nn.Linear(2, 1)
    calls = {"n": 0}

    def loss_fn(batch):
        calls["n"] += 1
        out = module(batch).sum()
        return out * float("nan") if calls["n"] == 3 else out

    def batches(epoch, gen):
        yield torch.ones(1, 2)

    with pytest.raises(training.TrainingDiverged, match=r"at step 2 \(epoch 2.*fp32"):
        training.train(module, loss_fn, batches, training.TrainConfig(epochs=5), device=torch.device("cpu"),
                       show_progress=False)


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    module = nn.Linear(2, 1)

    def batches(epoch, gen):
        yield torch.ones(1, 2)

    cfg = training.TrainConfig(epochs=2, checkpoint_every=1)
    training.train(module, lambda b: module(b).sum(), batches, cfg, device=torch.device("cpu"),
                   checkpoint_dir=tmp_path, show_progress=False)
    with pytest.raises(wb.WorkbenchError, match="other training settings"):
        training.train(module, lambda b: module(b).sum(), batches, training.TrainConfig(epochs=3, checkpoint_every=1),
                       device=torch.device("cpu"), checkpoint_dir=tmp_path, show_progress=False)


# -- BiomedCLIP-shaped towers: timm ViT (fused qkv) + Hugging Face BERT -----------------------

def test_split_attention_and_lora_targets_on_timm_and_bert_towers(biomed_like):
    model = copy.deepcopy(biomed_like.model)
    x = torch.randn(2, 3, 32, 32)
    tokens = biomed_like.tokenize(["a photo of a circle.", "a chest showing pneumonia."])
    with torch.no_grad():
        img0, txt0 = model.encode_image(x), model.encode_text(tokens)
        assert split_attention(model) == 12  # vit_tiny has 12 blocks; BERT needs no splitting
        img1, txt1 = model.encode_image(x), model.encode_text(tokens)
    assert (img0 - img1).abs().max() < 1e-5 and torch.equal(txt0, txt1)
    vision = lora_target_names(model, encoder="vision")
    text = lora_target_names(model, encoder="text")
    assert len(vision) == 36 and vision[0].endswith("blocks.0.attn.qkv.q_proj")
    assert len(text) == 6 and text[0].endswith("layer.0.attention.self.query")


def test_coop_on_a_hugging_face_text_tower(biomed_like):
    ds = synthetic_shapes(3, train_per_class=8, val_per_class=2, test_per_class=4, image_size=32)
    task = _task(ds, biomed_like, shots=2)
    tower = TextTower(biomed_like.model)
    assert tower.kind == "hf"
    learner = PromptLearner(tower, biomed_like.tokenizer, task.class_names, 16, "a photo of a", False, "end", 0.02,
                            torch.Generator())
    with torch.no_grad():
        txt = torch.nn.functional.normalize(tower.encode(learner(), learner.tokens), dim=-1)
    assert learner.n_ctx == 4
    assert torch.allclose(txt, task.text_classifier(["a photo of a {}."]), atol=1e-5)
    run = wb.get_method("coop", epochs=3, n_ctx=4).fit(task)
    assert run.fit_info["text_tower"] == "hf" and run.fit_info["steps"] == 3


def test_clip_lora_trains_on_timm_and_bert_towers(biomed_like):
    ds = synthetic_shapes(3, train_per_class=8, val_per_class=2, test_per_class=4, image_size=32)
    run = wb.run_experiment(ds, biomed_like, "clip_lora", 2, 1, method_params={"iterations": 2, "batch_size": 4})
    assert run.method.fit_info["target_modules"] == 36 + 6 and run.method.fit_info["iterations"] == 2


def test_clip_lora_can_keep_the_best_validation_epoch(backbone, shapes16):
    task = _task(shapes16, backbone, shots=4)
    run = wb.get_method("clip_lora", iterations=6, batch_size=8, lr=5e-3, checkpoint_selection="val").fit(task)
    info = run.fit_info
    assert info["checkpoint_selection"] == "val" and 0 <= info["chosen_epoch"] < info["epochs"]
    with pytest.raises(ConfigError, match="checkpoint_selection"):
        wb.get_method("clip_lora", checkpoint_selection="test").fit(task)


# -- CLIP-LoRA memory: no second copy of the model; text features cached for encoder="vision" ---

def _storages(tensors) -> dict:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def test_lora_model_adds_only_its_adapters_to_the_backbones_memory(backbone):
    flags = [p.requires_grad for p in backbone.model.parameters()]
    model, _ = wb.get_method("clip_lora")._build(backbone)
    base = _storages(backbone.model.parameters())
    own = _storages(list(model.parameters()) + list(model.buffers()))
    new_bytes = sum(n for ptr, n in own.items() if ptr not in base)
    lora_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    # before: a deep copy of the whole model (~30 MB for the tiny backbone, ~600 MB for ViT-B/16)
    assert new_bytes <= lora_bytes + buffer_bytes
    assert [p.requires_grad for p in backbone.model.parameters()] == flags  # the backbone's flags are its own
    q = model.base_model.model.visual.transformer.resblocks[0].attn.q_proj.base_layer.weight
    fused = backbone.model.visual.transformer.resblocks[0].attn.in_proj_weight
    assert q.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()  # a view, not a copy


def test_clip_lora_merge_leaves_the_shared_backbone_unchanged(backbone, shapes16):
    method = wb.get_method("clip_lora", iterations=2, batch_size=8, lr=5e-2).fit(_task(shapes16, backbone))
    pixels = torch.stack([backbone.preprocess(shapes16.load_image(s)) for s in shapes16.split("test")[:4]])
    before = backbone.encode_images(pixels)
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    adapted = method.predict_logits(method.image_backbone(backbone).encode_images(pixels))
    method.merge()  # peft adds s·B·A to the base weights in place: they must be the method's own by then
    assert torch.allclose(method.predict_logits(method.image_backbone(backbone).encode_images(pixels)), adapted,
                          atol=1e-5)
    assert all(torch.equal(v, state[k]) for k, v in backbone.model.state_dict().items())
    assert torch.equal(backbone.encode_images(pixels), before)


def _count_text_forwards(monkeypatch):
    """Counts forwards of the text transformer of every model CLIP-LoRA builds."""
    from workbench.methods.weights.clip_lora import CLIPLoRA

    calls = {"text": 0}
    build = CLIPLoRA._build

    def counting_build(self, backbone, cfg=None):
        model, names = build(self, backbone, cfg)
        model.base_model.model.transformer.register_forward_hook(lambda *_: calls.update(text=calls["text"] + 1))
        return model, names

    monkeypatch.setattr(CLIPLoRA, "_build", counting_build)
    return calls


@pytest.mark.parametrize("iterations", [2, 5])
def test_vision_only_lora_encodes_the_class_prompts_once_per_fit(backbone, shapes16, monkeypatch, iterations):
    calls = _count_text_forwards(monkeypatch)
    wb.get_method("clip_lora", encoder="vision", iterations=iterations, batch_size=8).fit(_task(shapes16, backbone))
    assert calls["text"] == 1  # not once per step (+1 for the final classifier)


def test_cached_text_features_give_the_uncached_run(backbone, shapes16, monkeypatch):
    from workbench.methods.weights import clip_lora

    params = dict(encoder="vision", iterations=4, batch_size=8, lr=5e-3)
    cached = wb.get_method("clip_lora", **params).fit(_task(shapes16, backbone))
    monkeypatch.setattr(clip_lora, "_text_is_frozen", lambda cfg: False)
    calls = _count_text_forwards(monkeypatch)
    uncached = wb.get_method("clip_lora", **params).fit(_task(shapes16, backbone))
    assert calls["text"] == 4 + 1  # the uncached path really re-encodes at every step
    assert torch.allclose(cached.text_weights, uncached.text_weights, atol=1e-6)
    a, b = (clip_lora.lora_parameters(m.model) for m in (cached, uncached))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert cached.fit_info["final_loss"] == pytest.approx(uncached.fit_info["final_loss"], abs=1e-6)
