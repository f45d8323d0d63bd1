"""Finding the repository root, so notebooks resolve paths the same from any working directory.

JupyterLab starts a kernel in the notebook's folder, papermill in whatever ``--cwd`` it was
given, nbval in the test runner's folder: paths relative to the working directory would differ
between them. Everything the workbench ships (``domains/``, ``data/``) is found from here.
"""
from __future__ import annotations

import os
from pathlib import Path

#: the package's version (``workbench.__version__``), recorded in saved models; here so that any room may read it
package_version = "0.1.0"


def _is_root(p: Path) -> bool:
    return (p / "pyproject.toml").is_file() and (p / "workbench").is_dir() and (p / "domains").is_dir()


def repo_root() -> Path:
    """The checkout that holds ``domains/`` and ``data/``.

    Order: ``$WORKBENCH_ROOT``; the folder above this package (editable install, the normal
    case); the working directory and its parents.
    """
    env = os.environ.get("WORKBENCH_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parent.parent
    if _is_root(here):
        return here
    cwd = Path.cwd().resolve()
    for p in (cwd, *cwd.parents):
        if _is_root(p):
            return p
    raise FileNotFoundError("cannot find the workbench checkout (a folder with pyproject.toml, workbench/ and "
                            "domains/). Set WORKBENCH_ROOT to it.")


def resolve(path: str | os.PathLike) -> Path:
    """An absolute path: relative ones are taken from the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else repo_root() / p


def find_existing(path: str | os.PathLike) -> Path | None:
    """An existing file or folder for a user-given path, or None.

    A relative path is tried from the working directory first (the CLI, a script), then from
    the repository root (a notebook's kernel runs in ``notebooks/``).
    """
    p = Path(path).expanduser()
    if p.exists():
        return p.resolve()
    if not p.is_absolute():
        try:
            q = repo_root() / p
        except FileNotFoundError:
            return None
        if q.exists():
            return q
    return None


_SAFE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+=@,")
#: the longest name :func:`safe_name` returns (file systems allow 255 bytes per path component)
SAFE_NAME_MAX = 120


def safe_name(name, what: str = "name") -> str:
    """A dataset, method, run or sweep name as ONE safe path component: names are not paths.

    Call it wherever a name that came from a user or a file (a dataset YAML's ``name:``, a
    method label, a run id, a sweep name) becomes part of a path the workbench writes. The
    result never contains a path separator, never is ``.``/``..`` or starts with a dot, holds only
    letters, digits and ``._-+=@,``, and is at most :data:`SAFE_NAME_MAX` characters; so
    ``root / safe_name(x)`` always stays inside ``root``.

    A name that is already safe is returned unchanged, and ``/`` becomes ``__`` (existing folders
    keep their names). Any other is slugged: other characters become ``_``,
    leading dots are dropped, and a short hash of the original name is appended so that two
    different names never share a folder. ``what`` names the value in the error raised for a
    non-string or empty name.
    """
    import hashlib

    from .errors import ConfigError

    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{what} must be a non-empty string, got {name!r}.")
    joined = name.replace("/", "__")   # a Hub id "user/set": the folder name split files always used
    if set(joined) <= _SAFE_CHARS and not joined.startswith(".") and len(joined) <= SAFE_NAME_MAX:
        return joined
    slug = "".join(c if c in _SAFE_CHARS else "_" for c in joined)
    slug = slug.lstrip(".") or "_"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug[:SAFE_NAME_MAX - 9]}-{digest}"


def check_inside(path: str | os.PathLike, root: str | os.PathLike, what: str = "path") -> Path:
    """``path`` if it lies inside ``root`` (after resolving ``..`` and links), else a ConfigError naming both."""
    from .errors import ConfigError

    p, r = Path(path).expanduser().resolve(), Path(root).expanduser().resolve()
    if p != r and r not in p.parents:
        raise ConfigError(f"{what} {str(path)!r} lies outside {str(root)!r}; the workbench writes and reads only "
                          "inside the folder it was given.")
    return p


#: the file that marks a folder written by ``workbench.backbones.save_backbone``
SAVED_BACKBONE_FILE = "backbone.json"


def saved_weights_fingerprint(folder) -> str | None:
    """The first 16 hex digits of the sha256 of a saved backbone folder's weights, from its manifest
    (``backbone.json``); None when ``folder`` is not such a folder or its manifest has no checksum.

    Run keys include it, so that a backbone fine-tuned again into the same folder never reuses the
    rows of the weights it replaced (read only: the folder's files are checked when it is loaded).
    """
    import json

    try:
        path = Path(os.path.expanduser(str(folder))) / SAVED_BACKBONE_FILE
        if not path.is_file() or path.stat().st_size > 1_000_000:
            return None
        meta = json.loads(path.read_text())
        sha = ((meta.get("files") or {}).get("open_clip_model.safetensors") or {}).get("sha256")
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return str(sha)[:16] if sha else None
