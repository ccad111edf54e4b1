"""Recognising a checkpoint's format and reading it into one canonical form, :class:`Checkpoint`.

Formats (``--from`` names of ``milan convert``):

* ``milan``: ours. A :class:`~milan.models.MILAN` state dict (``student.encoder.*``, ``student.decoder.*``,
  ``teacher.model.*``), a student (``encoder.*`` + ``decoder.*``), a classifier (``encoder.*`` + ``head.bn``/``head.fc``
  or ``fc_norm``/``head``), a teacher (``model.*``), bare or wrapped in ``{'model': ..., 'config': ...}``.
* ``mmpretrain``: MMSelfSup / mmpretrain MILAN pretraining (``backbone.*``, ``neck.*``, ``target_generator.*``) and
  ``ImageClassifier`` checkpoints (``backbone.ln1`` + ``neck.bn`` + ``head.layers.head``, or ``backbone.ln2`` +
  ``head.fc``), usually under ``state_dict``.
* ``milan-orig``: the original MILAN / MAE code (``{'model': ...}`` with ``blocks.N.norm1``,
  ``decoder_blocks.N.attn.q``; fine-tuned ``fc_norm``/``head``; linear-probe ``head.0``/``head.1``).
* ``openai-clip``: OpenAI CLIP (``visual.conv1.weight`` ...), a state dict or OpenAI's TorchScript archive.
* ``open-clip``: OpenCLIP (OpenAI key names, or ``visual.trunk.*`` for timm-backed towers), optionally with its
  ``open_clip_config.json``; training checkpoints (``{'epoch', 'name', 'state_dict': {'module.visual...'}}``) too.
* ``hf``: a Hugging Face transformers CLIP folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``,
  sharded or not) or its weights file; also ``ViTModel`` folders such as our own HF exports (an encoder).
* ``timm``: a timm ``VisionTransformer`` state dict (incl. our own timm exports and DINOv2's original layout).

Kinds (what the canonical ``state_dict`` holds, in our key names): ``milan`` (``student.encoder.*``,
``student.decoder.*`` and optionally ``teacher.model.*``), ``encoder`` (our encoder / a plain timm ViT),
``linear_probe`` (:class:`~milan.models.classifier.LinearProbe`), ``finetune``
(:class:`~milan.models.classifier.FinetuneClassifier`),
``teacher`` (:class:`~milan.models.Teacher`: ``model.*`` timm tower keys, with its :class:`~milan.models.TowerSpec`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
import yaml

from milan.checkpoint.io import check_zip, read_safetensors_metadata, safe_load
from milan.checkpoint.keymaps import (
    hf_clip_tower,
    hf_vit_to_encoder,
    milan_orig_to_milan,
    mmpretrain_classifier_to_milan,
    mmpretrain_milan_to_milan,
    open_clip_tower,
    openai_tower,
    timm_tower,
)
from milan.checkpoint.spec import (
    RGB,
    DecoderArch,
    EncoderArch,
    HeadKind,
    HeadSpec,
    ModelSpec,
    Pool,
    Preprocessing,
    Resample,
    SpecKind,
    TeacherSpec,
    infer_decoder,
    infer_encoder,
    infer_tower,
    spec_hints,
    vit_table_heads,
)
from milan.errors import CheckpointError, CheckpointNotFoundError, warn_assumption
from milan.models.tower import Act, StateDict, TowerSpec

FORMATS = ("milan", "mmpretrain", "milan-orig", "openai-clip", "open-clip", "hf", "timm")
_SAME_LAYOUT = ({"openai-clip", "open-clip"}, {"timm", "milan-orig"})  # a file may be read as either
Kind = Literal["milan", "encoder", "linear_probe", "finetune", "teacher"]

# Weights files looked for in a folder, in order (Hugging Face, then OpenCLIP hub layouts).
_FOLDER_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
# The CLIP formats: (the file next to the weights that records the teacher's MLP activation, what a file without it
# is, and why its reader's default activation is assumed then).
_CLIP_FORMATS: dict[str, tuple[str, str, str]] = {
    "openai-clip": (
        "open_clip_config.json",
        "a state dict in OpenAI CLIP key layout",
        "as OpenAI's CLIP weights, the paper's teacher; OpenCLIP models trained with GELU have the same keys",
    ),
    "open-clip": (
        "open_clip_config.json",
        "an OpenCLIP checkpoint without its open_clip_config.json",
        "open_clip's default for the models it trains; OpenAI-pretrained and '-quickgelu' models use QuickGELU",
    ),
    "hf": (
        "config.json",
        "a Hugging Face CLIP weights file without its config.json",
        "transformers' CLIP default, as OpenAI's CLIP weights",
    ),
}
_TOWER_FEATURES = ("norm_pre.weight", "reg_token", "blocks.0.ls1.gamma", "blocks.0.attn.q_norm.weight")


@dataclass
class Checkpoint:
    """A checkpoint read into our key names.

    Attributes:
        source: Where it came from.
        format: Detected (or given) source format, one of :data:`FORMATS`.
        kind: What it holds (see the module docstring).
        state_dict: Canonical state dict for ``kind``.
        tower: The teacher tower's spec (``kind == "teacher"``, or a ``milan`` checkpoint with a teacher).
        hints: Architecture facts that shapes cannot give (heads, pooling, the model config), from the caller
            or from metadata stored in the file.
        dropped: Source keys deliberately not used (e.g. CLIP's text tower).
        source_shapes: Every source key (after unwrapping) with its shape, for reports.
        tower_options: The teacher options given to :func:`read_checkpoint` (``model_name``, ``head``, ``act``,
            ``norm_eps``, ``img_size``): the teacher readers' own, and a plain ViT ``encoder``'s brought as a teacher.
    """

    source: str
    format: str
    kind: Kind
    state_dict: StateDict
    tower: TowerSpec | None = None
    hints: dict[str, Any] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    source_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tower_options: dict[str, Any] = field(default_factory=dict)

    def part(self, prefix: str) -> StateDict:
        """The keys under ``prefix``, with the prefix removed."""
        return {k[len(prefix) :]: v for k, v in self.state_dict.items() if k.startswith(prefix)}

    def encoder_state(self) -> StateDict:
        """The student encoder's weights (our VisionTransformer keys; no ``norm`` for fine-tuned classifiers)."""
        if self.kind == "milan":
            return self.part("student.encoder.")
        if self.kind in ("linear_probe", "finetune"):
            return self.part("encoder.")
        if self.kind == "encoder":
            return {k: v for k, v in self.state_dict.items() if not k.startswith(("head.", "fc_norm."))}
        raise CheckpointError(f"{self.source}: a {self.kind} checkpoint has no student encoder")

    def encoder_arch(self) -> EncoderArch:
        """The encoder's architecture (heads from ``hints``)."""
        return infer_encoder(self.encoder_state(), num_heads=self.hints.get("num_heads"))

    def decoder_arch(self) -> DecoderArch:
        """The decoder's architecture (heads from ``hints``)."""
        if self.kind != "milan" or not _has(self.state_dict, "student.decoder."):
            raise CheckpointError(f"{self.source}: a {self.kind} checkpoint has no decoder")
        return infer_decoder(self.part("student.decoder."), num_heads=self.hints.get("decoder_num_heads"))


def read_checkpoint(
    path: str | os.PathLike[str],
    fmt: str = "auto",
    *,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    teacher_num_heads: int | None = None,
    act: Act | None = None,
    norm_eps: float | None = None,
    img_size: int | None = None,
    model_name: str | None = None,
    head: bool = True,
) -> Checkpoint:
    """Reads any supported checkpoint (file or Hugging Face / OpenCLIP folder) into our key names.

    Args:
        path: File or folder.
        fmt: One of :data:`FORMATS`, or ``"auto"`` to detect it from the keys.
        num_heads: Heads of the checkpoint's main network: the student encoder, or the teacher for teacher formats.
        decoder_num_heads: Heads of the decoder.
        teacher_num_heads: Heads of the teacher inside a MILAN checkpoint.
        act: Teacher MLP activation (``quick_gelu``, ``gelu``, ``gelu_tanh``), overriding the format's default.
        norm_eps: Teacher LayerNorm epsilon, overriding the format's default.
        img_size: Run the teacher at this resolution (its position table is resampled when it is built).
        model_name: timm model name of a timm / OpenCLIP ``visual.trunk`` teacher.
        head: Keep a timm teacher's Linear head as its output projection.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; choose one of auto, {', '.join(FORMATS)}")
    obj, configs, file_meta = _read_raw(Path(path))
    sd, meta = _unwrap(obj, path)
    teacher = meta.pop("teacher", None)  # training checkpoints keep a random teacher next to the student
    if isinstance(teacher, dict) and teacher and all(isinstance(v, torch.Tensor) for v in teacher.values()):
        sd = {(k if k.startswith("student.") else "student." + k): v for k, v in sd.items()}
        sd.update({"teacher." + k: v for k, v in teacher.items()})
    hints = _hints(meta, file_meta)
    heads = {"num_heads": num_heads, "decoder_num_heads": decoder_num_heads, "teacher_num_heads": teacher_num_heads}
    hints.update({k: v for k, v in heads.items() if v})
    detected = _detect(sd, configs, meta)
    if fmt == "auto":
        fmt = detected
    elif fmt != detected and {fmt, detected} not in _SAME_LAYOUT:
        raise CheckpointError(f"{path}: looks like a {detected!r} checkpoint, not {fmt!r} (first keys: {list(sd)[:5]})")
    tower_opts: dict[str, Any] = dict(act=act, norm_eps=norm_eps, img_size=img_size)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    ck = Checkpoint(str(path), fmt, "encoder", {}, hints=hints, source_shapes=shapes)
    given = {"model_name": model_name, "head": head, **tower_opts}
    ck.tower_options = {k: v for k, v in given.items() if v is not None}
    if fmt == "milan":
        _read_milan(ck, sd)
    elif fmt == "mmpretrain":
        _read_mmpretrain(ck, sd, tower_opts)
    elif fmt == "milan-orig":
        ck.kind, ck.state_dict = milan_orig_to_milan(sd)
    elif fmt == "hf" and not _has(sd, "vision_model."):  # a ViTModel (e.g. our export)
        _read_hf_vit(ck, sd, configs.get("config.json") or {})
    elif fmt in _CLIP_FORMATS:
        config_name, what, why = _CLIP_FORMATS[fmt]
        config = configs.get(config_name) if fmt != "openai-clip" else None
        trunk = _has(sd, "visual.trunk.")
        script_act = _torchscript_act(Path(path)) if fmt == "openai-clip" else None  # OpenAI's archive names it
        opts = {**tower_opts, "act": act or script_act, "num_heads": hints.get("num_heads")}
        if fmt == "openai-clip":
            timm_sd, ck.tower, ck.dropped = openai_tower(sd, **opts)
        elif fmt == "open-clip":
            timm_sd, ck.tower, ck.dropped = open_clip_tower(sd, config, model_name=model_name, **opts)
        else:
            timm_sd, ck.tower, ck.dropped = hf_clip_tower(sd, config, **opts)
        if trunk and ck.tower.timm_name is None:
            _check_inferred_timm_tower(ck, timm_sd)
        elif not trunk and opts["act"] is None and config is None:
            _assumed_act(ck.source, what, ck.tower.act, why, f", or put the model's {config_name} next to the file")
        ck.kind, ck.state_dict = "teacher", {"model." + k: v for k, v in timm_sd.items()}
    else:
        _read_timm(ck, sd)
    return ck


# ----------------------------------------------------------------------------------------------------------------
# Raw files


def _read_raw(path: Path) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """(loaded object, json configs found next to the weights, safetensors metadata)."""
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    folder = path if path.is_dir() else path.parent
    configs: dict[str, Any] = {}
    for name in ("config.json", "open_clip_config.json"):
        if (folder / name).is_file():
            try:
                configs[name] = json.loads((folder / name).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(f"cannot parse {folder / name}: {e}") from e
    if not path.is_dir():
        return safe_load(path), configs, read_safetensors_metadata(path) or {}
    weights = next((folder / n for n in _FOLDER_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"no weights in folder {path} (looked for {', '.join(_FOLDER_WEIGHTS)})")
    if weights.name.endswith(".index.json"):
        merged: dict[str, Any] = {}
        for shard in _index_shards(weights):
            part = safe_load(folder / shard)
            if not isinstance(part, dict):
                raise CheckpointError(f"{folder / shard}: expected a dict of tensors, got {type(part).__name__}")
            merged.update({k: v for k, v in part.items() if isinstance(v, torch.Tensor)})
        return merged, configs, {}
    return safe_load(weights), configs, read_safetensors_metadata(weights) or {}


def _torchscript_act(path: Path) -> Act | None:
    """The activation a TorchScript archive's module tree names (its ``QuickGELU`` / ``GELU`` modules), if one."""
    try:
        with zipfile.ZipFile(path) as zf:  # the globals its data.pkl names, read with every name inert
            names = {name for module, name in check_zip(path, zf) or [] if module.startswith("__torch__.")}
    except Exception:  # a folder, another file, a damaged one: the reader reports it
        return None
    acts: dict[str, Act] = {"QuickGELU": "quick_gelu", "GELU": "gelu"}
    found = [act for cls, act in acts.items() if cls in names]
    return found[0] if len(found) == 1 else None


def _index_shards(index_path: Path) -> list[str]:
    """The shard files a sharded-weights index (``model.safetensors.index.json``) names, each inside its folder."""
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot parse the weights index {index_path}: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"weights index {index_path} has no 'weight_map' of tensor names to shard files")
    shards = sorted({str(v) for v in weight_map.values()})
    for shard in shards:
        # Checked by name, not resolved: Hugging Face cache folders hold symlinks into a blob store next to them.
        if not shard or Path(shard).is_absolute() or ".." in Path(shard).parts or "\\" in shard:
            raise CheckpointError(
                f"weights index {index_path} names the shard {shard!r}, which is outside its folder; shards must be "
                "relative paths inside it"
            )
    return shards


