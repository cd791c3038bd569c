"""Load timm/torchvision PyTorch checkpoints into the Flax NNX backbones.

The NNX module tree mirrors timm's attribute names, so one rule per tensor kind suffices:
conv `weight` [O, I, kh, kw] -> `kernel` [kh, kw, I, O]; linear `weight` [O, I] -> `kernel` [I, O];
BatchNorm `weight`/`bias`/`running_mean`/`running_var` -> `scale`/`bias`/`mean`/`var`.
A model class may declare `timm_renames` (torch key prefix -> module path prefix) and
`filter_state_dict` (e.g. TResNet's inplace-ABN era checkpoints) for what differs.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

log = logging.getLogger(__name__)

_SKIPPED_SUFFIXES = ("num_batches_tracked",)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch is not imported here
        value = value.detach().cpu().float().numpy() if value.is_floating_point() else value.numpy()
    return np.asarray(value)


def _flat_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Every Param and BatchStat of `model`, keyed by its dotted module path."""
    flat = {}
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, (nnx.Param, nnx.BatchStat)):
            flat[".".join(str(p) for p in path)] = variable
    return flat


def _target_key(torch_key: str, array: np.ndarray, renames: Mapping[str, str]) -> tuple[str, np.ndarray]:
    """Map one torch key and tensor to the NNX variable path and its layout."""
    for old, new in renames.items():
        if torch_key.startswith(old):
            torch_key = new + torch_key[len(old):]
            break
    module, _, leaf = torch_key.rpartition(".")
    if leaf == "weight" and array.ndim == 4:
        return f"{module}.kernel", array.transpose(2, 3, 1, 0)
    if leaf == "weight" and array.ndim == 2:
        return f"{module}.kernel", array.T
    if leaf == "weight" and array.ndim == 1:
        return f"{module}.scale", array
    if leaf == "running_mean":
        return f"{module}.mean", array
    if leaf == "running_var":
        return f"{module}.var", array
    return torch_key, array


def load_timm_weights(model: nnx.Module, state_dict: Mapping[str, Any], *,
                      head_name: str = "head.fc") -> nnx.Module:
    """Write a timm/torchvision `state_dict` into `model` in place and return it.

    Every weight and BatchNorm statistic must be used and every variable written; a classifier
    head of another class count (e.g. ImageNet's 1000) is skipped with a logged message.
    Raises KeyError/ValueError naming the offending key otherwise.
    """
    filter_fn = getattr(type(model), "filter_state_dict", None)
    state_dict = dict(filter_fn(state_dict) if filter_fn else state_dict)
    renames = getattr(type(model), "timm_renames", {})
    variables = _flat_variables(model)
    written, skipped_head = set(), []
    for torch_key, value in state_dict.items():
        if torch_key.endswith(_SKIPPED_SUFFIXES):
            continue
        key, array = _target_key(torch_key, _to_numpy(value), renames)
        if key not in variables:
            raise KeyError(f"checkpoint key {torch_key!r} (-> {key!r}) has no counterpart in "
                           f"{type(model).__name__}")
        variable = variables[key]
        if array.shape != variable.shape:
            if key.startswith(head_name + "."):
                skipped_head.append(torch_key)
                continue
            raise ValueError(f"checkpoint key {torch_key!r}: shape {array.shape} does not fit "
                             f"{key!r} of shape {variable.shape}")
        variable[...] = jnp.asarray(array, dtype=variable.dtype)
        written.add(key)
    if skipped_head:
        log.warning("classifier head skipped (class count differs): %s; it keeps its random init",
                    ", ".join(skipped_head))
    missing = [k for k in variables if k not in written
               and not (skipped_head and k.startswith(head_name + "."))]
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} variables of {type(model).__name__}, "
                       f"first: {missing[:5]}")
    return model
