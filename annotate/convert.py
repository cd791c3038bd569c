"""Load timm/torchvision PyTorch checkpoints into the Flax NNX models.

The NNX module tree mirrors timm's attribute names, so one rule per tensor kind suffices:
conv `weight` [O, I, kh, kw] -> `kernel` [kh, kw, I, O]; linear `weight` [O, I] -> `kernel` [I, O];
BatchNorm `weight`/`bias`/`running_mean`/`running_var` -> `scale`/`bias`/`mean`/`var`.
For a `Classifier` (backbone + head), timm's classifier keys (the registry's `classifier` prefix,
e.g. `fc.` or `head.fc.`) go to the head when they are exactly its variables with their shapes
(a linear head of the same class count) and are all skipped otherwise; every other key goes to
the backbone, which must take them all. An orbax checkpoint from `save_weights` (what
scripts/convert_timm.py writes) loads by the same rules. A backbone class may declare
`filter_state_dict` (e.g. TResNet's inplace-ABN era checkpoints).
"""
from __future__ import annotations

import importlib
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


def module_path(model: nnx.Module, torch_key: str) -> str:
    """Where timm's `torch_key` goes in `model`: under `backbone.` or (the checkpoint's
    classifier) `head.fc.`, where timm's linear classifier sits, of a Classifier; unchanged for
    any other module. Whether the head has that variable is `load_timm_weights`'s check."""
    from annotate.models.heads import Classifier

    if not isinstance(model, Classifier):
        return torch_key
    classifier = model.info.classifier + "."
    if not torch_key.startswith(classifier):
        return "backbone." + torch_key
    return "head.fc." + torch_key[len(classifier):]


def _load_head(model: nnx.Module, variables: Mapping[str, nnx.Variable],
               arrays: Mapping[str, tuple[str, np.ndarray]], prefix: str) -> None:
    """Write a checkpoint's classifier into a Classifier's head, all or nothing: `arrays` maps a
    head variable path to (checkpoint key, array); they are written only when they are exactly
    the head's variables with their shapes. Otherwise the head keeps its initialisation and a
    warning names the cause and the skipped keys (`prefix`: the checkpoint's classifier prefix)."""
    head = {key: variable for key, variable in variables.items() if key.startswith("head.")}
    extra = [key for key in arrays if key not in head]
    lacking = [key for key in head if key not in arrays]
    misfits = [f"{key} is {array.shape} in the checkpoint, {head[key].shape} in the model"
               for key, (_, array) in arrays.items() if key in head and array.shape != head[key].shape]
    if not arrays:
        log.warning("checkpoint has no classifier (%s*); the head keeps its initialisation", prefix)
        return
    if extra:
        reason = f"the model's head is {type(model.head).__name__}, which has no {', '.join(extra)}"
    elif lacking:
        reason = f"it lacks the model's {', '.join(lacking)}"
    elif misfits:
        reason = f"its shapes differ: {misfits[0]}"
    else:
        for key, (_, array) in arrays.items():
            head[key][...] = jnp.asarray(array, dtype=head[key].dtype)
        return
    log.warning("checkpoint classifier skipped (%s): %s; the head keeps its initialisation",
                reason, ", ".join(name for name, _ in arrays.values()))


def load_timm_weights(model: nnx.Module, state_dict: Mapping[str, Any]) -> nnx.Module:
    """Write a timm/torchvision `state_dict` into `model` (a Classifier, or any module whose tree
    mirrors the checkpoint, e.g. one block) in place and return it.

    Every backbone weight and BatchNorm statistic must be used and every backbone variable
    written; raises KeyError/ValueError naming the offending key otherwise. The checkpoint's
    classifier is loaded only into a linear head of the same class count, weight and bias
    together; otherwise (ImageNet's 1000 classes, another head type, no classifier or part of
    one in the checkpoint) the head keeps its initialisation and a message says why.
    """
    from annotate.models.heads import Classifier

    is_classifier = isinstance(model, Classifier)
    backbone = model.backbone if is_classifier else model
    filter_fn = getattr(type(backbone), "filter_state_dict", None)
    state_dict = dict(filter_fn(state_dict) if filter_fn else state_dict)
    variables = _flat_variables(model)
    written, head_arrays = set(), {}
    for torch_key, value in state_dict.items():
        if torch_key.endswith(_SKIPPED_SUFFIXES):
            continue
        key, array = _target_key(module_path(model, torch_key), _to_numpy(value))
        if is_classifier and key.startswith("head."):
            head_arrays[key] = (torch_key, array)
            continue
        if key not in variables:
            raise KeyError(f"checkpoint key {torch_key!r} (-> {key!r}) has no counterpart in "
                           f"{type(backbone).__name__}")
        variable = variables[key]
        if array.shape != variable.shape:
            raise ValueError(f"checkpoint key {torch_key!r}: shape {array.shape} does not fit "
                             f"{key!r} of shape {variable.shape}")
        variable[...] = jnp.asarray(array, dtype=variable.dtype)
        written.add(key)
    missing = [k for k in variables if k not in written
               and not (is_classifier and k.startswith("head."))]
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} variables of {type(backbone).__name__}, "
                       f"first: {missing[:5]}")
    if is_classifier:
        _load_head(model, variables, head_arrays, model.info.classifier + ".")
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


