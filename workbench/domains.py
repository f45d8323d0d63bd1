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
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from .data.dataset import Dataset
from .errors import ConfigError, DataError, did_you_mean
from .paths import repo_root
from .safe_yaml import load_yaml
from .task_kinds import kind_names, task_kind

TOP_KEYS = {
    "name": (str, True), "domain": (str, True), "task": (str, False), "source": (dict, True),
    "classes": (dict, True), "templates": (list, True), "descriptions": (dict, False), "metric": (str, False),
    "recommended_backbones": (list, False), "licence": (str, True), "citation": (str, True),
    "description": (str, False), "offline": (bool, False), "notes": (str, False),
    "method_presets": (dict, False), "paper_protocol": (dict, False), "class_map": (dict, False),
}
SOURCE_KEYS = {
    "folder": {"path", "test_fraction", "split_seed", "max_bad_fraction"},
    "csv": {"path", "path_column", "label_column", "split_column", "root", "test_fraction", "split_seed",
            "findings", "label_separator", "no_finding", "uncertain", "groups"},
    "npz": {"path", "test_fraction", "split_seed"},
    "mosaic": {"path", "n_images", "seed", "test_fraction", "tile_size"},
    "hub": {"repo_id", "config", "image_column", "label_column", "splits", "data_files", "revision",
            "test_fraction", "split_seed"},
    "hub_archive": {"repo_id", "filename", "subdir", "test_fraction", "split_seed", "max_bad_fraction"},
    "synthetic": {"generator", "train_per_class", "val_per_class", "test_per_class", "image_size", "seed"},
}
#: numeric source keys and what each must be (a YAML string such as "0.3" is refused, naming file and key)
SOURCE_NUMBERS = {"test_fraction": ("fraction", 0.0, 1.0), "max_bad_fraction": ("fraction", 0.0, 1.0),
                  "split_seed": ("integer", 0, None), "seed": ("integer", 0, None),
                  "train_per_class": ("integer", 1, None), "val_per_class": ("integer", 0, None),
                  "test_per_class": ("integer", 1, None), "image_size": ("integer", 8, None)}
#: ``paper_protocol:`` keys: the reference's single template, its split file (if the user has it) and
#: how hyper-parameters are selected (``full_val``: on the whole validation split, as the papers do)
PROTOCOL_KEYS = {"template": str, "split_file": str, "selection": str, "reference": str}
PROTOCOLS = ("default", "paper")
GENERATORS = ("leaves", "shapes", "scenes_xray_like", "scenes_aerial_like", "scenes_leaf_like")
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "micro_auroc", "mAP")


def domains_dir() -> Path:
    return repo_root() / "domains"


def _err(file, key, expected, got) -> ConfigError:
    return ConfigError(f"{file}: key {key!r}: expected {expected}, got {got!r}.")


def validate_spec(spec: Any, file: str = "<spec>", check_presets: bool = True) -> dict:
    """Check a dataset YAML's structure; errors name the file, the key, what was expected and what came.

    ``check_presets=False`` skips checking ``method_presets`` against the methods' parameters, which
    imports the method modules (and torch): only for listings, every load checks them.
    """
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
    try:
        task_kind(spec.get("task", "single_label"))
    except ConfigError:
        raise _err(file, "task", f"one of {kind_names()}", spec.get("task")) from None
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
    for key, value in source.items():
        if key in SOURCE_NUMBERS:
            _check_number(file, f"source.{key}", value, *SOURCE_NUMBERS[key])
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
            raise ConfigError(f"{file}: 'descriptions' has class {cname!r}, which is not a readable class name; "
                              f"the classes are {names}. Key each description list by one of them."
                              + did_you_mean(cname, names))
        if not isinstance(descs, builtins.list) or not all(isinstance(d, str) for d in descs):
            raise _err(file, f"descriptions.{cname}", "a list of strings", descs)
    if spec.get("class_map"):
        _validate_class_map(spec["class_map"], names, file)
    if spec.get("method_presets"):
        if check_presets:
            _validate_presets(spec["method_presets"], file)
    if spec.get("paper_protocol"):   # empty (a notebook parameter's default) means none
        _validate_protocol(spec["paper_protocol"], file)
    return spec


