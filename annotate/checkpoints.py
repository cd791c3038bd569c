"""A run's checkpoints: orbax's manager of workdir/checkpoints (the latest and the best epoch) and
the TrainState written packed, one array per dtype.

Each checkpoint `<epoch>/` holds two orbax items: `state`, the state's arrays flattened and
concatenated into one array per dtype ({"float32": [N], "int32": [M]}), and `layout`
(`layout/layout.json`), every array's dotted name, shape and dtype in packing order. Orbax's work
is per array: TResNet-M's TrainState is 889 arrays, and a save of them one by one took 1.96 s on
this project's CPU, packed 0.79 s (2.38 s with zstd, as the loop saved before); a save runs in
the background beside the next epoch, whose own save waits for it, and holds one packed copy of
the state on the device until it is written (docs/results.md, "Checkpoint saves";
`scripts/benchmark.py checkpoint`). Arrays are written without orbax's default zstd
compression, which shrank trained-like float32 values by 7.6% for 2.7 times the CPU time.
Checkpoints of earlier versions (one orbax item `default`, an array per leaf) are read as before.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from annotate.convert import flat_leaves
from annotate.devices import put
from annotate.workdir import CheckpointMismatchError, WorkdirError

STATE, LAYOUT = "state", "layout"  # the items of a checkpoint
LAYOUT_FILE = "layout.json"  # in the layout item's folder
EARLIER = "default"  # the one item of an earlier version's checkpoint, an array per leaf

Layout = list[tuple[str, tuple[int, ...], str]]  # (dotted name, shape, dtype) in packing order


def _rank(metrics: dict[str, float]) -> tuple[float, int]:
    """Order of checkpoints by their saved metrics: the higher selection value, then the earlier
    epoch (a later epoch that only ties does not replace the best)."""
    return metrics["selection"], -metrics["epoch"]


def checkpoint_manager(workdir: Path, *, compression: bool = False) -> ocp.CheckpointManager:
    """The orbax manager of workdir/checkpoints (checkpoint numbers are completed epochs). Its
    preservation policy keeps two: the latest (to resume) and the best by selection value (to
    evaluate), which orbax ranks from the metrics saved with each checkpoint. `compression`
    (zstd, orbax's default) is only for benchmark.py's comparison."""
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=1),
        ocp.checkpoint_managers.BestN(get_metric_fn=_rank, n=1)])
    options = ocp.CheckpointManagerOptions(create=True, best_fn=_rank, best_mode="max",
                                           preservation_policy=policy)
    handlers = {STATE: ocp.PyTreeCheckpointHandler(use_compression=compression),
                LAYOUT: ocp.JsonCheckpointHandler(filename=LAYOUT_FILE)}
    return ocp.CheckpointManager(workdir / "checkpoints", options=options, item_handlers=handlers)


def layout(tree: Any) -> Layout:
    """(dotted name, shape, dtype) of every array of `tree`, in the order `pack` concatenates;
    ValueError when two arrays share a dotted name (their slices could not be told apart)."""
    named, count = flat_leaves(tree), len(jax.tree.leaves(tree))
    if len(named) != count:
        raise ValueError(f"arrays of the state share a dotted name ({count} arrays, "
                         f"{len(named)} names); rename the key that holds a dot")
    return [(name, tuple(leaf.shape), str(jnp.dtype(leaf.dtype))) for name, leaf in named.items()]


@jax.jit
def pack(tree: Any) -> dict[str, jax.Array]:
    """The arrays of `tree` flattened and concatenated, one array per dtype, in leaf order."""
    parts: dict[str, list[jax.Array]] = {}
    for leaf in jax.tree.leaves(tree):
        parts.setdefault(str(jnp.dtype(leaf.dtype)), []).append(jnp.ravel(leaf))
    return {dtype: jnp.concatenate(arrays) for dtype, arrays in parts.items()}


def _slices(saved: Layout) -> dict[str, tuple[str, int, tuple[int, ...]]]:
    """name -> (dtype, offset into that dtype's packed array, shape)."""
    offsets: dict[str, int] = {}
    slices = {}
    for name, shape, dtype in saved:
        start = offsets.get(dtype, 0)
        slices[name] = (dtype, start, tuple(shape))
        offsets[dtype] = start + math.prod(shape)
    return slices


def save_checkpoint(manager: ocp.CheckpointManager, epoch: int, state: Any,
                    selection: float) -> None:
    """Start the background save of `state` (packed) as checkpoint `epoch`, ranked by `selection`
    (train.selection_value); orbax first waits for the previous save to finish."""
    arrays = [[name, list(shape), dtype] for name, shape, dtype in layout(state)]
    manager.save(epoch, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeSave(pack(state)), LAYOUT: ocp.args.JsonSave({"arrays": arrays})}),
        metrics={"selection": selection, "epoch": epoch})


def _stored_tree(item: Path) -> Any:
    """The tree of arrays (shapes, dtypes) that orbax's metadata of item folder `item` lists."""
    with contextlib.closing(ocp.PyTreeCheckpointHandler()) as reader:
        metadata = reader.metadata(item)
    return getattr(metadata, "item_metadata", metadata)


def _read_layout(path: Path) -> Layout:
    """The layout of checkpoint folder `path`: its `layout` item, or, for an earlier version's
    checkpoint, its arrays' orbax metadata."""
    if (path / EARLIER).is_dir():
        return layout(_stored_tree(path / EARLIER))
    arrays = json.loads((path / LAYOUT / LAYOUT_FILE).read_text())["arrays"]
    return [(str(name), tuple(int(n) for n in shape), str(dtype)) for name, shape, dtype in arrays]


