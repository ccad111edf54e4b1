"""Optimizer construction: weight-decay parameter groups and AdamW."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from milan.train.config import ConfigError, OptimConfig

# Parameter-name pieces that are never decayed in the mmpretrain MILAN recipe (``paramwise_cfg.custom_keys``).
TOKEN_NAMES = ("pos_embed", "mask_token", "cls_token")
# A dotted name segment that is a normalisation layer: ``norm``, ``norm1``, ``decoder_norm``, ``fc_norm``, ``ln_post``.
_NORM_SEGMENT = re.compile(r"^(ln(_\w+|\d*)|\w*norm\d*)$")


def no_weight_decay(name: str, param: torch.Tensor, exempt_tokens: bool = True) -> bool:
    """Whether a parameter is exempt from weight decay.

    Exempt: every tensor with ``ndim <= 1`` (biases, LayerNorm/BatchNorm weights), names ending in ``bias``,
    parameters of normalisation layers, and (``exempt_tokens=True``, mmpretrain) names containing ``pos_embed``,
    ``mask_token`` or ``cls_token``. With ``exempt_tokens=False`` the cls and mask tokens are decayed, as in
    the original repository (timm 0.3.2 ``add_weight_decay``).

    Args:
        name: Dotted parameter name.
        param: The parameter.
        exempt_tokens: Exempt the learnable tokens and position embeddings.

    Returns:
        True if the parameter gets no weight decay.
    """
    if param.ndim <= 1 or name.endswith("bias"):
        return True
    if any(_NORM_SEGMENT.match(part) for part in name.split(".")[:-1]):
        return True
    return exempt_tokens and any(token in name for token in TOKEN_NAMES)


def param_groups(model: nn.Module, weight_decay: float, exempt_tokens: bool = True) -> list[dict[str, Any]]:
    """Splits the trainable parameters into a decayed and a non-decayed group.

    Frozen parameters (``requires_grad=False``: fixed position embeddings, a frozen teacher) are left out.

    Args:
        model: The module to optimise (e.g. ``MILAN.student``).
        weight_decay: Decay of the decayed group.
        exempt_tokens: See :func:`no_weight_decay`.

    Returns:
        ``[{"params", "weight_decay", "param_names", "name": "decay"}, {... "name": "no_decay"}]``; a group
        without parameters is dropped.
    """
    decay: list[tuple[str, nn.Parameter]] = []
    skip: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (skip if no_weight_decay(name, p, exempt_tokens) else decay).append((name, p))
    groups = [
        {"name": "decay", "params": [p for _, p in decay], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for _, p in skip], "weight_decay": 0.0},
    ]
    for group, named in zip(groups, (decay, skip), strict=True):
        group["param_names"] = [n for n, _ in named]
    return [g for g in groups if g["params"]]


def fused_adamw_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch has a fused AdamW kernel for all of ``params`` (floating point, on a supported device).

    CUDA has one in every supported torch; CPUs since torch 2.4 (about 5x faster than the for-loop AdamW there).

    Args:
        params: The parameters to optimise.

    Returns:
        True if ``torch.optim.AdamW(..., fused=True)`` accepts them (False for no parameters).
    """
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch without the helper: the kernels every torch >= 2.4 has
        devices = {"cuda", "cpu"}
    tensors = list(params)
    return bool(tensors) and all(p.device.type in devices and torch.is_floating_point(p) for p in tensors)


def build_adamw(groups: list[dict[str, Any]], cfg: OptimConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``groups`` with the config's betas and eps; fused wherever supported unless ``cfg.fused`` is False.

    Fused and for-loop AdamW compute the same update up to float rounding (``tests/speed``), so runs with the same
    setting are reproducible, but the two settings are not bit-identical to each other.

    Args:
        groups: Parameter groups (e.g. from :func:`param_groups`); each may carry its own ``weight_decay`` and
            an ``lr_scale`` honoured by :meth:`milan.train.schedule.CosineSchedule.apply`.
        cfg: Optimizer settings (``fused``: ``None`` = fused when :func:`fused_adamw_supported`).
        lr: Initial (peak) learning rate; the schedule overwrites it every step.
        device: Where the parameters live.

    Returns:
        The optimizer.

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