def _import_reader(module: str, needs: str) -> Any:
    """The optional package `module` that reads a checkpoint, or ImportError saying what `needs`
    it ("reading x.pth needs torch (pip install torch)")."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(needs) from error


def _torch_needed(path: Path) -> str:
    return f"reading {path} needs torch (pip install torch)"


def _timm_needed(name: str) -> str:
    return f"pretrained 'timm:{name}' needs timm and torch installed (pip install timm torch)"


def _read_torch_checkpoint(path: Path) -> dict[str, Any]:
    """A `.pth`/`.pt` file's state_dict, unwrapped from {'state_dict'|'model': ...}/'module.'."""
    torch = _import_reader("torch", _torch_needed(path))
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
    timm = _import_reader("timm", _timm_needed(name))
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


def flat_leaves(tree: Any) -> dict[str, Any]:
    """Dotted path -> every leaf of `tree` (a trailing Variable `value` dropped from the path)."""
    leaves = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        leaves[".".join(names[:-1] if names[-1] == "value" else names)] = leaf
    return leaves


def _restore_weights(model: nnx.Module, directory: Path) -> nnx.Module:
    """Load an orbax checkpoint written by `save_weights` into `model` in place.

    Every variable outside a Classifier's head must be in the checkpoint with the model's shape
    and vice versa, else ValueError naming the first that is not. The stored head is loaded as
    `load_timm_weights` loads a classifier: only when it is exactly the model's head variables
    with their shapes (a 1000-class head does not fit a 260-class model, a linear head not an
    ML-Decoder or CSRA head); otherwise the head keeps its initialisation and a message says why.
    """
    import orbax.checkpoint as ocp
    from annotate.models.heads import Classifier

    is_classifier = isinstance(model, Classifier)

    def in_head(key: str) -> bool:
        return is_classifier and key.startswith("head.")

    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(directory.absolute())
    metadata = getattr(metadata, "item_metadata", metadata)  # check_pretrained: a checkpoint
    stored = {key: tuple(leaf.shape) for key, leaf in flat_leaves(metadata).items()}
    variables = _flat_variables(model)
    expected = {key: tuple(variable.shape) for key, variable in variables.items()}
    for key in sorted(k for k in stored.keys() | expected.keys() if not in_head(k)):
        if stored.get(key) != expected.get(key):
            raise ValueError(f"orbax checkpoint {directory} does not fit {type(model).__name__}: "
                             f"{key!r} is {stored.get(key, 'absent')} in the checkpoint, "
                             f"{expected.get(key, 'absent')} in the model")
    abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), metadata)
    arrays = flat_leaves(checkpointer.restore(directory.absolute(), abstract))
    for key, array in arrays.items():
        if not in_head(key):
            variables[key][...] = jnp.asarray(array, dtype=variables[key].dtype)
    if is_classifier:
        _load_head(model, variables, {key: (key, np.asarray(array))
                                      for key, array in arrays.items() if in_head(key)}, "head.")
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


def check_pretrained(spec: str) -> None:
    """What loading `spec` meets before any weights are read, raised at once (a run checks it
    before it decodes its data): a missing file (FileNotFoundError), an unknown format
    (PretrainedError), a reader that is not installed (ImportError)."""
    if spec.startswith("timm:"):
        _import_reader("timm", _timm_needed(spec.removeprefix("timm:")))
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist (expected a .pth/"
                                f".pt/.bin/.safetensors file, an orbax directory or timm:<name>)")
    if path.is_dir():
        from orbax.checkpoint.path import format_utils  # its files, without reading (or warning)

        if not format_utils.is_pytree_checkpoint(path):
            raise PretrainedError(f"{path} is not an orbax checkpoint written by save_weights (no "
                                  f"orbax arrays in it); a folder must hold one, a timm checkpoint "
                                  f"is a .pth/.pt/.bin/.safetensors file")
        return
    if path.suffix == ".safetensors":
        _import_reader("safetensors.numpy", f"reading {path} needs the safetensors package")
    elif path.suffix in _TORCH_SUFFIXES:
        _import_reader("torch", _torch_needed(path))
    else:
        raise PretrainedError(f"pretrained checkpoint {path}: unknown format {path.suffix!r}; "
                              f"use .pth/.pt/.bin/.safetensors, an orbax directory or "
                              f"timm:<name>")


def _load_pretrained(model: nnx.Module, spec: str) -> nnx.Module:
    check_pretrained(spec)
    if spec.startswith("timm:"):
        return load_timm_weights(model, _timm_pretrained_state_dict(spec.removeprefix("timm:")))
    path = Path(spec).expanduser()
    if path.is_dir():
        return _restore_weights(model, path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file  # check_pretrained: installed
        try:
            state_dict = load_file(path)
        except Exception as error:  # safetensors' own error type for a damaged header or data
            raise PretrainedError(f"{path} is not a readable safetensors file "
                                  f"({type(error).__name__}: {_first_line(error)})") from error
        return load_timm_weights(model, state_dict)
    return load_timm_weights(model, _read_torch_checkpoint(path))  # a torch file, checked