def _require_packed(slices: dict[str, tuple[str, int, tuple[int, ...]]], stored: Any) -> None:
    """ValueError when the packed arrays that orbax's metadata lists (`stored`) do not hold the
    values the layout's `slices` end at (one of the two damaged), before any array is read."""
    held = {dtype: tuple(array.shape) for dtype, array in dict(stored or {}).items()}
    listed = {dtype: (start + math.prod(shape),) for dtype, start, shape in slices.values()}
    if held != listed:
        raise ValueError(f"its layout lists {listed} values per dtype, its arrays hold {held}")


def _require_fit(saved: Layout, model: Layout, epoch: int, directory: Path) -> None:
    """CheckpointMismatchError naming the first array that the checkpoint lacks, holds besides
    the model's, or holds with another shape (e.g. another label count)."""
    saved_shapes = {name: shape for name, shape, _ in saved}
    model_shapes = {name: shape for name, shape, _ in model}
    differ = [f"{name} is {saved_shapes[name]} in the checkpoint, {shape} in the model"
              for name, shape in model_shapes.items()
              if name in saved_shapes and saved_shapes[name] != shape]
    missing = sorted(model_shapes.keys() - saved_shapes.keys())
    extra = sorted(saved_shapes.keys() - model_shapes.keys())
    differ += [f"{name} is not in the checkpoint" for name in missing]
    differ += [f"the checkpoint holds {name}, which the model has not" for name in extra]
    if differ:
        more = f" (and {len(differ) - 1} more arrays)" if len(differ) > 1 else ""
        hint = ("; a checkpoint from before EMA averaged the BatchNorm statistics too: retrain, "
                "or use the version that trained it"
                if any(name.startswith("ema_batch_stats") for name in missing) else "")
        raise CheckpointMismatchError(f"checkpoint {epoch} in {directory} does not fit this "
                                      f"run's model: {differ[0]}{more}{hint}")


def _read_arrays(path: Path, saved: Layout) -> dict[str, np.ndarray]:
    """Host copies of the arrays of checkpoint folder `path`, whose layout is `saved`, by dotted
    name: the packed arrays read as numpy and sliced (views; no device work, nothing to
    compile), or an earlier version's arrays one by one."""
    earlier = (path / EARLIER).is_dir()
    item = path / (EARLIER if earlier else STATE)
    stored = _stored_tree(item)
    slices = _slices(saved)
    if not earlier:
        _require_packed(slices, stored)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
    with contextlib.closing(ocp.Checkpointer(ocp.PyTreeCheckpointHandler())) as reader:
        restored = reader.restore(item, ocp.args.PyTreeRestore(restore_args=as_numpy))
    if earlier:
        return {name: np.asarray(array) for name, array in flat_leaves(restored).items()}
    return {name: restored[dtype][start:start + math.prod(shape)].reshape(shape)
            for name, (dtype, start, shape) in slices.items()}


def restore_state(manager: ocp.CheckpointManager, epoch: int, like: Any) -> Any:
    """Checkpoint `epoch` of `manager`, laid out (shapes, dtypes, shardings) like `like`'s arrays;
    CheckpointMismatchError when its arrays are not the model's (another dataset's label count,
    a config that keeps other state), read from its layout before any array is read (a restore
    that fails part-way leaves orbax's reads pending, and they print tracebacks when Python
    exits); WorkdirError calling it damaged when it fits but cannot be read. An error of putting
    the arrays on the devices (out of memory) is raised as it is: the checkpoint is not at fault."""
    model = layout(like)
    directory = Path(manager.directory)
    path = directory / str(epoch)
    try:
        saved, unreadable = _read_layout(path), None
    except Exception as error:  # the restore below names the damage
        saved, unreadable = None, error
    if saved is not None:
        _require_fit(saved, model, epoch, directory)
    try:
        if unreadable is not None:
            raise ValueError(f"its {LAYOUT} cannot be read: {type(unreadable).__name__}: "
                             f"{unreadable}") from unreadable
        arrays = _read_arrays(path, saved)
    except Exception as error:  # what fits its layout but cannot be read: a damaged file
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        cause = f"{type(error).__name__}: {' '.join(lines[:8])[:600]}"
        raise WorkdirError(f"checkpoint {epoch} in {directory} cannot be read, damaged? "
                           f"({cause}); delete that folder to resume from an earlier checkpoint, "
                           f"if one is left") from error
    leaves = [put(np.asarray(arrays[name], dtype=leaf.dtype), leaf.sharding)  # cast, no copy
              for (name, _, _), leaf in zip(model, jax.tree.leaves(like))]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Host copies of the arrays of checkpoint folder `path` (workdir/checkpoints/<epoch>) by
    dotted name, without the model: for inspecting a checkpoint, and for the tests."""
    return _read_arrays(path, _read_layout(path))


def has_checkpoint(workdir: Path) -> bool:
    """Whether `workdir` holds a finished checkpoint (orbax renames a checkpoint's temporary
    folder to its epoch number only once it is complete)."""
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(path.name.isdigit() for path in directory.iterdir())


def require_checkpoint(workdir: Path) -> None:
    """FileNotFoundError when `workdir` holds no finished checkpoint (an evaluation checks it
    before it decodes any data)."""
    if not has_checkpoint(workdir):
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}; train first")


def restore_best(workdir: Path, like: Any) -> tuple[Any, int]:
    """The best checkpoint of `workdir` (laid out like `like`) and its epoch; FileNotFoundError
    when the workdir holds none."""
    require_checkpoint(workdir)  # before the manager, which would create the folder
    with contextlib.closing(checkpoint_manager(workdir)) as manager:  # its threads end with it
        best_epoch = manager.best_step()
        if best_epoch is None:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}; train first")
        return restore_state(manager, best_epoch, like), best_epoch