def _validate_class_map(class_map, names: list[str], file) -> None:
    """``class_map: {other dataset: {readable class name here: its name there, or null}}`` (cross-dataset).

    Only this dataset's side can be checked here; the other side is checked when both are used
    (:func:`workbench.protocols.shared_classes`).
    """
    for other, pairs in class_map.items():
        if not isinstance(pairs, dict):
            raise _err(file, f"class_map.{other}", "a mapping {class name here: class name in " f"{other}}}", pairs)
        for here, there in pairs.items():
            if here not in names:
                raise ConfigError(f"{file}: 'class_map.{other}' has class {here!r}, which is not a readable class "
                                  f"name of this dataset; the classes are {names}." + did_you_mean(str(here), names))
            if there is not None and (not isinstance(there, str) or not there.strip()):
                raise _err(file, f"class_map.{other}.{here}", f"a class name of {other} (or null: not shared)",
                           there)


def _check_number(file, key: str, value, kind: str, low, high) -> None:
    """``value`` must be a YAML number (not a quoted string, not true/false) within [low, high]."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = is_int if kind == "integer" else (is_int or isinstance(value, float))
    if not ok:
        what = "a whole number" if kind == "integer" else "a number"
        hint = " (a string: remove the quotes)" if isinstance(value, str) else f" ({type(value).__name__})"
        raise ConfigError(f"{file}: key {key!r}: expected {what}, got {value!r}{hint}.")
    if key.endswith("test_fraction"):   # a test split of 0 or 100 % of the images is no split
        in_range, bounds = 0.0 < value < 1.0, "strictly between 0 and 1"
    else:
        in_range = (low is None or value >= low) and (high is None or value <= high)
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
    if not in_range:
        raise ConfigError(f"{file}: key {key!r}: expected a value {bounds}, got {value!r}.")


def _field_kind(f) -> str | None:
    """What a method parameter holds, read from its Config field: 'bool', 'number', 'list' or None (free)."""
    import dataclasses

    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    text = str(f.type)
    if isinstance(default, bool) or text.startswith("bool"):
        return "bool"
    if isinstance(default, (builtins.list, tuple)) or text.startswith(("list", "tuple")):
        return "list"
    if (isinstance(default, (int, float)) and not isinstance(default, bool)) or text.startswith(("int", "float")):
        return "number"
    return None


def _validate_presets(presets: dict, file) -> None:
    """``method_presets: {method: {parameter: value}}``: known methods, known parameters, right types."""
    import dataclasses

    from .methods.registry import method_class, method_names

    for method, params in presets.items():
        if method not in method_names():
            raise ConfigError(f"{file}: 'method_presets' names method {method!r}, which is not registered; methods: "
                              f"{method_names()}." + did_you_mean(str(method), method_names()))
        if not isinstance(params, dict):
            raise _err(file, f"method_presets.{method}", "a mapping of parameter: value", params)
        fields = {f.name: f for f in dataclasses.fields(method_class(method).Config)}
        for key, value in params.items():
            if key not in fields:
                raise ConfigError(f"{file}: key 'method_presets.{method}.{key}': {method} has no parameter {key!r}; "
                                  f"its parameters are {sorted(fields)}." + did_you_mean(str(key), fields))
            kind = _field_kind(fields[key])
            where = f"method_presets.{method}.{key}"
            if kind == "number":
                _check_number(file, where, value, "number", None, None)
            elif kind == "bool" and not isinstance(value, bool):
                raise _err(file, where, "true or false", value)
            elif kind == "list":
                if not isinstance(value, builtins.list):
                    raise _err(file, where, "a list", value)
                for i, item in enumerate(value):
                    if isinstance(item, (bool, str)) or not isinstance(item, (int, float)):
                        raise _err(file, f"{where}[{i}]", "a number", item)


def _validate_protocol(protocol: dict, file) -> None:
    unknown = sorted(set(protocol) - set(PROTOCOL_KEYS))
    if unknown:
        raise ConfigError(f"{file}: unknown key 'paper_protocol.{unknown[0]}'; allowed: {sorted(PROTOCOL_KEYS)}."
                          + did_you_mean(unknown[0], PROTOCOL_KEYS))
    if "template" not in protocol:
        raise ConfigError(f"{file}: 'paper_protocol' needs 'template', the reference's single prompt template.")
    for key, typ in PROTOCOL_KEYS.items():
        if key in protocol and not isinstance(protocol[key], typ):
            raise _err(file, f"paper_protocol.{key}", typ.__name__, protocol[key])
    if protocol["template"].count("{}") != 1:
        raise _err(file, "paper_protocol.template", "a string with exactly one '{}'", protocol["template"])
    if protocol.get("selection", "full_val") not in ("full_val", "kshot_val"):
        raise _err(file, "paper_protocol.selection", "'full_val' or 'kshot_val'", protocol["selection"])


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
        raise ConfigError(f"no dataset named {str(name_or_path)!r} in {domains_dir()}, and {str(name_or_path)!r} "
                          f"does not exist as a path in the working directory; known names: {sorted(known)}."
                          + did_you_mean(str(name_or_path), known))
    if len(matches) > 1:
        raise ConfigError(f"dataset name {str(name_or_path)!r} is ambiguous: {[str(m) for m in matches]}; pass the path.")
    return matches[0]


def load_spec(name_or_path: str | Path, check_presets: bool = True) -> dict:
    path = spec_path(name_or_path)
    spec = load_yaml(path, what="dataset YAML")
    spec = validate_spec(spec, str(path), check_presets)
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
        spec = load_spec(path, check_presets=False)  # a listing, without torch; loading the dataset checks them
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
    """A :class:`Dataset` from a dataset name, a YAML path, an image folder, a CSV or an ``.npz``.

    A plain name picks ``domains/*/<name>.yaml``; anything else is a path (relative paths from the
    working directory, then the repository root) read by ``data.load_user_data``. ``overrides``
    go to the source function. A path that does not exist is an error saying so.
    """
    from .data.sources import load_user_data
    from .paths import find_existing

    import os

    text = str(name_or_path)
    p = Path(text).expanduser()
    if p.suffix.lower() not in (".yaml", ".yml"):
        # "my_images/" (a trailing separator) is a path, never a dataset name
        plain_name = (len(p.parts) == 1 and not p.suffix and not p.is_absolute()
                      and not text.endswith(("/", os.sep)))
        if not (plain_name and any(domains_dir().glob(f"*/{text}.yaml"))):
            found = find_existing(p)
            if found is not None:
                return load_user_data(path=str(found), **overrides)
            if not plain_name:
                known = sorted(q.stem for q in domains_dir().glob("*/*.yaml"))
                raise DataError(f"path {text!r} does not exist (looked for it as a path in the working directory "
                                f"{os.getcwd()} and in the repository root). Give an existing image folder, CSV, "
                                f".npz or dataset YAML, or one of the dataset names: {known}.")
    return dataset_from_spec(load_spec(name_or_path), **overrides)


