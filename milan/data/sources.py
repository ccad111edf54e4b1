"""Where images come from: recursive folder scans, ImageFolder class trees, file lists, the bundled samples."""

from __future__ import annotations

import os
import re
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from PIL import Image

# Pillow formats that register an extension and an opener but cannot decode pixels here: stubs that need a
# handler installed by the user (BUFR, GRIB, HDF5, WMF/EMF outside Windows), MPEG (header only), EPS/PS (needs
# Ghostscript) and IPTC (metadata). Files with their extensions are ignored like any other non-image file.
_UNDECODABLE_FORMATS = frozenset({"BUFR", "GRIB", "HDF5", "WMF", "MPEG", "EPS", "IPTC"})


def _pillow_extensions() -> tuple[str, ...]:
    Image.init()
    registered = Image.registered_extensions()  # ".ext" -> format name
    found = {ext for ext, fmt in registered.items() if fmt in Image.OPEN and fmt not in _UNDECODABLE_FORMATS}
    found |= {".mpo"}  # multi-picture JPEG: opened by the JPEG plugin
    common = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
    return (*common, *sorted(found - set(common)))


IMAGE_EXTENSIONS: tuple[str, ...] = _pillow_extensions()
"""Accepted file extensions, compared case-insensitively (``.JPEG`` and ``.Jpg`` count): every format the installed
Pillow can read (JPEG, PNG, WebP, BMP, TIFF, GIF, ... ; the common ones first)."""

BUILTIN_SAMPLES = "builtin:samples"
"""Data source string that resolves to the images bundled with the package (:func:`sample_images_dir`)."""


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether a file name has an accepted image extension and is not hidden (``.*``, e.g. macOS ``._x.jpg``)."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def extension_of(path: str | os.PathLike[str]) -> str:
    """The lower-cased extension of a file name (``".jpg"``), or ``"(none)"``."""
    return os.path.splitext(os.path.basename(path))[1].lower() or "(none)"


class ImageScan(NamedTuple):
    """What a folder scan found.

    Attributes:
        paths: The image files, in the scan's order.
        ignored: Visible files left out for their extension, counted by extension (``{".txt": 3}``).
    """

    paths: list[Path]
    ignored: Counter[str]


def describe_ignored(ignored: Counter[str], limit: int = 4) -> str:
    """``"ignored 3 files for their extension (.txt 2, .json 1)"``, or ``""`` when nothing was ignored."""
    total = sum(ignored.values())
    if not total:
        return ""
    ranked = sorted(ignored.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]  # most common first, then by name
    kinds = ", ".join(f"{ext} {n}" for ext, n in ranked)
    more = ", ..." if len(ignored) > limit else ""
    files = "1 file for its" if total == 1 else f"{total} files for their"
    return f"ignored {files} extension ({kinds}{more})"


def natural_key(text: str) -> list[str | int]:
    """Sort key that orders embedded numbers numerically (``img_2`` before ``img_10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def scan_images(root: str | os.PathLike[str]) -> ImageScan:
    """Recursively lists the image files under a folder, at any depth, in a deterministic order.

    Hidden files and folders are skipped. Symbolic links to folders are followed, each real folder once. Visible
    files without an image extension are counted by extension (:attr:`ImageScan.ignored`).

    Args:
        root: The folder to scan.

    Returns:
        Image paths sorted by their path relative to ``root``, and the ignored files' counts.

    Raises:
        NotADirectoryError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"image folder not found: {root}")
    found: list[Path] = []
    ignored: Counter[str] = Counter()
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle or a second link to the same folder
            dirnames.clear()
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if is_image_file(name):
                found.append(Path(dirpath, name))
            elif not name.startswith("."):
                ignored[extension_of(name)] += 1
    return ImageScan(sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix())), ignored)


def find_images(root: str | os.PathLike[str]) -> list[Path]:
    """The image files under a folder (:func:`scan_images` without the ignored-file counts).

    Args:
        root: The folder to scan.

    Returns:
        Image paths sorted by their path relative to ``root``.

    Raises:
        NotADirectoryError: ``root`` is not a folder.
    """
    return scan_images(root).paths


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
