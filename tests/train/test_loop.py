from __future__ import annotations

import math
import signal
from contextlib import nullcontext
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from milan.data import Batch, SkipReport
from milan.jobs.pretrain import milan_loss
from milan.models import create_model
from milan.train.config import AdamWConfig
from milan.train.loop import NonFiniteLossError, Optimization, StepOutput, TrainState, train_step
from milan.train.optim import build_adamw, param_groups
from milan.train.schedule import CosineSchedule

CPU = torch.device("cpu")


def steps(loss_fn: Any, batches: list[Any], opt: Optimization, *args: Any) -> tuple[TrainState, list[dict[str, float]]]:
    """Optimizer steps over ``batches`` until they run out, as a job's loop does; the metrics of each step."""
    state, records, it = TrainState(), [], iter(batches)
    while state.batch_in_epoch < len(batches):
        metrics = train_step(loss_fn, it, state, opt, *args)
        assert metrics is not None
        records.append({"step": state.step, **metrics})
    return state, records


def milan_batches(n: int, batch: int, seed: int = 0) -> list[tuple[Batch, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.randn(batch, 3, 32, 32, generator=g)
        out.append((Batch(images, torch.full((batch,), -1)), torch.rand(batch, 16, generator=g)))
    return out


def split(batch: tuple[Batch, torch.Tensor], parts: int) -> list[tuple[Batch, torch.Tensor]]:
    data, noise = batch
    chunks = zip(data.images.chunk(parts), data.labels.chunk(parts), noise.chunk(parts), strict=True)
    return [(Batch(i, lab), nz) for i, lab, nz in chunks]


def run(
    model: Any, batches: list[Any], optimizer: torch.optim.Optimizer, accum: int = 1, **kw: Any
) -> tuple[TrainState, list[dict[str, float]]]:
    opt = Optimization(optimizer, CosineSchedule(1e-2, 100, 0), CPU, accum_steps=accum, **kw)
    return steps(milan_loss, batches, opt, model, model.student, SkipReport())


def test_smoke_steps_update_every_trainable_param_and_never_the_teacher() -> None:
    model = create_model("milan_test_tiny")
    assert model.teacher is not None
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    before = {n: p.detach().clone() for n, p in model.student.named_parameters()}
    opt = build_adamw(param_groups(model.student, 0.05), AdamWConfig(), 1e-2, CPU)
    state, records = run(model, milan_batches(3, 4), opt)
    assert state.step == 3 and state.images_seen == 12 and state.batch_in_epoch == 3
    assert len(records) == 3 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert [r["images"] for r in records] == [4, 4, 4]
    for name, p in model.student.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == p.requires_grad, name  # trainable ones move, the frozen position tables do not
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_accumulation_equals_the_full_batch() -> None:
    batches = milan_batches(2, 8)
    results = []
    for accum in (1, 2):
        torch.manual_seed(0)
        model = create_model("milan_test_tiny")
        opt = torch.optim.SGD(model.student.parameters(), lr=0.5)  # plain SGD: parameters move by lr x gradient
        micro = batches if accum == 1 else [m for b in batches for m in split(b, 2)]
        state, records = run(model, micro, opt, accum=accum)
        assert state.step == 2
        results.append((model.student.state_dict(), [r["loss"] for r in records]))
    (full, full_loss), (acc, acc_loss) = results
    assert acc_loss == pytest.approx(full_loss, rel=1e-6)
    for k in full:
        torch.testing.assert_close(acc[k], full[k], rtol=1e-5, atol=1e-6, msg=k)


def test_non_finite_loss_stops_before_the_update() -> None:
    model = nn.Linear(3, 1)
    opt = Optimization(torch.optim.SGD(model.parameters(), lr=0.1), CosineSchedule(0.1, 10), CPU)
    x = torch.randn(4, 3)
    calls = {"n": 0}

    def loss_fn(batch: Any) -> StepOutput:
        calls["n"] += 1
        loss = model(x).pow(2).mean()
        return StepOutput(loss * float("nan") if calls["n"] == 3 else loss, 4)

    state, batches = TrainState(), iter(range(5))
    for _ in range(2):
        train_step(loss_fn, batches, state, opt)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="non-finite loss nan at optimizer step 2") as err:
        train_step(loss_fn, batches, state, opt)
    assert "lower lr" in str(err.value) and "bf16" in str(err.value)
    assert state.step == 2  # two good steps, then the stop
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k])  # the NaN step did not touch the weights
    assert all(p.grad is None for p in model.parameters())


