"""torch.compile of the student and the teacher, with torch's eager fallback, against the eager path."""

from __future__ import annotations

import warnings

import pytest
import torch

from milan.masking import random_masking
from milan.models import create_model
from milan.models.compile import CompileWarning, compile_method, compile_milan


def _failing_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
    raise RuntimeError("backend unavailable on this machine")


def test_fallback_warns_once_in_one_line_and_matches_eager() -> None:
    model = create_model("milan_test_tiny")
    images = torch.randn(2, 3, 32, 32)
    mask = random_masking(torch.rand(2, 16, generator=torch.Generator().manual_seed(0)), 0.75)
    expected = model.student(images, mask)
    keys = list(model.state_dict())

    compile_method(model.student, backend=_failing_backend)
    with pytest.warns(CompileWarning, match="running it eagerly") as caught:
        got = model.student(images, mask)
    message = str(caught[0].message)
    assert "backend unavailable on this machine" in message and "\n" not in message, message
    assert issubclass(CompileWarning, RuntimeWarning) and CompileWarning.__module__.startswith("milan.")
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
    graphs: list[str] = []

    def counted(backend: str) -> object:
        def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
            graphs.append(backend)
            return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

        return compile_graph

    compile_method(compiled.student, backend=counted("aot_eager"))
    compile_method(compiled.teacher, "_forward", backend=counted("eager"))
    images = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))

    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)  # compilation must not have fallen back to eager
        for model in (eager, compiled):
            out = model(images, noise=noise)
            out.loss.backward()
            losses.append(out.loss.detach())
    assert "aot_eager" in graphs and "eager" in graphs  # both were compiled, not skipped
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    grads = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def test_compile_milan_replaces_the_student_forward_and_the_teacher_pass() -> None:
    model = create_model("milan_test_tiny")
    assert model.teacher is not None
    keys = list(model.state_dict())
    compile_milan(model, backend="eager")
    for module, name in ((model.teacher, "_forward"), (model.student, "forward")):
        assert hasattr(module.__dict__[name], "_torchdynamo_orig_callable"), name
    compile_milan(model, backend="eager", teacher=False)  # compiling again compiles the eager method, not the wrapper
    assert model.student.__dict__["forward"]._torchdynamo_orig_callable.__self__ is model.student
    assert list(model.state_dict()) == keys
