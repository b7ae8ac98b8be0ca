"""The shipped configs and how ``--config`` names find them.

The YAML files live in ``configs/`` beside the package in a checkout and are installed as
``music/configs`` in a wheel, so a name means the same file for an installed, an editable and a
source-tree ``music``. Groups: the Lightning deltas and ``base.yaml`` at the top,
``methods/`` (continual-learning method deltas), ``merge/`` (``music merge`` recipes) and
``experiments/`` (one per experiment command, its defaults); ``search/`` holds search spaces
of ``music tune --space search/<name>``, which are no configs and no ``--config`` names.

A ``--config`` value is a shipped name (``seq``, ``seq.yaml``, ``methods/ewc``, or ``ewc`` when
only one group holds it), an explicit path (``./seq.yaml``, ``/abs/x.yaml``, ``dir/x.yaml``), or
inline YAML. A file in the working directory never silently stands in for a shipped config of
the same name: the ambiguity is refused, and ``./name`` picks the file.

This module imports nothing else of ``music``, so every part of it can use it.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

_PACKAGE = Path(__file__).resolve().parent
# a wheel installs them into the package; a checkout (plain or editable) keeps them beside it
CONFIG_DIR = _PACKAGE / "configs" if (_PACKAGE / "configs" / "base.yaml").is_file() else _PACKAGE.parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"
GROUPS = ("methods", "merge", "experiments")
SEARCH = "search"  # search spaces for ``music tune --space search/<name>``: no configs, never a --config name
_EXPLICIT_PREFIXES = ("./", "../", "~", ".\\", "..\\")


def shipped_names() -> list[str]:
    """Every shipped config as ``--config`` takes it: ``seq``, ``methods/ewc``, ..."""
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml")
                  if p.relative_to(CONFIG_DIR).parts[0] != SEARCH)


def search_space_path(value: str) -> Path | None:
    """The shipped search space ``search/<name>`` (``configs/search/<name>.yaml``) means, or None."""
    stem = value.removesuffix(".yaml")
    if not stem.startswith(f"{SEARCH}/") or ".." in Path(stem).parts:
        return None
    path = CONFIG_DIR / f"{stem}.yaml"
    return path if path.is_file() else None


def _shipped(name: str) -> Path | None:
    """The shipped file ``name`` means, or None; a group-less name held by two groups is refused."""
    stem = name.removesuffix(".yaml")
    if os.path.isabs(stem) or ".." in Path(stem).parts:  # a path, never a name
        return None
    path = CONFIG_DIR / f"{stem}.yaml"
    if path.is_file():
        return path
    if "/" in stem:
        return None
    found = [CONFIG_DIR / group / f"{stem}.yaml" for group in GROUPS if (CONFIG_DIR / group / f"{stem}.yaml").is_file()]
    if len(found) > 1:
        named = sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in found)
        raise ValueError(f"--config {name!r} is ambiguous: shipped are {named}; write one of them.")
    return found[0] if found else None


def shipped_config(name: str) -> Path:
    """``seq`` -> ``configs/seq.yaml``; a name that is no shipped config is refused."""
    path = _shipped(name)
    if path is None:
        raise FileNotFoundError(f"--config {name!r} is neither a file nor a shipped config: shipped are "
                                f"{shipped_names()}.")
    return path


def config_path(value: str) -> str:
    """The file (or inline YAML) a ``--config`` value stands for; a file that is no YAML
    mapping is refused here, naming it."""
    path = _locate(value)
    if os.path.isfile(path):
        check_yaml(path)
    return path


def _locate(value: str) -> str:
    if "\n" in value or ":" in value:  # inline YAML
        return value
    if os.path.isabs(value) or value.startswith(_EXPLICIT_PREFIXES):
        return value
    shipped = _shipped(value)
    local = os.path.isfile(value)
    if shipped is not None and local and not os.path.samefile(value, shipped):
        raise ValueError(f"--config {value!r} names both the shipped config {str(shipped)!r} and the local file "
                         f"{os.path.abspath(value)!r}: write ./{value} for the local file (or another explicit path), "
                         "or the shipped file's path for the shipped one.")
    if shipped is not None:
        return str(shipped)
    if os.path.exists(value):
        return value
    return str(shipped_config(value))


def check_yaml(path: str) -> None:
    """A config file that is empty, not YAML or not a mapping, refused naming the file: the
    parser would report it as ``<unicode string>`` or an empty "Unexpected config"."""
    try:
        with open(path, encoding="utf-8") as f:
            content = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"--config {path} is not valid YAML: {problem}{where}.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path} cannot be read: {err}.") from None
    if not isinstance(content, dict):
        what = "empty" if content is None else f"a {type(content).__name__}, not a mapping"
        raise ValueError(f"--config {path} is {what}: a config is a YAML mapping of settings, "
                         "e.g. `model: {lr: 0.001}`.")



def resolve_configs(args: list[str]) -> list[str]:
    """``args`` with every ``--config`` value replaced by the file it stands for, so the parser
    (which knows only paths) reads the shipped config a name means."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            out += [arg, config_path(args[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + config_path(arg.removeprefix("--config="))
        out.append(arg)
        i += 1
    return out
