"""A human-readable summary of a checkpoint (``milan inspect``)."""

from __future__ import annotations

import math
from pathlib import Path

from milan.checkpoint.arch import DecoderArch, EncoderArch, TowerSpec
from milan.checkpoint.formats import Checkpoint
from milan.checkpoint.io import CheckpointError

_KINDS = {
    "milan": "MILAN pretraining model",
    "encoder": "ViT encoder",
    "linear_probe": "linear-probe classifier (BN + linear on the CLS token)",
    "finetune": "fine-tuned classifier (pooled tokens + fc_norm + head)",
    "teacher": "teacher tower",
}
_LAYOUTS = {
    "mmpretrain": "fixed 2-D sin-cos, mmpretrain layout [sin/cos(row), sin/cos(col)]",
    "mae": "fixed 2-D sin-cos, MAE layout [sin/cos(col), sin/cos(row)]",
    "learned": "learned (not a sin-cos table)",
}


def group_keys(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, int, int]]:
    """Groups keys by prefix, collapsing block indices: ``[(pattern, tensors, elements)]`` in file order.

    ``backbone.layers.3.attn.qkv.weight`` falls in ``backbone.layers.{0..11}``; keys without an index are grouped
    by their first two name parts.
    """
    groups: dict[str, list[int]] = {}
    indices: dict[str, set[int]] = {}
    for key, shape in shapes.items():
        parts = key.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if idx is not None:
            base = ".".join(parts[:idx])
            indices.setdefault(base, set()).add(int(parts[idx]))
            name = base + ".{N}"
        else:
            name = ".".join(parts[:2]) if len(parts) > 2 else key
        entry = groups.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += math.prod(shape)
    out = []
    for name, (count, numel) in groups.items():
        label = name
        if name.endswith(".{N}"):
            base = name[: -len(".{N}")]
            ids = sorted(indices[base])
            label = f"{base}.{{{ids[0]}..{ids[-1]}}}" if len(ids) > 1 else f"{base}.{ids[0]}"
        out.append((label, count, numel))
    return out


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


def _heads(n: int, stored: bool, flag: str = "--num-heads") -> str:
    return f"{n}" if stored else f"{n} (assumed; pass {flag} if different)"


def _encoder_line(arch: EncoderArch, stored_heads: bool) -> str:
    return (
        f"width {arch.embed_dim}, depth {arch.depth}, heads {_heads(arch.num_heads, stored_heads)}, "
        f"patch {arch.patch_size}, grid {arch.grid}x{arch.grid} ({arch.img_size} px), mlp ratio {arch.mlp_ratio:g}"
    )


def _decoder_line(arch: DecoderArch, stored_heads: bool) -> str:
    return (
        f"{arch.kind}, width {arch.embed_dim}, depth {arch.depth}, "
        f"heads {_heads(arch.num_heads, stored_heads, '--decoder-num-heads')}, "
        f"in {arch.in_dim} -> out {arch.out_dim}, grid {arch.grid}x{arch.grid}"
    )


def _tower_line(spec: TowerSpec) -> str:
    extras = [
        name
        for name, on in (
            ("ln_pre", spec.pre_norm),
            (f"{spec.reg_tokens} registers", spec.reg_tokens > 0),
            ("layer scale", spec.layer_scale),
            ("qk-norm", spec.qk_norm),
            ("inputs resized", spec.resize_input),
        )
        if on
    ]
    out = f"out {spec.out_dim}" if spec.out_dim else f"no projection (out {spec.embed_dim})"
    text = (
        f"width {spec.embed_dim}, depth {spec.depth}, heads {spec.num_heads}, patch {spec.patch_size}, "
        f"grid {spec.grid}x{spec.grid} ({spec.img_size} px), {out}, act {spec.act}, LN eps {spec.norm_eps:g}"
    )
    if spec.timm_name:
        text += f", timm {spec.timm_name}"
    return text + (f" [{', '.join(extras)}]" if extras else "")


def describe(ck: Checkpoint, max_groups: int = 40) -> str:
    """The ``milan inspect`` text: format, kind, architecture, parameter counts, key summary, pos-embed layout."""
    lines = [f"file:        {ck.source}"]
    path = Path(ck.source)
    if path.is_file():
        lines[0] += f" ({path.stat().st_size / 2**20:.1f} MiB)"
    lines.append(f"format:      {ck.format}")
    lines.append(f"contents:    {_KINDS.get(ck.kind, ck.kind)}")
    if ck.kind != "teacher":
        arch = ck.encoder_arch()
        lines.append(f"encoder:     {_encoder_line(arch, 'num_heads' in ck.hints)}")
        grid = "" if ck.kind != "finetune" else " (fine-tuned: learnable, initialised from the stored table)"
        lines.append(f"pos-embed:   {_LAYOUTS[arch.pos_embed_layout]}{grid}")
    if ck.kind == "milan":
        try:
            dec = ck.decoder_arch()
            lines.append(f"decoder:     {_decoder_line(dec, 'decoder_num_heads' in ck.hints)}")
        except CheckpointError:
            lines.append("decoder:     none")
    if ck.kind in ("linear_probe", "finetune"):
        head = ck.state_dict.get("head.fc.weight", ck.state_dict.get("head.weight"))
        if head is not None:
            pool = "cls token" if ck.kind == "linear_probe" else ck.hints.get("global_pool", "avg")
            lines.append(f"head:        {head.shape[0]} classes, pooling: {pool}")
    if ck.tower is not None:
        lines.append(f"teacher:     {_tower_line(ck.tower)}")
    elif ck.kind == "milan":
        lines.append("teacher:     not stored (pass one when loading the full model)")
    counts = []
    for label, prefix in (
        ("encoder", "student.encoder."),
        ("decoder", "student.decoder."),
        ("teacher", "teacher.model."),
    ):
        n = sum(v.numel() for v in ck.part(prefix).values() if v.is_floating_point())
        if n:
            counts.append(f"{label} {_millions(n)}")
    total = ck.num_params()
    lines.append(f"parameters:  {total:,} ({_millions(total)})" + (f": {', '.join(counts)}" if counts else ""))
    if ck.dropped:
        lines.append(f"not used:    {len(ck.dropped)} source keys (e.g. {', '.join(ck.dropped[:3])})")
    groups = group_keys(ck.source_shapes)
    lines.append(f"keys:        {len(ck.source_shapes)} tensors in {len(groups)} groups (source layout)")
    width = min(60, max((len(g[0]) for g in groups), default=0))
    for name, count, numel in groups[:max_groups]:
        lines.append(f"  {name:<{width}}  {count:>5} tensors  {_millions(numel):>9}")
    if len(groups) > max_groups:
        lines.append(f"  ... {len(groups) - max_groups} more groups")
    return "\n".join(lines)
