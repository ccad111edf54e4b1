"""``milan models``: the named variants with their encoder, decoder and teacher parameter counts.

Counts are exact and cheap: each part is built with one and with two blocks (a few million parameters at most) and
the per-block count is multiplied out, so even ViT-H is counted in well under a second.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from milan.models.factory import (
    ModelConfig,
    build_decoder,
    build_encoder,
    build_teacher,
    list_models,
    model_config,
)

COMMANDS = {"models": "the model names with their encoder, decoder and teacher parameter counts"}


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a MILAN model.

    The trainable encoder (kept after pretraining) and decoder (thrown away), the frozen teacher (0: pixel targets).
    """

    encoder: int
    decoder: int
    teacher: int


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Exact parameter counts of the model ``cfg`` builds (its teacher as configured, i.e. random-weight shape).

    Examples:
        >>> c = param_counts(model_config("milan_vit_base_patch16"))
        >>> round(c.encoder / 1e6, 2), round(c.decoder / 1e6, 2), round(c.teacher / 1e6, 2)
        (85.65, 25.88, 86.19)
    """
    grid = (cfg.encoder.img_size // cfg.encoder.patch_size,) * 2
    enc, dec = dataclasses.replace(cfg.encoder, depth=0), dataclasses.replace(cfg.decoder, depth=0)  # the cache keys
    teacher = dataclasses.replace(cfg.teacher, checkpoint=None, depth=0)
    out_dim = 3 * enc.patch_size**2 if teacher.kind == "none" else teacher.out_dim
    return ParamCounts(
        encoder=_by_depth(build_encoder, enc, cfg.encoder.depth),
        decoder=_by_depth(build_decoder, dec, cfg.decoder.depth, grid, enc.embed_dim, out_dim, enc.pos_embed_layout),
        teacher=_by_depth(build_teacher, teacher, cfg.teacher.depth, grid, frozen=True),  # None: pixel targets
    )


_CACHE: dict[str, tuple[int, int]] = {}  # the counts of one part's 1- and 2-block builds, by its description


def _by_depth(build: Callable[..., nn.Module | None], part: Any, depth: int, *args: Any, frozen: bool = False) -> int:
    """Parameters of a ``depth``-block part, ``build(part with depth n, *args)``, from its builds with 1 and 2 blocks.

    Blocks are identical in size. A frozen part counts every parameter, another its trainable ones.
    """
    key = f"{build.__name__} {part} {args}"
    if key not in _CACHE:
        counts = []
        for n in (1, 2):
            module = build(dataclasses.replace(part, depth=n), *args)
            params = module.parameters() if module is not None else ()
            counts.append(sum(p.numel() for p in params if p.requires_grad or frozen))
        _CACHE[key] = (counts[0], counts[1])
    one, two = _CACHE[key]
    return one + (depth - 1) * (two - one)


def models_table() -> list[str]:
    """The lines ``milan models`` prints."""
    rows = [("model", "student", "encoder", "decoder", "decoder share", "teacher (frozen)")]
    for name in list_models():
        cfg = model_config(name)
        enc, tea = cfg.encoder, cfg.teacher
        counts = param_counts(cfg)
        student = f"ViT {enc.embed_dim}-d x {enc.depth}, /{enc.patch_size} at {enc.img_size} px"
        if tea.kind == "none":
            teacher = "none (pixel targets)"
        else:
            teacher = f"{counts.teacher / 1e6:.1f} M ({tea.width}-d x {tea.depth}, /{tea.patch_size})"
        share = f"{100 * counts.decoder / max(counts.encoder + counts.decoder, 1):.0f} %"  # of the student
        rows.append((name, student, f"{counts.encoder / 1e6:.2f} M", f"{counts.decoder / 1e6:.2f} M", share, teacher))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """``milan models`` takes no arguments."""


def run(args: argparse.Namespace) -> int:
    """Prints the variants (``model_name=`` in a pretraining config, ``create_model(name)`` in Python)."""
    print("\n".join(models_table()))
    print(
        "\nencoder: kept after pretraining; decoder: trained with it, then dropped (its share of the trained "
        "parameters above); teacher: frozen, the shape of a randomly initialised one (a file brings its own)."
    )
    return 0
