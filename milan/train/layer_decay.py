"""Layer-wise learning-rate decay (BEiT/MAE scheme) and weight-decay groups for fine-tuning a ViT.

Layer ids, for an encoder with ``depth`` blocks (``num_layers = depth + 1``):

* ``cls_token``, ``pos_embed``, ``patch_embed.*`` -> 0;
* ``blocks.i.*`` -> ``i + 1``;
* everything else (``fc_norm``, ``head``, a final ``norm``) -> ``num_layers``.

A parameter of layer ``i`` trains at ``lr * decay ** (num_layers - i)``: for ViT-B with decay 0.65 that is
0.65^13 for the patch embedding, 0.65^(12 - i) for block ``i`` and 1 for the head (MAE ``util/lr_decay.py``;
MMSelfSup ``num_layers=12+2``, ``0.65 ** (14 - id - 1)``: the same exponents).

Weight decay is off for 1-D parameters (biases, norm weights) and for ``pos_embed`` / ``cls_token`` (the MAE
rule; MMSelfSup's ``.ln``/``.bias``/``.cls_token``/``.pos_embed`` custom keys select the same set for our ViT).
"""

from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

NO_WEIGHT_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "dist_token")

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)(?:cls_token|pos_embed|patch_embed|mask_token|dist_token)(?:$|\.)")


def layer_id(name: str, num_layers: int) -> int:
    """The layer id of a parameter (see the module docstring).

    Args:
        name: Parameter name, with or without a prefix such as ``encoder.``.
        num_layers: ``depth + 1``.

    Returns:
        An int in ``[0, num_layers]``.
    """
    if (m := _BLOCK.search(name)) is not None:
        return int(m.group(1)) + 1
    if _EMBED.search(name) is not None:
        return 0
    return num_layers


def exempt_from_weight_decay(name: str, param: nn.Parameter) -> bool:
    """True for parameters that get no weight decay: 1-D tensors and the token/position embeddings."""
    return param.ndim <= 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY_NAMES


def param_groups_layer_decay(
    model: nn.Module, *, weight_decay: float, layer_decay: float, depth: int | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise lr scales and weight-decay exemptions.

    Frozen parameters (``requires_grad=False``) are left out.

    Args:
        model: The classifier (e.g. :class:`milan.models.classifier.FinetuneClassifier`).
        weight_decay: Weight decay of the decayed groups.
        layer_decay: Per-layer lr multiplier (0.65 for ViT-B, 0.75 for ViT-L); 1.0 disables the decay.
        depth: Number of transformer blocks; by default counted from the ``blocks.N`` parameter names.

    Returns:
        One group per (layer id, decay/no-decay) pair, each with ``params``, ``weight_decay``, ``lr_scale``
        (to multiply the scheduled lr with), ``layer_id`` and ``param_names``.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if depth is None:
        ids = [int(m.group(1)) for n, _ in named if (m := _BLOCK.search(n)) is not None]
        depth = max(ids) + 1 if ids else 0
    num_layers = depth + 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in named:
        lid = layer_id(name, num_layers)
        no_decay = exempt_from_weight_decay(name, param)
        group = groups.setdefault(
            (lid, no_decay),
            {
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers - lid),
                "layer_id": lid,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