def _unwrap(obj: Any, path: str | os.PathLike[str]) -> tuple[StateDict, dict[str, Any]]:
    """Finds the state dict inside common wrappers; returns it and the wrapper's other entries."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    for key in ("state_dict", "model", "module", "model_state_dict"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner:
            tensors = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
            if len(tensors) * 2 >= len(inner):
                return _strip(tensors), {k: v for k, v in obj.items() if k != key}
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no state dict of tensors found (top-level keys: {list(obj)[:10]})")
    return _strip(tensors), {k: v for k, v in obj.items() if not isinstance(v, torch.Tensor)}


def _strip(sd: StateDict) -> StateDict:
    """Removes DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return {k.replace("_orig_mod.", ""): v for k, v in sd.items()}


def _hints(meta: dict[str, Any], file_meta: dict[str, str]) -> dict[str, Any]:
    """Architecture facts stored with the weights: our ``milan`` metadata, or a resolved model config."""
    hints: dict[str, Any] = {}
    cfg = _find_model_config(meta)
    if cfg is not None:
        hints["model_config"] = cfg
        enc, dec, tch = cfg.get("encoder", {}), cfg.get("decoder", {}), cfg.get("teacher", {})
        hints.update(num_heads=enc.get("num_heads"), decoder_num_heads=dec.get("num_heads"))
        if tch.get("kind") == "clip":
            hints["tower"] = {"num_heads": tch.get("num_heads"), "act": "quick_gelu", "norm_eps": 1e-5}
    ours = meta.get("milan")
    if ours is None and "milan" in file_meta:
        ours = json.loads(file_meta["milan"])
    if isinstance(ours, dict):
        hints.update(ours)
    if isinstance(meta.get("teacher_spec"), dict):  # training checkpoints: the teacher's exact architecture
        hints["tower"] = hints["teacher_spec"] = meta["teacher_spec"]
    hints.update(spec_hints(meta.get("spec", hints.get("spec"))))  # our model spec, when stored: it decides
    return {k: v for k, v in hints.items() if v is not None}


