"""The presets installed with the package, and naming them from anywhere.

Presets are YAML files ``configs/<job>/<name>.yaml``. In a clone they are the repository's ``configs/`` folder
(``milan/configs`` is a link to it); an installed package carries them as package data in ``milan/configs``. So
``--config demo_cpu``, ``--config pretrain/demo_cpu`` and ``--config configs/pretrain/demo_cpu.yaml`` name the same
file from any working directory; a path to an existing file always wins.
"""

from __future__ import annotations

import os
from pathlib import Path

from milan.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parents[1]  # the milan package folder


def presets_dir() -> Path | None:
    """The folder holding ``<job>/<name>.yaml`` presets (``None`` if this install has none)."""
    for candidate, marker in ((_PACKAGE / "configs", None), (_PACKAGE.parent / "configs", "pyproject.toml")):
        if marker is not None and not (candidate.parent / marker).is_file():
            continue  # outside a clone, a sibling "configs" folder is someone else's
        if candidate.is_dir() and any(candidate.glob("*/*.yaml")):
            return candidate
    return None


def list_presets(job: str | None = None) -> list[str]:
    """Preset names as ``job/name`` (only ``job``'s when given), sorted."""
    root = presets_dir()
    if root is None:
        return []
    pattern = f"{job}/*.yaml" if job else "*/*.yaml"
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.glob(pattern))


def resolve_preset(path: str | os.PathLike[str], job: str | None = None) -> Path:
    """The YAML file that ``--config PATH`` names.

    Args:
        path: An existing file, or a preset: ``name``, ``job/name``, with or without ``.yaml``, optionally
            starting with ``configs/`` (the repository's paths work outside a clone).
        job: The job whose presets a bare ``name`` is looked up among first (e.g. ``pretrain``).

    Returns:
        The file.

    Raises:
        ConfigError: Neither a file nor a preset (the message lists the job's presets), or a name that several
            jobs' presets share (the message says how to pick one).
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise ConfigError(f"config {str(path)!r} is a folder; pass a YAML file or a preset name")
    found = _find(p, job)
    if found is not None:
        return found
    known = list_presets(job) or list_presets()
    names = ", ".join(n.split("/", 1)[1] if job and n.startswith(f"{job}/") else n for n in known)
    hint = f"; presets: {names}" if names else ""
    raise ConfigError(f"config file not found: {path} (not a file, nor a preset{hint})")


def _find(p: Path, job: str | None) -> Path | None:
    root = presets_dir()
    if root is None or p.is_absolute():
        return None
    parts = list(p.parts)
    if "configs" in parts:  # configs/pretrain/demo_cpu.yaml from outside the clone
        parts = parts[len(parts) - parts[::-1].index("configs") :]
    if not parts or any(part in ("..", ".") for part in parts):
        return None
    name = "/".join(parts).removesuffix(".yaml").removesuffix(".yml")
    if "/" in name:
        candidate = root / f"{name}.yaml"
        return candidate if candidate.is_file() else None
    if job is not None and (root / job / f"{name}.yaml").is_file():
        return root / job / f"{name}.yaml"
    matches = sorted(root.glob(f"*/{name}.yaml"))
    if len(matches) > 1:
        jobs = ", ".join(m.parent.name for m in matches)
        raise ConfigError(f"preset {name!r} exists for {jobs}: name one, e.g. --config {matches[0].parent.name}/{name}")
    return matches[0] if matches else None


__all__ = ["list_presets", "presets_dir", "resolve_preset"]
