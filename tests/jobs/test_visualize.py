"""``milan visualize``: the computed views against naive recomputations, the PCA colouring, and the CLI end to end
on checkpoints written by the pretraining job itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from milan.cli import main
from milan.jobs.pretrain import pretrain
from milan.jobs.visualize import COLUMNS, compute_views, figure_size, pca_rgb, reconstruction, render, unpatchify
from milan.masking import from_permutation, num_visible, restore_order
from milan.models import MILAN, build_milan, create_model, model_config
from milan.models.milan import patchify
from milan.train.config import PretrainConfig, load_config


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pixel_model() -> MILAN:
    cfg = model_config("milan_test_tiny")
    cfg.teacher.kind, cfg.masking, cfg.loss_on, cfg.decoder.kind = "none", "random", "masked", "mae"
    return build_milan(cfg).eval()


def _images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_views_match_a_naive_recomputation() -> None:
    model = create_model("milan_test_tiny").eval()
    x = _images()
    views = compute_views(model, x, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t = model.teacher(x)  # type: ignore[misc]
    torch.testing.assert_close(views.importance, t.cls_attention)
    torch.testing.assert_close(views.target, t.features[:, 1:])
    # per-patch cosine, recomputed from the student's own prediction for the drawn mask
    m = views.mask
    keep = num_visible(16, 0.75)
    assert m.shape == (3, 16) and bool((m.sum(1) == 16 - keep).all())
    ids_shuffle = torch.argsort(m, dim=1, stable=True)  # visible (0) first
    mask = from_permutation(ids_shuffle, 0.75)
    with torch.no_grad():
        pred = restore_order(model.student(x, mask), mask)[:, 1:]
    torch.testing.assert_close(views.pred, pred, rtol=1e-4, atol=1e-5)
    expected = F.cosine_similarity(pred, t.features[:, 1:], dim=-1)
    torch.testing.assert_close(views.cosine, expected, rtol=1e-4, atol=1e-5)
    assert views.mean_cosine(0, True) == pytest.approx(float(expected[0][m[0] == 1].mean()), abs=1e-5)
    # display images are the de-normalised inputs
    assert views.images.min() >= 0 and views.images.max() <= 1


def test_overrides_and_seed() -> None:
    model = create_model("milan_test_tiny").eval()
    x = _images()
    a = compute_views(model, x, generator=torch.Generator().manual_seed(3), mask_ratio=0.5, masking="random")
    assert bool((a.mask.sum(1) == 8).all()) and a.masking == "random"
    b = compute_views(model, x, generator=torch.Generator().manual_seed(3), mask_ratio=0.5, masking="random")
    assert torch.equal(a.mask, b.mask)
    assert model.mask_ratio == 0.75 and model.masking == "attention"  # the model is left as it was
    with pytest.raises(ValueError, match="attention masking needs a teacher"):
        compute_views(_pixel_model(), x, masking="attention")
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 32, 32\)"):
        compute_views(model, _images(size=48))


def test_pca_rgb_against_numpy_svd() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 16, 8, generator=g)
    pred = target + 0.3 * torch.randn(2, 16, 8, generator=g)
    t_rgb, p_rgb = pca_rgb(target, pred)
    assert t_rgb.shape == p_rgb.shape == (2, 16, 3)
    assert t_rgb.min() >= 0 and t_rgb.max() <= 1 and p_rgb.min() >= 0 and p_rgb.max() <= 1
    # naive: numpy SVD of the normalised, centred targets; colours are affine in the projection, so each colour
    # channel must be perfectly (anti-)correlated with the numpy projection wherever it is not clipped
    t = target.reshape(32, 8).double().numpy()
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    centred = t - t.mean(0)
    _, _, vh = np.linalg.svd(centred, full_matrices=False)
    proj = centred @ vh[:3].T
    colours = t_rgb.reshape(32, 3).double().numpy()
    for c in range(3):
        inside = (colours[:, c] > 0) & (colours[:, c] < 1)
        r = np.corrcoef(colours[inside, c], proj[inside, c])[0, 1]
        assert abs(r) > 0.9999
    # equal inputs give equal colours (one basis for both)
    same_t, same_p = pca_rgb(target, target.clone())
    torch.testing.assert_close(same_t, same_p)


def test_unpatchify_inverts_patchify_and_reconstruction_pastes_visible_patches() -> None:
    x = _images(2)
    assert torch.equal(unpatchify(patchify(x, 8), (4, 4), 8), x)
    views = compute_views(_pixel_model(), x, generator=torch.Generator().manual_seed(0))
    assert views.pixel_targets and views.importance is None
    recon, pasted = reconstruction(views, x)
    shown = views.images
    visible = F.interpolate(1 - views.mask.view(2, 1, 4, 4), scale_factor=8) > 0  # (B, 1, H, W)
    torch.testing.assert_close(pasted[visible.expand_as(pasted)], shown[visible.expand_as(shown)], atol=1e-5, rtol=0)
    assert recon.shape == pasted.shape == x.shape


def test_render_size_and_content(tmp_path: Path) -> None:
    model = create_model("milan_test_tiny").eval()
    views = compute_views(model, _images(2), generator=torch.Generator().manual_seed(0))
    out = render(views, tmp_path / "grid.png", names=["a.jpg", "b.jpg"])
    img = np.asarray(Image.open(out).convert("RGB")).astype(np.float64)
    assert (img.shape[1], img.shape[0]) == figure_size(2)
    assert figure_size(2)[1] < figure_size(3)[1] and figure_size(2)[0] == figure_size(3)[0]
    assert img.std() > 20  # not a blank canvas
    # every one of the len(COLUMNS) column bands holds drawn pixels
    bands = np.array_split(img.mean(axis=2), len(COLUMNS), axis=1)
    assert all(band.std() > 5 for band in bands)


# ----------------------------------------------------------------------------------------------------------------
# The CLI on checkpoints written by `milan pretrain` itself


def _pretrain(run_dir: Path, extra: list[str]) -> Path:
    overrides = [
        "model_name=milan_test_tiny",
        f"out_dir={run_dir}",
        "data.path=builtin:samples",
        "data.num_workers=0",
        "batch_size=8",
        "optim.lr=1e-3",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "schedule.max_steps=2",
        "runtime.device=cpu",
        "runtime.cpu_threads=1",
        "log.progress=false",
        "log.tensorboard=false",
        "log.plot=false",
        *extra,
    ]
    summary = pretrain(load_config(PretrainConfig, overrides=overrides))
    assert summary.checkpoint is not None
    return summary.checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            "milan": _pretrain(root / "milan", []),
            "pixel": _pretrain(
                root / "pixel",
                ["model.teacher.kind=none", "model.masking=random", "model.loss_on=masked", "model.decoder.kind=mae"],
            ),
        }
    finally:
        torch.set_num_threads(threads)


def test_cli_draws_a_grid_for_a_pretraining_checkpoint(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vis.png"
    rc = main(["visualize", "--checkpoint", str(checkpoints["milan"]), "builtin:samples", "--out", str(out),
               "--max-images", "3", "--device", "cpu", "--seed", "1"])  # fmt: skip
    assert rc == 0 and capsys.readouterr().out.strip() == str(out)
    img = np.asarray(Image.open(out).convert("RGB")).astype(np.float64)
    assert (img.shape[1], img.shape[0]) == figure_size(3)
    assert img.std() > 20
    # a folder of images works too
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8)).save(folder / "x.png")
    out2 = tmp_path / "vis2.png"
    rc = main(["visualize", "-c", str(checkpoints["milan"]), str(folder), "-o", str(out2), "--device", "cpu"])
    assert rc == 0
    assert (Image.open(out2).size) == figure_size(1)


def test_cli_pixel_model_and_errors(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pixel.png"
    rc = main(["visualize", "-c", str(checkpoints["pixel"]), "builtin:samples", "-o", str(out), "--max-images", "2",
               "--device", "cpu"])  # fmt: skip
    assert rc == 0 and Image.open(out).size == figure_size(2)
    capsys.readouterr()
    rc = main(["visualize", "-c", str(checkpoints["pixel"]), "builtin:samples", "-o", str(out), "--masking",
               "attention", "--device", "cpu"])  # fmt: skip
    assert rc == 2 and "attention masking needs a teacher" in capsys.readouterr().err
    rc = main(["visualize", "-c", str(tmp_path / "missing.pt"), "builtin:samples", "-o", str(out)])
    assert rc == 2 and "missing.pt" in capsys.readouterr().err
    rc = main(["visualize", "-c", str(checkpoints["milan"]), str(tmp_path / "nowhere"), "-o", str(out)])
    assert rc == 2 and "nowhere" in capsys.readouterr().err


def test_load_images_labels_rows_by_folder_when_file_names_repeat(tmp_path: Path) -> None:
    from milan.jobs.visualize import load_images

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / cls / "0000.jpg")
    x, names = load_images([str(tmp_path)], 32, 1.0, 8)
    assert x.shape == (2, 3, 32, 32) and names == ["cat/0000.jpg", "dog/0000.jpg"]
    x, names = load_images([str(tmp_path / "cat" / "0000.jpg")], 32, 0.875, 8)
    assert names == ["0000.jpg"]


def test_a_moved_teacher_file_is_rebuilt_from_the_checkpoints_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Today: "pass teacher=<...>" (the flag is --teacher), then with --teacher "teacher patch grid (7, 7) !=
    student patch grid (4, 4)": the teacher's image size was not taken from the checkpoint."""
    from milan.checkpoint import load_milan
    from tests.checkpoint.conftest import open_clip_model

    teacher_file = tmp_path / "clip.pth"
    torch.save(open_clip_model(image=56).state_dict(), teacher_file)  # patch 8: a 7 x 7 grid; the student's is 4 x 4
    ckpt = _pretrain(tmp_path / "run", [f"model.teacher.checkpoint={teacher_file}"])
    original = load_milan(ckpt)  # the recorded file, run at the student's grid as in training
    moved = teacher_file.rename(tmp_path / "moved.pth")
    out = tmp_path / "vis.png"
    args = ["visualize", "-c", str(ckpt), "builtin:samples", "-o", str(out), "--device", "cpu", "--max-images", "2"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "pass --teacher FILE" in err and str(teacher_file) in err and "teacher=" not in err and "\n" not in err
    assert main([*args, "--teacher", str(moved)]) == 0 and Image.open(out).size == figure_size(2)
    again = load_milan(ckpt, teacher=moved)
    assert again.teacher is not None and original.teacher is not None and again.teacher.grid_size == (4, 4)
    x = _images(2)
    torch.testing.assert_close(again.teacher(x).features, original.teacher(x).features, atol=0, rtol=0)
