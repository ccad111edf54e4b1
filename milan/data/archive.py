"""Unpacking a deterministic, class-balanced subset of a labelled image archive into an ImageFolder tree.

Meant for labelled image archives such as a CIFAR-10 or Tiny-ImageNet tarball of JPEG class folders::

    root = extract_archive_subset("cifar10/test.tar.gz", None, per_class=100)
    dataset = ImageFolderDataset(root, eval_transform(32))

Archive layout: ``[<split>/]<class>/<any sub-path>/<image>``. The subset holds, for every class, the first
``per_class`` images in natural name order (``img_2`` before ``img_10``): the same files on every machine. The
tree is written atomically (into a temporary folder, then renamed) with a ``.milan_subset.json`` marker and is
reused when the marker matches the request, so concurrent processes (e.g. DDP ranks) can all call this.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from milan.data.sources import is_image_file, natural_key

MARKER = ".milan_subset.json"


def default_cache_dir() -> Path:
    """``$MILAN_CACHE``, else ``$XDG_CACHE_HOME/milan``, else ``~/.cache/milan``."""
    if "MILAN_CACHE" in os.environ:
        return Path(os.environ["MILAN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "milan"


def _members_by_class(tar_path: Path, split: str | None) -> dict[str, list[tuple[str, str]]]:
    """Image members grouped by class: ``class -> [(member name, output path "class/.../image")]``.

    ``split=None`` strips a top folder shared by every image (``train/<class>/...``), if there is one.
    """
    names: list[tuple[str, tuple[str, ...]]] = []
    with tarfile.open(tar_path, "r:*") as tf:
        for member in tf:
            path = PurePosixPath(member.name)
            if member.isfile() and is_image_file(member.name) and ".." not in path.parts and not path.is_absolute():
                names.append((member.name, path.parts))
    if split is None:
        tops = {parts[0] for _, parts in names}
        if len(tops) == 1 and all(len(parts) >= 3 for _, parts in names):
            split = tops.pop()
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for member_name, parts in names:
        inner = parts
        if split is not None:
            if parts[0] != split:
                continue
            inner = parts[1:]
        if len(inner) >= 2:  # class folder + file
            groups[inner[0]].append((member_name, "/".join(inner)))
    return groups


def _extract(tar_path: Path, selected: dict[str, str], dest: Path) -> None:
    """Writes the selected members (name -> relative output path) under ``dest``."""
    remaining = len(selected)
    with tarfile.open(tar_path, "r:*") as tf:
        for member in tf:
            out = selected.get(member.name)
            if out is None:
                continue
            source = tf.extractfile(member)
            if source is None:
                raise OSError(f"{tar_path}: cannot read member {member.name}")
            target = dest / out
            target.parent.mkdir(parents=True, exist_ok=True)
            with source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)
            remaining -= 1
            if remaining == 0:
                break
    if remaining:
        raise OSError(f"{tar_path}: {remaining} selected members were not found on the second read")


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

    Args:
        tar_path: A ``.tar``, ``.tar.gz`` ... archive laid out as ``[<split>/]<class>/.../<image>``.
        out_dir: The tree's root. ``None``: ``default_cache_dir()/subsets/<archive>-<split>-<per_class>``.
            An existing folder is reused if its marker matches, replaced if it holds a different subset, and
            never touched if it has no marker.
        per_class: Images per class (``None``: all of them).
        split: The archive's top folder to read (e.g. ``"train"``); ``None``: the single top folder shared by
            every image, if any, else none.
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
        out = default_cache_dir() / "subsets" / f"{stem}-{split or 'auto'}-{per_class or 'all'}"
    else:
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

    groups = _members_by_class(tar_path, split)
    if classes is not None:
        missing = sorted(set(classes) - set(groups))
        if missing:
            raise FileNotFoundError(f"{tar_path}: classes not in the archive (split {split!r}): {missing[:10]}")
        groups = {name: groups[name] for name in classes}
    selected: dict[str, str] = {}
    counts: dict[str, int] = {}
    for name, members in groups.items():
        chosen = sorted(members, key=lambda m: natural_key(m[0]))[:per_class]
        selected.update(chosen)
        counts[name] = len(chosen)
    if not selected:
        raise FileNotFoundError(f"no images in {tar_path} for split {split!r} (layout: [split/]class/.../image)")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _extract(tar_path, selected, tmp)
        (tmp / MARKER).write_text(json.dumps({**request, "num_images": len(selected), "per_class_found": counts}))
        if out.exists():  # a different subset of ours: replace it
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
