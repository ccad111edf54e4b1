"""LARS (layer-wise adaptive rate scaling) SGD for the linear probe, in the two variants the references use.

* ``"mocov3"`` (MAE ``util/lars.py`` / MoCo v3, the ORIG linear probe): for a parameter with ``ndim > 1`` the
  update is ``u = g + wd * p`` scaled by the trust ratio ``eta * ||p|| / ||u||`` (1 if either norm is 0);
  parameters with ``ndim <= 1`` (biases, norms) get neither weight decay nor the trust ratio. Then
  ``mu = momentum * mu + u`` and ``p -= lr * mu``.
* ``"mmselfsup"`` (MMSelfSup / mmpretrain ``LARS``): every parameter, bias included, gets the local lr
  ``eta * ||p|| / (||g|| + wd * ||p|| + eps)`` (1 if either norm is 0), and the lr is folded into the momentum
  buffer: ``buf = momentum * buf + lr * local_lr * (g + wd * p)``, ``p -= buf``. With a schedule the two
  differ: here a change of lr only affects new contributions to the buffer.

Both read ``group["lr"]`` afresh at every step, so the usual per-step schedule (and per-group ``lr_scale``) works.
Our own, because timm's ``Lars`` is neither: its trust ratio divides by ``||g|| + wd * ||p||`` for every parameter
(not ``||g + wd * p||`` for weights only) and it keeps the lr out of the momentum buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch

LarsVariant = Literal["mocov3", "mmselfsup"]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios.

    Args:
        params: Parameters or parameter-group dicts.
        lr: Learning rate (overwritten per step by the schedule).
        momentum: Momentum factor (0.9 in both references).
        weight_decay: L2 penalty added to the gradient (0 for the MILAN linear probe).
        trust_coefficient: ``eta`` of the trust ratio (0.001 in both references).
        variant: ``"mocov3"`` (MAE/ORIG) or ``"mmselfsup"``; see the module docstring.
        eps: Added to the denominator of the ``"mmselfsup"`` trust ratio (1e-8 as in MMSelfSup).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        variant: LarsVariant = "mocov3",
        eps: float = 1e-8,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient < 0:
            raise ValueError(
                f"LARS: lr, momentum, weight_decay and trust_coefficient must be >= 0, got {lr}, {momentum}, "
                f"{weight_decay}, {trust_coefficient}"
            )
        if variant not in ("mocov3", "mmselfsup"):
            raise ValueError(f"LARS variant must be 'mocov3' or 'mmselfsup', got {variant!r}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "variant": variant,
            "eps": eps,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimisation step; returns the loss of ``closure`` (which re-evaluates the model), if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["variant"] == "mocov3":
                    self._step_mocov3(p, group)
                else:
                    self._step_mmselfsup(p, group)
        return loss

    def _step_mocov3(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        update = p.grad
        assert update is not None
        if p.ndim > 1:  # weights only: biases and norm parameters skip wd and the trust ratio
            update = update.add(p, alpha=group["weight_decay"])
            p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
            one = torch.ones_like(p_norm)
            trust = torch.where(
                (p_norm > 0) & (u_norm > 0), group["trust_coefficient"] * p_norm / u_norm.clamp_min(1e-30), one
            )
            update = update.mul(trust)
        state = self.state[p]
        if "mu" not in state:
            state["mu"] = torch.zeros_like(p)
        mu: torch.Tensor = state["mu"]
        mu.mul_(group["momentum"]).add_(update)
        p.add_(mu, alpha=-group["lr"])

    def _step_mmselfsup(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = p.grad
        assert grad is not None
        wd = group["weight_decay"]
        p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
        local_lr = torch.where(
            (p_norm > 0) & (g_norm > 0),
            group["trust_coefficient"] * p_norm / (g_norm + wd * p_norm + group["eps"]),
            torch.ones_like(p_norm),
        )
        update = grad.add(p, alpha=wd).mul_(local_lr * group["lr"])
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = update.clone()
        else:
            state["momentum_buffer"].mul_(group["momentum"]).add_(update)
        p.sub_(state["momentum_buffer"])
