"""Writing checkpoints out: timm backbones, Hugging Face ``ViTModel`` folders, and our own canonical files.

* :func:`export_timm`: the encoder in timm ``VisionTransformer`` keys (our encoder's keys already are), as
  ``.safetensors`` (and/or ``.pth``). For ViT-B/16 at 224 px it loads with
  ``timm.create_model('vit_base_patch16_224', pretrained=True, num_classes=0,
  pretrained_cfg_overlay=dict(file=FILE))``; other sizes name their timm model (or ``vit_base_patch16_224`` plus
  size overrides) in the file's metadata and in :attr:`Exported.snippet`. A fine-tuned classifier exports with its
  ``fc_norm`` and ``head`` (timm ``global_pool='avg'``); a linear probe exports its encoder only (timm has no BN head).
  A teacher exports as a timm tower (e.g. ``vit_base_patch16_clip_quickgelu_224`` layout).
* :func:`export_hf`: a folder with ``config.json`` (``ViTConfig``: GELU, LayerNorm eps 1e-6, qkv bias),
  ``model.safetensors`` and ``preprocessor_config.json``; ``ViTModel.from_pretrained(folder,
  add_pooling_layer=False)`` gives ``last_hidden_state`` equal to our ``forward_features`` (HF's final
  ``layernorm`` is our ``norm``).
* :func:`save_canonical`: our layout (``milan convert --to milan``) with the architecture facts stored alongside.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milan.checkpoint.arch import EncoderArch, StateDict, TowerSpec
from milan.checkpoint.formats import Checkpoint, read_checkpoint
from milan.checkpoint.io import CheckpointError, atomic_save, save_safetensors
from milan.checkpoint.keymaps import encoder_to_hf_vit
from milan.models.teacher import IMAGENET_MEAN, IMAGENET_STD

_VIT_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large"}
_VIT_SIZES[(1280, 32, 16)] = "huge"
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar")


@dataclass
class Exported:
    """What an export wrote and how to load it."""

    path: Path
    kind: str
    timm_model: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    extra_paths: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def cfg_overlay(self) -> dict[str, Any]:
        """Timm ``pretrained_cfg_overlay``: the file, and the class count (else timm drops a classifier head)."""
        overlay: dict[str, Any] = {"file": str(self.path)}
        if self.model_args.get("num_classes"):
            overlay["num_classes"] = self.model_args["num_classes"]
        return overlay

    @property
    def snippet(self) -> str:
        """Python that loads the export in timm (empty if no timm model describes it)."""
        if self.timm_model is None:
            return ""
        args = "".join(f", {k}={v!r}" for k, v in self.model_args.items())
        overlay = ", ".join(f"{k}={v!r}" for k, v in self.cfg_overlay.items())
        return f"timm.create_model({self.timm_model!r}, pretrained=True{args}, pretrained_cfg_overlay=dict({overlay}))"


def timm_encoder_model(arch: EncoderArch, num_classes: int = 0) -> tuple[str, dict[str, Any]]:
    """The timm model name (plus overrides) whose ``VisionTransformer`` has this encoder's shape."""
    import timm

    size = _VIT_SIZES.get((arch.embed_dim, arch.depth, arch.num_heads))
    name = f"vit_{size}_patch{arch.patch_size}_{arch.img_size}"
    standard = size is not None and arch.mlp_ratio == 4.0 and arch.qkv_bias and arch.in_chans == 3
    if standard and timm.is_model(name):
        return name, {"num_classes": num_classes}
    args: dict[str, Any] = {
        "num_classes": num_classes,
        "img_size": arch.img_size,
        "patch_size": arch.patch_size,
        "embed_dim": arch.embed_dim,
        "depth": arch.depth,
        "num_heads": arch.num_heads,
    }
    if arch.mlp_ratio != 4.0:
        args["mlp_ratio"] = arch.mlp_ratio
    if not arch.qkv_bias:
        args["qkv_bias"] = False
    if arch.in_chans != 3:
        args["in_chans"] = arch.in_chans
    return "vit_base_patch16_224", args


def timm_tower_model(spec: TowerSpec) -> tuple[str | None, dict[str, Any]]:
    """A timm model name (plus overrides) building this teacher tower exactly, or ``None`` if there is none."""
    if spec.timm_name:
        return spec.timm_name, {"num_classes": spec.out_dim, "img_size": spec.img_size}
    args: dict[str, Any] = {
        "num_classes": spec.out_dim,
        "img_size": spec.img_size,
        "patch_size": spec.patch_size,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "mlp_ratio": spec.mlp_ratio,
    }
    clip_like = spec.pre_norm and spec.norm_eps == 1e-5 and spec.act in ("quick_gelu", "gelu")
    plain = not spec.pre_norm and spec.norm_eps == 1e-6 and spec.act == "gelu"
    if not (clip_like or plain) or not spec.class_token or spec.qk_norm or not spec.qkv_bias:
        return None, {}
    if spec.reg_tokens:
        args["reg_tokens"] = spec.reg_tokens
    if spec.no_embed_class:
        args["no_embed_class"] = True
    if spec.layer_scale:
        args["init_values"] = 1.0
    if clip_like:
        quick = spec.act == "quick_gelu"
        return ("vit_base_patch16_clip_quickgelu_224" if quick else "vit_base_patch16_clip_224"), args
    return "vit_base_patch16_224", args