def _find_model_config(meta: dict[str, Any], depth: int = 0) -> dict[str, Any] | None:
    """A dict shaped like ``dataclasses.asdict(ModelConfig)`` anywhere in the wrapper (e.g. ``config.model``)."""
    if depth > 3:
        return None
    for value in meta.values():
        if isinstance(value, str) and depth == 0 and "encoder" in value:
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                continue
        if not isinstance(value, dict):
            continue
        if all(isinstance(value.get(k), dict) for k in ("encoder", "decoder", "teacher")):
            return value
        found = _find_model_config(value, depth + 1)
        if found is not None:
            return found
    return None


# ----------------------------------------------------------------------------------------------------------------
# Detection


def _detect(sd: StateDict, configs: dict[str, Any], meta: dict[str, Any]) -> str:
    if _has(sd, "student.", "teacher.model.", "encoder.blocks."):
        return "milan"
    if _has(sd, "model.blocks.") and "model.patch_embed.proj.weight" in sd:
        return "milan"
    if _has(sd, "backbone.", "target_generator."):
        return "mmpretrain"
    if _has(sd, "vision_model.embeddings.", "embeddings.patch_embeddings.", "vit.embeddings."):
        return "hf"
    open_clip_signs = _has(sd, "visual.trunk.") or "open_clip_config.json" in configs or {"epoch", "name"} <= set(meta)
    if open_clip_signs and _has(sd, "visual."):
        return "open-clip"
    if "visual.conv1.weight" in sd:
        return "openai-clip"
    if _has(sd, "blocks.") and "patch_embed.proj.weight" in sd:
        if _has(sd, "decoder_blocks.") or "head.0.running_mean" in sd:
            return "milan-orig"
        return "timm"
    raise CheckpointError(f"unrecognised checkpoint layout (first keys: {list(sd)[:8]}); see milan.checkpoint.formats")


