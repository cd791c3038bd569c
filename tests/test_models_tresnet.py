"""TResNet-M parity with timm's `tresnet_m`: layers, key mapping, eval/train logits, bf16, inplace-ABN import."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from timm.layers import BlurPool2d, ConvNormAct, SpaceToDepth
from timm.models.tresnet import checkpoint_filter_fn

from annotate.convert import (_flat_variables, _target_key, load_pretrained, load_timm_weights,
                              module_path)
from annotate.models import count_params, create_model
from annotate.models.tresnet import TResNet, avg_pool_2x2_ceil, blur_pool, space_to_depth
from parity import (assert_train_mode_matches_timm, nchw_tensor, random_images, relative_l2,
                    timm_and_flax_models, torch_state_dict)

NUM_CLASSES = 260
SEED_README_PARAMS = 29_872_772
# 224x224 and a non-square size: timm accepts any H, W divisible by 4, and 200x168 gives odd maps
# (25x21, 13x11, 7x6) that take the ceil-mode AvgPool and odd-size BlurPool paths.
IMAGE_SIZES = ((224, 224), (200, 168))
TRAIN_SIZE = (200, 168)


def _images(height: int, width: int, seed: int = 0) -> np.ndarray:
    return random_images(2, height, width, seed)


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, TResNet]:
    return timm_and_flax_models("tresnet_m", "tresnet_m", num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def timm_model(models) -> torch.nn.Module:
    return models[0]


@pytest.fixture(scope="module")
def model(models) -> TResNet:
    assert isinstance(models[1].backbone, TResNet)
    return models[1]


@pytest.fixture(scope="module")
def state_dict(timm_model) -> dict[str, np.ndarray]:
    return torch_state_dict(timm_model)


@pytest.fixture(scope="module")
def timm_logits(timm_model) -> dict[tuple[int, int], np.ndarray]:
    with torch.no_grad():
        return {size: timm_model(nchw_tensor(_images(*size))).numpy() for size in IMAGE_SIZES}


@pytest.fixture(scope="module")
def our_logits(model) -> dict[tuple[int, int], np.ndarray]:
    return {size: np.asarray(model(jnp.asarray(_images(*size)))) for size in IMAGE_SIZES}


def test_parameter_count_matches_seed_readme_and_timm(model, timm_model):
    timm_count = sum(p.numel() for p in timm_model.parameters())
    assert timm_count == SEED_README_PARAMS
    assert count_params(model) == SEED_README_PARAMS


def test_variables_are_exactly_the_mapped_timm_keys(state_dict):
    fresh = create_model("tresnet_m", NUM_CLASSES, drop_rate=0.0, seed=1)
    mapped = {_target_key(module_path(fresh, key), value)[0] for key, value in state_dict.items()
              if not key.endswith("num_batches_tracked")}
    assert mapped == set(_flat_variables(fresh))


def test_space_to_depth_matches_timm_channel_order():
    images = _images(8, 12)
    expected = SpaceToDepth()(nchw_tensor(images)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(space_to_depth(jnp.asarray(images))), expected)
    with pytest.raises(ValueError, match="divisible by 4"):
        space_to_depth(jnp.zeros((1, 10, 8, 3)))


def _assert_pool_matches_torch(ours, theirs: torch.nn.Module, features: np.ndarray) -> None:
    """Outputs and input gradients of a weighted sum agree with the torch layer (autograd)."""
    expected_out = theirs(nchw_tensor(features))
    cotangent = np.random.default_rng(5).standard_normal(expected_out.shape).astype(np.float32)
    torch_input = nchw_tensor(features).requires_grad_(True)
    (theirs(torch_input) * torch.from_numpy(cotangent)).sum().backward()
    nhwc_cotangent = jnp.asarray(cotangent.transpose(0, 2, 3, 1))
    grad = jax.grad(lambda x: jnp.sum(ours(x) * nhwc_cotangent))(jnp.asarray(features))
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(features))),
                               expected_out.detach().numpy().transpose(0, 2, 3, 1),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), torch_input.grad.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("height,width", [(8, 8), (7, 6), (5, 9)])
def test_blur_pool_matches_timm_reflect_blurpool(height, width):
    features = np.random.default_rng(1).standard_normal((2, height, width, 5)).astype(np.float32)
    _assert_pool_matches_torch(blur_pool, BlurPool2d(channels=5, filt_size=3, stride=2), features)


@pytest.mark.parametrize("height,width", [(8, 6), (7, 5)])
def test_avg_pool_matches_torch_ceil_mode_without_pad_count(height, width):
    features = np.random.default_rng(2).standard_normal((2, height, width, 4)).astype(np.float32)
    pool = torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    _assert_pool_matches_torch(avg_pool_2x2_ceil, pool, features)


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_eval_logits_match_timm(our_logits, timm_logits, size):
    assert our_logits[size].shape == (2, NUM_CLASSES)
    assert timm_logits[size].std() > 0.1, "random weights should give non-degenerate logits"
    assert relative_l2(our_logits[size], timm_logits[size]) < 1e-4


def test_forward_features_is_the_pre_pool_map(model, our_logits):
    features = model.forward_features(jnp.asarray(_images(224, 224)))
    assert features.shape == (2, 7, 7, model.num_features) and model.num_features == 2048
    pooled = np.asarray(features).mean(axis=(1, 2))
    head = model.head.fc
    logits = pooled @ np.asarray(head.kernel[...]) + np.asarray(head.bias[...])
    assert relative_l2(logits, our_logits[(224, 224)]) < 1e-5


def test_train_mode_logits_and_running_stats_match_timm(model, timm_model):
    theirs = assert_train_mode_matches_timm(timm_model, model, _images(*TRAIN_SIZE, seed=3),
                                            tolerance=1e-4)
    assert len(theirs) == 2 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in timm_model.modules())


def test_bfloat16_logits_close_to_float32(state_dict, our_logits):
    net = create_model("tresnet_m", NUM_CLASSES, drop_rate=0.0, dtype=jnp.bfloat16)
    load_timm_weights(net, state_dict)
    net.eval()
    stored = jax.tree.leaves(nnx.state(net, nnx.Param)) + jax.tree.leaves(nnx.state(net, nnx.BatchStat))
    assert all(leaf.dtype == jnp.float32 for leaf in stored)
    # jitted: one bf16 compile costs less CPU than eager per-op bf16 compiles, and covers nnx.jit
    features, logits = nnx.jit(lambda m, x: (m.forward_features(x), m(x)))(
        net, jnp.asarray(_images(224, 224)))
    assert features.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    assert relative_l2(np.asarray(logits), our_logits[(224, 224)]) < 2e-2


def _inplace_abn_checkpoint(timm_model: torch.nn.Module,
                            state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Invert timm's checkpoint_filter_fn: old Sequential keys and signed ABN weights |w| = w' - eps."""
    blurred = {name for name, module in timm_model.named_modules()
               if isinstance(module, ConvNormAct) and getattr(module, "aa", None) is not None}
    signs = np.random.default_rng(4)
    old = {}
    for key, value in state_dict.items():
        module, leaf = key.rsplit(".", 1)
        prefix, part = module.rsplit(".", 1)
        if part in ("conv", "bn") and ".downsample." in f".{prefix}.":
            old_module = f"{prefix}.{'0' if part == 'conv' else '1'}"
        elif part in ("conv", "bn"):
            index = "0" if part == "conv" else "1"
            old_module = f"{prefix}.0.{index}" if prefix in blurred else f"{prefix}.{index}"
        else:
            old_module = module
        if part == "bn" and leaf == "weight":
            value = (value - 1e-5) * signs.choice([-1.0, 1.0], size=value.shape).astype(np.float32)
        old[f"{old_module}.{leaf}"] = value
    return old


