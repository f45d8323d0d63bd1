import json

import pytest
import torch

import workbench as wb
from workbench import backbones as bb
from workbench.errors import BackboneError


def test_offline_default_is_reproducible_and_normalised(backbone):
    again = wb.load_backbone("workbench-tiny", device="cpu")
    assert again.weights_hash == backbone.weights_hash
    assert wb.load_backbone("workbench-tiny", device="cpu", seed=1).weights_hash != backbone.weights_hash
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
            wb.load_backbone("workbench-tiny", device="cpu", precision="amp_fp16")
    with pytest.raises(BackboneError, match="not a torch device"):
        bb.resolve_device("gpu0")


def test_local_checkpoint_file_in_common_containers(backbone, tmp_path):
    # RemoteCLIP/GeoRSCLIP-style: a plain .pt of another training run, wrapped and prefixed.
    source = wb.load_backbone("workbench-tiny", device="cpu", seed=7)
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
    source = wb.load_backbone("workbench-tiny", device="cpu", seed=3)
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
    source = wb.load_backbone("workbench-tiny", device="cpu", seed=4)
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


# -- domain CLIPs of the seed papers: each alias up to the network boundary ------------------------

NEW_ALIASES = {"bmc-clip-cf": ("ViT-L-14", "hf-file:BIOMEDICA/BMC_CLIP_CF/BMC_CLIP_CF.pt"),
               "pathgen-clip": ("ViT-B-16", "hf-file:jamessyx/PathGen-CLIP/pathgenclip.pt"),
               "skyclip-vit-l-14": ("ViT-L-14-quickgelu", "url-zip:https://opendatasharing.s3.us-west-2.amazonaws.com"
                                    "/SkyScript/ckpt/SkyCLIP_ViT_L14_top50pct.zip#epoch_20.pt"),
               "skyclip-vit-b-32": ("ViT-B-32", "url-zip:https://opendatasharing.s3.us-west-2.amazonaws.com"
                                    "/SkyScript/ckpt/SkyCLIP_ViT_B32_top50pct.zip#epoch_20.pt"),
               "rs-m-clip": ("hf-hub:joaodaniel/RS-M-CLIP", "")}


def test_seed_paper_aliases_have_exact_recipes_licences_and_sources():
    from pathlib import Path

    recipes = wb.domains.backbone_recipes()
    for alias, (name, pretrained) in NEW_ALIASES.items():
        assert (recipes[alias]["name"], recipes[alias].get("pretrained", "")) == (name, pretrained), alias
        assert recipes[alias]["licence"] and recipes[alias]["source"], alias
    assert recipes["scold"]["loadable"] is False and "CC BY 4.0" in recipes["scold"]["licence"]
    text = (Path(wb.domains.domains_dir()) / "backbones.yaml").read_text()
    for cited in ("wangzhecheng/SkyScript", "jamessyx/PathGen-CLIP", "BIOMEDICA", "DannielSilva/RS-M-CLIP", "enalis/scold"):
        assert cited in text
    with pytest.raises(wb.ConfigError, match="cannot be loaded with stock open_clip"):
        wb.load_backbone("scold")


def _tiny_arch_standing_in(monkeypatch, expected_name):
    """open_clip builds the tiny model whenever the alias asks for its (large) architecture: the recipe's
    own path — download, unwrap, load — runs unchanged, without building a ViT-L."""
    import open_clip

    real = open_clip.create_model_and_transforms
    seen = []

    def create(name, **kwargs):
        seen.append((name, kwargs))
        assert name == expected_name
        return real("workbench-tiny", **{k: v for k, v in kwargs.items() if k != "force_quick_gelu"})

    monkeypatch.setattr(open_clip, "create_model_and_transforms", create)
    return seen


