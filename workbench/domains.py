"""Dataset descriptions as data: ``domains/<domain>/<dataset>.yaml``.

One YAML per dataset says where the images come from, the class ids and their readable names,
the prompt templates, the task type, the primary metric, licence and citation. Loading a
dataset by name needs no code per dataset::

    ds = workbench.load_dataset("whu_rs19_mini")          # finds domains/*/whu_rs19_mini.yaml
    ds = workbench.load_dataset("domains/medical/x.yaml")  # or a path

Relative ``source.path`` values are resolved against the repository root (the folder that
holds ``domains/``), so the same YAML works from JupyterLab, papermill and the tests.
"""
from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import yaml

from .data.dataset import Dataset
from .errors import ConfigError, DataError, did_you_mean
from .paths import repo_root

TOP_KEYS = {
    "name": (str, True), "domain": (str, True), "task": (str, False), "source": (dict, True),
    "classes": (dict, True), "templates": (list, True), "descriptions": (dict, False), "metric": (str, False),
    "recommended_backbones": (list, False), "licence": (str, True), "citation": (str, True),
    "description": (str, False), "offline": (bool, False), "notes": (str, False),
}
SOURCE_KEYS = {
    "folder": {"path", "test_fraction", "split_seed", "max_bad_fraction"},
    "csv": {"path", "path_column", "label_column", "split_column", "root", "test_fraction", "split_seed"},
    "npz": {"path", "test_fraction", "split_seed"},
    "hub": {"repo_id", "config", "image_column", "label_column", "splits", "data_files", "revision",
            "test_fraction", "split_seed"},
    "hub_archive": {"repo_id", "filename", "subdir", "test_fraction", "split_seed", "max_bad_fraction"},
    "synthetic": {"generator", "train_per_class", "val_per_class", "test_per_class", "image_size", "seed"},
}
GENERATORS = ("leaves", "shapes")
TASKS = ("single-label", "multi-label")
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")


def domains_dir() -> Path:
    return repo_root() / "domains"


def _err(file, key, expected, got) -> ConfigError:
    return ConfigError(f"{file}: key {key!r}: expected {expected}, got {got!r}.")


