"""Helpers that keep the tutorial notebooks thin and their parameters safe.

papermill only *warns* about a parameter the notebook does not declare, so ``-p shot 4``
(instead of ``shots``) would silently run the defaults. :func:`check_parameters`, called in
the cell right after the ``parameters`` cell, reads the declared parameters from the notebook
file itself (the annotated assignments of the cell tagged ``parameters``), and raises a clear
error for an unknown name, a value of the wrong type, or a value the workbench does not know
(a misspelt method, dataset or device).
"""
from __future__ import annotations

import ast
import json
import types
import typing
from pathlib import Path
from typing import Any

from .errors import ConfigError, did_you_mean
from .paths import repo_root

_IGNORED_GLOBALS = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def declared_parameters(notebook: str | Path) -> dict[str, dict]:
    """``{name: {"annotation": str, "default": value, "help": str}}`` from the ``parameters`` cell."""
    path = Path(notebook)
    if not path.is_absolute():
        path = repo_root() / "notebooks" / path
    nb = json.loads(path.read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ConfigError(f"{path}: expected exactly one cell tagged 'parameters', found {len(cells)}.")
    src = "".join(cells[0]["source"])
    lines = src.splitlines()
    params = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.lineno - 1]
            help_text = line.split("#", 1)[1].strip() if "#" in line else ""
            quoted = isinstance(node.annotation, ast.Constant) and isinstance(node.annotation.value, str)
            # quoted, e.g. "Union[float, str]": papermill's parser reads no `float | str`
            params[node.target.id] = {"annotation": node.annotation.value if quoted else ast.unparse(node.annotation),
                                      "default": ast.literal_eval(node.value) if node.value else None,
                                      "help": help_text}
    return params


_TYPE_NAMES = {"list": list, "dict": dict, "tuple": tuple, "str": str, "int": int, "float": float, "bool": bool,
               "None": None, "Optional": typing.Optional, "Union": typing.Union, "Any": typing.Any}


def _annotation(node):
    """A parameter annotation from its syntax tree, built from :data:`_TYPE_NAMES` only: names,
    ``X[...]``, ``X | Y`` and ``typing.X``. Nothing in a notebook file is executed."""
    if isinstance(node, ast.Name) and node.id in _TYPE_NAMES:
        return _TYPE_NAMES[node.id]
    if isinstance(node, ast.Constant) and node.value is None:
        return None
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "typing"
            and node.attr in _TYPE_NAMES):
        return _TYPE_NAMES[node.attr]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return typing.Union[_annotation(node.left), _annotation(node.right)]
    if isinstance(node, ast.Subscript):
        base = _annotation(node.value)
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return base[tuple(_annotation(a) for a in args)] if len(args) > 1 else base[_annotation(args[0])]
    raise ValueError(f"unsupported annotation {ast.unparse(node)!r}")


def _type_ok(value: Any, annotation: str) -> bool:
    try:
        ann = _annotation(ast.parse(annotation, mode="eval").body)
    except (SyntaxError, ValueError, TypeError):
        return True   # an annotation this checker does not model: no type check, as before
    return _matches(value, ann)


def _matches(value, ann) -> bool:
    if ann is None or ann is type(None):
        return value is None
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(ann))
    if origin in (list, tuple):
        args = typing.get_args(ann)
        return isinstance(value, (list, tuple)) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, ann) if isinstance(ann, type) else True


