"""Optimizer construction: the weight-decay rule, parameter groups (plain, or with layer-wise lr decay) and AdamW."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from timm.optim._param_groups import param_groups_layer_decay

from milan.train.config import AdamWConfig, ConfigError

# Parameter-name pieces that are never decayed in the mmpretrain MILAN recipe (``paramwise_cfg.custom_keys``).
TOKEN_NAMES = ("pos_embed", "mask_token", "cls_token")
# A dotted name segment that is a normalisation layer: ``norm``, ``norm1``, ``decoder_norm``, ``fc_norm``, ``ln_post``.
_NORM_SEGMENT = re.compile(r"^(ln(_\w+|\d*)|\w*norm\d*)$")


def no_weight_decay(name: str, param: torch.Tensor, exempt_tokens: bool = True) -> bool:
    """Whether a parameter is exempt from weight decay: the one rule of every job.

    Exempt: every tensor with ``ndim <= 1`` (biases, LayerNorm/BatchNorm weights), names ending in ``bias``,
    parameters of normalisation layers, and (``exempt_tokens=True``: mmpretrain, and both references' fine-tuning)
    names containing ``pos_embed``, ``mask_token`` or ``cls_token``. With ``exempt_tokens=False`` the tokens are
    decayed, as in the original repository's pretraining (timm 0.3.2 ``add_weight_decay``).
    """
    if param.ndim <= 1 or name.endswith("bias"):
        return True
    if any(_NORM_SEGMENT.match(part) for part in name.split(".")[:-1]):
        return True
    return exempt_tokens and any(token in name for token in TOKEN_NAMES)


def param_groups(model: nn.Module, weight_decay: float, exempt_tokens: bool = True) -> list[dict[str, Any]]:
    """The trainable parameters in a decayed and a non-decayed group (:func:`no_weight_decay`).

    Frozen parameters (``requires_grad=False``: fixed position embeddings, a frozen teacher) are left out.

    Returns:
        ``[{"name": "decay", "params", "param_names", "weight_decay"}, {"name": "no_decay", ...}]``; a group
        without parameters is dropped.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for name, exempt in (("decay", False), ("no_decay", True)):
        members = [(n, p) for n, p in named if no_weight_decay(n, p, exempt_tokens) == exempt]
        if members:
            params, names = [p for _, p in members], [n for n, _ in members]
            groups.append(
                {"name": name, "params": params, "param_names": names, "weight_decay": 0.0 if exempt else weight_decay}
            )
    return groups


def layer_decay_groups(
    model: nn.Module, weight_decay: float, layer_decay: float, exempt_tokens: bool = True
) -> list[dict[str, Any]]:
    """Layer-wise lr decay groups (BEiT/MAE; timm's) of a ViT classifier, with :func:`no_weight_decay`'s exemptions.

    Layer ids for ``depth`` blocks: ``cls_token``, ``pos_embed``, ``patch_embed.*`` -> 0; ``blocks.i.*`` -> ``i + 1``;
    everything else (``fc_norm``, ``head``, a final ``norm``) -> ``depth + 1``. A parameter of layer ``i`` trains at
    ``lr * layer_decay ** (depth + 1 - i)`` (each group's ``lr_scale``): MAE ``util/lr_decay.py``; MMSelfSup's
    ``0.65 ** (14 - id - 1)`` for ViT-B, the same exponents. Frozen parameters are left out.
    """
    exempt = [f"m.{n}" for n, p in model.named_parameters() if no_weight_decay(n, p, exempt_tokens)]
    groups: list[dict[str, Any]] = param_groups_layer_decay(
        _ViTLayers(model), weight_decay=weight_decay, no_weight_decay_list=exempt, layer_decay=layer_decay
    )
    return groups


class _ViTLayers(nn.Module):
    """A ViT (or a classifier holding one as ``encoder``) as timm reads a model's layers: from ``group_matcher``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return {
            "stem": r"^m\.(?:encoder\.)?(?:cls_token|pos_embed|patch_embed)",
            "blocks": r"^m\.(?:encoder\.)?blocks\.(\d+)\.",
        }


def fused_adamw_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch has a fused AdamW kernel for all of ``params`` (floating point, on a supported device).

    CUDA has one in every supported torch; CPUs since torch 2.4 (about 5x faster than the for-loop AdamW there).
    False for no parameters.
    """
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch without the helper: the kernels every torch >= 2.4 has
        devices = {"cuda", "cpu"}
    tensors = list(params)
    return bool(tensors) and all(p.device.type in devices and torch.is_floating_point(p) for p in tensors)


def build_adamw(groups: list[dict[str, Any]], cfg: AdamWConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``groups`` with the config's betas and eps; fused wherever supported unless ``cfg.fused`` is False.

    Fused and for-loop AdamW compute the same update up to float rounding, so runs with the same setting are
    reproducible, but the two settings are not bit-identical to each other. Each group may carry its own
    ``weight_decay`` and an ``lr_scale`` (see :meth:`milan.train.schedule.CosineSchedule.apply`); ``lr`` is the
    initial (peak) lr, which the schedule overwrites every step.

    Raises:
        ConfigError: ``cfg.fused`` is True but torch has no fused AdamW for these parameters.
    """
    params = [p for group in groups for p in group["params"]]
    supported = fused_adamw_supported(params)
    if cfg.fused and not supported:
        raise ConfigError(
            f"optim.fused=true, but this torch ({torch.__version__}) has no fused AdamW for parameters on "
            f"{device.type}; set optim.fused=null (fused where supported) or false"
        )
    fused = cfg.fused if cfg.fused is not None else supported
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused)
