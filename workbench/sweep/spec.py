"""The sweep spec: what a sweep YAML may say, checked whole before any cell runs, and the grid of cells it makes.

Part of :mod:`workbench.sweep` (see the package docstring for how a sweep behaves).
"""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path


from ..safe_yaml import load_yaml
from ..errors import ConfigError, did_you_mean
from ..paths import repo_root, resolve
from ..results import backbone_weights_key, make_cell
from .devices import _check_devices_syntax

SPEC_KEYS = {"datasets", "backbones", "methods", "shots", "seeds", "output_dir", "workers", "engine", "dask_address",
             "runner", "notebook", "device", "devices", "templates", "protocol", "unlabeled"}


@dataclass
class SweepSpec:
    datasets: list
    methods: list
    shots: list
    seeds: list
    backbones: list = field(default_factory=lambda: ["workbench-tiny-scenes"])
    output_dir: str = "outputs/sweep"
    workers: int = 1
    engine: str = "local"
    dask_address: str | None = None
    runner: str = "function"
    notebook: str = "00_quickstart.ipynb"
    device: str = "auto"
    devices: list | str | None = None
    templates: list | None = None
    #: "default", "paper", "base_to_new" or "retrieval" (see workbench.protocols; cross-dataset needs
    #: compare(targets=...)); a pair dataset (domains/*/pairs/*.yaml) runs the retrieval protocol whatever it says
    protocol: str = "default"
    #: images nobody labelled, for the methods that use them (``transclip``, ``tda``): ``"test"`` (transductive),
    #: a split name, a folder, CSV or ``.npz`` (see workbench.unlabeled); part of those methods' cell keys
    unlabeled: str | None = None
    #: run a ``notebook`` outside ``notebooks/``: only from code or the command line, never from a spec file
    #: (a shared spec must not opt itself in to running a notebook, which is code, from anywhere)
    allow_notebook_outside: bool = False

    def __post_init__(self):
        """Check the whole spec before any cell runs: each error names the key and the fix."""
        from ..methods import method_class

        for key in ("datasets", "methods", "shots", "seeds", "backbones"):
            value = getattr(self, key)
            if not isinstance(value, list) or not value:
                raise ConfigError(f"sweep: '{key}' must be a non-empty list, got {value!r}.")
        self.methods = [m if isinstance(m, dict) else {"name": m} for m in self.methods]
        for m in self.methods:
            extra = sorted(set(m) - {"name", "params", "label"})
            if extra or "name" not in m:
                raise ConfigError(f"sweep: a method entry is a name or {{name, params, label}}; got {m!r}.")
            if m.get("params") is not None and not isinstance(m["params"], dict):
                raise ConfigError(f"sweep: method {m['name']!r}: 'params' must be a mapping of parameter: value, "
                                  f"got {m['params']!r}.")
            method_class(m["name"])
            if m.get("params"):
                method_class(m["name"])(**m["params"])  # unknown hyper-parameter -> clear error now
        self.backbones = [b if isinstance(b, dict) else {"name": b, "pretrained": ""} for b in self.backbones]
        self.datasets = [_check_dataset(d, i) for i, d in enumerate(self.datasets)]
        for key, what in (("shots", "shots per class"), ("seeds", "seeds")):
            for v in getattr(self, key):
                # bool is an int in Python, and a float K would silently become another K
                if isinstance(v, bool) or not isinstance(v, numbers.Integral) or (key == "shots" and v < 1):
                    kind = "positive integers" if key == "shots" else "integers"
                    raise ConfigError(f"sweep: '{key}' must be a list of {kind} ({what}); {v!r} is not. "
                                      f"Write e.g. {key}: [1, 2, 4].")
            setattr(self, key, [int(v) for v in getattr(self, key)])  # numpy ints: same cell keys as ints
        if self.engine not in ("local", "dask"):
            raise ConfigError(f"sweep: engine must be 'local' or 'dask', got {self.engine!r}.")
        if self.runner not in ("function", "notebook"):
            raise ConfigError(f"sweep: runner must be 'function' or 'notebook', got {self.runner!r}.")
        if self.runner == "notebook" and any(m.get("params") for m in self.methods):
            raise ConfigError("sweep: runner 'notebook' passes no method parameters; use runner 'function'.")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"sweep: workers must be a positive integer, got {self.workers!r}.")
        if self.templates is not None and (not isinstance(self.templates, list) or not all(
                isinstance(t, str) and "{}" in t for t in self.templates)):
            raise ConfigError(f"sweep: 'templates' must be a list of strings with a {{}} for the class name, "
                              f"got {self.templates!r}.")
        if self.protocol not in ("default", "paper", "base_to_new", "retrieval"):
            raise ConfigError(f"sweep: 'protocol' must be 'default', 'paper', 'base_to_new' or 'retrieval', got "
                              f"{self.protocol!r}"
                              + (" (cross-dataset runs need targets: wb.compare(..., protocol='cross_dataset', "
                                 "targets=[...]))." if self.protocol == "cross_dataset" else "."))
        self._check_unlabeled()
        if self.protocol != "default" and self.runner == "notebook":
            raise ConfigError("sweep: runner 'notebook' runs the default protocol only; use runner 'function'.")
        if self.runner == "notebook":
            notebook_path(self.notebook, self.allow_notebook_outside)
            pairs = [d for d in self.datasets if is_pair_entry(d)]
            if pairs:
                raise ConfigError(f"sweep: runner 'notebook' runs classification cells; {pairs} are image–text pair "
                                  "datasets (retrieval rows): use runner 'function'.")
        for m in self.methods:
            if m.get("label") is not None:
                check_name(m["label"], f"method {m['name']!r}: 'label'")
        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
            raise ConfigError(f"sweep: 'output_dir' must be a folder path, got {self.output_dir!r}.")
        if self.devices is not None:
            _check_devices_syntax(self.devices)
            if self.device != "auto":
                raise ConfigError(f"sweep: give either 'device' ({self.device!r}: every worker on it) or 'devices' "
                                  f"(one worker per device), not both.")
            n = len(self.devices) if isinstance(self.devices, list) else None
            if n is not None and self.workers > 1 and self.workers != n:
                raise ConfigError(f"sweep: 'devices' runs one worker per device ({n}); 'workers: {self.workers}' "
                                  "disagrees. Leave 'workers' out, or list as many devices as workers.")

    def _check_unlabeled(self) -> None:
        """``unlabeled``: its type, "test" under the inductive paper protocol (also when a method that uses
        unlabeled images would fall back to it), TDA with a pool that is not the test stream — before any cell."""
        from ..methods import method_class
        from ..unlabeled import check_unlabeled

        if self.unlabeled is not None and self.protocol not in ("default", "paper"):
            raise ConfigError(f"sweep: 'unlabeled' applies to the standard few-shot protocols, not {self.protocol!r}.")
        if self.unlabeled is not None and self.runner == "notebook":
            raise ConfigError("sweep: runner 'notebook' passes no unlabeled pool; use runner 'function'.")
        where = "sweep ('unlabeled')"
        check_unlabeled(self.unlabeled, self.protocol, where)
        users = []
        for m in self.methods:
            check_unlabeled(self.unlabeled, self.protocol, where, method=method_class(m["name"]))
            if getattr(method_class(m["name"]), "uses_unlabeled", None):
                users.append(m["name"])
        if self.unlabeled is None and users:
            import warnings

            warnings.warn(f"sweep: {sorted(set(users))} use images nobody labelled and the spec names none "
                          "('unlabeled'): they run transductively on the test images (unlabeled: test) and their rows "
                          "say transductive=True. Set 'unlabeled' to choose.", stacklevel=3)
        elif self.unlabeled is not None and str(self.unlabeled) != "test" and _looks_like_path(str(self.unlabeled)):
            # a folder / CSV / npz: made absolute, so that every worker and every rerun reads the same images
            path = Path(str(self.unlabeled)).expanduser()
            for candidate in ((path,) if path.is_absolute() else (Path.cwd() / path, repo_root() / path)):
                if candidate.exists():
                    self.unlabeled = str(candidate.resolve())
                    break
            else:
                raise ConfigError(f"sweep: 'unlabeled' {str(self.unlabeled)!r} does not exist (looked in {Path.cwd()} "
                                  f"and {repo_root()}); give an image folder, CSV or .npz, a split name, or 'test'.")

    def unlabeled_for(self, method: str):
        """What ``method``'s cells are given: None for an inductive method; else ``unlabeled``, or ``"test"`` (the
        transductive setting, as compare() does) when the spec names none."""
        from ..methods import method_class

        if not getattr(method_class(method), "uses_unlabeled", None):
            return None
        return "test" if self.unlabeled is None else str(self.unlabeled)

    @classmethod
    def from_yaml(cls, path, **overrides) -> "SweepSpec":
        """The spec in the YAML file ``path``; ``overrides`` are the caller's own settings (opt-ins)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"sweep spec {str(path)!r} does not exist.")
        data = load_yaml(path, what="sweep spec") or {}   # size-limited, bounded aliases, no python tags
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sweep settings.")
        if "allow_notebook_outside" in data:
            raise ConfigError(f"{path}: 'allow_notebook_outside' cannot be set in a spec file (a spec may come from "
                              "someone else, and a notebook is code); pass it yourself: "
                              "sweep(spec, allow_notebook_outside=True) or `workbench sweep --allow-notebook-outside`.")
        unknown = sorted(set(data) - SPEC_KEYS)
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]!r}; allowed: {sorted(SPEC_KEYS)}."
                              + did_you_mean(unknown[0], SPEC_KEYS))
        for key in ("datasets", "methods", "shots", "seeds"):
            if key not in data:
                raise ConfigError(f"{path}: missing required key {key!r}.")
        return cls(**data, **overrides)


DATA_SUFFIXES = {".yaml", ".yml", ".csv", ".npz"}


def _looks_like_path(entry: str) -> bool:
    return "/" in entry or os.sep in entry or Path(entry).suffix.lower() in DATA_SUFFIXES


def _check_dataset(entry, index: int) -> str:
    """A dataset entry: a YAML name (checked against ``domains/``), or a folder / CSV / .npz / YAML path.

    A path must exist (taken from the working directory, else the repository root, as dataset
    YAMLs are); it is made absolute so that every worker and every rerun reads the same data.
    """
    if not isinstance(entry, (str, os.PathLike)) or not str(entry):
        raise ConfigError(f"sweep: datasets[{index}] must be a dataset name or a path, got {entry!r}.")
    from ..domains import load_spec

    entry = str(entry)
    if not _looks_like_path(entry):
        if is_pair_entry(entry):   # an image–text pair YAML (domains/*/pairs/*.yaml): the retrieval protocol
            from ..data.pairs import load_pair_spec

            check_name(load_pair_spec(entry).get("name", entry), f"datasets[{index}] {entry!r}: the YAML's 'name'")
            return entry
        # unknown name or a YAML that breaks the schema -> a ConfigError naming it; its name becomes a path
        check_name(load_spec(entry).get("name", entry), f"datasets[{index}] {entry!r}: the YAML's 'name'")
        return entry
    path = Path(entry).expanduser()
    for candidate in ((path,) if path.is_absolute() else (Path.cwd() / path, repo_root() / path)):
        if candidate.exists():
            if candidate.suffix.lower() in (".yaml", ".yml"):
                from ..data.pairs import load_pair_spec

                spec = load_pair_spec(candidate) if is_pair_entry(str(candidate)) else load_spec(candidate)
                check_name(spec.get("name", candidate.stem), f"datasets[{index}] {entry!r}: the YAML's 'name'")
            return str(candidate.resolve())
    raise ConfigError(f"sweep: datasets[{index}] {entry!r} does not exist (looked in {Path.cwd()} and "
                      f"{repo_root()}). Give an existing folder, CSV, .npz or dataset YAML, or a dataset name "
                      "from `workbench datasets`.")


def is_pair_entry(entry: str) -> bool:
    """Whether a dataset entry names an image–text pair dataset: a YAML name under ``domains/*/pairs/``, or a
    YAML file whose ``task`` is the retrieval kind (read through the safe YAML reader; nothing is loaded)."""
    from ..data.pairs import pair_specs_dir
    from ..task_kinds import task_kind

    entry = str(entry)
    if not _looks_like_path(entry):
        return entry in {p.stem for p in pair_specs_dir()}
    path = Path(entry)
    if path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
        return False
    data = load_yaml(path, what="dataset YAML")
    task = data.get("task") if isinstance(data, dict) else None
    try:
        return task is not None and task_kind(str(task)).name == "retrieval"
    except ConfigError:
        return False


def check_name(name, what: str) -> str:
    """A name that becomes part of a written path (a run folder, a file) must stay one path component.

    Refused: anything but a non-empty string, path separators, ``.`` and ``..``, control characters
    and names over 200 characters — so a dataset YAML's ``name: ../../x`` or a method label never
    moves a file outside ``output_dir``. (A minimal local check; the package-wide name validator
    lives with the path helpers.)
    """
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or any(ord(c) < 32 or ord(c) == 127 for c in name) or len(name) > 200):
        raise ConfigError(f"sweep: {what} {name!r} is not a usable name: it becomes part of a file path under "
                          "output_dir, so it must be one path component (no '/', '\\', '.' or '..', no control "
                          "characters, at most 200 characters). Rename it, e.g. to "
                          f"{_slug(name)!r}.")
    return name


def _slug(name) -> str:
    import re

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._")[:200]
    return slug or "dataset"


def notebook_path(notebook, allow_outside: bool = False) -> Path:
    """The notebook a ``runner: notebook`` sweep executes: ``notebook`` taken from ``notebooks/``.

    A notebook runs code, and a sweep spec may come from someone else: a path that leaves
    ``notebooks/`` (``../x.ipynb``, an absolute path, a link out) is a ConfigError unless the
    user opts in (``allow_outside``, from code or the command line).
    """
    if not isinstance(notebook, (str, os.PathLike)) or not str(notebook):
        raise ConfigError(f"sweep: 'notebook' must be a notebook file name in notebooks/, got {notebook!r}.")
    folder = resolve("notebooks").resolve()
    path = (folder / Path(notebook).expanduser()).resolve()
    if not allow_outside and not path.is_relative_to(folder):
        raise ConfigError(f"sweep: notebook {str(notebook)!r} is outside notebooks/ ({path}). A sweep runs its "
                          "notebook as code, and a spec may come from someone else, so only notebooks in "
                          f"{folder} run unless you opt in: sweep(spec, allow_notebook_outside=True) or "
                          "`workbench sweep --allow-notebook-outside`.")
    return path


def cells(spec: SweepSpec) -> list[dict]:
    """Every (dataset, backbone, method, K, seed) of the grid, each with a stable ``cell_id``.

    A method that uses unlabeled images has its pool in the key (``unlabeled``, as compare() keys it), so
    a sweep with another pool is another cell; inductive methods keep their keys. A pair dataset (or
    ``protocol: retrieval``) has one ``retrieval`` cell per (backbone, method, seed): K does not apply
    (``shots`` 0, as compare(protocol="retrieval") keys it).
    """
    out = []
    for d in spec.datasets:
        retrieval = spec.protocol == "retrieval" or is_pair_entry(d)
        for b in spec.backbones:
            for m in spec.methods:
                for k in ([0] if retrieval else spec.shots):
                    for s in spec.seeds:
                        out.append(make_cell(d, b["name"], b.get("pretrained"), m["name"], k, s, label=m.get("label"),
                                             params=m.get("params"), templates=spec.templates, runner=spec.runner,
                                             protocol="retrieval" if retrieval else spec.protocol,
                                             extra={"unlabeled": None if retrieval else spec.unlabeled_for(m["name"]),
                                                    "backbone_weights": backbone_weights_key(b["name"])}))
    return out
