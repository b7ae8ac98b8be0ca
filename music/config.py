"""The shipped configs: where they are, and ``--config NAME`` resolved to one of them."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"


def shipped_config(name: str) -> Path:
    """``seq`` -> ``music/configs/seq.yaml``; a name that is no shipped config is refused."""
    path = CONFIG_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"--config {name!r} is neither a file nor a shipped config: shipped are {names}.")
    return path


def resolve_configs(args: list[str]) -> list[str]:
    """Every ``--config X`` that names no existing file becomes the shipped config ``X``."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            out += [arg, _config_path(args[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + _config_path(arg.removeprefix("--config="))
        out.append(arg)
        i += 1
    return out


def _config_path(value: str) -> str:
    if os.path.exists(value) or "\n" in value or ":" in value:  # a file, or inline YAML
        return value
    return str(shipped_config(value))