def _check_values(values: dict) -> None:
    """Values that name something the workbench must know: fail here, not ten cells later."""
    from .backbones import resolve_device
    from .methods import available_methods

    if "methods" in values:
        for m in values["methods"]:
            if m not in available_methods():
                raise ConfigError(f"parameter 'methods': unknown method {m!r}; available: {available_methods()}."
                                  + did_you_mean(m, available_methods()))
    for key in ("shots", "seeds", "seed"):
        if key in values:
            vals = values[key] if isinstance(values[key], (list, tuple)) else [values[key]]
            if not vals or any(v < (1 if key == "shots" else 0) for v in vals):
                raise ConfigError(f"parameter {key!r}: expected {'positive' if key == 'shots' else 'non-negative'} "
                                  f"integer(s), got {values[key]!r}.")
    if "device" in values:
        resolve_device(values["device"])
    for key, allowed in (("encoder", ("vision", "text", "both")), ("class_token_position", ("end", "middle", "front"))):
        if key in values and values[key] not in allowed:
            raise ConfigError(f"parameter {key!r}: expected one of {allowed}, got {values[key]!r}.")
    if "lora_params" in values and not set(values["lora_params"]) <= {"q", "k", "v", "o"}:
        raise ConfigError(f"parameter 'lora_params': expected a list of q, k, v, o, got {values['lora_params']!r}.")
    if "selection" in values and values["selection"] not in ("kshot_val", "full_val"):
        raise ConfigError(f"parameter 'selection': expected 'kshot_val' or 'full_val', got {values['selection']!r}.")
    if "dataset" in values and values["dataset"]:
        from .domains import spec_path

        spec_path(values["dataset"])
    if "domain" in values:
        from .domains import list_datasets

        list_datasets(values["domain"])  # unknown domain -> clear error
    if values.get("backbone"):
        _check_backbone(values["backbone"])
    if values.get("data_path"):
        _check_data_path(values["data_path"])
    _check_pair_values(values)


def _check_pair_values(values: dict) -> None:
    """The image–text pair notebook's parameters: the pair set, the pairs method, WiSE-FT's alpha, steps."""
    if values.get("pairs"):
        from .data.pairs import load_pair_spec

        load_pair_spec(values["pairs"])   # an unknown name or a bad YAML -> its clear error
    if "pairs_method" in values:
        from .methods.registry import check_method_task

        check_method_task(values["pairs_method"], "retrieval")
    alpha = values.get("wise_alpha", "val")
    if alpha != "val" and not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ConfigError(f"parameter 'wise_alpha': expected 'val' (chosen on the val split's mean recall) or a "
                          f"number in [0, 1], got {alpha!r}.")
    if values.get("steps", 0) < 0:
        raise ConfigError(f"parameter 'steps': expected a non-negative integer, got {values['steps']!r}.")


def _check_data_path(path: str) -> None:
    from .domains import domains_dir
    from .paths import find_existing

    if find_existing(path) is None and not any(domains_dir().glob(f"*/{path}.yaml")):
        raise ConfigError(f"parameter 'data_path': {path!r} is neither an existing image folder, CSV, .npz or "
                          "dataset YAML (looked in the working directory and the repository root) nor a dataset "
                          "name from domains/ (wb.list_datasets()).")


def check_parameters(namespace: dict, notebook: str, allow_dataset_spec: bool = False) -> dict:
    """Validate the notebook's parameters (see module docstring); returns them as a dict.

    ``allow_dataset_spec``: the notebook accepts a dataset YAML's keys too
    (``papermill … -f domains/<domain>/<set>.yaml``); they are validated when the dataset is built.
    """
    declared = declared_parameters(notebook)
    present = {k: v for k, v in namespace.items()
               if not k.startswith("_") and k not in _IGNORED_GLOBALS and not isinstance(v, types.ModuleType)
               and not callable(v)}
    allowed = set(declared)
    if allow_dataset_spec:
        from .domains import TOP_KEYS

        allowed |= set(TOP_KEYS)
    unknown = sorted(set(present) - allowed)
    if unknown:
        raise ConfigError(f"{notebook}: unknown parameter {unknown[0]!r}; this notebook's parameters are "
                          f"{sorted(declared)}" + (" (and the keys of a dataset YAML)" if allow_dataset_spec else "")
                          + "." + did_you_mean(unknown[0], allowed))
    values = {k: namespace.get(k, d["default"]) for k, d in declared.items()}
    for k, d in declared.items():
        if not _type_ok(values[k], d["annotation"]):
            coerced = _from_command_line(values[k], d["annotation"])
            if coerced is not None:
                values[k] = namespace[k] = coerced
        if not _type_ok(values[k], d["annotation"]):
            raise ConfigError(f"{notebook}: parameter {k!r} should be {d['annotation']} ({d['help']}), "
                              f"got {values[k]!r}." + _quoting_hint(k, d["annotation"], d["default"]))
    _check_values(values)
    return values


