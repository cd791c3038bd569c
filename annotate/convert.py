"""Load timm/torchvision PyTorch checkpoints into the Flax NNX models.

The NNX module tree mirrors timm's attribute names, so one rule per tensor kind suffices:
conv `weight` [O, I, kh, kw] -> `kernel` [kh, kw, I, O]; linear `weight` [O, I] -> `kernel` [I, O];
BatchNorm `weight`/`bias`/`running_mean`/`running_var` -> `scale`/`bias`/`mean`/`var`.
For a `Classifier` (backbone + head), timm's classifier keys (the registry's `classifier` prefix,
e.g. `fc.` or `head.fc.`) go to the head when it is the linear head that timm's classifier is,
and are skipped for any other head; every other key goes to the backbone. A backbone class may
declare `filter_state_dict` (e.g. TResNet's inplace-ABN era checkpoints).
"""
from __future__ import annotations

import logging
import re
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


def _target_key(path: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """Map one torch key (already placed under the model's backbone or head) and its tensor to
    the NNX variable path and layout."""
    module, _, leaf = path.rpartition(".")
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
    return path, array


def module_path(model: nnx.Module, torch_key: str) -> str | None:
    """Where timm's `torch_key` goes in `model`: under `backbone.` or (the checkpoint's
    classifier) `head.fc.` of a Classifier, None for a classifier key when the head is not the
    linear one; unchanged for any other module."""
    from annotate.models.heads import Classifier, LinearHead

    if not isinstance(model, Classifier):
        return torch_key
    classifier = model.info.classifier + "."
    if not torch_key.startswith(classifier):
        return "backbone." + torch_key
    return "head.fc." + torch_key[len(classifier):] if isinstance(model.head, LinearHead) else None


def load_timm_weights(model: nnx.Module, state_dict: Mapping[str, Any]) -> nnx.Module:
    """Write a timm/torchvision `state_dict` into `model` (a Classifier, or any module whose tree
    mirrors the checkpoint, e.g. one block) in place and return it.

    Every backbone weight and BatchNorm statistic must be used and every backbone variable
    written. The checkpoint's classifier is loaded into a linear head of the same class count;
    otherwise (ImageNet's 1000 classes, another head type, no classifier in the checkpoint) the
    head keeps its initialisation and a message says why. Raises KeyError/ValueError naming the
    offending key otherwise.
    """
    from annotate.models.heads import Classifier, LinearHead

    backbone = model.backbone if isinstance(model, Classifier) else model
    filter_fn = getattr(type(backbone), "filter_state_dict", None)
    state_dict = dict(filter_fn(state_dict) if filter_fn else state_dict)
    classifier = model.info.classifier + "." if isinstance(model, Classifier) else None
    head_loads = isinstance(model, Classifier) and isinstance(model.head, LinearHead)
    variables = _flat_variables(model)
    written, skipped_head = set(), []
    for torch_key, value in state_dict.items():
        if torch_key.endswith(_SKIPPED_SUFFIXES):
            continue
        path = module_path(model, torch_key)
        if path is None:
            skipped_head.append(torch_key)
            continue
        key, array = _target_key(path, _to_numpy(value))
        if key not in variables:
            raise KeyError(f"checkpoint key {torch_key!r} (-> {key!r}) has no counterpart in "
                           f"{type(backbone).__name__}")
        variable = variables[key]
        if array.shape != variable.shape:
            if classifier is not None and key.startswith("head."):
                skipped_head.append(torch_key)
                continue
            raise ValueError(f"checkpoint key {torch_key!r}: shape {array.shape} does not fit "
                             f"{key!r} of shape {variable.shape}")
        variable[...] = jnp.asarray(array, dtype=variable.dtype)
        written.add(key)
    unwritten_head = [k for k in variables if k.startswith("head.") and k not in written]
    if skipped_head:
        reason = ("its class count differs" if head_loads else
                  f"the model's head is {type(model.head).__name__}, not timm's linear classifier")
        log.warning("checkpoint classifier skipped (%s): %s; the head keeps its initialisation",
                    reason, ", ".join(skipped_head))
    elif classifier is not None and unwritten_head:
        log.warning("checkpoint has no classifier (%s*); the head keeps its initialisation",
                    classifier)
    missing = [k for k in variables if k not in written
               and not (classifier is not None and k.startswith("head."))]
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} variables of {type(backbone).__name__}, "
                       f"first: {missing[:5]}")
    return model


class PretrainedError(ValueError):
    """config.model.pretrained cannot be loaded: not a checkpoint, another architecture's, or a
    timm download that failed. The message names the checkpoint and the cause."""


def _first_line(error: BaseException) -> str:
    """An exception's message on one line (a KeyError's without its quotes)."""
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_WRAPPER_KEYS = ("state_dict", "model")


def _read_torch_checkpoint(path: Path) -> dict[str, Any]:
    """A `.pth`/`.pt` file's state_dict, unwrapped from {'state_dict'|'model': ...}/'module.'."""
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"reading {path} needs torch (pip install torch)") from error
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors of a damaged or foreign file
        # torch's weights-only refusal opens with general advice; its cause follows this marker
        cause = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))
        detail = f"weights-only unpickling: {cause.group(1)}" if cause else _first_line(error)
        raise PretrainedError(f"{path} is not a readable PyTorch checkpoint "
                              f"({type(error).__name__}: {detail})") from error
    for wrapper in _WRAPPER_KEYS:
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    if not isinstance(checkpoint, Mapping):
        raise PretrainedError(f"{path} holds a {type(checkpoint).__name__}, not a state_dict")
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def _timm_pretrained_state_dict(name: str) -> dict[str, Any]:
    """The ImageNet state_dict of timm model `name`, downloaded by timm (needs internet)."""
    try:
        import timm
    except ImportError as error:
        raise ImportError(f"pretrained 'timm:{name}' needs timm and torch installed (pip "
                          f"install timm torch)") from error
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as error:  # timm/huggingface raise many types when offline or name unknown
        raise PretrainedError(f"could not get pretrained weights for timm model {name!r} (needs "
                              f"internet access and a valid timm name): {_first_line(error)}"
                              ) from error


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

    A missing file raises FileNotFoundError; anything else that cannot be loaded (a damaged file,
    another architecture's weights, a failed download) PretrainedError naming `spec` and the
    cause. The model is never left silently at random init.
    """
    try:
        return _load_pretrained(model, spec)
    except PretrainedError:
        raise
    except (KeyError, ValueError) as error:  # load_timm_weights: a key or shape that does not fit
        info = getattr(model, "info", None)
        name = f"timm's {info.timm_name}" if info is not None else type(model).__name__
        raise PretrainedError(f"pretrained checkpoint {spec} does not fit {name}: "
                              f"{_first_line(error)}") from error


def _load_pretrained(model: nnx.Module, spec: str) -> nnx.Module:
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