def _has(sd: StateDict, *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in sd)


# ----------------------------------------------------------------------------------------------------------------
# Per-format readers (fill ``ck`` in place)


_ACT_NAMES = {"quick_gelu": "QuickGELU", "gelu": "GELU", "gelu_tanh": "tanh-approximated GELU"}


def _assumed_act(source: str, what: str, chosen: Act, why: str, also: str = "") -> None:
    """Warns (once) that the teacher's activation was assumed: which, why, and how to choose the other."""
    other: Act = "gelu" if chosen == "quick_gelu" else "quick_gelu"
    warn_assumption(
        f"{source}: {what} does not record the teacher's MLP activation; using {_ACT_NAMES[chosen]} ({why}). If it "
        f"was trained with {_ACT_NAMES[other]}, set model.teacher.act={other} (milan inspect/export/convert: --act "
        f"{other}; Python: act={other!r}){also}."
    )


def _check_inferred_timm_tower(ck: Checkpoint, tower_sd: StateDict) -> None:
    """Warns when a CLIP-style timm tower (it has CLIP's ``norm_pre``) was inferred without a timm model name."""
    if ck.tower_options.get("act") is None and "norm_pre.weight" in tower_sd and ck.tower is not None:
        _assumed_act(
            ck.source,
            "a timm-layout CLIP tower without a timm model name",
            ck.tower.act,
            f"as OpenAI's CLIP weights, the paper's teacher; LayerNorm eps {ck.tower.norm_eps:g} as in CLIP",
            "; or give the timm model name, which settles both: model.teacher.model_name=NAME (--model-name; "
            "Python: model_name=), e.g. vit_base_patch16_clip_quickgelu_224.openai or "
            "vit_base_patch16_clip_224.laion2b",
        )


