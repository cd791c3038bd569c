"""Xception parity with timm's `legacy_xception`: parameter count, eval/train forward, BN, bf16."""
from __future__ import annotations

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
from annotate.models.xception import Block
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
    pointwise_gradient = parameter_gradients["rep"][1]["pointwise"]["kernel"][...]
    reference_gradient = torch_block.rep[1].pointwise.weight.grad.numpy().transpose(2, 3, 1, 0)
    assert relative_l2(np.asarray(pointwise_gradient), reference_gradient) < 1e-5
