"""Where images come from: folder scans, ImageFolder class trees, file lists, archives, tar shards, bundled samples.

A data source as the user writes it (``data.path``, ``data.train``, ...):

* ``"builtin:samples"``: the ~32 JPEGs bundled with the package (the CPU demo);
* a folder: every image under it, at any depth, or an ImageFolder class tree ``root/<class>/**/<image>``;
* a text file: one image path per line (relative to the list's folder); an image file: just that image;
* a ``.tar``/``.tar.gz`` archive of class folders (labelled data): a class-balanced subset is unpacked once into the
  cache folder (:func:`extract_archive_subset`);
* tar shards (webdataset): ``*.tar`` paths, brace patterns like ``train-{000000..000127}.tar``, ``pipe:CMD`` and
  remote URLs (these two only with ``data.allow_shell_pipes``: webdataset runs shell commands for them);
* a list of the above: their images concatenated (unlabelled only).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from PIL import Image

Source = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
"""A data source: one entry or a sequence of entries (see the module docstring)."""

# Pillow formats that register an extension and an opener but cannot decode pixels here: stubs that need a handler
# installed by the user (BUFR, GRIB, HDF5, WMF/EMF outside Windows), MPEG (header only), EPS (needs Ghostscript) and
# IPTC (metadata). Files with their extensions are ignored like any other non-image file.
_UNDECODABLE_FORMATS = frozenset({"BUFR", "GRIB", "HDF5", "WMF", "MPEG", "EPS", "IPTC"})


def _pillow_extensions() -> tuple[str, ...]:
    Image.init()
    registered = Image.registered_extensions()  # ".ext" -> format name
    found = {ext for ext, fmt in registered.items() if fmt in Image.OPEN and fmt not in _UNDECODABLE_FORMATS}
    found |= {".mpo"}  # multi-picture JPEG: opened by the JPEG plugin
    common = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
    return (*common, *sorted(found - set(common)))


IMAGE_EXTENSIONS: tuple[str, ...] = _pillow_extensions()
"""Accepted extensions, compared case-insensitively: every format the installed Pillow reads (common ones first)."""

BUILTIN_SAMPLES = "builtin:samples"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
MARKER = ".milan_subset.json"  # written into an unpacked archive subset, describes the request
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two characters at least: "C:" is a drive letter


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether a file name has an accepted image extension and is not hidden (``.*``, e.g. macOS ``._x.jpg``)."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def natural_key(text: str) -> list[str | int]:
    """Sort key that orders embedded numbers numerically (``img_2`` before ``img_10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


class ImageScan(NamedTuple):
    """What a scan found: the image files, and the visible files left out for their extension (``{".txt": 3}``)."""

    paths: list[Path]
    ignored: Counter[str]


def describe_ignored(ignored: Counter[str], limit: int = 4) -> str:
    """``"ignored 3 files for their extension (.txt 2, .json 1)"``, or ``""`` when nothing was ignored."""
    total = sum(ignored.values())
    if not total:
        return ""
    ranked = sorted(ignored.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]  # most common first, then by name
    kinds = ", ".join(f"{ext} {n}" for ext, n in ranked) + (", ..." if len(ignored) > limit else "")
    return f"ignored {'1 file for its' if total == 1 else f'{total} files for their'} extension ({kinds})"


def no_images_error(where: str, ignored: Counter[str] | None = None) -> FileNotFoundError:
    """The error of a source without a single image file, saying what it holds instead."""
    found = describe_ignored(ignored or Counter()) or "no files at all"
    accepted = ", ".join(IMAGE_EXTENSIONS[:8])
    return FileNotFoundError(
        f"no image files found in {where}: {found} (accepted: every format Pillow reads, e.g. {accepted})"
    )


def scan_images(root: str | os.PathLike[str]) -> ImageScan:
    """The image files under a folder, at any depth, sorted by their path relative to ``root`` in natural order.

    Hidden files and folders are skipped; symbolic links to folders are followed, each real folder once. Callers
    check that ``root`` is a folder (each with its own message).
    """
    root = Path(root)
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
                ignored[os.path.splitext(name)[1].lower() or "(none)"] += 1
    return ImageScan(sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix())), ignored)


