"""The model spec (milan.checkpoint.spec): its schema, how readers complete it for foreign files, the probe fold."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from milan.checkpoint import CheckpointError, load_student, read_checkpoint, safe_load
from milan.checkpoint.export import export_timm, fold_batchnorm
from milan.checkpoint.formats import resolve_spec
from milan.checkpoint.spec import DecoderArch, EncoderArch, HeadSpec, ModelSpec, Preprocessing, TeacherSpec, milan_spec
from milan.models import TowerSpec, build_milan, model_config
from milan.models.classifier import LinearProbe
from tests.checkpoint.conftest import randomize_


def _full_spec() -> ModelSpec:
    return ModelSpec(
        kind="milan",
        encoder=EncoderArch(64, 8, 128, 4, num_heads=4, pos_embed_layout="mae"),
        preprocessing=Preprocessing(64, interpolation="bilinear", crop_pct=0.9),
        decoder=DecoderArch("prompting", 8, 128, 64, 64, 2, 4),
        teacher=TeacherSpec(TowerSpec(64, 8, 128, 2, 2, out_dim=64, act="quick_gelu"), "clip", "openai-clip", "t.pt"),
        head=HeadSpec("linear_probe", 3, ["a", "b", "c"], "token", lr=0.5, grid_index=2),
    )


def test_spec_round_trips_through_torch_weights_only_and_json(tmp_path: Path) -> None:
    spec = _full_spec()
    torch.save({"spec": spec.to_dict()}, tmp_path / "s.pt")
    assert ModelSpec.from_dict(safe_load(tmp_path / "s.pt")["spec"]) == spec
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec  # tuples come back as tuples


def test_spec_refuses_newer_and_malformed_records() -> None:
    data = _full_spec().to_dict()
    with pytest.raises(CheckpointError, match="version 2, newer"):
        ModelSpec.from_dict({**data, "version": 2})
    with pytest.raises(CheckpointError, match="malformed"):
        ModelSpec.from_dict({**data, "encoder": {"img_size": 64}})
    with pytest.raises(CheckpointError, match="no valid version"):
        ModelSpec.from_dict({k: v for k, v in data.items() if k != "version"})
    assert ModelSpec.from_dict({**data, "added_later": 1}) == _full_spec()  # unknown fields of a version: ignored


def test_milan_spec_describes_the_built_model() -> None:
    model = build_milan(model_config("milan_test_tiny"))
    spec = milan_spec(model)
    assert (spec.encoder.embed_dim, spec.encoder.num_heads, spec.encoder.img_size) == (64, 4, 32)
    assert spec.decoder is not None and (spec.decoder.num_heads, spec.decoder.out_dim) == (4, 32)
    assert spec.teacher is not None and spec.teacher.format == "random" and spec.teacher.tower.num_heads == 2
    assert spec.encoder.build().state_dict().keys() == model.encoder.state_dict().keys()


def test_resolve_spec_stored_values_win_and_assumptions_are_named(tmp_path: Path) -> None:
    model = randomize_(build_milan(model_config("milan_test_tiny")))
    # a foreign-style file: weights only. Heads (4) are not what the convention gives (64 / 64 = 1).
    torch.save({"model": model.state_dict()}, tmp_path / "bare.pth")
    resolved = resolve_spec(read_checkpoint(tmp_path / "bare.pth"))
    assert not resolved.stored and set(resolved.assumed) == {"encoder_heads", "decoder_heads", "preprocessing"}
    assert resolved.spec.encoder.num_heads == 1 and "--num-heads" in resolved.assumed["encoder_heads"]
    assert "--decoder-num-heads" in resolved.assumed["decoder_heads"]
    # the Python loaders say the same, once per value, naming their argument; given the argument, nothing
    with pytest.warns(UserWarning) as caught:
        load_student(tmp_path / "bare.pth")
    # (the bare file's teacher also gets its own activation warning, from the teacher reader)
    messages = sorted(str(w.message).split(": ", 1)[1] for w in caught if " heads: " in str(w.message))
    assert [m[:22] for m in messages] == ["decoder heads: 1 assum", "encoder heads: 1 assum"]
    assert "pass decoder_num_heads=N" in messages[0] and "pass num_heads=N" in messages[1]
    with warnings.catch_warnings(record=True) as given:
        warnings.simplefilter("always")
        load_student(tmp_path / "bare.pth", num_heads=4, decoder_num_heads=4)
    assert not [w for w in given if " heads: " in str(w.message)]
    # with the spec stored: nothing assumed, the heads are the spec's
    spec = milan_spec(model)
    torch.save({"model": model.state_dict(), "spec": spec.to_dict()}, tmp_path / "ours.pth")
    resolved = resolve_spec(read_checkpoint(tmp_path / "ours.pth"), crop_pct=0.5)
    assert resolved.stored and resolved.assumed == {} and resolved.spec.encoder.num_heads == 4
    assert resolved.spec.preprocessing.crop_pct == 0.5  # an explicit override beats the stored value
    # a spec copied onto other weights is refused, naming the difference
    wrong = dataclasses.replace(spec, encoder=dataclasses.replace(spec.encoder, depth=3))
    torch.save({"model": model.state_dict(), "spec": wrong.to_dict()}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="depth 3 vs 2"):
        resolve_spec(read_checkpoint(tmp_path / "wrong.pth"))


def test_fold_batchnorm_equals_batchnorm_then_linear() -> None:
    torch.manual_seed(0)
    probe = randomize_(LinearProbe(build_milan(model_config("milan_test_tiny")).encoder, 5), std=0.5).eval()
    x = torch.randn(7, 64)
    sd = probe.head.state_dict()
    w, b = fold_batchnorm(sd["fc.weight"], sd["fc.bias"], sd["bn.running_mean"], sd["bn.running_var"])
    with torch.no_grad():
        naive = probe.head.fc((x - sd["bn.running_mean"]) / torch.sqrt(sd["bn.running_var"] + 1e-6))
        torch.testing.assert_close(x @ w.T + b, naive, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x @ w.T + b, probe.head(x), atol=1e-5, rtol=1e-5)


def test_linear_probe_exports_to_timm_with_its_folded_head(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    probe = randomize_(LinearProbe(build_milan(model_config("milan_test_tiny")).encoder, 5), std=0.3).eval()
    torch.save({"model": probe.state_dict(), "milan": {"num_heads": 4}}, tmp_path / "lp.pth")
    result = export_timm(tmp_path / "lp.pth", tmp_path / "lp.safetensors")
    assert result.model_args["global_pool"] == "token" and result.model_args["num_classes"] == 5
    model = timm.create_model(
        result.timm_model, pretrained=True, pretrained_cfg_overlay=result.cfg_overlay, **result.model_args
    ).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), probe(x), atol=1e-5, rtol=1e-5)
    assert result.assumed and "preprocessing" in result.assumed[0]  # this bare file records no view: said so
    assert timm.data.resolve_model_data_config(model)["input_size"] == (3, 32, 32)