def _tower_from_hints(ck: Checkpoint, tower_sd: StateDict) -> TowerSpec:
    """Spec of a teacher stored in our own layout: stored metadata first, else CLIP conventions if it has ln_pre."""
    stored, tower_opts = ck.hints.get("tower"), ck.tower_options
    clip_like = "norm_pre.weight" in tower_sd
    if stored is None and clip_like and not tower_opts.get("act"):
        _assumed_act(
            ck.source,
            "a teacher in our key layout without its stored spec",
            "quick_gelu",
            "as OpenAI's CLIP weights, the paper's teacher",
        )
    act: Act = tower_opts.get("act") or (stored or {}).get("act") or ("quick_gelu" if clip_like else "gelu")
    eps = tower_opts.get("norm_eps") or (stored or {}).get("norm_eps") or (1e-5 if clip_like else 1e-6)
    heads = ck.hints.get("teacher_num_heads") or (stored or {}).get("num_heads")
    spec = infer_tower(tower_sd, act=act, norm_eps=eps, num_heads=heads, img_size=tower_opts.get("img_size"))
    if stored and stored.get("timm_name"):
        spec.timm_name = stored["timm_name"]
    if stored and stored.get("resize_input") and not tower_opts.get("img_size"):
        spec.resize_input = True
    return spec


