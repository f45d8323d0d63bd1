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
        res = wb.run_experiment(ds, backbone, "linear_probe", 2, 1)
        assert 0.0 <= res.row["accuracy"] <= 1.0


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
    spec["source"]["path"] = str(wb.resolve("data/whu_rs19_mini"))
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(wb.DataError, match=r"in data but not in YAML: \[.viaduct.\]"):
        wb.load_dataset(path)