def test_a_stream_that_ends_mid_step_drops_the_partial_accumulation() -> None:
    model = nn.Linear(2, 1)
    opt = Optimization(torch.optim.SGD(model.parameters(), lr=0.1), CosineSchedule(0.1, 10), CPU, accum_steps=2)
    state, before = TrainState(), {k: v.clone() for k, v in model.state_dict().items()}

    def loss_fn(batch: torch.Tensor) -> StepOutput:
        return StepOutput(model(batch).sum(), 1)

    assert train_step(loss_fn, iter([torch.ones(1, 2)]), state, opt) is None  # one of the two micro-batches
    assert state.step == 0 and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_stop_request_is_agreed_at_the_end_of_the_step() -> None:
    """The request travels in the step's all-reduce: the step completes, then the loop knows to stop."""
    model = nn.Linear(2, 1)
    opt = Optimization(torch.optim.SGD(model.parameters(), lr=0.1), CosineSchedule(0.1, 10), CPU)

    def loss_fn(batch: torch.Tensor) -> StepOutput:
        return StepOutput(model(batch).sum(), 1)

    state = TrainState()
    assert train_step(loss_fn, iter([torch.ones(1, 2)]), state, opt) is not None and opt.stop.agreed == 0
    opt.stop.request(signal.SIGINT)
    opt.stop.request(signal.SIGTERM)  # the first request's signal is kept
    assert train_step(loss_fn, iter([torch.ones(1, 2)]), state, opt) is not None
    assert state.step == 2 and opt.stop.agreed == signal.SIGINT


def test_a_classifier_step_trains_through_the_same_loop() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(8, 2)
    optimizer = build_adamw(param_groups(model, 0.0), AdamWConfig(), 0.1, CPU)

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor], net: nn.Module) -> StepOutput:
        xb, yb = batch
        return StepOutput(F.cross_entropy(net(xb), yb), len(yb))

    batches = list(zip(x.split(8), y.split(8), strict=True)) * 4
    _, records = steps(loss_fn, batches, Optimization(optimizer, CosineSchedule(0.1, 16), CPU, accum_steps=2), model)
    assert len(records) == 16
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]


def test_clip_grad_reports_the_norm_and_limits_the_update() -> None:
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    opt = Optimization(torch.optim.SGD(model.parameters(), lr=1.0), CosineSchedule(1.0, 10, 0), CPU, clip_grad=1.0)

    def loss_fn(batch: Any) -> StepOutput:
        return StepOutput((model(torch.tensor([[300.0, 400.0]])) - 0).sum() * 1.0, 1)  # gradient (300, 400): norm 500

    _, records = steps(loss_fn, [0], opt)
    assert records[0]["grad_norm"] == pytest.approx(500.0)
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[-0.6, -0.8]]))


def test_the_fp16_scaler_path_gives_the_same_update() -> None:
    """The loss-scaling path (scale, unscale for clipping, step, update) on CPU: powers of two scale exactly."""
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0)):
        torch.manual_seed(0)
        model = create_model("milan_test_tiny")
        opt = build_adamw(param_groups(model.student, 0.05), AdamWConfig(), 1e-2, CPU)
        run(model, milan_batches(2, 4), opt, scaler=scaler, clip_grad=1.0)
        results.append(model.student.state_dict())
        if scaler is not None:
            assert scaler.get_scale() == 1024.0  # no inf/NaN gradients: the scale stays
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_and_dtype_resolution() -> None:
    from milan.train.loop import autocast_context, grad_scaler, resolve_dtype

    cuda = torch.device("cuda", 0)
    assert resolve_dtype("auto", CPU) == torch.float32 and resolve_dtype("bf16", CPU) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16 and resolve_dtype("fp16", cuda) == torch.float16
    assert resolve_dtype("fp32", cuda) == torch.float32
    assert grad_scaler(CPU, torch.float32) is None and grad_scaler(cuda, torch.bfloat16) is None
    assert isinstance(autocast_context(CPU, torch.float32), type(nullcontext()))
    assert isinstance(autocast_context(cuda, torch.bfloat16), torch.autocast)
