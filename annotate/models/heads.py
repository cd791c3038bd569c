"""Classifier heads: feature map [B, h, w, C] -> float32 logits [B, num_classes].

Every head takes (num_features, num_classes, *, rngs, **options) and is registered by name in
annotate.models (`_HEADS`); its options come from config.model.<head> (annotate.config.
head_options), whose keys are checked against the keyword-only arguments; its constructor checks
their values (`require_option`), which annotate.config.validate_config runs abstractly to name a
bad one as its config key; `Classifier` joins a backbone and a head. "linear" is the seed's head
(global average or max pool, dropout, linear), named `fc` like timm's classifier, so timm
checkpoints load into it.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from annotate.models.layers import torch_default_uniform

GLOBAL_POOLS: tuple[str, ...] = ("avg", "max")  # the linear head's pooling
# CSRA's official temperature settings by number of heads (99 stands for max pooling)
CSRA_TEMPERATURES: dict[int, tuple[int, ...]] = {
    1: (1,), 2: (1, 99), 4: (1, 2, 4, 99), 6: (1, 2, 3, 4, 5, 99), 8: (1, 2, 3, 4, 5, 6, 7, 99)}


def require_option(ok: bool, option: str, value: Any, message: str) -> None:
    """A head's check of one option: ValueError "<option> = <value>: <message>" unless `ok`."""
    if not ok:
        raise ValueError(f"{option} = {value!r}: {message}")


def global_pool(x: jax.Array, kind: str) -> jax.Array:
    """Global average or max pool over H and W: [B, H, W, C] -> [B, C] (float32 for the head)."""
    if kind == "avg":
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if kind == "max":
        return jnp.max(x, axis=(1, 2)).astype(jnp.float32)
    raise ValueError(f"global_pool must be one of {list(GLOBAL_POOLS)}, got {kind!r}")


class LinearHead(nnx.Module):
    """The seed's head: global pool (avg or max) -> dropout -> linear, named `fc` like timm.

    Initialised as timm's classifier: torch's nn.Linear default (weight and bias
    U(+-1/sqrt(in_features))), or weights N(0, init_std) where the family sets one (TResNet: 0.01).
    """

    def __init__(self, in_features: int, num_classes: int, *, global_pool: str = "avg",
                 drop_rate: float = 0.3, init_std: float | None = None, rngs: nnx.Rngs):
        require_option(global_pool in GLOBAL_POOLS, "global_pool", global_pool,
                       f"use one of {list(GLOBAL_POOLS)}")
        require_option(0 <= drop_rate < 1, "drop_rate", drop_rate, "must lie in [0, 1)")
        self.global_pool = global_pool
        self.dropout = nnx.Dropout(drop_rate, rngs=rngs)
        torch_default = torch_default_uniform(in_features)
        kernel_init = torch_default if init_std is None else nnx.initializers.normal(init_std)
        self.fc = nnx.Linear(in_features, num_classes, param_dtype=jnp.float32,
                             kernel_init=kernel_init, bias_init=torch_default, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.fc(self.dropout(global_pool(features, self.global_pool)))


class Buffer(nnx.BatchStat):
    """A fixed tensor that is not trained (torch's requires_grad=False): kept with the BatchNorm
    statistics, outside the optimiser, checkpointed with the model."""


def torch_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs,
                 bias: bool = True) -> nnx.Linear:
    """torch's nn.Linear with its default initialisation (weight and bias U(+-1/sqrt(in)))."""
    init = torch_default_uniform(in_features)
    return nnx.Linear(in_features, out_features, use_bias=bias, kernel_init=init, bias_init=init,
                      param_dtype=jnp.float32, rngs=rngs)