@pytest.mark.parametrize("alias", ["bmc-clip-cf", "pathgen-clip"])
def test_hf_file_aliases_download_their_file_and_unwrap_it(alias, tmp_path, monkeypatch):
    import huggingface_hub

    name, pretrained = NEW_ALIASES[alias]
    source = wb.load_backbone("workbench-tiny", device="cpu", seed=11)
    path = tmp_path / "ckpt.pt"
    # BMC_CLIP_CF.pt layout: an open_clip training checkpoint with "module."-prefixed keys
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in source.model.state_dict().items()}}, path)
    downloads = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, filename, cache_dir=None: downloads.append((repo, filename)) or str(path))
    seen = _tiny_arch_standing_in(monkeypatch, name)
    loaded = wb.load_backbone(alias, device="cpu")
    repo_file = pretrained[len("hf-file:"):]
    assert downloads == [(repo_file.rsplit("/", 1)[0], repo_file.rsplit("/", 1)[1])]
    assert seen[0][1]["pretrained"] is None and loaded.weights_hash == source.weights_hash


def test_skyclip_alias_downloads_and_unpacks_its_zip_once(tmp_path, monkeypatch):
    import zipfile

    source = wb.load_backbone("workbench-tiny", device="cpu", seed=12)
    ckpt = tmp_path / "epoch_20.pt"
    torch.save({"epoch": 20, "state_dict": {"module." + k: v for k, v in source.model.state_dict().items()}}, ckpt)
    calls = []

    def fake_download(url, dest, timeout=30.0):
        calls.append(url)
        with zipfile.ZipFile(dest, "w") as z:
            z.write(ckpt, "SkyCLIP_ViT_L14_top50pct/epoch_20.pt")
            z.writestr("SkyCLIP_ViT_L14_top50pct/params.txt", "lr: 3e-9")

    monkeypatch.setattr(bb, "_download_url", fake_download)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)   # online (a faked download): url-zip honours the offline variables
    seen = _tiny_arch_standing_in(monkeypatch, "ViT-L-14-quickgelu")
    first = wb.load_backbone("skyclip-vit-l-14", device="cpu", cache_dir=str(tmp_path / "cache"))
    again = wb.load_backbone("skyclip-vit-l-14", device="cpu", cache_dir=str(tmp_path / "cache"))
    url = NEW_ALIASES["skyclip-vit-l-14"][1][len("url-zip:"):].split("#")[0]
    assert calls == [url] and len(seen) == 2                       # downloaded once, unpacked once
    assert first.weights_hash == again.weights_hash == source.weights_hash
    assert first.source["checkpoint"].endswith("epoch_20.pt")


def test_url_zip_failures_are_clear(tmp_path, monkeypatch):
    def offline(url, dest, timeout=30.0):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(bb, "_download_url", offline)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)   # the variables unset: the (failing) download is attempted
    with pytest.raises(BackboneError, match=r"could not download https://h/x.zip.*curl -O https://h/x.zip.*epoch_20.pt"):
        wb.load_backbone("workbench-tiny", "url-zip:https://h/x.zip#epoch_20.pt", cache_dir=str(tmp_path))
    monkeypatch.setattr(bb, "_download_url", lambda url, dest, timeout=30.0: dest.write_bytes(b"not a zip"))
    with pytest.raises(BackboneError, match="not a zip archive"):
        wb.load_backbone("workbench-tiny", "url-zip:https://h/y.zip#epoch_20.pt", cache_dir=str(tmp_path))
    with pytest.raises(BackboneError, match="expected 'url-zip:https://"):
        wb.load_backbone("workbench-tiny", "url-zip:https://h/z.zip", cache_dir=str(tmp_path))


def test_rs_m_clip_alias_asks_open_clip_for_its_hub_model(monkeypatch):
    import open_clip

    seen = []

    def fake_create(name, **kwargs):
        seen.append(name)
        raise RuntimeError("stop before downloading")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    with pytest.raises(BackboneError):
        wb.load_backbone("rs-m-clip")
    assert seen == ["hf-hub:joaodaniel/RS-M-CLIP"]
