"""MAE-style weight initialisation shared by the encoder and the decoders."""

from __future__ import annotations

import torch.nn as nn


def mae_init_(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear, unit weight and zero bias for every LayerNorm.

    Args:
        module: Initialised in place, recursively.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