class CrossAttention(nnx.Module):
    """torch's nn.MultiheadAttention as cross-attention (queries attend to key = value tokens):
    q/k/v projections initialised as its stacked in_proj (xavier-uniform over [3D, D], zero
    bias), the output projection as its out_proj (nn.Linear weight, zero bias), dropout on the
    attention weights."""

    def __init__(self, dim: int, num_heads: int, dropout: float, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {num_heads} heads")
        bound = math.sqrt(6.0 / (dim + 3 * dim))
        in_proj = nnx.initializers.uniform(2 * bound)

        def projection() -> nnx.Linear:
            return nnx.Linear(dim, dim, kernel_init=lambda key, shape, dtype=jnp.float32: (
                in_proj(key, shape, dtype) - bound), bias_init=nnx.initializers.zeros,
                param_dtype=jnp.float32, rngs=rngs)

        self.query, self.key, self.value = projection(), projection(), projection()
        self.out = nnx.Linear(dim, dim, kernel_init=torch_default_uniform(dim),
                              bias_init=nnx.initializers.zeros, param_dtype=jnp.float32, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.num_heads = num_heads

    def __call__(self, queries: jax.Array, tokens: jax.Array) -> jax.Array:
        """queries [B, K, D], tokens [B, N, D] -> [B, K, D]."""
        batch, num_queries, dim = queries.shape
        head_dim = dim // self.num_heads

        def split(x: jax.Array) -> jax.Array:
            return x.reshape(batch, x.shape[1], self.num_heads, head_dim)

        q, k, v = split(self.query(queries)), split(self.key(tokens)), split(self.value(tokens))
        weights = jax.nn.softmax(jnp.einsum("bqhd,bnhd->bhqn", q, k) / math.sqrt(head_dim), -1)
        attended = jnp.einsum("bhqn,bnhd->bqhd", self.dropout(weights), v)
        return self.out(attended.reshape(batch, num_queries, dim))


class MLDecoderHead(nnx.Module):
    """ML-Decoder as the official MLDecoder module: spatial tokens -> linear `embed` + ReLU; fixed
    N(0, 1) queries (min(num_groups, num_classes) of them) pass one decoder layer (the
    `TransformerDecoderLayerOptimal`: tgt + dropout(tgt) -> LayerNorm; cross-attention, residual,
    LayerNorm; feed-forward ReLU, residual, LayerNorm; `dropout`, 0.1 by default, at the official
    positions); group fully-connected: query i gives labels i*d .. i*d+d-1 (d = num_classes /
    queries rounded up; the official int(num_classes / queries + 0.999) is the same wherever it
    covers every label)."""

    def __init__(self, in_features: int, num_classes: int, *, num_groups: int = 100,
                 embedding_dim: int = 768, num_heads: int = 8, feedforward_dim: int = 2048,
                 dropout: float = 0.1, rngs: nnx.Rngs):
        for option, value in (("num_groups", num_groups), ("embedding_dim", embedding_dim),
                              ("num_heads", num_heads), ("feedforward_dim", feedforward_dim)):
            require_option(value > 0, option, value, "must be positive")
        require_option(embedding_dim % num_heads == 0, "embedding_dim", embedding_dim,
                       f"must be divisible by num_heads={num_heads}")
        require_option(0 <= dropout < 1, "dropout", dropout, "must lie in [0, 1)")
        groups = min(num_groups, num_classes)
        self.num_classes = num_classes
        self.embed = torch_linear(in_features, embedding_dim, rngs=rngs)
        self.queries = Buffer(jax.random.normal(rngs.params(), (groups, embedding_dim)))
        self.dropout, self.dropout1, self.dropout2, self.dropout3 = (
            nnx.Dropout(dropout, rngs=rngs) for _ in range(4))
        self.attention = CrossAttention(embedding_dim, num_heads, dropout, rngs=rngs)
        self.norm1, self.norm2, self.norm3 = (
            nnx.LayerNorm(embedding_dim, epsilon=1e-5, rngs=rngs) for _ in range(3))
        self.linear1 = torch_linear(embedding_dim, feedforward_dim, rngs=rngs)
        self.linear2 = torch_linear(feedforward_dim, embedding_dim, rngs=rngs)
        duplicate = -(-num_classes // groups)  # ceil
        std = math.sqrt(2.0 / ((embedding_dim + groups) * duplicate))  # xavier-normal, 3-D
        self.group_fc = nnx.Param(std * jax.random.normal(
            rngs.params(), (groups, embedding_dim, duplicate)))
        self.group_fc_bias = nnx.Param(jnp.zeros((num_classes,)))

    def __call__(self, features: jax.Array) -> jax.Array:
        batch, channels = features.shape[0], features.shape[-1]
        tokens = jax.nn.relu(self.embed(features.astype(jnp.float32).reshape(batch, -1, channels)))
        queries = jnp.broadcast_to(self.queries[...], (batch, *self.queries.shape))
        x = self.norm1(queries + self.dropout1(queries))
        x = self.norm2(x + self.dropout2(self.attention(x, tokens)))
        feedforward = self.linear2(self.dropout(jax.nn.relu(self.linear1(x))))
        x = self.norm3(x + self.dropout3(feedforward))
        logits = jnp.einsum("bqd,qdr->bqr", x, self.group_fc[...]).reshape(batch, -1)
        return logits[:, :self.num_classes] + self.group_fc_bias[...]


class CSRAHead(nnx.Module):
    """Class-specific residual attention as the official MHA of CSRA modules: per head, a 1x1
    convolution without bias (torch's default init) whose per-class scores are divided by the
    class weight's norm; logit = mean over positions + lam x (max over positions for temperature
    99, else the scores weighted by their softmax over positions at that temperature); heads add."""

    def __init__(self, in_features: int, num_classes: int, *, num_heads: int = 1,
                 lam: float = 0.1, rngs: nnx.Rngs):
        require_option(num_heads in CSRA_TEMPERATURES, "num_heads", num_heads,
                       f"use one of {list(CSRA_TEMPERATURES)} (the official temperature settings)")
        require_option(lam >= 0, "lam", lam, "must be >= 0")
        self.temperatures = CSRA_TEMPERATURES[num_heads]
        self.lam = lam
        self.heads = nnx.List([torch_linear(in_features, num_classes, rngs=rngs, bias=False)
                               for _ in self.temperatures])

    def __call__(self, features: jax.Array) -> jax.Array:
        batch, channels = features.shape[0], features.shape[-1]
        tokens = features.astype(jnp.float32).reshape(batch, -1, channels)
        logits = 0.0
        for temperature, head in zip(self.temperatures, self.heads):
            kernel = head.kernel[...]
            score = tokens @ (kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True))
            if temperature == 99:  # the official code's marker for max pooling
                attention = jnp.max(score, axis=1)
            else:
                attention = jnp.sum(score * jax.nn.softmax(score * temperature, axis=1), axis=1)
            logits = logits + jnp.mean(score, axis=1) + self.lam * attention
        return logits


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
