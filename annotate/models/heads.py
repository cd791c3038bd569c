"""Classifier heads: feature map [B, h, w, C] -> float32 logits [B, num_classes].

Every head takes (num_features, num_classes, *, rngs, **options) and is registered by name in
annotate.models (`_HEADS`); `Classifier` joins a backbone and a head. "linear" is the seed's head (global average or max pool,
dropout, linear), named `fc` like timm's classifier, so timm checkpoints load into it.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from annotate.models.layers import torch_default_uniform


def global_pool(x: jax.Array, kind: str) -> jax.Array:
    """Global average or max pool over H and W: [B, H, W, C] -> [B, C] (float32 for the head)."""
    if kind == "avg":
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if kind == "max":
        return jnp.max(x, axis=(1, 2)).astype(jnp.float32)
    raise ValueError(f"global_pool must be 'avg' or 'max', got {kind!r}")


class LinearHead(nnx.Module):
    """The seed's head: global pool (avg or max) -> dropout -> linear, named `fc` like timm.

    Initialised as timm's classifier: torch's nn.Linear default (weight and bias
    U(+-1/sqrt(in_features))), or weights N(0, init_std) where the family sets one (TResNet: 0.01).
    """

    def __init__(self, in_features: int, num_classes: int, *, global_pool: str = "avg",
                 drop_rate: float = 0.3, init_std: float | None = None, rngs: nnx.Rngs):
        if global_pool not in ("avg", "max"):
            raise ValueError(f"global_pool must be 'avg' or 'max', got {global_pool!r}")
        self.global_pool = global_pool
        self.dropout = nnx.Dropout(drop_rate, rngs=rngs)
        torch_default = torch_default_uniform(in_features)
        kernel_init = torch_default if init_std is None else nnx.initializers.normal(init_std)
        self.fc = nnx.Linear(in_features, num_classes, param_dtype=jnp.float32,
                             kernel_init=kernel_init, bias_init=torch_default, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.fc(self.dropout(global_pool(features, self.global_pool)))


class Classifier(nnx.Module):
    """A backbone and a head: images [B, H, W, 3] -> float32 logits [B, num_classes].

    `info` is the backbone's registry entry (annotate.models.ModelInfo): annotate.convert reads
    the timm classifier key from it.
    """

    def __init__(self, backbone: nnx.Module, head: nnx.Module, info: Any):
        self.backbone = backbone
        self.head = head
        self.info = info

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def forward_features(self, x: jax.Array) -> jax.Array:
        """The backbone's pre-pool feature map [B, h, w, num_features]."""
        return self.backbone.forward_features(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.backbone.forward_features(x))
