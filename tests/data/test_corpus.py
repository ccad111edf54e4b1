"""A corpus of good, odd-but-valid and bad files through pretrain (both decoders, shards), knn, linprobe, finetune.

The corpus is an ImageFolder tree of two classes. Per class: 5 good JPEGs; 6 odd but valid files (16-bit TIFF,
transparent palette PNG, CMYK JPEG, greyscale BMP, GIF, an upper-case ``.PNG``); 6 bad files (a PNG header claiming
900 megapixels, above Pillow's own hard limit; one claiming 100 megapixels, above our default limit; a truncated
JPEG; a zero-byte file; a text file and an HTML page with image names); plus a note and a hidden file that are not
images at all. Tar shards: three good shards and a truncated one among them. Every job must finish, and its counts
are exact.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from milan.cli import main as cli
from milan.train.logging import read_metrics
from tests.train.conftest import tiny_overrides

from .conftest import encode, noisy_rgb

GOOD, ODD = 5, 6
BAD = {"too large": 2, "truncated": 1, "empty": 1, "not an image": 2}  # per class
PER_CLASS = GOOD + ODD + sum(BAD.values())


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def photo(seed: int, tint: tuple[int, int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(tint) + rng.integers(-40, 40, (36, 40, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def build_corpus(root: Path) -> Path:
    for label, (name, tint) in enumerate((("cat", (200, 60, 40)), ("dog", (40, 90, 210)))):
        folder = root / name
        folder.mkdir(parents=True)
        base = photo(100 + label, tint)
        for i in range(GOOD):
            (folder / f"good_{i}.jpg").write_bytes(encode(photo(10 * label + i, tint), "JPEG", quality=90))
        palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        grey16 = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        odd = {
            "deep.tif": encode(grey16, "TIFF"),
            "alpha.png": encode(palette, "PNG", transparency=0),
            "print.jpg": encode(base.convert("CMYK"), "JPEG", quality=90),
            "grey.bmp": encode(base.convert("L"), "BMP"),
            "anim.gif": encode(palette, "GIF"),
            "UPPER.PNG": encode(base, "PNG"),
        }
        jpg = encode(noisy_rgb(64, 64, seed=label), "JPEG", quality=90)
        bad = {
            "bomb_900mp.png": png_claiming(30_000, 30_000),
            "big_100mp.png": png_claiming(10_000, 10_000),
            "cut.jpg": jpg[: len(jpg) // 2],
            "zero.jpg": b"",
            "notes.jpg": b"shopping list: milk, eggs\n",
            "page.png": b"<!DOCTYPE html><html><body>404 not found</body></html>\n",
        }
        assert len(odd) == ODD and len(bad) == sum(BAD.values())
        for file_name, data in {**odd, **bad, "README.txt": b"about the pictures", ".DS_Store": b"\0\0"}.items():
            (folder / file_name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def expected_reasons(classes: int = 2, *, evaluation: bool = False) -> dict[str, int]:
    """Skip counts over ``classes`` class folders. The evaluation jobs' pixel limit (``data.max_image_pixels``,
    179 M) is above the 100-megapixel header, so that file gets decoded there and is found truncated."""
    reasons = {reason: n * classes for reason, n in BAD.items()}
    if evaluation:
        reasons["too large"] -= classes
        reasons["truncated"] += classes
    return reasons


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_pretrain_on_the_corpus(tmp_path: Path, corpus: Path, decode: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    extra = {"batch_size": 2, "schedule.epochs": 1, "schedule.warmup_epochs": 0, "data.decode": decode}
    assert cli(["pretrain", *tiny_overrides(run, corpus, extra)]) == 0
    out = capsys.readouterr().out
    total = 2 * PER_CLASS
    assert f"found {total} images in {corpus} (ignored 2 files for their extension (.txt 2))" in out
    (epoch,) = read_metrics(run / "metrics.jsonl", "epoch")
    assert epoch["data"]["seen"] == total and epoch["data"]["reasons"] == expected_reasons()
    (summary,) = read_metrics(run / "metrics.jsonl", "summary")
    assert summary["images_seen"] == 2 * (GOOD + ODD)
    assert f"skipped {2 * sum(BAD.values())} of {total} images" in out


def test_pretrain_on_shards_with_a_truncated_one(tmp_path: Path, corpus: Path) -> None:
    pytest.importorskip("webdataset")
    images = sorted((corpus / "cat").glob("good_*.jpg")) + sorted((corpus / "dog").glob("good_*.jpg"))  # 10
    for s in range(4):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for i in range(6):
                data = images[(6 * s + i) % len(images)].read_bytes()
                info = tarfile.TarInfo(f"{s}{i:05d}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        raw = buf.getvalue()
        if s == 2:  # the third shard breaks inside its fifth sample: 4 are read
            with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
                raw = raw[: tf.getmembers()[4].offset_data + 100]
        (tmp_path / f"part-{s}.tar").write_bytes(raw)
    run = tmp_path / "run"
    extra = {"batch_size": 3, "schedule.epochs": 1, "schedule.warmup_epochs": 0, "data.num_samples": 24}
    assert cli(["pretrain", *tiny_overrides(run, tmp_path / "part-{0..3}.tar", extra)]) == 0
    (epoch,) = read_metrics(run / "metrics.jsonl", "epoch")
    # 6 + 6 + 4 + 6 = 22 images and 1 damaged-shard marker: 23 items, 7 batches of 3 (2 items in the dropped tail)
    data = epoch["data"]
    assert data["damaged_shards"] == 1 and data["skipped"] == 0 and data["expected"] == 24
    assert data["seen"] in (19, 20)  # the marker fell into a trained batch (19 images) or into the dropped tail
    assert data["shard_examples"][0][0] == str(tmp_path / "part-2.tar")
    assert data["shard_examples"][0][2].startswith("unreadable after 4 samples")


def test_knn_and_linprobe_on_the_corpus(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = [f"data.train={corpus}", f"data.val={corpus}", "data.num_workers=0", "runtime.device=cpu",
              "encoder.model_name=milan_test_tiny", "log.progress=false"]  # fmt: skip
    usable = 2 * (GOOD + ODD)
    assert cli(["knn", *common, f"out_dir={tmp_path / 'knn'}", "batch_size=4", "cache_dir=null", "k=[3]"]) == 0
    result = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert result["num_train"] == result["num_val"] == usable
    (summary,) = read_metrics(tmp_path / "knn" / "metrics.jsonl", "summary")
    assert summary["data"]["seen"] == 4 * PER_CLASS and summary["data"]["reasons"] == expected_reasons(
        4, evaluation=True
    )
    out = capsys.readouterr().out
    assert f"train: found {2 * PER_CLASS} images (2 classes) in {corpus} (ignored 2 files" in out

    probe = [*common, f"out_dir={tmp_path / 'probe'}", "batch_size=2", "schedule.epochs=1",
             "schedule.warmup_epochs=0", "log.tensorboard=false", "log.plot=false", "optim.lr=0.1"]  # fmt: skip
    assert cli(["linprobe", *probe]) == 0
    (epoch,) = read_metrics(tmp_path / "probe" / "metrics.jsonl", "epoch")
    assert epoch["data"]["seen"] == 2 * PER_CLASS
    assert epoch["data"]["reasons"] == expected_reasons(evaluation=True)
    (evaluation,) = read_metrics(tmp_path / "probe" / "metrics.jsonl", "eval")
    assert evaluation["val_skipped"] == 2 * sum(BAD.values())
    assert evaluation["val_data"]["reasons"] == expected_reasons(evaluation=True)
    assert evaluation["heads"][0]["count"] == usable
    out = capsys.readouterr().out
    assert f"train: found {2 * PER_CLASS} images (2 classes) in {corpus}" in out and "steps per epoch" in out

    classifier = tmp_path / "probe" / "classifier.pt"
    evaluate = ["evaluate", "--checkpoint", str(classifier), "--data", str(corpus), "--device", "cpu",
                "--num-workers", "0", "--batch-size", "4", "--no-progress",
                "--out", str(tmp_path / "eval.json")]  # fmt: skip
    assert cli(evaluate) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"found {2 * PER_CLASS} images (2 classes) in {corpus} (ignored 2 files")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["count"] == usable and result["skipped"] == 2 * sum(BAD.values())
    assert cli([*evaluate[:5], "--per-class", "3", *evaluate[5:]]) == 0  # a folder's per-class subset
    # the first 3 per class in name order: UPPER.PNG, alpha.png, anim.gif (all readable)
    assert json.loads((tmp_path / "eval.json").read_text())["count"] == 6


def test_finetune_on_the_corpus(tmp_path: Path, corpus: Path) -> None:
    args = [f"data.train={corpus}", f"data.val={corpus}", "data.num_workers=0", "runtime.device=cpu",
            "encoder.model_name=milan_test_tiny", "log.progress=false", "log.tensorboard=false",
            f"out_dir={tmp_path / 'ft'}", "batch_size=2", "schedule.epochs=1", "schedule.warmup_epochs=0"]  # fmt: skip
    assert cli(["finetune", *args]) == 0
    (epoch,) = read_metrics(tmp_path / "ft" / "metrics.jsonl", "epoch")
    assert epoch["data"]["seen"] == 2 * PER_CLASS
    assert epoch["data"]["reasons"] == expected_reasons(evaluation=True)
    (evaluation,) = read_metrics(tmp_path / "ft" / "metrics.jsonl", "eval")
    assert evaluation["val_data"]["reasons"] == expected_reasons(evaluation=True)