def timm_state_dict(ck: Checkpoint, head: bool = True) -> tuple[StateDict, str | None, dict[str, Any], dict[str, Any]]:
    """(state_dict in timm keys, timm model, its overrides, our metadata) for any checkpoint kind."""
    meta: dict[str, Any] = {"source_format": ck.format}
    if ck.kind == "teacher":
        assert ck.tower is not None
        sd = ck.part("model.")
        name, args = timm_tower_model(ck.tower)
        meta.update(kind="teacher", tower=ck.tower.to_dict())
        return sd, name, args, meta
    arch = ck.encoder_arch()
    meta.update(kind="encoder", num_heads=arch.num_heads, pos_embed_layout=arch.pos_embed_layout)
    sd = ck.encoder_state()
    if ck.kind == "finetune":  # blocks + fc_norm (+ head): timm's global_pool='avg' layout (its norm is Identity)
        pool = ck.hints.get("global_pool", "avg")
        keep = ("fc_norm.", "head.") if head else ("fc_norm.",)
        sd = {**sd, **{k: v for k, v in ck.state_dict.items() if k.startswith(keep)}}
        classes = int(ck.state_dict["head.weight"].shape[0]) if head else 0
        name, args = timm_encoder_model(arch, num_classes=classes)
        args["global_pool"] = pool
        if pool == "token":
            args["fc_norm"] = True
        meta.update(kind="finetune", global_pool=pool)
        return sd, name, args, meta
    name, args = timm_encoder_model(arch)
    return sd, name, args, meta


def export_timm(
    src: str | os.PathLike[str] | Checkpoint,
    out: str | os.PathLike[str],
    *,
    pth: bool = False,
    head: bool = True,
    **read_options: Any,
) -> Exported:
    """Writes a timm-compatible backbone.

    Args:
        src: Any checkpoint :func:`milan.checkpoint.read_checkpoint` understands (or one already read).
        out: Destination; ``.safetensors`` (default for other suffixes too) or ``.pth``/``.pt``/``.bin``.
        pth: Also write a ``.pth`` next to a ``.safetensors`` output.
        head: Keep a fine-tuned classifier's ``head`` (without it the export gives its pooled, ``fc_norm``-ed
            features: timm ``num_classes=0``).
        **read_options: Passed to :func:`~milan.checkpoint.read_checkpoint` (``num_heads`` ...).

    Returns:
        What was written and the timm call that loads it.
    """
    ck = src if isinstance(src, Checkpoint) else read_checkpoint(src, **read_options)
    sd, name, args, meta = timm_state_dict(ck, head=head)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    out = Path(out)
    result = Exported(out, str(meta["kind"]), name, args)
    if ck.kind == "linear_probe":
        result.notes.append("the linear probe's BatchNorm + linear head has no timm equivalent: encoder only")
    if name is None:
        result.notes.append("no timm model builds this tower exactly; load it with milan.checkpoint.load_teacher")
    if out.suffix in _TORCH_SUFFIXES:
        atomic_save(sd, out)
        return result
    metadata = {"milan": json.dumps(meta)}
    if name:
        metadata.update(timm_model=name, timm_model_args=json.dumps(args))
    save_safetensors(sd, out, metadata)
    if pth:
        result.extra_paths.append(atomic_save(sd, out.with_suffix(".pth")))
    return result


def export_hf(
    src: str | os.PathLike[str] | Checkpoint, out_dir: str | os.PathLike[str], **read_options: Any
) -> Exported:
    """Writes a Hugging Face ``ViTModel`` folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``).

    Args:
        src: A checkpoint holding an encoder with its final norm (pretraining, encoder, linear probe).
        out_dir: Destination folder (created).
        **read_options: Passed to :func:`~milan.checkpoint.read_checkpoint`.

    Returns:
        What was written.
    """
    ck = src if isinstance(src, Checkpoint) else read_checkpoint(src, **read_options)
    if ck.kind not in ("milan", "encoder", "linear_probe"):
        raise CheckpointError(
            f"{ck.source}: Hugging Face ViTModel export needs an encoder with its final norm; a {ck.kind} checkpoint "
            "has none (fine-tuned classifiers pool first: export them to timm instead)"
        )
    arch = ck.encoder_arch()
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
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    sd = {k: v.float() for k, v in encoder_to_hf_vit(ck.encoder_state()).items()}
    weights = save_safetensors(sd, folder / "model.safetensors")
    return Exported(weights, "encoder", extra_paths=[folder / "config.json", folder / "preprocessor_config.json"])


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
    from milan.models.factory import DecoderConfig, ModelConfig, TeacherConfig

    dec = ck.decoder_arch()
    cfg = ModelConfig(
        encoder=ck.encoder_arch().to_config(),
        decoder=DecoderConfig(
            kind=dec.kind, embed_dim=dec.embed_dim, depth=dec.depth, num_heads=dec.num_heads, mlp_ratio=dec.mlp_ratio
        ),
        teacher=TeacherConfig(kind="none"),
    )
    if ck.tower is not None:
        t = ck.tower
        cfg.teacher = TeacherConfig(
            width=t.embed_dim,
            depth=t.depth,
            num_heads=t.num_heads,
            patch_size=t.patch_size,
            img_size=t.img_size,
            out_dim=t.out_dim,
        )
    return dataclasses.asdict(cfg)