def _read_milan(ck: Checkpoint, sd: StateDict) -> None:
    if _has(sd, "student.", "teacher.model."):
        ck.kind, ck.state_dict = "milan", dict(sd)
    elif _has(sd, "encoder.") and _has(sd, "decoder."):
        ck.kind, ck.state_dict = "milan", {"student." + k: v for k, v in sd.items()}
    elif "head.bn.running_mean" in sd:
        ck.kind, ck.state_dict = "linear_probe", dict(sd)
    elif "bn.running_mean" in sd and "fcs.0.weight" in sd:  # a linear-probe training checkpoint: a grid of heads
        ck.kind, ck.state_dict = "linear_probe", _probe_from_grid(ck, sd)
    elif "fc_norm.weight" in sd:
        ck.kind, ck.state_dict = "finetune", dict(sd)
    elif _has(sd, "model."):
        ck.kind, ck.state_dict = "teacher", dict(sd)
    else:
        ck.kind, ck.state_dict = "encoder", {k[len("encoder.") :]: v for k, v in sd.items()}
    prefix = {"milan": "teacher.model.", "teacher": "model."}.get(ck.kind)
    if prefix and _has(ck.state_dict, prefix):
        ck.tower = _tower_from_hints(ck, ck.part(prefix))


def _probe_from_grid(ck: Checkpoint, sd: StateDict) -> StateDict:
    """The head of an lr grid that the stored spec names (the best so far), as a linear-probe state dict."""
    spec = ck.hints.get("spec")
    index = spec.head.grid_index if spec is not None and spec.head is not None else None
    if index is None:
        raise CheckpointError(
            f"{ck.source} is a linear-probe training checkpoint (a grid of heads) that does not record which head "
            "won; use the run's classifier.pt"
        )
    out = {k: v for k, v in sd.items() if k.startswith("encoder.")}
    out.update({"head.bn." + k.removeprefix("bn."): v for k, v in sd.items() if k.startswith("bn.")})
    fc = f"fcs.{index}."
    out.update({"head.fc." + k.removeprefix(fc): v for k, v in sd.items() if k.startswith(fc)})
    return out


def _read_mmpretrain(ck: Checkpoint, sd: StateDict, tower_opts: dict[str, Any]) -> None:
    if _has(sd, "neck.bn.", "head."):
        kind, ck.state_dict, unmapped = mmpretrain_classifier_to_milan(sd)
        ck.kind = kind  # type: ignore[assignment]
    else:
        encoder, decoder, clip, unmapped = mmpretrain_milan_to_milan(sd)
        ck.kind, ck.state_dict = "encoder", encoder
        if decoder:
            ck.kind, ck.state_dict = "milan", {"student.encoder." + k: v for k, v in encoder.items()}
            ck.state_dict.update({"student.decoder." + k: v for k, v in decoder.items()})
        if clip:  # mmpretrain's MILAN teacher is its own CLIP with QuickGELU: openai_tower's default is exact
            heads = ck.hints.get("teacher_num_heads")
            timm_sd, ck.tower, ck.dropped = openai_tower(clip, num_heads=heads, **tower_opts)
            ck.dropped = ["target_generator.tokenizer." + k for k in ck.dropped]
            ck.state_dict.update({"teacher.model." + k: v for k, v in timm_sd.items()})
    if unmapped:
        raise CheckpointError(f"{ck.source}: mmpretrain keys with no counterpart in our models: {unmapped[:10]}")


