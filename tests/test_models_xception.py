"""Xception parity with timm's `legacy_xception`: parameter count, eval/train forward, BN, bf16,
and its depthwise convolutions as shifted multiply-adds against the grouped convolution."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx
from timm.models.xception import Block as TimmBlock

from annotate.convert import load_timm_weights
from annotate.models import count_params, create_model
from annotate.models.layers import DepthwiseConv2d, conv2d, depthwise_implementation
from annotate.models.xception import Block, SeparableConv2d
from parity import (assert_eval_matches_timm, assert_train_mode_matches_timm,
                    batch_stats_by_torch_key, nchw_tensor, random_images, randomize_torch_model_,
                    relative_l2, timm_and_flax_models, torch_state_dict)

README_XCEPTION_PARAMS = 21_339_692


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, nnx.Module]:
    """(randomised timm legacy_xception, our xception holding its weights), built once."""
    return timm_and_flax_models("xception", "legacy_xception", seed=2)


def test_param_count_matches_timm_and_readme():
    abstract_model = nnx.eval_shape(lambda: create_model("xception", 260))
    timm_model = timm.create_model("legacy_xception", pretrained=False, num_classes=260)
    timm_count = sum(p.numel() for p in timm_model.parameters())
    assert count_params(abstract_model) == timm_count == README_XCEPTION_PARAMS


def test_state_dict_keys_are_timms(models):
    torch_model, model = models
    ours = batch_stats_by_torch_key(model)
    theirs = {k for k in torch_model.state_dict() if k.endswith(("running_mean", "running_var"))}
    assert set(ours) == theirs
    assert "backbone.block1.rep.0.conv1.kernel" in {".".join(map(str, p))
                                                    for p, _ in nnx.iter_graph(model)}


@pytest.mark.parametrize("height,width", [(224, 224), (160, 192)])
def test_eval_features_and_logits_match_timm(models, height, width):
    torch_model, model = models
    assert_eval_matches_timm(torch_model, model, height, width, seed=height)


def test_train_mode_logits_and_running_stats_match_timm(models):
    torch_model, model = models
    assert_train_mode_matches_timm(torch_model, model, random_images(2, 160, 192, seed=4))


def test_bfloat16_logits_close_to_float32(models):
    torch_model, model = models
    model_bf16 = create_model("xception", 260, drop_rate=0.0, dtype=jnp.bfloat16)
    load_timm_weights(model_bf16, torch_state_dict(torch_model))
    model_bf16.eval()
    images = jnp.asarray(random_images(2, 160, 192, seed=5))
    logits_bf16 = model_bf16(images)
    assert logits_bf16.dtype == jnp.float32
    assert model_bf16.forward_features(images).dtype == jnp.bfloat16
    assert model_bf16.backbone.block4.rep[1].pointwise.kernel.dtype == jnp.float32
    assert relative_l2(np.asarray(logits_bf16), np.asarray(model(images))) < 2e-2


def test_block_gradients_match_timm_under_jit():
    torch_block = TimmBlock(8, 16, reps=2, strides=2)
    randomize_torch_model_(torch_block, seed=5).train()
    block = Block(8, 16, 2, 2, rngs=nnx.Rngs(0))
    load_timm_weights(block, torch_state_dict(torch_block))
    block.train()
    images = np.random.default_rng(8).standard_normal((2, 9, 11, 8), dtype=np.float32)
    weights = np.random.default_rng(9).standard_normal((2, 5, 6, 16), dtype=np.float32)
    torch_images = nchw_tensor(images).requires_grad_()
    (torch_block(torch_images) * nchw_tensor(weights)).sum().backward()

    @nnx.jit
    def loss_gradients(block: Block, x: jax.Array) -> tuple[jax.Array, nnx.State]:
        def loss(block: Block, x: jax.Array) -> jax.Array:
            return jnp.sum(block(x) * weights)
        return nnx.grad(loss, argnums=(0, 1))(block, x)[::-1]

    input_gradient, parameter_gradients = loss_gradients(block, jnp.asarray(images))
    assert relative_l2(np.asarray(input_gradient),
                       torch_images.grad.numpy().transpose(0, 2, 3, 1)) < 1e-5
    for conv in ("pointwise", "conv1"):  # conv1: the depthwise convolution
        gradient = parameter_gradients["rep"][1][conv]["kernel"][...]
        reference = getattr(torch_block.rep[1], conv).weight.grad.numpy().transpose(2, 3, 1, 0)
        assert relative_l2(np.asarray(gradient), reference) < 1e-5, conv


def grouped(function):
    """`function` run with DepthwiseConv2d traced as a grouped convolution."""
    def run(*args):
        with depthwise_implementation("grouped"):
            return function(*args)
    return run


def test_depthwise_taps_draw_and_compute_as_the_grouped_conv():
    """The same draws as conv2d(groups=channels); values and both gradients equal to the grouped
    convolution's (float32, up to the order of the nine products' sum), at padding 1 and 0."""
    assert DepthwiseConv2d.implementation == "taps"
    for padding in (1, 0):
        layer = DepthwiseConv2d(6, 3, padding=padding, rngs=nnx.Rngs(3))
        reference = conv2d(6, 6, 3, padding=padding, groups=6, rngs=nnx.Rngs(3))
        np.testing.assert_array_equal(layer.kernel[...], reference.kernel[...])
        images = jax.random.normal(jax.random.key(padding), (2, 7, 9, 6))
        weights = jax.random.normal(jax.random.key(9), reference(images).shape)

        def loss(layer: DepthwiseConv2d, x: jax.Array) -> jax.Array:
            return jnp.sum(layer(x) * weights)

        def gradients(layer: DepthwiseConv2d, x: jax.Array) -> tuple[jax.Array, jax.Array]:
            kernel_gradient, input_gradient = nnx.grad(loss, argnums=(0, 1))(layer, x)
            return kernel_gradient["kernel"][...], input_gradient

        assert layer(images).shape == reference(images).shape
        np.testing.assert_allclose(layer(images), reference(images), rtol=0, atol=1e-5)
        np.testing.assert_allclose(layer(images), grouped(layer)(images), rtol=0, atol=1e-5)
        for ours, theirs in zip(gradients(layer, images), grouped(gradients)(layer, images)):
            assert relative_l2(np.asarray(ours), np.asarray(theirs)) < 1e-6


def test_depthwise_taps_in_bfloat16_sum_in_float32():
    """In bfloat16 the taps multiply the bf16-rounded inputs exactly and sum in float32, then
    round once: within one bf16 rounding of the float32 result of the same rounded inputs."""
    layer = DepthwiseConv2d(16, 3, padding=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 16)).astype(jnp.bfloat16)
    output = layer(images)
    assert output.dtype == jnp.bfloat16
    exact = jax.lax.conv_general_dilated(
        images.astype(jnp.float32), layer.kernel[...].astype(jnp.bfloat16).astype(jnp.float32),
        (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=16, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(output, np.float32), exact, rtol=2 ** -8, atol=1e-6)


def test_separable_conv_lowers_without_grouped_convolutions():
    """What XLA sees: the forward and backward of a separable conv hold only the pointwise
    convolutions, neither feature- nor batch-grouped; traced as "grouped" they hold both."""
    layer = SeparableConv2d(8, 16, 3, padding=1, rngs=nnx.Rngs(0))
    images = jnp.ones((2, 6, 6, 8))

    def lowered_text() -> str:
        def loss(layer: SeparableConv2d, x: jax.Array) -> jax.Array:
            return jnp.sum(layer(x) ** 2)
        return nnx.jit(nnx.grad(loss, argnums=(0, 1))).lower(layer, images).as_text()

    def group_counts(text: str) -> list[tuple[int, int]]:  # (batch, feature) per convolution
        return [(int(batch), int(feature)) for batch, feature in re.findall(
            r"batch_group_count = (\d+) : i64, feature_group_count = (\d+)", text)]

    # the pointwise conv's forward, input gradient and kernel gradient, none grouped
    assert group_counts(lowered_text()) == [(1, 1)] * 3
    # a grouped conv's kernel gradient is a batch-grouped convolution
    assert {(1, 8), (8, 1)} <= set(group_counts(grouped(lowered_text)()))