def dataset_from_parameters(namespace: dict) -> Dataset:
    """The dataset a domain notebook's parameters name.

    ``dataset_yaml`` (a path, one string: ``papermill … -p dataset_yaml domains/<domain>/<set>.yaml``)
    is read and validated here, through the one safe YAML reader: the safe way to run a notebook on
    a YAML. ``papermill … -f <set>.yaml`` instead injects the YAML's keys (name, domain, source,
    classes, templates, …) as parameters, written into the notebook's code as they are (use it only
    with your own files); then the dataset is built from them. Else ``name`` picks a YAML, and an
    empty name means the domain's offline dataset.
    """
    path = namespace.get("dataset_yaml")
    if path:
        if not isinstance(path, str) or Path(path).suffix.lower() not in (".yaml", ".yml"):
            raise ConfigError(f"parameter 'dataset_yaml': expected the path of a dataset YAML (ending in .yaml), "
                              f"got {path!r}.")
        found = Path(path).expanduser()
        if not found.is_absolute() and not found.exists():
            found = repo_root() / found   # a notebook's kernel runs in notebooks/
        return dataset_from_spec(load_spec(found))
    if namespace.get("source") and namespace.get("classes"):
        # the notebook declares every YAML key (so papermill does not warn), empty when no YAML was given
        spec = {k: namespace[k] for k in TOP_KEYS if namespace.get(k) not in (None, "", [], {})}
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
    src.update(overrides)
    if task_kind(spec.get("task", "single_label")).name == "multi_label":
        ds = _multilabel_from_spec(spec, kind, src, class_ids, names, meta)
        ds.source["spec"] = spec["_file"]
        ds.descriptions = spec.get("descriptions")
        ds.method_presets = dict(spec.get("method_presets") or {})
        ds.paper_protocol = spec.get("paper_protocol")
        ds.class_map = dict(spec.get("class_map") or {})
        return ds
    if kind == "mosaic" or any(k in src for k in ("findings", "label_separator", "uncertain", "no_finding")):
        raise DataError(f"{spec['_file']}: source keys {sorted(set(src) & {'findings', 'label_separator', 'uncertain', 'no_finding'}) or ['kind: mosaic']} "
                        "describe a multi-label set; add 'task: multi_label' to the YAML.")
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
        elif generator.startswith("scenes_"):
            from .data.scenes import shifted_scenes

            ds = shifted_scenes(generator[len("scenes_"):], name=spec["name"], class_names=names, **src, **meta)
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
    ds.method_presets = dict(spec.get("method_presets") or {})   # applied by run_settings()
    ds.paper_protocol = spec.get("paper_protocol")
    ds.class_map = dict(spec.get("class_map") or {})   # cross-dataset: classes shared under other names
    return ds


