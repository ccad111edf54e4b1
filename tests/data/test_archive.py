"""extract_archive_subset on the shared CIFAR-10 / Tiny-ImageNet archives and on small synthetic tars."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from milan.data import build_dataset, eval_transform, extract_archive_subset
from milan.data.sources import scan_images

from .conftest import encode, unpack

CIFAR_TEST = Path("/work/shared/data/cifar10_jpg/test.tar.gz")
TINY = Path("/work/shared/data/tiny_imagenet_subset/train100.tar.gz")
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.skipif(not CIFAR_TEST.is_file(), reason="shared CIFAR-10 archive not available")
def test_cifar10_test_subset(tmp_path: Path) -> None:
    root = extract_archive_subset(CIFAR_TEST, tmp_path / "cifar", per_class=2, split="test")
    dataset = build_dataset(root, eval_transform(32, crop_pct=1.0), labelled=True)
    assert dataset.classes == CIFAR_CLASSES
    assert [p.relative_to(root).as_posix() for p, _ in dataset.samples][:4] == [
        "airplane/0000.jpg",
        "airplane/0001.jpg",
        "automobile/0000.jpg",
        "automobile/0001.jpg",
    ]
    assert [label for _, label in dataset.samples] == [k for k in range(10) for _ in range(2)]
    image, label = unpack(dataset[19])
    assert image.shape == (3, 32, 32) and label == 9
    marker = json.loads((root / ".milan_subset.json").read_text())
    assert marker["num_images"] == 20 and marker["per_class"] == 2
    # Reused, not rewritten, when asked again (also with the split inferred from the archive).
    stamp = (root / "airplane" / "0000.jpg").stat().st_mtime_ns
    assert extract_archive_subset(CIFAR_TEST, root, per_class=2, split="test") == root
    assert (root / "airplane" / "0000.jpg").stat().st_mtime_ns == stamp


@pytest.mark.skipif(not TINY.is_file(), reason="shared Tiny-ImageNet archive not available")
def test_tiny_imagenet_class_subset_natural_order(tmp_path: Path) -> None:
    root = extract_archive_subset(TINY, tmp_path / "tiny", per_class=3, classes=["n02124075", "n01443537"])
    names = [p.relative_to(root).as_posix() for p in scan_images(root).paths]
    assert names == [
        f"{wnid}/images/{wnid}_{i}.JPEG" for wnid in ("n01443537", "n02124075") for i in range(3)
    ]  # natural order: _0, _1, _2 (not _0, _1, _10)


def _tar(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name in names:
            data = encode(Image.new("RGB", (4, 4)), "PNG") if name.endswith(".png") else b"x"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_synthetic_archive_layouts_and_cache_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"./val/{c}/img_{i}.png" for c in ("b", "a") for i in (10, 2, 1)] + ["./val/a/readme.txt", "LICENSE"]
    archive = _tar(tmp_path / "data.tar.gz", names)
    monkeypatch.setenv("MILAN_CACHE", str(tmp_path / "cache"))
    root = extract_archive_subset(archive, per_class=2, split="val")
    assert root == tmp_path / "cache" / "subsets" / "data-val-2"
    assert [p.relative_to(root).as_posix() for p in scan_images(root).paths] == [
        "a/img_1.png",
        "a/img_2.png",
        "b/img_1.png",
        "b/img_2.png",
    ]
    # A different request for the same folder replaces our own subset ...
    bigger = extract_archive_subset(archive, root, per_class=None, split="val")
    assert bigger == root and len(scan_images(root).paths) == 6
    # ... but a folder we did not write is never touched.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        extract_archive_subset(archive, foreign, per_class=1, split="val")
    flat = _tar(tmp_path / "flat.tar", ["cat/1.png", "cat/2.png", "dog/1.png"])  # no split folder
    assert len(scan_images(extract_archive_subset(flat, tmp_path / "flat", per_class=1)).paths) == 2
    with pytest.raises(FileNotFoundError, match="split"):
        extract_archive_subset(archive, tmp_path / "none", per_class=1, split="train")
    with pytest.raises(FileNotFoundError, match="classes"):
        extract_archive_subset(archive, tmp_path / "none", per_class=1, split="val", classes=["zebra"])