def read_file_list(list_file: str | os.PathLike[str]) -> list[Path]:
    """The image paths listed in a text file, in order.

    Blank lines and ``#`` comments are ignored; relative paths are resolved against the list's folder. The paths
    are not checked here: a missing or unreadable file is a counted skip when it is loaded.
    """
    list_file = Path(list_file)
    paths: list[Path] = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            path = Path(os.path.expanduser(entry))
            paths.append(path if path.is_absolute() else list_file.parent / path)
    return paths


def sample_images_dir() -> Path:
    """The folder of the ~32 small JPEGs bundled with the package (Tiny-ImageNet, see its README.md).

    Raises:
        FileNotFoundError: The package data is missing or not on a file system (e.g. a zip install).
    """
    path = Path(str(resources.files("milan") / "samples"))
    if not path.is_dir() or not any(is_image_file(p) for p in path.iterdir()):
        raise FileNotFoundError(f"the bundled sample images are missing from {path} (broken installation?)")
    return path


def entries_of(source: Source) -> list[str | os.PathLike[str]]:
    """A source's entries: ``[source]`` for one entry."""
    return [source] if isinstance(source, str | os.PathLike) else list(source)


def resolve_source(entry: str | os.PathLike[str]) -> Path:
    """Maps ``"builtin:samples"`` to the bundled folder and expands ``~``; other entries become paths."""
    text = os.fspath(entry)
    if text == BUILTIN_SAMPLES:
        return sample_images_dir()
    if text.startswith("builtin:"):
        raise ValueError(f"unknown built-in data source {text!r}; available: {BUILTIN_SAMPLES!r}")
    return Path(text).expanduser()


def scan_sources(source: Source) -> ImageScan:
    """The image paths of folders (scanned recursively), list files and image files, entry by entry.

    Raises:
        FileNotFoundError: An entry does not exist, or no image files were found at all.
    """
    entries = entries_of(source)
    paths: list[Path] = []
    ignored: Counter[str] = Counter()
    for entry in entries:
        location = resolve_source(entry)
        if location.is_dir():
            scan = scan_images(location)
            paths += scan.paths
            ignored += scan.ignored
        elif location.is_file():
            paths += [location] if is_image_file(location) else read_file_list(location)
        else:
            raise FileNotFoundError(f"image source not found: {location}")
    if not paths:
        where = ", ".join(str(resolve_source(e)) for e in entries) or "an empty source list"
        raise no_images_error(f"{where} (folders are searched recursively)", ignored)
    return ImageScan(paths, ignored)


def shell_sources(entries: Iterable[str | os.PathLike[str]]) -> list[str]:
    """The entries webdataset would open by running a shell command: ``pipe:`` and remote URLs (``http:``, ``gs:``)."""
    out = []
    for entry in entries:
        match = _SCHEME.match(os.fspath(entry))
        if match is not None and match.group(1).lower() not in ("file", "builtin"):
            out.append(os.fspath(entry))
    return out


def is_shard_source(source: Source) -> bool:
    """Whether every entry names tar shards: ``*.tar`` paths, brace patterns (``a-{000..009}.tar``), ``pipe:``."""
    entries = [os.fspath(e) for e in entries_of(source)]
    return bool(entries) and all(
        text.startswith("pipe:") or text.endswith(".tar") or ("{" in text and ".tar" in text) for text in entries
    )


# ----------------------------------------------------------------------------------------------------------------
# Archives of class folders: a deterministic, class-balanced subset unpacked into an ImageFolder tree