def _from_command_line(value: Any, annotation: str) -> Any:
    """What ``papermill -p`` makes of a list, read back as the list: None if it cannot be.

    papermill turns ``-p seeds 1`` into the int 1, ``-p methods zero_shot,gda`` into the string
    ``"zero_shot,gda"`` and ``-p shots "[1, 4]"`` into the string ``"[1, 4]"``. The first becomes
    ``[1]``, the second ``["zero_shot", "gda"]``, the third the literal it spells.
    """
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, tuple) and annotation.startswith("list["):
            parsed = list(parsed)  # "1,4" reads as the tuple (1, 4)
        if parsed is not None and _type_ok(parsed, annotation):
            return parsed
    if not annotation.startswith(("list[", "tuple[")):
        return None
    if isinstance(value, str):
        items: list = [t.strip() for t in value.split(",")]
        if not all(items):
            return None
        if annotation in ("list[int]", "tuple[int]"):
            try:
                items = [int(t) for t in items]
            except ValueError:
                return None
        elif annotation in ("list[float]", "tuple[float]"):
            try:
                items = [float(t) for t in items]
            except ValueError:
                return None
    else:
        items = [value]  # a single number where a list of numbers is expected
    return items if _type_ok(items, annotation) else None


def _quoting_hint(name: str, annotation: str, default: Any) -> str:
    """How to write a list or dict parameter on papermill's command line, with the default as example."""
    if not annotation.startswith(("list[", "tuple[", "dict")):
        return ""
    example = json.dumps(default)
    hint = (f" From papermill, pass it as -p {name} '{example}' (quoted, so the shell keeps it one argument) "
            f"or with -y \"{name}: {example}\"")
    if isinstance(default, list) and default:
        hint += f", or comma-separated: -p {name} {','.join(map(str, default))}"
    return hint + "."


def data_options(path: str, class_names: dict | None = None, path_column: str = "path",
                 label_column: str = "label") -> dict:
    """The ``wb.load_dataset(path, **options)`` options that apply to what ``path`` is.

    One notebook parameter takes an image folder, a CSV manifest, an ``.npz`` or a dataset YAML
    (or name): the CSV columns go only to a CSV, ``class_names`` (class id -> readable name) to a
    folder, CSV or ``.npz``; a YAML names its own classes, so ``class_names`` is ignored there
    with a warning.
    """
    import warnings

    from .data.sources import data_kind
    from .paths import find_existing

    names = dict(class_names or {}) or None
    found = find_existing(path) if path else None
    if not path or Path(path).suffix.lower() in (".yaml", ".yml") or (found is None and "/" not in str(path)):
        if names:
            warnings.warn(f"class_names is ignored for the dataset {path!r}: its YAML names the classes "
                          "(its 'classes:' key).", stacklevel=2)
        return {}
    if found is None:
        return {}  # wb.load_dataset says the path does not exist
    kind = data_kind(found)
    options: dict = {"class_names": names} if names else {}
    if kind == "csv":
        options.update(path_column=path_column, label_column=label_column)
    return options


def selection_params(methods, selection: str) -> dict:
    """``method_params`` that set ``selection`` on every chosen method that has such a hyper-parameter."""
    import dataclasses

    from .methods import method_class

    if selection not in ("kshot_val", "full_val"):
        raise ConfigError(f"selection must be 'kshot_val' or 'full_val', got {selection!r}.")
    out = {}
    for m in methods:
        fields = {f.name for f in dataclasses.fields(method_class(m).Config)}
        if "selection" in fields:
            out[m] = {"selection": selection}
    return out


def _check_backbone(name: str) -> None:
    import open_clip

    from .backbones import register_model_configs
    from .domains import backbone_recipes

    register_model_configs()
    if name.startswith(("hf-hub:", "local-dir:")) or name in open_clip.list_models() or name in backbone_recipes():
        return
    choices = list(backbone_recipes()) + open_clip.list_models()
    raise ConfigError(f"parameter 'backbone': {name!r} is neither an open_clip architecture, a backbone alias "
                      "(workbench.domains.backbones()) nor an 'hf-hub:'/'local-dir:' id." + did_you_mean(name, choices))
