"""Where images come from: recursive folder scans, ImageFolder class trees, file lists, the bundled samples."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
"""Accepted file extensions, compared case-insensitively (``.JPEG`` and ``.Jpg`` count)."""

BUILTIN_SAMPLES = "builtin:samples"
"""Data source string that resolves to the images bundled with the package (:func:`sample_images_dir`)."""


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether a file name has an accepted image extension and is not hidden (``.*``, e.g. macOS ``._x.jpg``)."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def natural_key(text: str) -> list[str | int]:
    """Sort key that orders embedded numbers numerically (``img_2`` before ``img_10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def find_images(root: str | os.PathLike[str]) -> list[Path]:
    """Recursively lists the image files under a folder, at any depth, in a deterministic order.

    Hidden files and folders are skipped. Symbolic links to folders are followed, each real folder once.

    Args:
        root: The folder to scan.

    Returns:
        Image paths sorted by their path relative to ``root``.

    Raises:
        NotADirectoryError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"image folder not found: {root}")
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle or a second link to the same folder
            dirnames.clear()
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, name) for name in filenames if is_image_file(name))
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def find_classes(root: str | os.PathLike[str]) -> list[str]:
    """The class names of an ImageFolder tree: its non-hidden subfolders, sorted (as torchvision does).

    Args:
        root: The tree's root folder.

    Returns:
        Sorted class names.

    Raises:
        NotADirectoryError: ``root`` is not a folder.
        FileNotFoundError: ``root`` has no class subfolders.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"image folder not found: {root}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise FileNotFoundError(
            f"no class subfolders in {root}: a labelled dataset needs one folder per class "
            "(root/<class>/<image>); for unlabelled images use UnlabelledImages"
        )
    return classes


def read_file_list(list_file: str | os.PathLike[str]) -> list[Path]:
    """Reads a text file with one image path per line.

    Blank lines and lines starting with ``#`` are ignored; surrounding whitespace is stripped. Relative paths
    are resolved against the folder that holds the list. Paths are not checked here: a missing or unreadable
    file is reported as a skipped sample when it is loaded.

    Args:
        list_file: The list file.

    Returns:
        The listed paths, in file order.

    Raises:
        FileNotFoundError: The list itself does not exist.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"image list not found: {list_file}")
    base = list_file.parent
    paths: list[Path] = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            path = Path(os.path.expanduser(entry))
            paths.append(path if path.is_absolute() else base / path)
    return paths


def sample_images_dir() -> Path:
    """The folder of the ~32 small JPEGs bundled with the package (Tiny-ImageNet, see its README.md).

    Returns:
        A real folder path (use it as a data source, or the string ``"builtin:samples"``).

    Raises:
        FileNotFoundError: The package data is missing or not on a file system (e.g. a zip install).
    """
    folder = resources.files("milan") / "samples"
    path = Path(str(folder))
    if not path.is_dir() or not any(is_image_file(p) for p in path.iterdir()):
        raise FileNotFoundError(f"the bundled sample images are missing from {path} (broken installation?)")
    return path
