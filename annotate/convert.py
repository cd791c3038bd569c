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
from pathlib import Path
from typing import Any

import jax
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


_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_WRAPPER_KEYS = ("state_dict", "model")


def _read_torch_checkpoint(path: Path) -> dict[str, Any]:
    """A `.pth`/`.pt` file's state_dict, unwrapped from {'state_dict'|'model': ...}/'module.'."""
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"reading {path} needs torch (pip install torch)") from error
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in _WRAPPER_KEYS:
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state_dict")
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def _timm_pretrained_state_dict(name: str) -> dict[str, Any]:
    """The ImageNet state_dict of timm model `name`, downloaded by timm (needs internet)."""
    try:
        import timm
    except ImportError as error:
        raise ImportError(f"pretrained 'timm:{name}' needs timm and torch installed") from error
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as error:  # timm/huggingface raise many types when offline or name unknown
        raise RuntimeError(f"could not get pretrained weights for timm model {name!r} (needs "
                           f"internet access and a valid timm name): {error}") from error


def save_weights(model: nnx.Module, directory: str | Path) -> Path:
    """Save `model`'s parameters and BatchNorm statistics as an orbax checkpoint at `directory`."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, nnx.state(model, (nnx.Param, nnx.BatchStat)))
    checkpointer.wait_until_finished()
    return directory


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Dotted path -> shape of every array leaf (a trailing Variable `value` dropped)."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        shapes[".".join(names[:-1] if names[-1] == "value" else names)] = tuple(leaf.shape)
    return shapes


def _restore_weights(model: nnx.Module, directory: Path) -> nnx.Module:
    """Load an orbax checkpoint written by `save_weights` into `model` in place, after checking
    that its variable names and shapes are the model's."""
    import orbax.checkpoint as ocp

    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), state)
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(directory.absolute())
    stored = _leaf_shapes(getattr(metadata, "item_metadata", metadata))
    expected = _leaf_shapes(abstract)
    for key in sorted(stored.keys() | expected.keys()):
        if stored.get(key) != expected.get(key):
            raise ValueError(f"orbax checkpoint {directory} does not fit {type(model).__name__}: "
                             f"{key!r} is {stored.get(key, 'absent')} in the checkpoint, "
                             f"{expected.get(key, 'absent')} in the model")
    nnx.update(model, checkpointer.restore(directory.absolute(), abstract))
    return model


def load_pretrained(model: nnx.Module, spec: str) -> nnx.Module:
    """Load `config.model.pretrained` into `model` in place: a `.pth`/`.pt`/`.bin`/`.safetensors`
    file, an orbax directory from `save_weights`, or `timm:<name>` (timm download, needs internet).

    A missing file or failed download raises; the model is never left silently at random init.
    """
    if spec.startswith("timm:"):
        return load_timm_weights(model, _timm_pretrained_state_dict(spec.removeprefix("timm:")))
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist (expected a .pth/"
                                f".pt/.bin/.safetensors file, an orbax directory or timm:<name>)")
    if path.is_dir():
        return _restore_weights(model, path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as error:
            raise ImportError(f"reading {path} needs the safetensors package") from error
        return load_timm_weights(model, load_file(path))
    if path.suffix in _TORCH_SUFFIXES:
        return load_timm_weights(model, _read_torch_checkpoint(path))
    raise ValueError(f"pretrained checkpoint {path}: unknown format {path.suffix!r}; use "
                     f".pth/.pt/.bin/.safetensors, an orbax directory or timm:<name>")
