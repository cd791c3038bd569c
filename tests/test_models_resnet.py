"""ResNet/ResNeXt parity with timm: parameter counts, eval and train forward, BN updates, bf16."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx

from annotate.convert import load_timm_weights
from annotate.models import count_params, create_model
from annotate.models.layers import max_pool2d
from annotate.models.resnet import BasicBlock, Bottleneck
from parity import (assert_eval_matches_timm, assert_train_mode_matches_timm, nchw_tensor,
                    random_images, randomize_torch_model_, relative_l2, timm_and_flax_models,
                    torch_state_dict)

# The seed README's counts with 260 classes (None: not listed there, timm is the reference).
README_PARAM_COUNTS = {"resnet18": None, "resnet50": None, "resnext50_32x4d": 23_512_644,
                       "resnet101": 43_032_900}
PARITY_MODELS = ("resnext50_32x4d", "resnet101")


@pytest.fixture(scope="module", params=PARITY_MODELS)
def models(request) -> tuple[str, torch.nn.Module, nnx.Module]:
    """(name, randomised timm model, our model with its weights), built once per name."""
    torch_model, model = timm_and_flax_models(request.param, request.param, seed=1)
    return request.param, torch_model, model


@pytest.mark.parametrize("name", list(README_PARAM_COUNTS))
def test_param_count_matches_timm_and_readme(name):
    abstract_model = nnx.eval_shape(lambda: create_model(name, 260))
    timm_count = sum(p.numel() for p in
                     timm.create_model(name, pretrained=False, num_classes=260).parameters())
    assert count_params(abstract_model) == timm_count
    if README_PARAM_COUNTS[name] is not None:
        assert timm_count == README_PARAM_COUNTS[name]


@pytest.mark.parametrize("height,width", [(224, 224), (160, 192)])
def test_eval_features_and_logits_match_timm(models, height, width):
    _, torch_model, model = models
    assert_eval_matches_timm(torch_model, model, height, width, seed=height)
    features = model.forward_features(jnp.asarray(random_images(2, height, width, seed=height)))
    assert features.shape == (2, -(-height // 32), -(-width // 32), model.num_features)


def test_train_mode_logits_and_running_stats_match_timm(models):
    _, torch_model, model = models
    assert_train_mode_matches_timm(torch_model, model, random_images(2, 160, 192, seed=4))


# bf16 compiles are the costliest on CPU; the deepest ResNet is the worst case for rounding drift.
@pytest.mark.parametrize("name", ["resnet101"])
def test_bfloat16_logits_close_to_float32(name):
    torch_model = timm.create_model(name, pretrained=False, num_classes=260)
    randomize_torch_model_(torch_model, seed=1).eval()
    model_bf16 = create_model(name, 260, drop_rate=0.0, dtype=jnp.bfloat16)
    load_timm_weights(model_bf16, torch_state_dict(torch_model))
    model_bf16.eval()
    assert model_bf16.backbone.conv1.kernel.dtype == jnp.float32
    assert model_bf16.backbone.bn1.mean.dtype == jnp.float32
    images = random_images(2, 160, 192, seed=5)
    logits_bf16 = model_bf16(jnp.asarray(images))
    assert logits_bf16.dtype == jnp.float32
    assert model_bf16.forward_features(jnp.asarray(images)).dtype == jnp.bfloat16
    with torch.no_grad():
        reference = torch_model(nchw_tensor(images)).numpy()
    assert relative_l2(np.asarray(logits_bf16), reference) < 2e-2


@pytest.mark.parametrize("in_channels,planes,stride", [(64, 64, 1), (64, 128, 2)])
def test_basic_block_matches_timm(in_channels, planes, stride):
    torch_block = timm.models.resnet.BasicBlock(
        in_channels, planes, stride=stride,
        downsample=(timm.models.resnet.downsample_conv(in_channels, planes, 1, stride=stride)
                    if stride != 1 or in_channels != planes else None))
    randomize_torch_model_(torch_block, seed=2).eval()
    block = BasicBlock(in_channels, planes, stride=stride, rngs=nnx.Rngs(0))
    load_timm_weights(block, torch_state_dict(torch_block))
    block.eval()
    images = np.random.default_rng(7).standard_normal((2, 12, 10, in_channels), dtype=np.float32)
    with torch.no_grad():
        reference = torch_block(nchw_tensor(images)).numpy().transpose(0, 2, 3, 1)
    assert relative_l2(np.asarray(block(jnp.asarray(images))), reference) < 1e-5


def test_zero_init_last_bn_like_timm():
    bottleneck = Bottleneck(64, 16, rngs=nnx.Rngs(0))
    basic = BasicBlock(64, 64, rngs=nnx.Rngs(0))
    assert np.all(np.asarray(bottleneck.bn3.scale[...]) == 0)
    assert np.all(np.asarray(basic.bn2.scale[...]) == 0)
    assert np.all(np.asarray(bottleneck.bn1.scale[...]) == 1)
    assert np.all(np.asarray(basic.bn1.scale[...]) == 1)


def test_max_pool_pads_with_minus_infinity_like_torch():
    images = -np.abs(random_images(2, 7, 9, seed=6)) - 1.0  # all negative: zero padding would win
    pooled = np.asarray(max_pool2d(jnp.asarray(images), 3, 2, 1))
    reference = torch.nn.functional.max_pool2d(nchw_tensor(images), 3, 2, 1).numpy()
    np.testing.assert_array_equal(pooled, reference.transpose(0, 2, 3, 1))
    torch_images = nchw_tensor(images).requires_grad_()
    torch.nn.functional.max_pool2d(torch_images, 3, 2, 1).sum().backward()
    gradient = jax.grad(lambda x: max_pool2d(x, 3, 2, 1).sum())(jnp.asarray(images))
    np.testing.assert_array_equal(np.asarray(gradient),
                                  torch_images.grad.numpy().transpose(0, 2, 3, 1))
