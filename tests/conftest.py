import os
import warnings

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import workbench as wb  # noqa: E402
from workbench.data import synthetic_shapes  # noqa: E402


@pytest.fixture(scope="session")
def backbone():
    return wb.load_backbone("workbench-tiny", device="cpu")  # random init: tests where weights must not matter


@pytest.fixture(scope="session")
def shapes():
    return synthetic_shapes(4, train_per_class=20, val_per_class=6, test_per_class=10)


@pytest.fixture(scope="session")
def whu():
    return wb.load_dataset("whu_rs19_mini")


@pytest.fixture
def cache(backbone, tmp_path):
    return wb.FeatureCache(backbone, tmp_path / "features", show_progress=False)


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="session")
def biomed_like(tmp_path_factory):
    """A BiomedCLIP-shaped backbone built offline: timm ViT image tower + Hugging Face BERT text tower.

    Same open_clip classes as BiomedCLIP (CustomTextCLIP, TimmModel, HFTextEncoder with a CLS
    pooler and an MLP projection), tiny and randomly initialised, from a local BERT folder.
    """
    import json

    import open_clip
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("biomed_like")
    bert = root / "tinybert"
    bert.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "photo", "of", "x", "circle", "square",
             "triangle", "cross", "normal", "pneumonia", "chest", "showing"]
    (bert / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(str(bert))
    BertTokenizer(str(bert / "vocab.txt")).save_pretrained(str(bert))
    configs = root / "configs"
    configs.mkdir()
    (configs / "tiny-biomed.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 32},
        "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 24}}))
    open_clip.add_model_config(configs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = wb.load_backbone("tiny-biomed", device="cpu")
    backbone.model.visual.set_input_size(32)
    return backbone
