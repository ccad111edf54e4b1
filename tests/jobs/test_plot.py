"""``milan plot`` on runs without training records (issue 10 §7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from milan.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def _write(folder: Path, records: list[dict[str, object]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_knn_run_draws_accuracy_per_k(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "has no training records yet", exit 1, nothing drawn (a k-NN run logs only its summary)."""
    by_k = {"20": {"top1": 24.4, "top5": 75.7}, "10": {"top1": 23.0, "top5": 70.1}, "100": {"top1": 22.0, "top5": 77.0}}
    run = _write(tmp_path / "knn", [{"event": "summary", "step": 0, "job": "knn", "top1": 24.4, "by_k": by_k}])
    assert main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    assert "no training records (an evaluation-only run)" in out and "k-NN top-1 / top-5 for k = 10, 20, 100" in out
    assert (run / "plot.png").read_bytes()[:8] == PNG


def test_eval_records_are_drawn_against_the_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records: list[dict[str, object]] = [
        {"event": "eval", "epoch": e, "step": 10 * e, "top1": 20.0 + e, "top5": 60.0 + e} for e in (1, 2, 3)
    ]
    run = _write(tmp_path / "probe", records)
    assert main(["plot", str(run), "--out", str(tmp_path / "p.png")]) == 0
    assert "accuracy of 3 evaluation(s) against the epoch" in capsys.readouterr().out
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG


def test_a_log_with_nothing_to_draw_says_what_it_holds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _write(tmp_path / "odd", [{"event": "epoch", "epoch": 1, "step": 2}])
    assert main(["plot", str(run)]) == 1
    err = capsys.readouterr().err
    assert "holds records of kind epoch: no training curves and no accuracies to draw" in err
    assert not (run / "plot.png").exists()
