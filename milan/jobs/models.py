"""``milan models``: the named variants with their encoder, decoder and teacher parameter counts.

Counts are exact and cheap: each part is built with one and with two blocks (a few million parameters at most) and
the per-block count is multiplied out, so even ViT-H is counted in well under a second.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from milan.models.factory import (
    ModelConfig,
    build_decoder,
    build_encoder,
    build_teacher,
    list_models,
    model_config,
)


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a MILAN model.

    Attributes:
        encoder: Trainable encoder parameters (what is kept after pretraining).
        decoder: Trainable decoder parameters (thrown away after pretraining).
        teacher: Frozen teacher parameters (0 for pixel targets).
    """

    encoder: int
    decoder: int
    teacher: int

    @property
    def decoder_share(self) -> float:
        """The decoder's share of the trained (student) parameters."""
        return self.decoder / max(self.encoder + self.decoder, 1)


def _count(module: nn.Module | None, trainable: bool) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


_CACHE: dict[str, tuple[int, int]] = {}  # the counts of one part's 1- and 2-block builds, by its description


def _by_depth(key: str, build: Callable[[int], nn.Module | None], depth: int, trainable: bool = True) -> int:
    """Parameters of a ``depth``-block model from builds with 1 and 2 blocks (blocks are identical in size)."""
    if key not in _CACHE:
        _CACHE[key] = (_count(build(1), trainable), _count(build(2), trainable))
    one, two = _CACHE[key]
    return one + (depth - 1) * (two - one)


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Exact parameter counts of the model ``cfg`` builds (its teacher as configured, i.e. random-weight shape).

    Args:
        cfg: The model config.

    Returns:
        The counts.

    Examples:
        >>> c = param_counts(model_config("milan_vit_base_patch16"))
        >>> round(c.encoder / 1e6, 2), round(c.decoder / 1e6, 2), round(c.teacher / 1e6, 2)
        (85.65, 25.88, 86.19)
    """
    enc_cfg = cfg.encoder
    grid = (enc_cfg.img_size // enc_cfg.patch_size,) * 2
    teacher_depth = cfg.teacher.depth

    def teacher(depth: int) -> nn.Module | None:
        return build_teacher(dataclasses.replace(cfg.teacher, checkpoint=None, depth=depth), grid)

    t_key = f"teacher {dataclasses.replace(cfg.teacher, checkpoint=None, depth=0)} {grid}"
    teacher_params = 0 if cfg.teacher.kind == "none" else _by_depth(t_key, teacher, teacher_depth, trainable=False)
    pixel_dim = 3 * enc_cfg.patch_size**2
    out_dim = pixel_dim if cfg.teacher.kind == "none" else cfg.teacher.out_dim

    dec_key = dataclasses.replace(cfg.decoder, depth=0)

    def encoder(depth: int) -> nn.Module:
        return build_encoder(dataclasses.replace(enc_cfg, depth=depth))

    def decoder(depth: int) -> nn.Module:
        dec = dataclasses.replace(cfg.decoder, depth=depth)
        return build_decoder(dec, grid, enc_cfg.embed_dim, out_dim, enc_cfg.pos_embed_layout)

    return ParamCounts(
        encoder=_by_depth(f"encoder {dataclasses.replace(enc_cfg, depth=0)}", encoder, enc_cfg.depth),
        decoder=_by_depth(f"decoder {dec_key} {enc_cfg} {out_dim}", decoder, cfg.decoder.depth),
        teacher=teacher_params,
    )


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
        rows.append(
            (
                name,
                student,
                f"{counts.encoder / 1e6:.2f} M",
                f"{counts.decoder / 1e6:.2f} M",
                f"{100 * counts.decoder_share:.0f} %",
                teacher,
            )
        )
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


__all__ = ["ParamCounts", "models_table", "param_counts"]
