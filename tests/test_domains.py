import copy

import pytest
import yaml

import workbench as wb
from workbench.domains import load_spec, validate_spec
from workbench.errors import ConfigError


def test_every_yaml_validates_and_offline_sets_load(backbone, quiet):
    table = wb.list_datasets()
    assert {"whu_rs19_mini", "pneumoniamnist_mini"} <= set(table["name"])
    for name in table[table["offline"]]["name"]:
        ds = wb.load_dataset(name)
        assert ds.templates and ds.domain
        multi = getattr(ds, "task", "single_label") == "multi_label"
        res = wb.run_experiment(ds, backbone, "ovr_linear_probe" if multi else "linear_probe", 2, 1)
        assert 0.0 <= res.row["macro_auroc" if multi else "accuracy"] <= 1.0


def test_readable_names_come_from_yaml(whu):
    assert "football field" in whu.class_names and "railway station" in whu.class_names
    assert whu.class_ids[whu.class_names.index("football field")] == "footballfield"


@pytest.fixture
def spec():
    return copy.deepcopy({k: v for k, v in load_spec("whu_rs19_mini").items() if not k.startswith("_")})


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.update(templtes=["x {}"]), "unknown key 'templtes'.*Did you mean 'templates'"),
    (lambda s: s.update(templates=["a satellite photo"]), r"templates\[0\].*exactly one"),
    (lambda s: s["classes"].update(beach="airport"), "readable name 'airport' is used by more than one"),
    (lambda s: s.pop("licence"), "missing required key 'licence'"),
    (lambda s: s["source"].update(kind="ftp"), "source.kind"),
    (lambda s: s["source"].update(colour="red"), "unknown key 'source.colour'"),
    (lambda s: s.update(metric="auc"), "key 'metric'"),
])
def test_schema_errors_name_file_key_expected_and_got(spec, mutate, message):
    mutate(spec)
    with pytest.raises(ConfigError, match=message):
        validate_spec(spec, "domains/x.yaml")


def test_unknown_dataset_name_suggests(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'whu_rs19_mini'"):
        wb.load_dataset("whu_rs19_mni")


def test_yaml_classes_must_match_the_data(tmp_path, spec):
    spec["classes"] = {k: v for k, v in list(spec["classes"].items())[:-1]}  # drop 'viaduct'
    (spec.get("descriptions") or {}).pop("viaduct", None)   # else the descriptions check refuses it first
    spec["source"]["path"] = str(wb.resolve("data/whu_rs19_mini"))
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(wb.DataError, match=r"in the data but not in YAML: \[.viaduct.\]"):
        wb.load_dataset(path)


# -- every YAML, every Hub loader up to the network boundary ---------------------------------

def _all_specs():
    from workbench.domains import domains_dir

    return [load_spec(p) for p in sorted(domains_dir().glob("*/*.yaml"))]


HUB_SPECS = [s for s in _all_specs() if s["source"]["kind"] in ("hub", "hub_archive")]


def test_every_domain_has_an_offline_dataset_and_known_backbones():
    specs = _all_specs()
    assert {s["domain"] for s in specs} == {"remote_sensing", "medical", "agriculture"}
    for domain in ("remote_sensing", "medical", "agriculture"):
        assert wb.domains.offline_dataset(domain)
    aliases = set(wb.domains.backbone_recipes())
    for s in specs:
        assert set(s.get("recommended_backbones", [])) <= aliases, s["_file"]
        assert s["licence"] and s["citation"]
        text = open(s["_file"]).read()
        assert text.lstrip().startswith("#"), f"{s['_file']}: say where the facts come from in a comment"


def _mimic_hub_repo(spec, root):
    """A local folder with the same layout as the Hub repo a YAML names (tiny images, every class)."""
    import zipfile

    import datasets as hfds
    from PIL import Image

    src = spec["source"]
    ids = list(spec["classes"])
    repo = root / spec["name"]
    repo.mkdir()
    if src["kind"] == "hub_archive":  # BiomedCoOp: one zip of class folders per dataset
        with zipfile.ZipFile(repo / src["filename"], "w") as z:
            for cid in ids:
                for i in range(3):
                    path = root / f"{cid}_{i}.png"
                    Image.new("RGB", (8, 8), (i * 90, 40, 40)).save(path)
                    z.write(path, f"{src['subdir']}/{cid}/{i}.png")
        return repo
    label_cols = src.get("label_column", "label")
    label_cols = [label_cols] if isinstance(label_cols, str) else label_cols
    if len(label_cols) == 1:
        feats = hfds.Features({src.get("image_column", "image"): hfds.Image(),
                               label_cols[0]: hfds.ClassLabel(names=ids)})
        rows = {label_cols[0]: list(range(len(ids))) * 2}
    else:
        feats = hfds.Features({src.get("image_column", "image"): hfds.Image(), **{c: hfds.Value("string")
                                                                                 for c in label_cols}})
        parts = [cid.split("/") for cid in ids] * 2
        rows = {c: [p[j] for p in parts] for j, c in enumerate(label_cols)}
    rows[src.get("image_column", "image")] = [Image.new("RGB", (8, 8), (i * 9 % 255, 0, 0)) for i in range(2 * len(ids))]
    config = src.get("config") or "default"
    lines = ["---", "configs:", f"- config_name: {config}", "  data_files:"]
    for split in set((src.get("splits") or {"train": "train"}).values()):
        hfds.Dataset.from_dict(rows, features=feats).to_parquet(str(repo / f"{config}-{split}.parquet"))
        lines += [f"  - split: {split}", f"    path: {config}-{split}.parquet"]
    (repo / "README.md").write_text("\n".join(lines + ["---", ""]))
    return repo


@pytest.mark.parametrize("spec", HUB_SPECS, ids=lambda s: s["name"])
def test_hub_entry_loads_from_a_local_copy_with_the_same_layout(spec, tmp_path, quiet):
    repo = _mimic_hub_repo(spec, tmp_path)
    ds = wb.load_dataset(spec["name"], repo_id=str(repo), cache_dir=str(tmp_path / "hf"))
    assert sorted(ds.class_ids) == sorted(spec["classes"])
    assert [spec["classes"][c] for c in ds.class_ids] == ds.class_names
    assert ds.has_split("test") and ds.split("train")
    assert ds.load_image(ds.split("train")[0]).mode == "RGB"
    assert ds.templates == spec["templates"] and ds.domain == spec["domain"]


def test_backbone_aliases(backbone):
    recipes = wb.domains.backbone_recipes()
    assert recipes["biomedclip"]["name"].startswith("hf-hub:microsoft/BiomedCLIP")
    assert recipes["remoteclip-vit-b-32"]["name"] == "ViT-B-32-quickgelu"
    assert "non-commercial" in recipes["unimed-clip-vit-b-16"]["licence"]
    assert "research" in recipes["mobileclip-s2"]["licence"]
    assert wb.load_backbone("workbench-tiny").weights_hash == backbone.weights_hash
    with pytest.raises(ConfigError, match="cannot be loaded with stock open_clip"):
        wb.load_backbone("unimed-clip-vit-b-16")
    with pytest.raises(wb.BackboneError, match="alias that fixes its own weights"):
        wb.load_backbone("openai-vit-b-16", "laion2b_s34b_b88k")


def test_remoteclip_alias_downloads_its_file_once(tmp_path, monkeypatch):
    import huggingface_hub
    import torch

    arch = wb.load_backbone("workbench-tiny", seed=5)
    path = tmp_path / "RemoteCLIP-tiny.pt"
    torch.save(arch.model.state_dict(), path)
    seen = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, filename, cache_dir=None: seen.append((repo, filename)) or str(path))
    from workbench import domains

    real = domains.backbone_recipes
    monkeypatch.setattr(domains, "backbone_recipes", lambda: {**real(), "tiny-remote": {
        "name": "workbench-tiny", "pretrained": "hf-file:chendelong/RemoteCLIP/RemoteCLIP-tiny.pt",
        "licence": "x", "source": "x"}})
    loaded = wb.load_backbone("tiny-remote")
    assert seen == [("chendelong/RemoteCLIP", "RemoteCLIP-tiny.pt")] and loaded.weights_hash == arch.weights_hash


