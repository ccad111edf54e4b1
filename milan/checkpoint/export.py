"""Writing checkpoints out (timm models, Hugging Face ``ViTModel`` folders, our own files) and ``milan inspect``.

Every export carries the model spec (:mod:`milan.checkpoint.spec`) of what it holds in its metadata, and the values
it had to assume for a file without one are reported (:attr:`Exported.assumed`). Our encoder's keys already are timm
``VisionTransformer`` keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from milan.checkpoint.formats import Checkpoint, Resolved, read_checkpoint, resolve_spec
from milan.checkpoint.io import atomic_save, save_safetensors
from milan.checkpoint.keymaps import encoder_to_hf_vit
from milan.checkpoint.spec import EncoderArch, ModelSpec, Resample
from milan.errors import CheckpointError
from milan.models.factory import DecoderConfig, ModelConfig, TeacherConfig
from milan.models.tower import StateDict, TowerSpec, ViTShape, vit_kwargs
from milan.models.vit import VIT_ARCHS

_VIT_SIZES = {arch: size for size, arch in VIT_ARCHS.items()}  # (embed_dim, depth, heads) -> timm's size name
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar")


@dataclass
class Exported:
    """What an export wrote and how to load it.

    Attributes:
        path: The weights file.
        kind: ``encoder``, ``finetune``, ``linear_probe`` or ``teacher``.
        timm_model: The timm model name that builds it (``None``: none does).
        model_args: ``timm.create_model`` keyword arguments (sizes, ``num_classes``, ``global_pool``).
        pretrained_cfg: timm ``pretrained_cfg`` fields: the evaluation view (``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``) and the class names (``label_names``), so that
            ``timm.data.resolve_model_data_config(model)`` gives the transform the model was trained for.
        extra_paths: Other files written.
        notes: Facts about the export (e.g. what was left out).
        assumed: Values the source file did not record and the export assumed (each names its flag).
    """

    path: Path
    kind: str
    timm_model: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    extra_paths: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)

    @property
    def cfg_overlay(self) -> dict[str, Any]:
        """Timm ``pretrained_cfg_overlay``: the file, the class count (else timm drops a classifier head), the view."""
        overlay: dict[str, Any] = {"file": str(self.path)}
        if self.model_args.get("num_classes"):
            overlay["num_classes"] = self.model_args["num_classes"]
        overlay.update(self.pretrained_cfg)
        return overlay

    def snippet(self) -> str:
        """Python that loads the export in timm and builds its evaluation transform (empty if no timm model does).

        More than 32 class names are left out of the text (they stay in :attr:`cfg_overlay` and the file's metadata).
        """
        if self.timm_model is None:
            return ""
        overlay = dict(self.cfg_overlay)
        if len(overlay.get("label_names", ())) > 32:
            del overlay["label_names"]
        args = "".join(f", {k}={v!r}" for k, v in self.model_args.items())
        cfg = ", ".join(f"{k}={v!r}" for k, v in overlay.items())
        load = f"model = timm.create_model({self.timm_model!r}, pretrained=True{args}, "
        load += f"pretrained_cfg_overlay=dict({cfg}))"
        if self.kind == "teacher":
            return load
        return f"{load}\ntransform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))"


def timm_encoder_model(arch: EncoderArch, num_classes: int = 0) -> tuple[str, dict[str, Any]]:
    """The timm model name (plus overrides) whose ``VisionTransformer`` has this encoder's shape."""
    import timm

    defaults = {"mlp_ratio": 4.0, "qkv_bias": True, "in_chans": 3}  # timm's: left out of the call
    args = {"num_classes": num_classes, **{k: v for k, v in vit_kwargs(arch).items() if defaults.get(k) != v}}
    size = _VIT_SIZES.get((arch.embed_dim, arch.depth, arch.num_heads))
    name = f"vit_{size}_patch{arch.patch_size}_{arch.img_size}"
    if size is not None and not args.keys() & defaults.keys() and timm.is_model(name):
        return name, {"num_classes": num_classes}
    return "vit_base_patch16_224", args


def timm_tower_model(spec: TowerSpec) -> tuple[str | None, dict[str, Any]]:
    """A timm model name (plus overrides) building this teacher tower exactly, or ``None`` if there is none."""
    if spec.timm_name:
        return spec.timm_name, {"num_classes": spec.out_dim, "img_size": spec.img_size}
    clip_like = spec.pre_norm and spec.norm_eps == 1e-5 and spec.act in ("quick_gelu", "gelu")
    plain = not spec.pre_norm and spec.norm_eps == 1e-6 and spec.act == "gelu"
    if not (clip_like or plain) or not spec.class_token or spec.qk_norm or not spec.qkv_bias:
        return None, {}
    args = {"num_classes": spec.out_dim, **vit_kwargs(spec)}
    args.update({k: v for k, v in {"reg_tokens": spec.reg_tokens, "no_embed_class": spec.no_embed_class}.items() if v})
    if spec.layer_scale:
        args["init_values"] = 1.0
    if clip_like:
        quick = spec.act == "quick_gelu"
        return ("vit_base_patch16_clip_quickgelu_224" if quick else "vit_base_patch16_clip_224"), args
    return "vit_base_patch16_224", args


def fold_batchnorm(
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Linear(BatchNorm(x))`` with an affine-free BatchNorm in eval mode (the probe's: eps 1e-6), as one ``Linear``.

    ``W (x - m) / s + b = (W / s) x + (b - (W / s) m)`` with ``s = sqrt(var + eps)``, computed in float64, for a
    (C, D) weight, (C,) bias and (D,) running statistics; returned in the Linear's dtype.
    """
    scale = (running_var.double() + eps).rsqrt()  # (D,)
    w = weight.double() * scale  # (C, D)
    b = bias.double() - w @ running_mean.double()  # (C,)
    return w.to(weight.dtype), b.to(bias.dtype)


def export_timm(
    src: str | os.PathLike[str] | Checkpoint,
    out: str | os.PathLike[str],
    *,
    pth: bool = False,
    head: bool = True,
    crop_pct: float | None = None,
    interpolation: Resample | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    **read_options: Any,
) -> Exported:
    """Writes a timm-compatible model: an encoder, a classifier with its head, or a teacher tower.

    The file's metadata holds our model spec; :attr:`Exported.cfg_overlay` carries the evaluation view and the
    class names into timm's ``pretrained_cfg``.

    Args:
        src: Any checkpoint :func:`milan.checkpoint.read_checkpoint` understands (or one already read).
        out: Destination; ``.safetensors`` (default for other suffixes too) or ``.pth``/``.pt``/``.bin``. A
            missing folder is created.
        pth: Also write a ``.pth`` next to a ``.safetensors`` output.
        head: Keep a classifier's head: a fine-tuned classifier's ``fc_norm`` + ``head`` (timm
            ``global_pool='avg'``), a linear probe's BatchNorm + Linear folded into one ``head`` (timm
            ``global_pool='token'``). Without it: the pooled features (timm ``num_classes=0``).
        crop_pct: Override the evaluation crop fraction (default: the checkpoint's spec, else 0.875).
        interpolation: Override the evaluation resampling (default: the spec's, else bicubic).
        mean: Override the normalisation mean (default: the spec's, else ImageNet's).
        std: Override the normalisation std (default: the spec's, else ImageNet's).
        **read_options: Passed to :func:`~milan.checkpoint.read_checkpoint` (``num_heads`` ...).
    """
    ck = src if isinstance(src, Checkpoint) else read_checkpoint(src, **read_options)
    out = Path(out)
    meta: dict[str, Any] = {"source_format": ck.format, "kind": ck.kind}
    if ck.kind == "teacher":
        assert ck.tower is not None
        tower_name, tower_args = timm_tower_model(ck.tower)
        meta["tower"] = ck.tower.to_dict()
        result = Exported(out, "teacher", tower_name, tower_args)
        if tower_name is None:
            result.notes.append("no timm model builds this tower exactly; load it with milan.checkpoint.load_teacher")
        _write(ck.part("model."), out, pth, result, meta)
        return result
    resolved = resolve_spec(ck, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
    sd, arch, head_spec = ck.encoder_state(), resolved.spec.encoder, resolved.spec.head
    spec = ModelSpec("encoder", arch, resolved.spec.preprocessing)  # the exported file's
    head = head and ck.kind in ("finetune", "linear_probe")
    name, args = timm_encoder_model(arch, num_classes=head_spec.num_classes if head and head_spec else 0)
    if ck.kind == "finetune":  # blocks + fc_norm (+ head): timm's global_pool='avg' layout (its norm is Identity)
        pool = head_spec.global_pool if head_spec is not None else "avg"
        keep = ("fc_norm.", "head.") if head else ("fc_norm.",)
        sd = {**sd, **{k: v for k, v in ck.state_dict.items() if k.startswith(keep)}}
        args["global_pool"] = pool
        if pool == "token":
            args["fc_norm"] = True
        spec = dataclasses.replace(spec, kind="finetune", head=head_spec if head else None)
    elif ck.kind == "linear_probe" and head:  # the final norm, the CLS token, the BatchNorm folded into the Linear
        assert head_spec is not None  # a linear probe's resolved spec always has its head
        h = ck.part("head.")
        w, b = fold_batchnorm(h["fc.weight"], h["fc.bias"], h["bn.running_mean"], h["bn.running_var"])
        sd = {**sd, "head.weight": w, "head.bias": b}
        args["global_pool"] = "token"
        spec = dataclasses.replace(spec, head=dataclasses.replace(head_spec, kind="linear", grid_index=None))
    kind = "encoder" if spec.kind == "encoder" and spec.head is None else ck.kind
    result = Exported(out, kind, name, args, assumed=list(resolved.assumed.values()))
    result.pretrained_cfg = spec.preprocessing.timm_cfg()
    if spec.head is not None and spec.head.class_names:
        result.pretrained_cfg["label_names"] = list(spec.head.class_names)
    if ck.kind == "linear_probe" and head:
        result.notes.append("the probe's BatchNorm is folded into its Linear head (timm global_pool='token')")
    meta.update(kind=spec.kind, spec=spec.to_dict())  # the spec holds the heads, the pooling, the pos-embed layout
    _write(sd, out, pth, result, meta)
    return result


def _write(sd: StateDict, out: Path, pth: bool, result: Exported, meta: dict[str, Any]) -> None:
    """The weights (float32) as ``.safetensors`` with our metadata and timm's model arguments, or as a torch file."""
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    if out.suffix in _TORCH_SUFFIXES:
        atomic_save(sd, out)
        return
    metadata = {"milan": json.dumps(meta)}
    if result.timm_model:
        metadata.update(timm_model=result.timm_model, timm_model_args=json.dumps(result.model_args))
    save_safetensors(sd, out, metadata)
    if pth:
        result.extra_paths.append(atomic_save(sd, out.with_suffix(".pth")))


def export_hf(
    src: str | os.PathLike[str] | Checkpoint, out_dir: str | os.PathLike[str], **read_options: Any
) -> Exported:
    """Writes a Hugging Face ``ViTModel`` folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``).

    ``src`` holds an encoder with its final norm (pretraining, encoder, linear probe).
    ``ViTModel.from_pretrained(folder, add_pooling_layer=False)`` then gives ``last_hidden_state`` equal to our
    ``forward_features`` (HF's final ``layernorm`` is our ``norm``; GELU, LayerNorm eps 1e-6, qkv bias as ours).
    """
    ck = src if isinstance(src, Checkpoint) else read_checkpoint(src, **read_options)
    if ck.kind not in ("milan", "encoder", "linear_probe"):
        raise CheckpointError(
            f"{ck.source}: Hugging Face ViTModel export needs an encoder with its final norm; a {ck.kind} checkpoint "
            "has none (fine-tuned classifiers pool first: export them to timm instead)"
        )
    resolved = resolve_spec(ck)
    arch, pre = resolved.spec.encoder, resolved.spec.preprocessing
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "hidden_size": arch.embed_dim,
        "num_hidden_layers": arch.depth,
        "num_attention_heads": arch.num_heads,
        "intermediate_size": round(arch.embed_dim * arch.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": arch.img_size,
        "patch_size": arch.patch_size,
        "num_channels": arch.in_chans,
        "qkv_bias": arch.qkv_bias,
        "encoder_stride": arch.patch_size,
        "torch_dtype": "float32",
    }
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": arch.img_size, "width": arch.img_size},
        "resample": 3 if pre.interpolation == "bicubic" else 2,  # PIL codes
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pre.mean),
        "image_std": list(pre.std),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    sd = {k: v.float() for k, v in encoder_to_hf_vit(ck.encoder_state()).items()}
    spec = ModelSpec("encoder", arch, pre)
    weights = save_safetensors(sd, folder / "model.safetensors", {"milan": json.dumps({"spec": spec.to_dict()})})
    extra = [folder / "config.json", folder / "preprocessor_config.json"]
    return Exported(weights, "encoder", extra_paths=extra, assumed=list(resolved.assumed.values()))


def save_canonical(ck: Checkpoint, dst: str | os.PathLike[str]) -> Path:
    """Writes a checkpoint in our layout with its architecture facts (``milan convert --to milan``).

    ``.safetensors`` destinations store the facts as JSON metadata; others are ``torch.save`` files
    ``{'model': state_dict, 'milan': facts, 'model_config': ...}`` readable with ``weights_only=True``.
    """
    meta: dict[str, Any] = {"kind": ck.kind, "source_format": ck.format}
    if ck.kind != "teacher":
        arch = ck.encoder_arch()
        meta.update(num_heads=arch.num_heads, pos_embed_layout=arch.pos_embed_layout)
    if ck.kind == "milan" and any(k.startswith("student.decoder.") for k in ck.state_dict):
        meta["decoder_num_heads"] = ck.decoder_arch().num_heads
    if ck.kind == "finetune":
        meta["global_pool"] = ck.hints.get("global_pool", "avg")
    if ck.tower is not None:
        meta["tower"] = ck.tower.to_dict()
    if ck.kind != "teacher" and isinstance(ck.hints.get("spec"), ModelSpec):  # only a stored spec travels
        meta["spec"] = resolve_spec(ck).spec.to_dict()
    sd = {k: v.float() if v.is_floating_point() else v for k, v in ck.state_dict.items()}
    dst = Path(dst)
    if dst.suffix == ".safetensors":
        return save_safetensors(sd, dst, {"milan": json.dumps(meta)})
    obj: dict[str, Any] = {"model": sd, "milan": meta}
    if ck.kind == "milan" and meta.get("decoder_num_heads"):
        obj["model_config"] = _model_config(ck)
    return atomic_save(obj, dst)


def _model_config(ck: Checkpoint) -> dict[str, Any]:
    """``dataclasses.asdict(ModelConfig)`` describing a MILAN checkpoint (teacher fields from its tower, if any)."""
    dec, t = ck.decoder_arch(), ck.tower
    shared = ("depth", "num_heads", "patch_size", "img_size", "out_dim")  # TowerSpec's names in TeacherConfig
    teacher = TeacherConfig(width=t.embed_dim, **{k: getattr(t, k) for k in shared}) if t else TeacherConfig("none")
    decoder = DecoderConfig(dec.kind, dec.embed_dim, dec.depth, dec.num_heads, dec.mlp_ratio)
    return dataclasses.asdict(ModelConfig(ck.encoder_arch().to_config(), decoder, teacher))


# ----------------------------------------------------------------------------------------------------------------
# milan inspect

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
    groups: dict[tuple[str, bool], tuple[list[int], set[int]]] = {}  # (name, indexed) -> ([tensors, elements], ids)
    for key, shape in shapes.items():
        parts = key.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        name = ".".join(parts[: 2 if idx is None else idx])
        counts, ids = groups.setdefault((name, idx is not None), ([0, 0], set()))
        counts[0] += 1
        counts[1] += math.prod(shape)
        ids.update([int(parts[idx])] if idx is not None else [])
    out = []
    for (name, _), ([count, numel], ids) in groups.items():
        first, last = min(ids, default=0), max(ids, default=0)
        label = name if not ids else f"{name}.{first}" if first == last else f"{name}.{{{first}..{last}}}"
        out.append((label, count, numel))
    return out


def _numel(state_dict: StateDict) -> int:
    return sum(v.numel() for v in state_dict.values() if v.is_floating_point())


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


def _heads(n: int, stored: bool, flag: str) -> str:
    return f"{n}" if stored else f"{n} (assumed; pass {flag} if different)"


def _vit_line(shape: ViTShape, heads: str) -> str:
    return (
        f"width {shape.embed_dim}, depth {shape.depth}, heads {heads}, patch {shape.patch_size}, "
        f"grid {shape.grid}x{shape.grid} ({shape.img_size} px)"
    )


def _tower_line(spec: TowerSpec) -> str:
    flags = {
        "ln_pre": spec.pre_norm,
        f"{spec.reg_tokens} registers": spec.reg_tokens > 0,
        "layer scale": spec.layer_scale,
        "qk-norm": spec.qk_norm,
        "inputs resized": spec.resize_input,
    }
    extras = [name for name, on in flags.items() if on]
    out = f"out {spec.out_dim}" if spec.out_dim else f"no projection (out {spec.embed_dim})"
    text = f"{_vit_line(spec, str(spec.num_heads))}, {out}, act {spec.act}, LN eps {spec.norm_eps:g}"
    if spec.timm_name:
        text += f", timm {spec.timm_name}"
    return text + (f" [{', '.join(extras)}]" if extras else "")


def describe(ck: Checkpoint, max_groups: int, resolved: Resolved | None) -> str:
    """The ``milan inspect`` text: format, kind, architecture, view, head, parameter counts, ``max_groups`` key groups.

    ``resolved`` is ``None`` for a teacher; values it had to assume are marked.
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
    spec: ModelSpec | None = None
    assumed = resolved.assumed if resolved is not None else {}
    if resolved is not None:
        spec = resolved.spec
        stored = f"stored (version {spec.version})" if resolved.stored else "not stored: values marked assumed"
        lines.append(f"model spec:  {stored}")
        heads = _heads(spec.encoder.num_heads, "encoder_heads" not in assumed, "--num-heads")
        lines.append(f"encoder:     {_vit_line(spec.encoder, heads)}, mlp ratio {spec.encoder.mlp_ratio:g}")
        grid_note = "" if ck.kind != "finetune" else " (fine-tuned: learnable, initialised from the stored table)"
        lines.append(f"pos-embed:   {_LAYOUTS[ck.encoder_arch().pos_embed_layout]}{grid_note}")
        view = " (assumed; see --crop-pct, --interpolation, --mean, --std)" if "preprocessing" in assumed else ""
        lines.append(f"eval view:   {spec.preprocessing.describe()}{view}")
    if spec is not None and spec.decoder is not None:
        dec = spec.decoder
        heads = _heads(dec.num_heads, "decoder_heads" not in assumed, "--decoder-num-heads")
        lines.append(
            f"decoder:     {dec.kind}, width {dec.embed_dim}, depth {dec.depth}, heads {heads}, "
            f"in {dec.in_dim} -> out {dec.out_dim}, grid {dec.grid}x{dec.grid}"
        )
    elif ck.kind == "milan":
        lines.append("decoder:     none")
    if spec is not None and spec.head is not None:
        head = spec.head
        pool = {"token": "cls token", "avg": "mean of the patch tokens"}[head.global_pool]
        names = ", ".join(head.class_names[:6]) + (", ..." if len(head.class_names) > 6 else "")
        names = f"({names})" if head.class_names else "(class names not stored)"
        text = f"{head.kind.replace('_', ' ')}, {head.num_classes} classes {names}, pooling: {pool}"
        if head.lr is not None:
            text += f", lr {head.lr:.4g}"
        if head.lr is not None and head.grid_index is not None:
            text += f" (head {head.grid_index} of the grid)"
        lines.append(f"head:        {text}")
    tower = ck.tower or (spec.teacher.tower if spec is not None and spec.teacher is not None else None)
    if tower is not None:
        lines.append(f"teacher:     {_tower_line(tower)}")
    elif ck.kind == "milan":
        lines.append("teacher:     not stored (pass one when loading the full model)")
    if spec is not None and spec.teacher is not None:
        t = spec.teacher
        source = f"weights {t.weights} ({t.format})" if t.weights else "weights stored in this file"
        lines.append(f"             input norm {t.input_norm}; {source}")
    parts = {"encoder": "student.encoder.", "decoder": "student.decoder.", "teacher": "teacher.model."}
    counts = [f"{label} {_millions(n)}" for label, prefix in parts.items() if (n := _numel(ck.part(prefix)))]
    total = _numel(ck.state_dict)
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