def _multilabel_from_spec(spec, kind, src, class_ids, names, meta):
    """A ``task: multi_label`` YAML: the findings are its ``classes`` (id -> readable name)."""
    from .data import multilabel

    meta = dict(meta, metric=spec.get("metric", "macro_auroc"))
    mapping = dict(zip(class_ids, names))
    if "root" in src:
        src["root"] = _resolve(src["root"])
    if kind == "csv":
        if "label_separator" not in src and "findings" not in src:
            src["findings"] = class_ids
        elif "label_separator" in src:
            src.setdefault("findings", class_ids)
        ds = multilabel.from_csv_multilabel(_resolve(src.pop("path")), name=spec["name"], class_names=mapping,
                                            **src, **meta)
    elif kind == "npz":
        ds = multilabel.from_npz_multilabel(_resolve(src.pop("path")), name=spec["name"], class_names=names,
                                            class_ids=class_ids, **src, **meta)
    elif kind == "mosaic":
        ds = multilabel.mosaic_dataset(_resolve(src.pop("path")), name=spec["name"], classes=class_ids,
                                       class_names=names, **src, **meta)
    else:
        raise DataError(f"{spec['_file']}: a multi_label dataset can be read from sources of kind csv, npz or "
                        f"mosaic; {kind!r} is not supported for multi-label yet (download the data and use a CSV "
                        "with one column per finding or a separated list).")
    if builtins.list(ds.class_ids) != class_ids:
        raise DataError(f"{spec['_file']}: the data's findings {ds.class_ids} do not match 'classes' {class_ids}.")
    return ds


# -- method presets and the paper protocol ---------------------------------------------------
@dataclass
class RunSettings:
    """What a run takes from its dataset's YAML: method parameters, templates, splits; and the record of it."""
    params: dict
    templates: list | None
    dataset: Dataset
    record: dict
    #: the dataset was re-split by the paper's split file (its few-shot splits are kept apart)
    resplit: bool = False


def method_preset(dataset_or_name, method: str) -> dict:
    """The ``method_presets:`` entry of a dataset YAML for ``method`` ({} when it has none)."""
    presets = (load_spec(dataset_or_name).get("method_presets") if isinstance(dataset_or_name, (str, Path))
               else getattr(dataset_or_name, "method_presets", None)) or {}
    return dict(presets.get(method) or {})