def test_inplace_abn_checkpoint_converts_as_timm_and_gives_timm_logits(
        model, timm_model, state_dict, timm_logits, tmp_path):
    old = _inplace_abn_checkpoint(timm_model, state_dict)
    assert "body.conv1.0.weight" in old and "body.layer3.0.conv2.0.1.weight" in old
    assert "body.layer2.0.downsample.1.1.running_var" in old
    converted = TResNet.filter_state_dict(old)
    reference = checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in old.items()}, None)
    assert set(converted) == set(reference) == set(state_dict)
    for key, value in reference.items():
        np.testing.assert_array_equal(converted[key], value.numpy(), err_msg=key)
    imported = create_model("tresnet_m", NUM_CLASSES, drop_rate=0.0, seed=11)  # fresh weights
    official = tmp_path / "tresnet_m.pth"  # as Alibaba-MIIL's files: {"model": state_dict}
    torch.save({"model": {k: torch.from_numpy(v) for k, v in old.items()}}, official)
    load_pretrained(imported, str(official))
    imported.eval()
    logits = np.asarray(imported(jnp.asarray(_images(224, 224))))
    assert relative_l2(logits, timm_logits[(224, 224)]) < 1e-4


def test_current_checkpoint_passes_through_filter_unchanged(state_dict):
    assert TResNet.filter_state_dict(state_dict) is state_dict