def validate_spec(spec: Any, file: str = "<spec>") -> dict:
    """Check a dataset YAML's structure; errors name the file, the key, what was expected and what came."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{file}: expected a mapping at the top level, got {type(spec).__name__}.")
    unknown = sorted(set(spec) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{file}: unknown key {unknown[0]!r}; allowed keys are {sorted(TOP_KEYS)}."
                          + did_you_mean(unknown[0], TOP_KEYS))
    for key, (typ, required) in TOP_KEYS.items():
        if key not in spec:
            if required:
                raise ConfigError(f"{file}: missing required key {key!r} ({typ.__name__}).")
            continue
        if not isinstance(spec[key], typ):
            raise _err(file, key, typ.__name__, spec[key])
    task = spec.get("task", "single-label")
    if task not in TASKS:
        raise _err(file, "task", f"one of {TASKS}", task)
    metric = spec.get("metric", "accuracy")
    if metric not in METRICS:
        raise _err(file, "metric", f"one of {METRICS}", metric)
    source = spec["source"]
    kind = source.get("kind")
    if kind not in SOURCE_KEYS:
        raise _err(file, "source.kind", f"one of {sorted(SOURCE_KEYS)}", kind)
    extra = sorted(set(source) - SOURCE_KEYS[kind] - {"kind"})
    if extra:
        raise ConfigError(f"{file}: unknown key 'source.{extra[0]}' for kind {kind!r}; allowed: "
                          f"{sorted(SOURCE_KEYS[kind])}." + did_you_mean(extra[0], SOURCE_KEYS[kind]))
    need = {"hub": "repo_id", "hub_archive": "repo_id", "synthetic": "generator"}.get(kind, "path")
    if kind == "synthetic" and source.get("generator") not in GENERATORS:
        raise _err(file, "source.generator", f"one of {GENERATORS}", source.get("generator"))
    if need not in source:
        raise ConfigError(f"{file}: source of kind {kind!r} needs 'source.{need}'.")
    classes = spec["classes"]
    if not classes:
        raise ConfigError(f"{file}: 'classes' is empty; map each class id to its readable name.")
    names = [str(v) for v in classes.values()]
    for cid, name in classes.items():
        if name is None or not str(name).strip():
            raise _err(file, f"classes.{cid}", "a readable class name", name)
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ConfigError(f"{file}: key 'classes': readable name {dups[0]!r} is used by more than one class id.")
    for i, t in enumerate(spec["templates"]):
        if not isinstance(t, str) or t.count("{}") != 1:
            raise _err(file, f"templates[{i}]", "a string with exactly one '{}'", t)
    for cname, descs in (spec.get("descriptions") or {}).items():
        if cname not in names:
            raise ConfigError(f"{file}: 'descriptions' has class {cname!r}, which is not a readable class name."
                              + did_you_mean(cname, names))
        if not isinstance(descs, list) or not all(isinstance(d, str) for d in descs):
            raise _err(file, f"descriptions.{cname}", "a list of strings", descs)
    return spec


def spec_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_absolute() and not p.exists():
            p = repo_root() / p
        if not p.is_file():
            raise ConfigError(f"dataset YAML {str(name_or_path)!r} does not exist.")
        return p
    matches = sorted(domains_dir().glob(f"*/{name_or_path}.yaml"))
    if not matches:
        known = [q.stem for q in domains_dir().glob("*/*.yaml")]
        raise ConfigError(f"no dataset named {str(name_or_path)!r} in {domains_dir()}; known: {sorted(known)}."
                          + did_you_mean(str(name_or_path), known))
    if len(matches) > 1:
        raise ConfigError(f"dataset name {str(name_or_path)!r} is ambiguous: {[str(m) for m in matches]}; pass the path.")
    return matches[0]


def load_spec(name_or_path: str | Path) -> dict:
    path = spec_path(name_or_path)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    spec = validate_spec(spec, str(path))
    spec["_file"] = str(path)
    return spec


def list_datasets(domain: str | None = None) -> "Any":
    """All dataset YAMLs as a table (name, domain, classes, source, metric)."""
    import pandas as pd

    rows = []
    domains = sorted({p.parent.name for p in domains_dir().glob("*/*.yaml")})
    if domain and domain not in domains:
        raise ConfigError(f"unknown domain {domain!r}; domains: {domains}." + did_you_mean(domain, domains))
    for path in sorted(domains_dir().glob("*/*.yaml")):
        spec = load_spec(path)
        if domain and spec["domain"] != domain:
            continue
        src = spec["source"]
        where = src.get("repo_id") or src.get("path") or src.get("generator")
        rows.append({"name": spec["name"], "domain": spec["domain"], "classes": len(spec["classes"]),
                     "source": f"{src['kind']}:{where}", "metric": spec.get("metric", "accuracy"),
                     "offline": bool(spec.get("offline", False)),
                     "backbones": ", ".join(spec.get("recommended_backbones", []))})
    return pd.DataFrame(rows, columns=["name", "domain", "classes", "source", "metric", "offline", "backbones"])


def show(name: str) -> str:
    """A readable description of one dataset YAML (source, classes, templates, metric, licence, citation)."""
    spec = load_spec(name)
    lines = [f"{spec['name']} ({spec['domain']}, {spec.get('task', 'single-label')}) — {spec['_file']}"]
    if spec.get("description"):
        lines.append(spec["description"])
    src = {k: v for k, v in spec["source"].items()}
    lines.append(f"source: {src}")
    lines.append(f"classes ({len(spec['classes'])}): " + ", ".join(f"{k} -> {v}" if str(k) != str(v) else str(v)
                                                                   for k, v in spec["classes"].items()))
    lines.append("templates: " + " | ".join(spec["templates"]))
    lines.append(f"metric: {spec.get('metric', 'accuracy')}")
    lines.append("recommended backbones: " + ", ".join(spec.get("recommended_backbones", [])))
    lines.append(f"licence: {spec['licence']}")
    lines.append(f"citation: {spec['citation']}")
    return "\n".join(lines)


def offline_dataset(domain: str) -> str:
    """The name of the domain's dataset that needs no network (the notebooks' default)."""
    table = list_datasets(domain)
    offline = table[table["offline"]]
    if offline.empty:
        raise ConfigError(f"domain {domain!r} has no offline dataset.")
    return str(offline["name"].iloc[0])


def _resolve(path: str) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else repo_root() / p)


def load_dataset(name_or_path: str | Path, **overrides) -> Dataset:
    """Build the :class:`Dataset` a YAML describes (``overrides`` go to the source function)."""
    return dataset_from_spec(load_spec(name_or_path), **overrides)


def dataset_from_parameters(namespace: dict) -> Dataset:
    """The dataset a domain notebook's parameters name.

    ``papermill … -f domains/<domain>/<set>.yaml`` injects the YAML's keys (name, domain,
    source, classes, templates, …) as parameters: then the dataset is built from them. Else
    ``name`` picks a YAML, and an empty name means the domain's offline dataset.
    """
    if "source" in namespace and "classes" in namespace:
        spec = {k: namespace[k] for k in TOP_KEYS if k in namespace}
        spec = validate_spec(spec, "papermill parameters (-f YAML)")
        spec["_file"] = "papermill parameters (-f YAML)"
        return dataset_from_spec(spec)
    name = namespace.get("name") or offline_dataset(namespace.get("domain", ""))
    return load_dataset(name)


def dataset_from_spec(spec: dict, **overrides) -> Dataset:
    """Build a :class:`Dataset` from a validated spec (see :func:`load_spec`)."""
    from .data import sources

    src = dict(spec["source"])
    kind = src.pop("kind")
    class_ids = [str(c) for c in spec["classes"]]
    names = [str(v) for v in spec["classes"].values()]
    mapping = dict(zip(class_ids, names))
    meta = {"domain": spec["domain"], "templates": builtins.list(spec["templates"]),
            "metric": spec.get("metric", "accuracy")}
    if spec.get("task", "single-label") != "single-label":
        raise DataError(f"{spec['_file']}: task {spec['task']!r} is not supported yet; only single-label "
                        "classification is.")
    src.update(overrides)
    if kind == "folder":
        ds = sources.from_folder(_resolve(src.pop("path")), name=spec["name"], **src, **meta)
    elif kind == "csv":
        ds = sources.from_csv(_resolve(src.pop("path")), name=spec["name"], classes=class_ids,
                              class_names=names, **src, **meta)
    elif kind == "npz":
        ds = sources.from_npz(_resolve(src.pop("path")), name=spec["name"], class_names=names, class_ids=class_ids,
                              **src, **meta)
    elif kind == "hub_archive":
        ds = sources.from_hub_archive(src.pop("repo_id"), src.pop("filename"), name=spec["name"], **src, **meta)
    elif kind == "synthetic":
        from .data import synthetic

        generator = src.pop("generator")
        if generator == "leaves":
            ds = synthetic.synthetic_leaves(name=spec["name"], class_names=names, **src, **meta)
        else:
            ds = synthetic.synthetic_shapes(shapes=class_ids, name=spec["name"], **src)
            ds.domain, ds.templates, ds.metric = meta["domain"], meta["templates"], meta["metric"]
    else:
        ds = sources.from_hub(src.pop("repo_id"), name=spec["name"], classes=class_ids, **src, **meta)
    missing = sorted(set(class_ids) - set(ds.class_ids))
    extra = sorted(set(ds.class_ids) - set(class_ids))
    if missing or extra:
        raise DataError(f"{spec['_file']}: the data's classes do not match 'classes': in YAML but not in the data: "
                        f"{missing}; in the data but not in YAML: {extra}. Fix the class ids in the YAML.")
    from .data.dataset import validate_class_names

    ds.class_names = [mapping[c] for c in ds.class_ids]  # readable names in the data's label order
    validate_class_names(ds.class_ids, ds.class_names, where=spec["_file"])
    ds.source["spec"] = spec["_file"]
    ds.descriptions = spec.get("descriptions")
    return ds


BACKBONE_KEYS = {"name": str, "pretrained": str, "domains": builtins.list, "licence": str, "source": str,
                 "notes": str, "loadable": bool}


def backbone_recipes() -> dict:
    """``domains/backbones.yaml``: alias -> loading recipe, validated."""
    path = domains_dir() / "backbones.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    for alias, recipe in data.items():
        if not isinstance(recipe, dict):
            raise _err(path, alias, "a mapping", recipe)
        unknown = sorted(set(recipe) - set(BACKBONE_KEYS))
        if unknown:
            raise ConfigError(f"{path}: {alias}: unknown key {unknown[0]!r}; allowed {sorted(BACKBONE_KEYS)}."
                              + did_you_mean(unknown[0], BACKBONE_KEYS))
        for key in ("name", "licence", "source"):
            if key not in recipe:
                raise ConfigError(f"{path}: {alias}: missing required key {key!r}.")
        for key, typ in BACKBONE_KEYS.items():
            if key in recipe and not isinstance(recipe[key], typ):
                raise _err(path, f"{alias}.{key}", typ.__name__, recipe[key])
    return data


def backbones(domain: str | None = None) -> "Any":
    """The backbone aliases as a table (alias, open_clip name, pretrained, licence, domains)."""
    import pandas as pd

    rows = [{"alias": alias, "name": r["name"], "pretrained": r.get("pretrained", ""), "licence": r["licence"],
             "domains": ", ".join(r.get("domains", [])), "loadable": r.get("loadable", True)}
            for alias, r in backbone_recipes().items()
            if domain is None or domain in r.get("domains", []) or "any" in r.get("domains", [])]
    return pd.DataFrame(rows, columns=["alias", "name", "pretrained", "licence", "domains", "loadable"])


def resolve_backbone_alias(alias: str) -> tuple[str, str | None] | None:
    """(open_clip name, pretrained) for an alias in backbones.yaml, or None if it is not an alias."""
    recipes = backbone_recipes()
    if alias not in recipes:
        return None
    recipe = recipes[alias]
    if recipe.get("loadable", True) is False:
        raise ConfigError(f"backbone {alias!r} cannot be loaded with stock open_clip: {recipe.get('notes', '')}")
    return recipe["name"], recipe.get("pretrained") or None


# `workbench.domains.list()` reads naturally in a notebook; the module uses builtins.list internally.
list = list_datasets  # noqa: A001
