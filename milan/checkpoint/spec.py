"""The model spec: what every checkpoint we write says about its model, and what every reader takes from it.

One versioned plain-data record, stored as the ``"spec"`` entry of every checkpoint a job writes (pretraining
``last.pt`` / ``epoch_N.pt``, linear-probe and fine-tuning checkpoints, ``classifier.pt``) and in the metadata of our
exports and conversions. It holds what the weights' shapes cannot say:

* ``encoder``: the student ViT (:class:`~milan.checkpoint.arch.EncoderArch`, heads included);
* ``decoder``: the MILAN decoder (:class:`~milan.checkpoint.arch.DecoderArch`; pretraining checkpoints);
* ``teacher``: the frozen teacher (:class:`TeacherSpec`: the tower with its activation and image size, its input
  normalisation, the weights' format and file);
* ``preprocessing``: the evaluation view the model expects (:class:`Preprocessing`: size, mean, std, resampling,
  crop fraction);
* ``head``: classifiers (:class:`HeadSpec`: kind, pooling, class names in index order, the probe's lr).

Readers (``milan export``, ``inspect``, ``evaluate``, ``visualize`` and the loaders of :mod:`milan.checkpoint`) take
their values from here. Files without a spec (official and foreign checkpoints) go through :func:`resolve_spec`,
which fills each gap with a stated convention and returns one note per assumption naming the flag that overrides it.

Examples:
    >>> spec = ModelSpec("encoder", EncoderArch(64, 8, 128, 4, num_heads=4), Preprocessing(64))
    >>> ModelSpec.from_dict(spec.to_dict()) == spec
    True
    >>> spec.preprocessing.resize  # eval view: Resize(73) + CenterCrop(64)
    73
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from milan.checkpoint.arch import DecoderArch, EncoderArch, TowerSpec, infer_decoder, infer_encoder
from milan.checkpoint.io import CheckpointError
from milan.models.teacher import IMAGENET_MEAN, IMAGENET_STD
from milan.models.vit import VIT_ARCHS

if TYPE_CHECKING:
    from milan.checkpoint.formats import Checkpoint
    from milan.models.decoder import MAEDecoder, PromptingDecoder
    from milan.models.milan import MILAN
    from milan.models.teacher import Teacher
    from milan.models.vit import VisionTransformer

SPEC_VERSION = 1
SpecKind = Literal["milan", "encoder", "linear_probe", "finetune"]
HeadKind = Literal["linear_probe", "finetune", "linear"]  # "linear": a plain Linear (a probe exported with BN folded)
Pool = Literal["token", "avg"]
Resample = Literal["bicubic", "bilinear"]
RGB = tuple[float, float, float]


@dataclass
class Preprocessing:
    """The evaluation view: Resize(shorter side to :attr:`resize`) + CenterCrop(``img_size``) + Normalize."""

    img_size: int
    mean: RGB = IMAGENET_MEAN
    std: RGB = IMAGENET_STD
    interpolation: Resample = "bicubic"
    crop_pct: float = 0.875

    @property
    def resize(self) -> int:
        """The resize target of the shorter side (``int(img_size / crop_pct)``: 224 -> 256)."""
        return int(self.img_size / self.crop_pct)

    def timm_cfg(self) -> dict[str, Any]:
        """The same view as timm ``pretrained_cfg`` fields (what ``timm.data.resolve_model_data_config`` reads)."""
        return {
            "input_size": (3, self.img_size, self.img_size),
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": "center",
        }

    def describe(self) -> str:
        """``"64 px: bicubic resize to 73, center crop (crop_pct 0.875), mean (...), std (...)"``."""
        mean = ", ".join(f"{v:g}" for v in self.mean)
        std = ", ".join(f"{v:g}" for v in self.std)
        return (
            f"{self.img_size} px: {self.interpolation} resize to {self.resize}, center crop (crop_pct "
            f"{self.crop_pct:g}), mean ({mean}), std ({std})"
        )


@dataclass
class TeacherSpec:
    """The frozen teacher a MILAN model was trained with.

    Attributes:
        tower: Its exact architecture (activation, LayerNorm eps, image size, input resize ...).
        input_norm: ``"imagenet"``: fed the student's ImageNet-normalised view; ``"clip"``: re-normalised first.
        format: Format of its weights file (``"random"``: randomly initialised, weights stored with the student).
        weights: The weights file it was read from (``None``: stored in the checkpoint itself).
    """

    tower: TowerSpec
    input_norm: Literal["imagenet", "clip"] = "imagenet"
    format: str = "random"
    weights: str | None = None


@dataclass
class HeadSpec:
    """A classifier's head.

    Attributes:
        kind: ``linear_probe`` (BatchNorm without affine + Linear on the CLS token after the final norm),
            ``finetune`` (pooled tokens + ``fc_norm`` + Linear) or ``linear`` (a Linear on the CLS token after the
            final norm: a probe exported with its BatchNorm folded in).
        num_classes: Output width.
        class_names: Class names in index order (empty when unknown).
        global_pool: ``token`` (CLS) or ``avg`` (mean of the patch tokens).
        lr: Linear probe: the learning rate of this head (the lr grid's winner).
        grid_index: Linear-probe training checkpoints: which head of the lr grid this spec describes.
    """

    kind: HeadKind
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    global_pool: Pool = "token"
    lr: float | None = None
    grid_index: int | None = None


@dataclass
class ModelSpec:
    """Everything a reader needs besides the weights (see the module docstring)."""

    kind: SpecKind
    encoder: EncoderArch
    preprocessing: Preprocessing
    decoder: DecoderArch | None = None
    teacher: TeacherSpec | None = None
    head: HeadSpec | None = None
    version: int = SPEC_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples, lists, dicts, numbers, strings): fits ``torch.save`` with ``weights_only`` and JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """The spec stored by :meth:`to_dict` (unknown fields of the same version are ignored).

        Raises:
            CheckpointError: A newer spec version, or a malformed record.
        """
        version = data.get("version")
        if not isinstance(version, int) or version < 1:
            raise CheckpointError(f"the stored model spec has no valid version (got {version!r})")
        if version > SPEC_VERSION:
            raise CheckpointError(
                f"the stored model spec is version {version}, newer than this milan understands ({SPEC_VERSION}); "
                "upgrade milan-pretrain"
            )
        try:
            pre = _fields(Preprocessing, data["preprocessing"])
            pre.update({k: tuple(float(v) for v in pre[k]) for k in ("mean", "std") if k in pre})
            teacher = data.get("teacher")
            if teacher is not None:
                teacher = {**_fields(TeacherSpec, teacher), "tower": TowerSpec.from_dict(teacher["tower"])}
            return cls(
                kind=data["kind"],
                encoder=EncoderArch(**_fields(EncoderArch, data["encoder"])),
                preprocessing=Preprocessing(**pre),
                decoder=DecoderArch(**_fields(DecoderArch, data["decoder"])) if data.get("decoder") else None,
                teacher=TeacherSpec(**teacher) if teacher is not None else None,
                head=HeadSpec(**_fields(HeadSpec, data["head"])) if data.get("head") else None,
                version=version,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"the stored model spec is malformed ({type(e).__name__}: {e})") from e

    def hints(self) -> dict[str, Any]:
        """The facts :class:`~milan.checkpoint.formats.Checkpoint` readers use (``num_heads``, ``tower`` ...)."""
        out: dict[str, Any] = {"spec": self, "num_heads": self.encoder.num_heads}
        if self.decoder is not None:
            out["decoder_num_heads"] = self.decoder.num_heads
        if self.head is not None:
            out["global_pool"] = self.head.global_pool
        if self.teacher is not None:
            out["tower"] = out["teacher_spec"] = self.teacher.tower.to_dict()
            out["teacher_input_norm"] = self.teacher.input_norm
        return out


def _fields(cls: type[Any], data: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in known}


def spec_hints(data: Any) -> dict[str, Any]:
    """:meth:`ModelSpec.hints` of a stored spec record (``{}`` when there is none)."""
    if data is None:
        return {}
    if isinstance(data, ModelSpec):
        return data.hints()
    if not isinstance(data, dict):
        raise CheckpointError(f"the stored model spec is malformed (a {type(data).__name__}, not a dict)")
    return ModelSpec.from_dict(data).hints()


# ----------------------------------------------------------------------------------------------------------------
# Writers: the spec of live modules


def encoder_arch_of(encoder: VisionTransformer) -> EncoderArch:
    """The architecture of a built encoder (its stored position table decides ``pos_embed_layout``)."""
    sd = {k: v.detach().cpu() if k == "pos_embed" else v.detach() for k, v in encoder.state_dict().items()}
    return infer_encoder(sd, num_heads=encoder.num_heads)  # shapes, and the position table's values


def decoder_arch_of(decoder: PromptingDecoder | MAEDecoder) -> DecoderArch:
    """The architecture of a built decoder."""
    heads = int(cast(Any, decoder.decoder_blocks[0]).attn.num_heads)
    return infer_decoder({k: v.detach() for k, v in decoder.state_dict().items()}, num_heads=heads)


def teacher_spec_of(teacher: Teacher, *, weights: str | None, fmt: str) -> TeacherSpec:
    """The spec of a built teacher (``weights=None`` and ``fmt="random"`` for a randomly initialised one)."""
    from milan.checkpoint.arch import describe_tower

    return TeacherSpec(describe_tower(teacher.model), teacher.input_norm, fmt, weights)


def milan_spec(model: MILAN, *, interpolation: Resample = "bicubic", teacher_weights: str | None = None) -> ModelSpec:
    """The spec of a MILAN model (pretraining checkpoints).

    Args:
        model: The model (student built, teacher loaded).
        interpolation: The resampling of the run's views (evaluation views use it too).
        teacher_weights: The teacher's weights file (``None``: a random teacher, stored with the student).
    """
    teacher = None
    if model.teacher is not None:
        fmt = str(getattr(model.teacher, "source_format", "random")) if teacher_weights else "random"
        teacher = teacher_spec_of(model.teacher, weights=teacher_weights, fmt=fmt)
    encoder = encoder_arch_of(model.encoder)
    pre = Preprocessing(encoder.img_size, interpolation=interpolation)
    return ModelSpec("milan", encoder, pre, decoder_arch_of(model.decoder), teacher)


# ----------------------------------------------------------------------------------------------------------------
# Readers: the stored spec, or one completed from the weights with stated assumptions


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

    @property
    def notes(self) -> list[str]:
        """The lines of :attr:`assumed`."""
        return list(self.assumed.values())

    def adopt(self, ck: Checkpoint) -> None:
        """Records the resolved head counts in ``ck.hints``: once reported, the loaders build them without warning."""
        ck.hints.setdefault("num_heads", self.spec.encoder.num_heads)
        if self.spec.decoder is not None:
            ck.hints.setdefault("decoder_num_heads", self.spec.decoder.num_heads)


def stored_spec(ck: Checkpoint) -> ModelSpec | None:
    """The spec stored in a checkpoint read by :func:`~milan.checkpoint.formats.read_checkpoint`, if any."""
    spec = ck.hints.get("spec")
    return spec if isinstance(spec, ModelSpec) else None


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
        ck: From :func:`~milan.checkpoint.formats.read_checkpoint` (caller flags such as ``num_heads`` already
            applied).
        crop_pct: Override the evaluation crop fraction.
        interpolation: Override the evaluation resampling.
        mean: Override the normalisation mean.
        std: Override the normalisation std.
        heads_flag: How the caller's users set the encoder's heads (named in the note when they are assumed).
        decoder_heads_flag: The same for the decoder's heads.

    Returns:
        The resolved spec.

    Raises:
        CheckpointError: No student encoder, or a stored spec that contradicts the weights.
    """
    stored = stored_spec(ck)
    notes: dict[str, str] = {}
    arch = ck.encoder_arch()
    if stored is not None:
        _check_agrees(ck, stored.encoder, arch)
    elif "num_heads" not in ck.hints:
        table = any((dim, depth) == (arch.embed_dim, arch.depth) for dim, depth, _ in VIT_ARCHS.values())
        why = f"the standard ViT table for width {arch.embed_dim}" if table else f"width {arch.embed_dim} / 64"
        notes["encoder_heads"] = (
            f"encoder heads: {arch.num_heads} assumed ({why}; the file does not record them); pass {heads_flag} if "
            "the model has another count"
        )
    decoder = None
    if ck.kind == "milan" and any(k.startswith("student.decoder.") for k in ck.state_dict):
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
    pre = stored.preprocessing if stored is not None else None
    options: dict[str, Any] = {"crop_pct": crop_pct, "interpolation": interpolation, "mean": mean, "std": std}
    given = {k: v for k, v in options.items() if v is not None}
    if pre is None:
        pre = Preprocessing(arch.img_size)
        assumed = [_describe_field(pre, k) for k in ("mean", "std", "interpolation", "crop_pct") if k not in given]
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


def _describe_field(pre: Preprocessing, name: str) -> str:
    if name in ("mean", "std"):
        values = ", ".join(f"{v:g}" for v in getattr(pre, name))
        return f"ImageNet {name} ({values})"
    if name == "crop_pct":
        return f"crop_pct {pre.crop_pct:g} (resize to {pre.resize}, center crop {pre.img_size})"
    return f"{pre.interpolation} resize"


def _check_agrees(ck: Checkpoint, spec: EncoderArch, arch: EncoderArch) -> None:
    """Raises when the stored encoder spec and the weights' shapes disagree (a spec copied onto other weights)."""
    names = ("img_size", "patch_size", "embed_dim", "depth", "in_chans")  # heads: a caller's flag may override
    diff = [f"{n} {getattr(spec, n)} vs {getattr(arch, n)}" for n in names if getattr(spec, n) != getattr(arch, n)]
    if diff:
        raise CheckpointError(
            f"{ck.source}: the stored model spec does not describe these weights (spec vs weights: {', '.join(diff)})"
        )
