"""torch.compile of the student and the teacher, with the eager fallback, against the eager path."""

from __future__ import annotations

import warnings

import pytest
import torch

from milan.masking import random_masking
from milan.models import create_model
from milan.models.compile import EagerFallback, compile_method, compile_milan, undo_compile


def _failing_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
    raise RuntimeError("backend unavailable on this machine")


def test_fallback_warns_once_and_matches_eager() -> None:
    model = create_model("milan_test_tiny")
    images = torch.randn(2, 3, 32, 32)
    mask = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(0))
    expected = model.student(images, mask)
    keys = list(model.state_dict())

    wrapper = compile_method(model.student, backend=_failing_backend)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        got = model.student(images, mask)
    assert not wrapper.active
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        torch.testing.assert_close(model.student(images, mask), expected, rtol=0, atol=0)
    assert list(model.state_dict()) == keys


def test_compiled_step_matches_eager() -> None:
    """Loss and every gradient of a compiled MILAN step equal the eager ones. The student goes through aot_eager
    (the dynamo + AOT-autograd capture that inductor also uses, without the slow C++ code generation); the
    teacher through dynamo's capture only (the inference path has no autograd part)."""
    torch.manual_seed(0)
    eager = create_model("milan_test_tiny")
    compiled = create_model("milan_test_tiny")
    compiled.load_state_dict(eager.state_dict())
    assert compiled.teacher is not None
    wrappers = [
        compile_method(compiled.student, backend="aot_eager"),
        compile_method(compiled.teacher, "_forward", backend="eager"),
    ]
    images = torch.randn(3, 3, 32, 32)

    losses = []
    for model in (eager, compiled):
        out = model(images, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        losses.append(out.loss.detach())
    assert all(w.active for w in wrappers), "compilation fell back to eager"
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    grads = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def test_compile_milan_and_undo() -> None:
    model = create_model("milan_test_tiny")
    assert model.teacher is not None
    wrappers = compile_milan(model, backend="eager")
    assert len(wrappers) == 2 and all(w.active for w in wrappers)
    assert isinstance(model.teacher.__dict__["_forward"], EagerFallback)
    assert isinstance(model.student.__dict__["forward"], EagerFallback)
    undo_compile(model.teacher, "_forward")
    undo_compile(model.student)
    assert "_forward" not in model.teacher.__dict__ and "forward" not in model.student.__dict__