def default_cache_dir() -> Path:
    """``$MILAN_CACHE``, else ``$XDG_CACHE_HOME/milan``, else ``~/.cache/milan``."""
    if "MILAN_CACHE" in os.environ:
        return Path(os.environ["MILAN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "milan"


def _members_by_class(tf: tarfile.TarFile, split: str | None) -> dict[str, list[tarfile.TarInfo]]:
    """Image members by class, each renamed to its output path ``class/.../image``.

    ``split=None`` strips a top folder shared by every image (``train/<class>/...``), if there is one.
    """
    members: list[tuple[tarfile.TarInfo, tuple[str, ...]]] = []
    for member in tf:
        path = PurePosixPath(member.name)
        if member.isfile() and is_image_file(member.name) and ".." not in path.parts and not path.is_absolute():
            members.append((member, path.parts))
    if split is None:
        tops = {parts[0] for _, parts in members}
        if len(tops) == 1 and all(len(parts) >= 3 for _, parts in members):
            split = tops.pop()
    groups: dict[str, list[tarfile.TarInfo]] = defaultdict(list)
    for member, parts in members:
        if split is not None and parts[0] != split:
            continue
        inner = parts[1:] if split is not None else parts
        if len(inner) >= 2:  # class folder + file
            member.name = "/".join(inner)
            groups[inner[0]].append(member)
    return groups


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((folder / MARKER).read_text()))
    except (OSError, ValueError):
        return None


def extract_archive_subset(
    tar_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    per_class: int | None,
    split: str | None = None,
    classes: Sequence[str] | None = None,
) -> Path:
    """Unpacks (or reuses) the first ``per_class`` images of every class of an archive as an ImageFolder tree.

    The archive is laid out as ``[<split>/]<class>/<any sub-path>/<image>``; the subset holds, for every class, the
    first ``per_class`` images in natural name order: the same files on every machine. The tree is written atomically
    (into a temporary folder, then renamed) with a :data:`MARKER` file and reused when the marker matches the request,
    so concurrent processes (e.g. DDP ranks) can all call this.

    Args:
        tar_path: A ``.tar``, ``.tar.gz`` ... archive.
        out_dir: The tree's root. ``None``: ``default_cache_dir()/subsets/<archive>-<split>-<per_class>``. An
            existing folder is reused if its marker matches, replaced if it holds another subset of ours, and never
            touched if it has no marker.
        per_class: Images per class (``None``: all of them).
        split: The archive's top folder to read (``"train"``); ``None``: the single top folder shared by every
            image, if any.
        classes: Keep only these classes (default: all).

    Returns:
        The root of the tree: ``root/<class>/.../<image>``.

    Raises:
        FileNotFoundError: The archive is missing, or the selection is empty.
        FileExistsError: ``out_dir`` exists, is not empty and was not written by this function.
    """
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise FileNotFoundError(f"archive not found: {tar_path}")
    if per_class is not None and per_class <= 0:
        raise ValueError(f"per_class must be positive or None, got {per_class}")
    stem = tar_path.name.split(".")[0]
    if out_dir is None:
        out_dir = default_cache_dir() / "subsets" / f"{stem}-{split or 'auto'}-{per_class or 'all'}"
    out = Path(out_dir)
    request = {
        "archive": str(tar_path.resolve()),
        "archive_bytes": tar_path.stat().st_size,
        "split": split,
        "per_class": per_class,
        "classes": sorted(classes) if classes is not None else None,
    }
    marker = _read_marker(out)
    if marker is not None and {k: marker.get(k) for k in request} == request:
        return out
    if marker is None and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and was not written by extract_archive_subset; choose another out_dir")

    with tarfile.open(tar_path, "r:*") as tf:
        groups = _members_by_class(tf, split)
        if classes is not None:
            missing = sorted(set(classes) - set(groups))
            if missing:
                raise FileNotFoundError(f"{tar_path}: classes not in the archive (split {split!r}): {missing[:10]}")
            groups = {name: groups[name] for name in classes}
        selected: list[tarfile.TarInfo] = []
        counts: dict[str, int] = {}
        for name, members in groups.items():
            chosen = sorted(members, key=lambda m: natural_key(m.name))[:per_class]
            selected += chosen
            counts[name] = len(chosen)
        if not selected:
            raise FileNotFoundError(f"no images in {tar_path} for split {split!r} (layout: [split/]class/.../image)")

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            selected.sort(key=lambda m: m.offset)  # one pass in archive order (a compressed stream seeks forward)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12: also drops modes and owners
                tf.extractall(tmp, members=selected, filter="data")
            else:  # regular files whose names were checked and rewritten above
                tf.extractall(tmp, members=selected)
            (tmp / MARKER).write_text(json.dumps({**request, "num_images": len(selected), "per_class_found": counts}))
            if out.exists():  # another subset of ours: replace it
                stale = out.with_name(f".{out.name}.stale-{os.getpid()}")
                os.replace(out, stale)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.replace(tmp, out)
            except OSError:  # another process finished first
                theirs = _read_marker(out)
                if theirs is None or {k: theirs.get(k) for k in request} != request:
                    raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(tmp)
    return out
