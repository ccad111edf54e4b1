"""Segmentation checkpoints: the model spec ``milan segment`` stores with its weights, and reading them back.

The ``"spec"`` entry of every checkpoint of a ``milan segment`` run (``RUN/segmenter.pt``, ``checkpoints/last.pt``)
is plain data::

    {"kind": "segmentation", "version": 1,
     "arch": {...},      # milan.models.segmentation.model_spec: encoder shape, crop, heads, feature blocks
     "labels": {"num_classes", "ignore_index", "reduce_zero_label", "class_names"},
     "eval": {"scale", "mode", "crop", "stride"}}   # the evaluation protocol

``milan evaluate`` and ``milan visualize`` read it (:func:`segmentation_spec`, :func:`load_segmenter`); the encoder
and classifier readers (:func:`milan.checkpoint.read_checkpoint`) refuse it with a line that says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch

from milan.checkpoint.io import safe_load
from milan.checkpoint.spec import SPEC_VERSION, check_version
from milan.errors import CheckpointError
from milan.models.segmentation import SegmentationModel, build_from_spec, model_spec

KIND = "segmentation"


def segmenter_spec(
    model: SegmentationModel,
    *,
    class_names: Sequence[str],
    ignore_index: int,
    reduce_zero_label: bool,
    scale: tuple[int, int],
    mode: Literal["slide", "whole"],
    crop: int,
    stride: int,
) -> dict[str, Any]:
    """The spec record of ``model`` (see the module docstring): architecture, labels, evaluation protocol."""
    return {
        "kind": KIND,
        "version": SPEC_VERSION,
        "arch": model_spec(model),
        "labels": {"num_classes": model.num_classes, "ignore_index": ignore_index,
                   "reduce_zero_label": reduce_zero_label, "class_names": list(class_names)},
        "eval": {"scale": list(scale), "mode": mode, "crop": crop, "stride": stride},
    }  # fmt: skip


def segmentation_spec(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The segmentation spec of a checkpoint file, or ``None`` (another kind of checkpoint, or not one we can read).

    Reads the file memory-mapped (a cheap look before another reader opens it).
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint, or unreadable: the caller's own reader reports it
        return None
    return _spec_of(blob)


def _spec_of(blob: Any) -> dict[str, Any] | None:
    spec = blob.get("spec") if isinstance(blob, dict) else None
    return spec if isinstance(spec, dict) and spec.get("kind") == KIND else None


def load_segmenter(path: str | os.PathLike[str]) -> tuple[SegmentationModel, dict[str, Any]]:
    """The model of a segmentation checkpoint, in eval mode on the CPU, and its spec record.

    Raises:
        CheckpointError: Not a segmentation checkpoint, a newer spec, or weights that do not fit the spec.
    """
    blob = safe_load(path)
    spec = _spec_of(blob)
    if spec is None:
        raise CheckpointError(f"{path} is not a checkpoint of milan segment (no segmentation model spec)")
    check_version(spec, f"{path}: ")
    try:
        model = build_from_spec(spec["arch"])
        model.load_state_dict(blob["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the weights do not fit the stored spec: {str(e).splitlines()[0]}") from e
    return model.eval(), spec
