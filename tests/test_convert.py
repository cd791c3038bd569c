"""Checkpoint import: key/shape errors, head skipping, .pth/.safetensors/timm:/orbax loading."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from flax import nnx
from safetensors.torch import save_file

from annotate.convert import (PretrainedError, check_pretrained, load_pretrained, load_timm_weights,
                              save_weights)
from annotate.models import MODEL_NAMES, create_model
from parity import randomize_torch_model_
from modules import load_module

NUM_CLASSES = 10
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def timm_state() -> dict[str, torch.Tensor]:
    """A randomised timm resnet18 state_dict (10 classes) as torch tensors."""
    model = timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES)
    return {k: v.clone() for k, v in randomize_torch_model_(model, seed=3).state_dict().items()}


def variables(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every Param and BatchStat of `model` by dotted path, as numpy."""
    return {".".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.iter_graph(model)
            if isinstance(v, (nnx.Param, nnx.BatchStat))}


def assert_same_variables(model: nnx.Module, other: nnx.Module) -> None:
    """Both models hold the same variable names with bit-identical values."""
    ours, theirs = variables(model), variables(other)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


@pytest.fixture(scope="module")
def reference_model(timm_state) -> nnx.Module:
    """resnet18 holding `timm_state`, loaded straight from the in-memory state_dict."""
    return load_timm_weights(create_model("resnet18", NUM_CLASSES), timm_state)


def test_every_tensor_lands_in_its_variable(reference_model, timm_state):
    loaded = variables(reference_model)
    np.testing.assert_array_equal(loaded["head.fc.kernel"], timm_state["fc.weight"].numpy().T)
    downsample = timm_state["layer2.0.downsample.0.weight"].numpy()
    np.testing.assert_array_equal(loaded["backbone.layer2.0.downsample.0.kernel"],
                                  downsample.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loaded["backbone.layer4.1.bn2.scale"],
                                  timm_state["layer4.1.bn2.weight"].numpy())
    np.testing.assert_array_equal(loaded["backbone.bn1.var"], timm_state["bn1.running_var"].numpy())
    used = {k for k in timm_state if not k.endswith("num_batches_tracked")}
    assert len(used) == len(loaded)


def test_missing_key_is_named(timm_state):
    state = dict(timm_state)
    del state["layer2.0.bn1.running_var"]
    with pytest.raises(KeyError, match=r"layer2\.0\.bn1\.var"):
        load_timm_weights(create_model("resnet18", NUM_CLASSES), state)


def test_extra_key_is_named(timm_state):
    state = dict(timm_state, **{"layer1.0.se.fc.weight": torch.zeros(4, 4)})
    with pytest.raises(KeyError, match=r"layer1\.0\.se\.fc\.weight"):
        load_timm_weights(create_model("resnet18", NUM_CLASSES), state)


def test_shape_mismatch_is_named(timm_state):
    state = dict(timm_state, **{"layer3.1.conv2.weight": torch.zeros(256, 256, 1, 1)})
    with pytest.raises(ValueError, match=r"layer3\.1\.conv2\.weight"):
        load_timm_weights(create_model("resnet18", NUM_CLASSES), state)


def test_imagenet_head_is_skipped_with_a_log_message(timm_state, caplog):
    state = dict(timm_state, **{"fc.weight": torch.ones(1000, 512), "fc.bias": torch.ones(1000)})
    model = create_model("resnet18", NUM_CLASSES)
    head_before = np.asarray(model.head.fc.kernel[...])
    with caplog.at_level(logging.WARNING, logger="annotate.convert"):
        load_timm_weights(model, state)
    assert ("checkpoint classifier skipped (its shapes differ: head.fc.kernel is (512, 1000) in "
            "the checkpoint, (512, 10) in the model): fc.weight, fc.bias; the head keeps its "
            "initialisation") in caplog.text
    np.testing.assert_array_equal(np.asarray(model.head.fc.kernel[...]), head_before)
    np.testing.assert_array_equal(np.asarray(model.backbone.layer1[0].conv1.kernel[...]),
                                  timm_state["layer1.0.conv1.weight"].numpy().transpose(2, 3, 1, 0))


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match="resnet1010") as error:
        create_model("resnet1010", NUM_CLASSES)
    assert all(name in str(error.value) for name in MODEL_NAMES)