def _read_timm(ck: Checkpoint, sd: StateDict) -> None:
    model_name = ck.tower_options.get("model_name")
    orig = _has(sd, "decoder_", "head.0.running_mean")  # the original MILAN/MAE's pretraining or linear probe
    tower_like = model_name is not None or "cls_token" not in sd or any(k in sd for k in _TOWER_FEATURES)
    if not orig and ("mask_token" in sd or tower_like or ck.hints.get("kind") == "teacher"):
        heads = ck.hints.get("num_heads")
        timm_sd, ck.tower = timm_tower(sd, num_heads=heads, **ck.tower_options)
        if "tower" in ck.hints and model_name is None:  # our own export: its stored spec is exact
            ck.tower = _tower_from_hints(ck, timm_sd)
        elif model_name is None:
            _check_inferred_timm_tower(ck, timm_sd)
        ck.kind, ck.state_dict = "teacher", {"model." + k: v for k, v in timm_sd.items()}
    else:  # its rules keep a plain encoder's keys and read fc_norm + head as a fine-tuned classifier
        ck.kind, ck.state_dict = milan_orig_to_milan(sd)


def _read_hf_vit(ck: Checkpoint, sd: StateDict, config: dict[str, Any]) -> None:
    ck.kind, (ck.state_dict, ck.dropped) = "encoder", hf_vit_to_encoder(sd)
    if config.get("num_attention_heads"):
        ck.hints.setdefault("num_heads", int(config["num_attention_heads"]))
    eps, act = float(config.get("layer_norm_eps", 1e-12)), config.get("hidden_act", "gelu")
    if eps != 1e-6 or act != "gelu":
        raise CheckpointError(
            f"{ck.source}: this Hugging Face ViT uses LayerNorm eps {eps:g} and {act!r}; our encoder (and timm's ViT) "
            "use eps 1e-6 and exact GELU, so it would not compute the same features"
        )


# ----------------------------------------------------------------------------------------------------------------
# The spec a reader uses: stored, or completed from the weights with stated assumptions


@dataclass
class Resolved:
    """A checkpoint's spec as a reader uses it.

    Attributes:
        spec: Complete: stored values, the caller's overrides, and conventions for what neither gives.
        stored: Whether the file carries a spec.
        assumed: What was assumed (``encoder_heads``, ``decoder_heads``, ``preprocessing``) -> one line naming the
            assumption and the flag that overrides it.
    """

    spec: ModelSpec
    stored: bool
    assumed: dict[str, str] = field(default_factory=dict)

    def adopt(self, ck: Checkpoint) -> None:
        """Records the resolved head counts in ``ck.hints``: once reported, the loaders build them without warning."""
        ck.hints.setdefault("num_heads", self.spec.encoder.num_heads)
        if self.spec.decoder is not None:
            ck.hints.setdefault("decoder_num_heads", self.spec.decoder.num_heads)


