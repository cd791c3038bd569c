"""Backbone registry: `create_model(name, num_classes)` builds any supported network in Flax NNX.

Every model maps NHWC images [B, H, W, 3] to logits [B, num_classes], exposes the pre-pool feature
map via `forward_features`, and switches BatchNorm/dropout with `model.train()` / `model.eval()`.
"""
from __future__ import annotations

import importlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# name -> "module:constructor"; modules are imported on first use so that building one model does
# not import every family.
_REGISTRY: dict[str, str] = {
    "resnet18": "resnet:resnet18",
    "resnet50": "resnet:resnet50",
    "resnet101": "resnet:resnet101",
    "resnext50_32x4d": "resnet:resnext50_32x4d",
    "xception": "xception:xception",
    "tresnet_m": "tresnet:tresnet_m",
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def check_model_name(name: str) -> None:
    """Raise a ValueError listing the valid names when `name` is not a registered backbone."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")


def create_model(name: str, num_classes: int, *, global_pool: str = "avg",
                 drop_rate: float = 0.3, dtype: Any = jnp.float32, seed: int = 0) -> nnx.Module:
    """Build backbone `name` with the seed's head (global pool -> dropout -> linear)."""
    check_model_name(name)
    module_name, constructor = _REGISTRY[name].split(":")
    module = importlib.import_module(f"annotate.models.{module_name}")
    return getattr(module, constructor)(num_classes=num_classes, global_pool=global_pool,
                                        drop_rate=drop_rate, dtype=dtype, rngs=nnx.Rngs(seed))


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (nnx.Param leaves), as torch's `numel` sum over parameters."""
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