def test_pretrained_from_pth_and_safetensors(tmp_path, timm_state, reference_model):
    wrapped = tmp_path / "wrapped.pth"  # DataParallel-style keys inside {"state_dict": ...}
    torch.save({"state_dict": {f"module.{k}": v for k, v in timm_state.items()}}, wrapped)
    plain = tmp_path / "plain.safetensors"
    save_file(timm_state, plain)
    for path in (wrapped, plain):
        assert_same_variables(load_pretrained(create_model("resnet18", NUM_CLASSES), str(path)),
                              reference_model)


def test_pretrained_missing_file_or_format_is_an_error(tmp_path):
    model = create_model("resnet18", NUM_CLASSES)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_pretrained(model, str(tmp_path / "nowhere.pth"))
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(PretrainedError, match=r"^pretrained checkpoint \S*weights.npz: unknown "
                                              r"format '.npz'; use .pth/.pt/.bin/.safetensors"):
        load_pretrained(model, str(tmp_path / "weights.npz"))


def test_a_damaged_or_foreign_checkpoint_is_named(tmp_path, timm_state):
    model = create_model("resnet18", NUM_CLASSES)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(PretrainedError, match=f"{damaged} is not a readable PyTorch checkpoint "
                                              r"\(UnpicklingError: weights-only unpickling: Unsupported operand"):
        load_pretrained(model, str(damaged))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\xff" * 200)
    with pytest.raises(PretrainedError, match=f"{damaged} is not a readable safetensors file "
                                              r"\(SafetensorError: "):
        load_pretrained(model, str(damaged))
    foreign = tmp_path / "resnet34.pth"  # another architecture's weights: ResNet-34's 3 blocks
    torch.save(timm.create_model("resnet34", num_classes=NUM_CLASSES).state_dict(), foreign)
    with pytest.raises(PretrainedError, match=f"{foreign} does not fit timm's resnet18: "
                                              "checkpoint key 'layer1.2.conv1.weight'"):
        load_pretrained(model, str(foreign))


def test_pretrained_timm_failure_names_the_model(monkeypatch):
    model = create_model("resnet18", NUM_CLASSES)
    with pytest.raises(PretrainedError, match="not_a_timm_model"):
        load_pretrained(model, "timm:not_a_timm_model")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PretrainedError, match="'resnet18'.*internet.*couldn't connect"):
        load_pretrained(model, "timm:resnet18")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, timm_state) -> Path:
    """The orbax folder scripts/convert_timm.py writes from `timm_state` (a 10-class resnet18)."""
    tmp_path = tmp_path_factory.mktemp("converted")
    source = tmp_path / "resnet18.pth"
    torch.save(timm_state, source)
    return load_module("scripts/convert_timm.py").main([
        "--model", "resnet18", "--num-classes", str(NUM_CLASSES), "--checkpoint", str(source),
        "--out", str(tmp_path / "orbax")])


def test_convert_script_writes_a_reusable_orbax_checkpoint(converted, reference_model):
    """Into a model of the same class count and head, every variable (the head too) loads."""
    assert_same_variables(load_pretrained(create_model("resnet18", NUM_CLASSES, seed=7),
                                          str(converted)), reference_model)


@pytest.mark.parametrize("classes, head, reason", [
    (260, "linear", "its shapes differ: head.fc.bias is (10,) in the checkpoint, (260,) in the "
                    "model"),
    (NUM_CLASSES, "csra", "the model's head is CSRAHead, which has no head.fc.bias, head.fc.kernel"),
    (260, "ml_decoder", "the model's head is MLDecoderHead, which has no head.fc.bias, "
                        "head.fc.kernel")])
def test_converted_checkpoint_loads_its_backbone_into_other_heads(converted, reference_model,
                                                                  classes, head, reason, caplog):
    """The converted folder works as config.model.pretrained for another class count or head:
    the backbone loads exactly, the stored classifier is skipped with the reason, the head keeps
    its initialisation."""
    model = create_model("resnet18", classes, head=head, seed=5)
    head_before = {key: value for key, value in variables(model).items() if key.startswith("head.")}
    with caplog.at_level(logging.WARNING, logger="annotate.convert"):
        load_pretrained(model, str(converted))
    assert (f"checkpoint classifier skipped ({reason}): head.fc.bias, head.fc.kernel; the head "
            f"keeps its initialisation") in caplog.text
    loaded = variables(model)
    backbone = {key: value for key, value in variables(reference_model).items()
                if key.startswith("backbone.")}
    assert backbone.keys() == {key for key in loaded if key.startswith("backbone.")}
    for key, value in backbone.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    for key, value in head_before.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_converted_checkpoint_of_another_backbone_is_an_error(converted):
    with pytest.raises(PretrainedError, match=f"orbax checkpoint {converted} does not fit "
                       r"Classifier: 'backbone.layer1.0.bn3.bias' is absent in the checkpoint, "
                       r"\(256,\) in the model"):
        load_pretrained(create_model("resnet50", NUM_CLASSES), str(converted))