def resolve_spec(
    ck: Checkpoint,
    *,
    crop_pct: float | None = None,
    interpolation: Resample | None = None,
    mean: RGB | None = None,
    std: RGB | None = None,
    heads_flag: str = "--num-heads N",
    decoder_heads_flag: str = "--decoder-num-heads N",
) -> Resolved:
    """The spec of a checkpoint holding a student encoder: stored values first, then conventions (with notes).

    Args:
        ck: From :func:`read_checkpoint` (caller flags such as ``num_heads`` already applied).
        crop_pct: Override the evaluation crop fraction.
        interpolation: Override the evaluation resampling.
        mean: Override the normalisation mean.
        std: Override the normalisation std.
        heads_flag: How the caller's users set the encoder's heads (named in the note when they are assumed).
        decoder_heads_flag: The same for the decoder's heads.

    Raises:
        CheckpointError: No student encoder, or a stored spec that contradicts the weights.
    """
    stored = spec if isinstance(spec := ck.hints.get("spec"), ModelSpec) else None
    notes: dict[str, str] = {}
    arch = ck.encoder_arch()
    if stored is not None:
        _check_agrees(ck, stored.encoder, arch)
    elif "num_heads" not in ck.hints:
        table = vit_table_heads(arch.embed_dim, arch.depth) is not None
        why = f"the standard ViT table for width {arch.embed_dim}" if table else f"width {arch.embed_dim} / 64"
        notes["encoder_heads"] = (
            f"encoder heads: {arch.num_heads} assumed ({why}; the file does not record them); pass {heads_flag} if "
            "the model has another count"
        )
    decoder = None
    if ck.kind == "milan" and _has(ck.state_dict, "student.decoder."):
        decoder = ck.decoder_arch()
        if stored is None and "decoder_num_heads" not in ck.hints:
            notes["decoder_heads"] = (
                f"decoder heads: {decoder.num_heads} assumed (width {decoder.embed_dim} / 32, MILAN's and MAE's "
                f"convention; the file does not record them); pass {decoder_heads_flag} if different"
            )
    teacher = stored.teacher if stored is not None else None
    if teacher is None and ck.tower is not None and ck.kind == "milan":
        norm = cast(Any, ck.hints.get("teacher_input_norm", "imagenet"))
        teacher = TeacherSpec(ck.tower, norm, ck.format, None)
    pre = stored.preprocessing if stored is not None else Preprocessing(arch.img_size)
    options: dict[str, Any] = {"crop_pct": crop_pct, "interpolation": interpolation, "mean": mean, "std": std}
    given = {k: v for k, v in options.items() if v is not None}
    if stored is None:
        described = {
            "mean": f"ImageNet mean ({', '.join(f'{v:g}' for v in pre.mean)})",
            "std": f"ImageNet std ({', '.join(f'{v:g}' for v in pre.std)})",
            "interpolation": f"{pre.interpolation} resize",
            "crop_pct": f"crop_pct {pre.crop_pct:g} (resize to {pre.resize}, center crop {pre.img_size})",
        }
        assumed = [text for k, text in described.items() if k not in given]
        if assumed:
            notes["preprocessing"] = (
                f"preprocessing: {', '.join(assumed)} assumed (the references' evaluation view; the file does not "
                "record its preprocessing); pass --mean, --std, --interpolation, --crop-pct to change"
            )
    pre = dataclasses.replace(pre, **given)
    head = stored.head if stored is not None else None
    if head is None and ck.kind in ("linear_probe", "finetune"):
        weight = ck.state_dict["head.fc.weight" if ck.kind == "linear_probe" else "head.weight"]
        pool: Pool = "token" if ck.kind == "linear_probe" else ck.hints.get("global_pool", "avg")
        head = HeadSpec(cast(HeadKind, ck.kind), int(weight.shape[0]), global_pool=pool)
    kind = cast(SpecKind, ck.kind)
    spec = ModelSpec(kind, arch, pre, decoder, teacher, head)
    return Resolved(spec, stored is not None, notes)


def _check_agrees(ck: Checkpoint, spec: EncoderArch, arch: EncoderArch) -> None:
    """Raises when the stored encoder spec and the weights' shapes disagree (a spec copied onto other weights)."""
    names = ("img_size", "patch_size", "embed_dim", "depth", "in_chans")  # heads: a caller's flag may override
    diff = [f"{n} {getattr(spec, n)} vs {getattr(arch, n)}" for n in names if getattr(spec, n) != getattr(arch, n)]
    if diff:
        raise CheckpointError(
            f"{ck.source}: the stored model spec does not describe these weights (spec vs weights: {', '.join(diff)})"
        )
