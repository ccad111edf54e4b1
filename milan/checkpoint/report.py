"""A human-readable summary of a checkpoint (``milan inspect``)."""

from __future__ import annotations

import math
from pathlib import Path

from milan.checkpoint.arch import DecoderArch, EncoderArch, TowerSpec
from milan.checkpoint.formats import Checkpoint
from milan.checkpoint.spec import Resolved, resolve_spec

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


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f" ({shown}{', ...' if len(names) > limit else ''})" if names else " (class names not stored)"


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


def describe(ck: Checkpoint, max_groups: int = 40, resolved: Resolved | None = None) -> str:
    """The ``milan inspect`` text: format, kind, architecture, view, head, parameter counts, keys, pos-embed layout.

    Args:
        ck: The checkpoint.
        max_groups: Key groups to list.
        resolved: Its resolved spec (default: :func:`~milan.checkpoint.spec.resolve_spec` without overrides); values
            it had to assume are marked.
    """
    lines = [f"file:        {ck.source}"]
    path = Path(ck.source)
    if path.is_file():
        lines[0] += f" ({path.stat().st_size / 2**20:.1f} MiB)"
    lines.append(f"format:      {ck.format}")
    grid = sorted({int(k.split(".")[1]) for k in ck.source_shapes if k.startswith("fcs.")})
    contents = _KINDS.get(ck.kind, ck.kind)
    if ck.kind == "linear_probe" and grid:
        contents = f"linear-probe training checkpoint: an lr grid of {len(grid)} heads (BN + linear on the CLS token)"
    lines.append(f"contents:    {contents}")
    if ck.kind != "teacher" and resolved is None:
        resolved = resolve_spec(ck)
    spec = resolved.spec if resolved is not None else None
    if resolved is not None and spec is not None:
        stored = f"stored (version {spec.version})" if resolved.stored else "not stored: values marked assumed"
        lines.append(f"model spec:  {stored}")
        lines.append(f"encoder:     {_encoder_line(spec.encoder, 'encoder_heads' not in resolved.assumed)}")
        grid_note = "" if ck.kind != "finetune" else " (fine-tuned: learnable, initialised from the stored table)"
        lines.append(f"pos-embed:   {_LAYOUTS[ck.encoder_arch().pos_embed_layout]}{grid_note}")
        assumed = (
            " (assumed; see --crop-pct, --interpolation, --mean, --std)" if "preprocessing" in resolved.assumed else ""
        )
        lines.append(f"eval view:   {spec.preprocessing.describe()}{assumed}")
    if spec is not None and spec.decoder is not None and resolved is not None:
        lines.append(f"decoder:     {_decoder_line(spec.decoder, 'decoder_heads' not in resolved.assumed)}")
    elif ck.kind == "milan":
        lines.append("decoder:     none")
    if spec is not None and spec.head is not None:
        head = spec.head
        pool = {"token": "cls token", "avg": "mean of the patch tokens"}[head.global_pool]
        text = f"{head.kind.replace('_', ' ')}, {head.num_classes} classes{_names(head.class_names)}, pooling: {pool}"
        if head.lr is not None:
            text += f", lr {head.lr:.4g}" + (
                f" (head {head.grid_index} of the grid)" if head.grid_index is not None else ""
            )
        lines.append(f"head:        {text}")
    if ck.tower is not None:
        lines.append(f"teacher:     {_tower_line(ck.tower)}")
    elif spec is not None and spec.teacher is not None:
        lines.append(f"teacher:     {_tower_line(spec.teacher.tower)}")
    elif ck.kind == "milan":
        lines.append("teacher:     not stored (pass one when loading the full model)")
    if spec is not None and spec.teacher is not None:
        t = spec.teacher
        source = f"weights {t.weights} ({t.format})" if t.weights else "weights stored in this file"
        lines.append(f"             input norm {t.input_norm}; {source}")
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
