"""The one reader of every YAML file the workbench reads (dataset packs, backbones, sweep specs).

A YAML file may come from someone else (a colleague's dataset pack, a sweep folder on shared
storage), so :func:`load_yaml`:

* refuses files over :data:`MAX_BYTES` before reading them;
* builds only plain data (PyYAML's safe loader: mappings, lists, strings, numbers, booleans,
  null, dates): a ``!!python/...`` tag is a :class:`~workbench.errors.ConfigError` naming the file
  and line, never an object;
* bounds anchors and aliases: the document, with every alias expanded, may hold at most
  :data:`MAX_VALUES` values (an "alias bomb" of a few lines would otherwise expand to billions
  the moment anything walks it), and a recursive alias is refused;
* turns syntax errors into a ConfigError naming the file, line and column.

Usage::

    from workbench.safe_yaml import load_yaml
    spec = load_yaml("domains/medical/x.yaml", what="dataset YAML")
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from .errors import ConfigError

#: the largest YAML file read (bytes): dataset packs and sweep specs are a few kilobytes
MAX_BYTES = 1_000_000
#: the most values (mapping keys, values, list items) a document may hold with its aliases expanded
MAX_VALUES = 100_000


def _expanded_size(root, limit: int, where: str) -> int:
    """How many values ``root`` holds with every alias expanded; stops early past ``limit``."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            raise ConfigError(f"{where}: an alias refers to its own anchor (a recursive structure); "
                              "write the values out instead.")
        visiting.add(key)
        if isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(item) for item in node.value)
        else:
            n = 1
        visiting.discard(key)
        if n > limit:
            raise ConfigError(f"{where}: its anchors and aliases expand to more than {limit} values (an alias "
                              "bomb?); the workbench does not read it. Write the values out, or split the file.")
        sizes[key] = n
        return n

    return size(root)


def _where(path: Path, err: yaml.MarkedYAMLError | None = None) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)


def load_yaml(path: str | os.PathLike, what: str = "YAML file", *, max_bytes: int = MAX_BYTES,
              max_values: int = MAX_VALUES):
    """The plain data of one YAML file, or a :class:`ConfigError` naming ``what``, the file and the line.

    ``what`` says what the file is for the error messages ("dataset YAML", "sweep spec", ...).
    An empty file gives ``None``.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist.") from None
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read: {err.strerror or err}.") from None
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a file.")
    if size > max_bytes:
        raise ConfigError(f"{what} {path} is {size} bytes, over the {max_bytes}-byte limit for YAML files; "
                          "is it the right file?")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.start}); save it as UTF-8.") from None
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read: {err.strerror or err}.") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, max_values, f"{what} {path}")
        return loader.construct_document(node)
    except yaml.constructor.ConstructorError as err:
        tag = f" ({err.problem.strip()})" if err.problem else ""
        raise ConfigError(f"{what} {_where(path, err)}: a value the workbench does not build{tag}. Only plain "
                          "data is read (mappings, lists, text, numbers, true/false, null): tags such as "
                          "!!python/... are refused, for safety.") from None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{what} {_where(path, err)}: not valid YAML: {problem}.") from None
    except RecursionError:
        raise ConfigError(f"{what} {path}: nested too deeply to read.") from None
    finally:
        loader.dispose()
