from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from milan.models import create_model
from milan.train.config import AdamWConfig, ConfigError
from milan.train.optim import build_adamw, fused_adamw_supported, no_weight_decay, param_groups
from milan.train.schedule import CosineSchedule

# The decayed parameters of milan_test_tiny's student, written out by hand: every >= 2-D weight of a Linear/conv.
DECAYED_PER_BLOCK = ["attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
DECAYED_PER_DEC_BLOCK = ["attn.q.weight", "attn.kv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
DECAYED = {
    "encoder.patch_embed.proj.weight",
    "decoder.decoder_embed.weight",
    "decoder.decoder_pred.weight",
    *(f"encoder.blocks.{i}.{n}" for i in range(2) for n in DECAYED_PER_BLOCK),
    *(f"decoder.decoder_blocks.{i}.{n}" for i in range(2) for n in DECAYED_PER_DEC_BLOCK),
}


def groups_by_name(groups: list[dict[str, object]]) -> dict[str, set[str]]:
    return {str(g["name"]): set(g["param_names"]) for g in groups}  # type: ignore[call-overload]


def test_mmpretrain_exemptions() -> None:
    student = create_model("milan_test_tiny").student
    groups = groups_by_name(param_groups(student, 0.05))
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert groups["decay"] == DECAYED
    assert groups["no_decay"] == trainable - DECAYED
    assert {"encoder.cls_token", "decoder.mask_token", "encoder.norm.weight", "decoder.decoder_norm.weight"} <= groups[
        "no_decay"
    ]
    # frozen position tables are in neither group
    assert "encoder.pos_embed" not in groups["decay"] | groups["no_decay"]
    assert "decoder.decoder_pos_embed" not in groups["decay"] | groups["no_decay"]


def test_original_repo_decays_cls_and_mask_tokens() -> None:
    student = create_model("milan_test_tiny").student
    groups = groups_by_name(param_groups(student, 0.05, exempt_tokens=False))
    assert groups["decay"] == DECAYED | {"encoder.cls_token", "decoder.mask_token"}
    assert all(not n.endswith("bias") for n in groups["decay"])


def test_norm_names_and_tokens() -> None:
    w2 = torch.zeros(4, 4)
    assert no_weight_decay("blocks.0.norm1.weight", w2)  # a (hypothetical) 2-D weight of a norm layer
    assert no_weight_decay("ln_post.weight", w2)
    assert no_weight_decay("head.fc_norm.weight", w2)
    assert not no_weight_decay("blocks.0.mlp.fc1.weight", w2)
    assert not no_weight_decay("unlnamed.weight", w2)  # 'ln' inside a word is not a norm layer
    assert no_weight_decay("pos_embed", torch.zeros(1, 2, 3))
    assert not no_weight_decay("pos_embed", torch.zeros(1, 2, 3), exempt_tokens=False)


def test_teacher_is_never_optimised() -> None:
    model = create_model("milan_test_tiny")
    assert model.teacher is not None
    names = set().union(*groups_by_name(param_groups(model, 0.05)).values())
    assert not any(n.startswith("teacher.") for n in names)
    opt = build_adamw(param_groups(model.student, 0.05), AdamWConfig(), 1e-3, torch.device("cpu"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in model.teacher.parameters()}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_cosine_schedule_hand_values() -> None:
    s = CosineSchedule(base_lr=2.0, total_steps=12, warmup_steps=4, min_lr=0.5)
    assert [s(i) for i in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    # decay over 8 steps: lr = 0.5 + 1.5 * (1 + cos(pi * k / 8)) / 2
    for k in range(9):
        assert s(4 + k) == pytest.approx(0.5 + 0.75 * (1 + math.cos(math.pi * k / 8)))
    assert s(8) == pytest.approx(1.25)
    assert s(12) == pytest.approx(0.5) and s(100) == pytest.approx(0.5)  # clamped after the end


def test_schedule_matches_mae_fractional_epoch_formula() -> None:
    # MAE/ORIG util/lr_sched.py: epoch = it / iters_per_epoch; warm-up lr * epoch / warmup_epochs, then
    # min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (epoch - warmup) / (epochs - warmup))).
    iters, epochs, warmup, lr = 7, 10, 2, 1e-3
    s = CosineSchedule(lr, iters * epochs, iters * warmup)
    for it in range(iters * epochs):
        e = it / iters
        ref = lr * e / warmup if e < warmup else lr * 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))
        assert s(it) == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_schedule_apply_respects_lr_scale() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], lr=0.0)
    lr = CosineSchedule(1.0, 10, 0).apply(opt, 0)
    assert lr == 1.0
    assert [g["lr"] for g in opt.param_groups] == [1.0, pytest.approx(0.1)]


def test_fused_adamw_by_default_where_torch_has_it() -> None:
    model = create_model("milan_test_tiny")
    cpu = torch.device("cpu")
    assert fused_adamw_supported(model.student.parameters())  # torch >= 2.4: CPUs have the kernel
    for fused, expected in ((None, True), (True, True), (False, False)):
        opt = build_adamw(param_groups(model.student, 0.05), AdamWConfig(fused=fused), 1e-3, cpu)
        assert [g["fused"] for g in opt.param_groups] == [expected, expected]
    assert not fused_adamw_supported([torch.zeros(2, dtype=torch.long)]) and not fused_adamw_supported([])
    meta = [{"params": [nn.Parameter(torch.empty(2, 2, device="meta"))]}]  # no fused kernel for this device
    assert build_adamw(meta, AdamWConfig(), 1e-3, torch.device("meta")).param_groups[0]["fused"] is False
    with pytest.raises(ConfigError, match=r"optim\.fused=true.*no fused AdamW"):
        build_adamw(meta, AdamWConfig(fused=True), 1e-3, torch.device("meta"))
