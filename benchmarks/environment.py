"""What every benchmark records about where it ran: package versions, the git state and the CPU's name."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (``None`` when it is not installed)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state() -> dict[str, Any]:
    """``{"commit": full hash, "dirty": bool}`` of the repository.

    Without git, or in a copy of the tree without ``.git`` (the device machine), the commit and the dirty flag come
    from ``$MILAN_GIT_COMMIT`` and ``$MILAN_GIT_DIRTY`` (``1``/``0``; unset: unknown).
    """

    def run(*cmd: str) -> str:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True, timeout=30).stdout.strip()

    try:
        return {"commit": run("git", "rev-parse", "HEAD"), "dirty": bool(run("git", "status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        dirty = os.environ.get("MILAN_GIT_DIRTY")
        return {
            "commit": os.environ.get("MILAN_GIT_COMMIT", "unknown"),
            "dirty": None if dirty is None else dirty == "1",
        }


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what :mod:`platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