def test_a_folder_that_is_not_an_orbax_checkpoint_is_named_so(tmp_path, caplog):
    """An empty folder, or a Hugging Face snapshot's (model.safetensors inside), is not reported
    as another architecture's checkpoint; check_pretrained (run before any decoding) refuses it
    in one error, without orbax's warnings about the metadata files it lacks."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "model.safetensors").write_bytes(b"x")
    for folder in (tmp_path / "empty", tmp_path / "snapshot"):
        with pytest.raises(PretrainedError, match=f"^{folder} is not an orbax checkpoint written "
                           "by save_weights"):
            check_pretrained(str(folder))
        with pytest.raises(PretrainedError, match=f"^{folder} is not an orbax checkpoint"):
            load_pretrained(nnx.eval_shape(lambda: create_model("resnet18", NUM_CLASSES)),
                            str(folder))  # refused before the model is touched
    assert "Metadata" not in caplog.text
    check_pretrained(str(save_weights(create_model("resnet18", NUM_CLASSES), tmp_path / "ok")))


def test_saved_head_of_another_type_loads_into_the_same_head(tmp_path):
    """An orbax folder of a CSRA-head model restores its head into a CSRA-head model."""
    source = create_model("resnet18", NUM_CLASSES, head="csra", seed=1)
    out = save_weights(source, tmp_path / "csra")
    assert_same_variables(load_pretrained(create_model("resnet18", NUM_CLASSES, head="csra",
                                                       seed=2), str(out)), source)


@pytest.mark.parametrize("head", ["ml_decoder", "csra"])
def test_checkpoint_classifier_is_skipped_for_other_heads(timm_state, reference_model, head,
                                                          caplog):
    """A timm checkpoint into a model with another head: the backbone loads exactly, timm's
    classifier is skipped with the reason, the head keeps its initialisation."""
    model = create_model("resnet18", NUM_CLASSES, head=head, seed=5)
    head_before = {key: value for key, value in variables(model).items() if key.startswith("head.")}
    with caplog.at_level(logging.WARNING, logger="annotate.convert"):
        load_timm_weights(model, timm_state)
    assert (f"checkpoint classifier skipped (the model's head is {type(model.head).__name__}, "
            f"which has no head.fc.kernel, head.fc.bias): fc.weight, fc.bias; the head keeps its "
            f"initialisation") in caplog.text
    loaded = variables(model)
    for key, value in variables(reference_model).items():
        if key.startswith("backbone."):
            np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    for key, value in head_before.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_a_partial_classifier_is_skipped_whole(timm_state, caplog):
    """A classifier weight without its bias is not half loaded: the head keeps its
    initialisation and the message says what the checkpoint lacks."""
    state = {key: value for key, value in timm_state.items() if key != "fc.bias"}
    model = create_model("resnet18", NUM_CLASSES, seed=5)
    head_before = {key: value for key, value in variables(model).items() if key.startswith("head.")}
    with caplog.at_level(logging.WARNING, logger="annotate.convert"):
        load_timm_weights(model, state)
    assert ("checkpoint classifier skipped (it lacks the model's head.fc.bias): fc.weight; the "
            "head keeps its initialisation") in caplog.text
    loaded = variables(model)
    for key, value in head_before.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_a_classifier_key_outside_the_heads_layout_is_named_as_such(timm_state, caplog):
    """The seed's nn.Sequential head (`fc.1.weight`) is a classifier the linear head cannot
    take, not a backbone key."""
    state = {"fc.1." + key[3:] if key.startswith("fc.") else key: value
             for key, value in timm_state.items()}
    model = create_model("resnet18", NUM_CLASSES, seed=5)
    with caplog.at_level(logging.WARNING, logger="annotate.convert"):
        load_timm_weights(model, state)
    assert ("checkpoint classifier skipped (the model's head is LinearHead, which has no "
            "head.fc.1.kernel, head.fc.1.bias): fc.1.weight, fc.1.bias; the head keeps its "
            "initialisation") in caplog.text