def test_cli_domains(capsys):
    from workbench.cli import main

    assert main(["domains", "list", "agriculture"]) == 0
    assert "leaf_disease_synthetic" in capsys.readouterr().out
    assert main(["domains", "show", "eurosat"]) == 0
    out = capsys.readouterr().out
    assert "SeaLake -> Sea or Lake" in out and "a centered satellite photo of {}." in out
    assert main(["domains", "backbones", "medical"]) == 0
    assert "biomedclip" in capsys.readouterr().out
    assert main(["domains", "list", "medicine"]) == 2
    assert "Did you mean 'medical'" in capsys.readouterr().err


def test_synthetic_leaves_are_deterministic_and_distinct():
    import numpy as np

    a, b = wb.load_dataset("leaf_disease_synthetic"), wb.load_dataset("leaf_disease_synthetic")
    s = a.split("train")[0]
    assert np.array_equal(np.asarray(a.load_image(s)), np.asarray(b.load_image(s)))
    assert a.class_names == ["healthy leaf", "rust", "blight", "powdery mildew"]
    means = [np.asarray(a.load_image(x), dtype=float).mean((0, 1)) for x in a.split("train")[::30]]
    assert len({tuple(np.round(m)) for m in means}) == 4


def test_hub_archive_is_downloaded_and_extracted_once(tmp_path, monkeypatch, quiet):
    import huggingface_hub

    spec = load_spec("busi")
    repo = _mimic_hub_repo(spec, tmp_path)
    calls = []

    def fake_download(repo_id, filename, repo_type=None, cache_dir=None):
        calls.append((repo_id, filename, repo_type))
        return str(repo / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    a = wb.load_dataset("busi", cache_dir=str(tmp_path / "cache"))
    b = wb.load_dataset("busi", cache_dir=str(tmp_path / "cache"))
    assert calls == [("TahaKoleilat/BiomedCoOp", "BUSI.zip", "dataset")] * 2  # hub's own cache makes this cheap
    assert len(list((tmp_path / "cache" / "extracted").iterdir())) == 1      # extracted once
    assert a.fingerprint() == b.fingerprint() and a.class_names == ["benign tumor", "malignant tumor", "normal scan"]
    (repo / "BUSI.zip").write_bytes(b"not a zip")
    with pytest.raises(wb.DataError, match="not a valid zip"):
        wb.load_dataset("busi", cache_dir=str(tmp_path / "cache2"))