def run_settings(dataset: Dataset, method, params: dict | None, protocol: str = "default") -> RunSettings:
    """The settings of one run of ``method`` on ``dataset`` under ``protocol``.

    Parameters, lowest priority first: the method's defaults, the dataset YAML's
    ``method_presets`` for it (the reference per-dataset settings), under ``protocol="paper"``
    the YAML's ``paper_protocol.selection`` for methods that select hyper-parameters, and last
    the user's own ``params``, which always win. ``protocol="paper"`` also uses the
    reference's single template and, when the user has it, its split file. A method passed as
    an object is used as it is (no preset applied); the record says so.
    """
    import dataclasses

    from .methods.base import Method
    from .methods.registry import method_class

    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}."
                          + did_you_mean(str(protocol), PROTOCOLS))
    user = dict(params or {})
    spec_file = dataset.source.get("spec") if isinstance(dataset.source, dict) else None
    record: dict = {"protocol": protocol}
    paper = getattr(dataset, "paper_protocol", None)
    if protocol == "paper" and not paper:
        raise ConfigError(f"dataset {dataset.name!r} has no 'paper_protocol:' in its YAML "
                          f"({spec_file or 'not loaded from a YAML'}), so protocol='paper' is undefined; "
                          "use protocol='default' or add the section (see domains/remote_sensing/eurosat.yaml).")
    if isinstance(method, Method):
        record["preset"] = "none: a method object was passed, its own configuration is used"
        return RunSettings(user, None, dataset, record)
    name = method
    fields = {f.name for f in dataclasses.fields(method_class(name).Config)}
    preset = method_preset(dataset, name)
    merged = dict(preset)
    if preset:
        record["preset"] = {"from": spec_file, "values": preset}
    templates, resplit = None, False
    if protocol == "paper":
        if "selection" in fields:
            merged["selection"] = paper.get("selection", "full_val")
        templates = [paper["template"]]
        record.update({"template": paper["template"], "selection": paper.get("selection", "full_val"),
                       "reference": paper.get("reference", "")})
        original = dataset
        dataset, record["split_file"] = _paper_splits(dataset, paper.get("split_file"))
        resplit = dataset is not original
    overridden = sorted(k for k in user if k in merged and user[k] != merged[k])
    if overridden:
        record["overridden_by_user"] = overridden
    merged.update(user)
    return RunSettings(merged, templates, dataset, record, resplit)


def _paper_splits(dataset: Dataset, split_file: str | None) -> tuple[Dataset, str]:
    """The dataset re-split by the reference's split file (CoOp's ``split_zhou_<D>.json`` format:
    ``{"train"|"val"|"test": [[image path, label, class name], ...]}``) when the file exists."""
    import json
    import warnings

    if not split_file:
        return dataset, "none in the YAML: the dataset's own splits"
    path = Path(_resolve(split_file))
    if not path.is_file():
        warnings.warn(f"dataset {dataset.name!r}: the paper protocol's split file {str(path)!r} is not there; the "
                      "dataset's own splits are used (put the file there to reproduce the paper's splits).",
                      stacklevel=3)
        return dataset, f"not found ({path}): the dataset's own splits"
    try:
        listing = json.loads(path.read_text())
        entries = {split: [str(item[0]).replace("\\", "/").removeprefix("./") for item in listing[split]]
                   for split in ("train", "val", "test")}
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise DataError(f"{path}: not a split file of the CoOp format ({{'train'|'val'|'test': [[path, label, "
                        f"class name], ...]}}): {type(err).__name__}: {err}") from None
    # a listed path matches the sample whose id ends with it ("AnnualCrop/x.jpg" ~ "2750/AnnualCrop/x.jpg")
    by_tail: dict[str, list] = {}
    for sample in (s for ss in dataset.splits.values() for s in ss):
        parts = sample.id.replace("\\", "/").split("/")
        for i in range(len(parts)):
            by_tail.setdefault("/".join(parts[i:]), []).append(sample)
    missing = [p for paths in entries.values() for p in paths if p not in by_tail]
    if missing:
        raise DataError(f"{path}: {len(missing)} image(s) of the split file are not in dataset {dataset.name!r}, e.g. "
                        f"{missing[:3]}; the file must list the same images (paths relative to the data folder).")
    ambiguous = [p for paths in entries.values() for p in paths if len(by_tail[p]) > 1]
    if ambiguous:
        raise DataError(f"{path}: {len(ambiguous)} path(s) of the split file match several images of dataset "
                        f"{dataset.name!r}, e.g. {ambiguous[:3]}; list longer paths (relative to the data folder).")
    splits = {split: [by_tail[p][0] for p in paths] for split, paths in entries.items()}
    import dataclasses

    resplit = dataclasses.replace(dataset, splits=splits, notes=[*dataset.notes, f"splits from {path}"])
    for attr in ("descriptions", "method_presets", "paper_protocol", "class_map"):
        setattr(resplit, attr, getattr(dataset, attr, None))
    return resplit, str(path)


BACKBONE_KEYS = {"name": str, "pretrained": str, "domains": builtins.list, "licence": str, "source": str,
                 "notes": str, "loadable": bool}


def backbone_recipes() -> dict:
    """``domains/backbones.yaml``: alias -> loading recipe, validated."""
    path = domains_dir() / "backbones.yaml"
    data = load_yaml(path, what="backbone list") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping alias -> recipe, got {type(data).__name__}.")
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
