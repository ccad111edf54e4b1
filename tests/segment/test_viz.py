"""Segmentation pictures: colours, overlays, the label map found next to an image, the prediction drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from milan.data.segmentation import find_label, normalize
from milan.jobs.segment_viz import ALPHA, colorize, palette, predict_labels, render_segmentation
from milan.models.segmentation import SegmentationModel
from milan.models.vit import VisionTransformer


def test_palette_is_distinct_and_fixed() -> None:
    colours = palette(150)  # ADE20K
    assert colours.shape == (150, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours.tolist()}) == 150
    assert np.array_equal(palette(11), colours[:11])  # a class keeps its colour whatever the number of classes
    rgb, valid = colorize(np.array([[0, 1], [255, 11]]), palette(11))
    assert valid.tolist() == [[True, True], [False, False]]  # the ignore index and values past K have no colour
    assert np.allclose(rgb[0, 1] * 255, colours[1]) and not rgb[1].any()


def test_the_label_map_of_an_image_is_found_in_both_layouts(tmp_path: Path) -> None:
    for images, labels in (("train/images", "train/labels"), ("images/validation", "annotations/validation")):
        (tmp_path / images / "sub").mkdir(parents=True)
        (tmp_path / labels / "sub").mkdir(parents=True)
        image = tmp_path / images / "sub" / "a.jpg"
        image.touch()
        assert find_label(image) is None
        (tmp_path / labels / "sub" / "a.png").touch()
        assert find_label(image) == tmp_path / labels / "sub" / "a.png"
    assert find_label(tmp_path / "elsewhere" / "a.jpg") is None


def test_prediction_and_picture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    model = SegmentationModel(enc, 3, crop_size=32, channels=8, aux_channels=0).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    whole = predict_labels(
        model, {"scale": [40, 30], "mode": "whole", "crop": 32, "stride": 21}, image, torch.device("cpu")
    )
    x = normalize(torch.from_numpy(pixels).permute(2, 0, 1).float())[None]  # the evaluation view at the image's size
    with torch.no_grad():
        assert np.array_equal(whole, model.predict(x).argmax(1)[0].numpy())
    slide = predict_labels(
        model, {"scale": [40, 30], "mode": "slide", "crop": 32, "stride": 21}, image, torch.device("cpu")
    )
    assert slide.shape == (30, 40) and set(np.unique(slide)) <= {0, 1, 2}
    grey = np.full_like(pixels, 128)
    truth = np.where(np.arange(40) < 20, 0, 255)[None].repeat(30, 0)  # half labelled (class 0), half ignored
    out = render_segmentation([grey, grey], [truth, None], [whole, slide], tmp_path / "seg.png",
                              class_names=["road", "sky", "car"], names=["a", "b"], title="t")  # fmt: skip
    picture = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3).astype(int)
    road = np.round((128 / 255 * (1 - ALPHA) + palette(3)[0] / 255 * ALPHA) * 255)  # class 0 drawn over grey
    assert (np.abs(picture - road).max(axis=1) <= 1).sum() > 500  # the ground truth's labelled half
    assert (np.abs(picture - 128).max(axis=1) <= 1).sum() > 500  # its ignored half: the image as is
