import json

import pytest
import torch

import workbench as wb
from workbench import backbones as bb
from workbench.errors import BackboneError


def test_offline_default_is_reproducible_and_normalised(backbone):
    again = wb.load_backbone(device="cpu")
    assert again.weights_hash == backbone.weights_hash
    assert wb.load_backbone(device="cpu", seed=1).weights_hash != backbone.weights_hash
    assert backbone.provenance_id.startswith("workbench-tiny|random-init|")
    feats = backbone.encode_images(torch.randn(3, 3, 64, 64))
    assert feats.dtype == torch.float32 and torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-5)
    text = backbone.text_features(["a photo of a dog.", "a photo of a cat."])
    assert text.shape == (2, backbone.embed_dim) and torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert backbone.logit_bias is None and backbone.logit_scale > 0


def test_augment_transform_shape_and_scale(backbone):
    from PIL import Image

    tf = backbone.augment_transform(scale=(0.08, 1.0))
    assert tf(Image.new("RGB", (100, 80))).shape == (3, 64, 64)
    assert tf.transforms[0].scale == (0.08, 1.0)


def test_bad_names_and_devices_are_clear_errors():
    with pytest.raises(BackboneError, match="unknown architecture 'ViT-B-61'"):
        wb.load_backbone("ViT-B-61")
    with pytest.raises(BackboneError, match="no pretrained tag 'opneai'"):
        wb.load_backbone("ViT-B-16", "opneai")
    with pytest.raises(BackboneError, match="does not exist"):
        wb.load_backbone("workbench-tiny", "/no/such/file.pt")
    if not torch.cuda.is_available():
        with pytest.raises(BackboneError, match="CUDA is not available"):
            wb.load_backbone(device="cuda")
        with pytest.raises(BackboneError, match="needs a GPU"):
            wb.load_backbone(device="cpu", precision="amp_fp16")
    with pytest.raises(BackboneError, match="not a torch device"):
        bb.resolve_device("gpu0")


def test_local_checkpoint_file_in_common_containers(backbone, tmp_path):
    # RemoteCLIP/GeoRSCLIP-style: a plain .pt of another training run, wrapped and prefixed.
    source = wb.load_backbone(device="cpu", seed=7)
    state = {"module." + k: v for k, v in source.model.state_dict().items()}
    path = tmp_path / "RemoteCLIP-tiny.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = wb.load_backbone("workbench-tiny", str(path), device="cpu")
    assert loaded.weights_hash == source.weights_hash != backbone.weights_hash
    assert loaded.source["checkpoint"] == str(path)
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(BackboneError, match="does not fit architecture"):
        wb.load_backbone("workbench-tiny", str(tmp_path / "wrong.pt"))
    (tmp_path / "broken.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(BackboneError, match="could not read checkpoint"):
        wb.load_backbone("workbench-tiny", str(tmp_path / "broken.pt"))


def test_hf_file_download_is_used_for_plain_checkpoints(tmp_path, monkeypatch):
    source = wb.load_backbone(device="cpu", seed=3)
    path = tmp_path / "ckpt.pt"
    torch.save(source.model.state_dict(), path)
    calls = []

    def fake_download(repo_id, filename, cache_dir=None):
        calls.append((repo_id, filename))
        return str(path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = wb.load_backbone("workbench-tiny", "hf-file:chendelong/RemoteCLIP/RemoteCLIP-ViT-B-32.pt")
    assert calls == [("chendelong/RemoteCLIP", "RemoteCLIP-ViT-B-32.pt")]
    assert loaded.weights_hash == source.weights_hash


def test_local_dir_schema(tmp_path):
    source = wb.load_backbone(device="cpu", seed=4)
    cfg = json.loads((bb._CONFIG_DIR / "workbench-tiny.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(source.model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    loaded = wb.load_backbone(f"local-dir:{tmp_path}")
    assert loaded.weights_hash == source.weights_hash
    with pytest.raises(BackboneError, match="folder does not exist"):
        wb.load_backbone(f"local-dir:{tmp_path / 'nope'}")


def test_quickgelu_is_switched_on_for_openai_weights(monkeypatch):
    import open_clip

    seen = {}

    def fake_create(name, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop before downloading")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    with pytest.warns(UserWarning, match="QuickGELU"), pytest.raises(BackboneError, match="stop before"):
        wb.load_backbone("ViT-B-16", "openai")
    assert seen["force_quick_gelu"] is True and seen["pretrained"] == "openai"
    seen.clear()
    with pytest.raises(BackboneError):
        wb.load_backbone("ViT-B-16-quickgelu", "openai")
    assert "force_quick_gelu" not in seen
