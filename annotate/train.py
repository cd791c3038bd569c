"""Training and evaluation: the seed's recipe as one sharded, jitted train step over on-device data.

With config.data.pipeline "device" (the default) the whole decoded split sits on the
accelerators as uint8 (replicated over the mesh); with "stream", grain threads decode each batch
on the host (annotate.data.stream). Each step receives the batch (with "device", its indices,
sharded along the "data" axis) and does gather, random flips, normalisation, the compute-dtype
cast, forward, loss, gradients, the optax update and the BatchNorm statistics update inside one
`jax.jit`. The model is split once into a static graph
and a pure `TrainState`; every random number derives from (config.seed, epoch, step), so a run
resumed from its latest checkpoint ends with exactly the parameters of an uninterrupted one (on
the CPU, as tested; on a GPU as far as XLA's kernels are deterministic).

Workdir layout: config.json, vocabulary.json (the labels of the outputs), metrics.jsonl,
tensorboard/, checkpoints/<epoch>/ (the latest and the best epoch); the apps write the reports
of the evaluation beside them (annotate.reports).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from annotate import convert, data, losses, metrics, models, training_log
from annotate.checkpoints import (checkpoint_manager, has_checkpoint, require_checkpoint,
                                  restore_best, restore_state, save_checkpoint)
from annotate.config import (head_options, loss_hyper, normalisation, resolved_config,
                             validate_config)
from annotate.devices import make_mesh, put, replicated, to_host
from annotate.run_data import (VOCABULARY_RECORD, DeviceSplit, RunData, StreamSplit,
                               check_before_decoding, check_validation_images, check_vocabulary,
                               load_data, record_validation_images)
from annotate.workdir import (CheckpointSaveError, WorkdirError, WorkdirLock, check_config,
                              require_folder, write_atomically, write_config)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- optimisation

def one_cycle(total_steps: int, pct_start: float, initial: float, peak: float,
              final: float) -> Callable[[jax.Array], jax.Array]:
    """torch's OneCycleLR curve (two phases, cosine annealing) from `initial` to `peak` over the
    first `pct_start` of `total_steps`, then to `final`; also its momentum curve (peak < initial).

    torch's (cos(pi pct) + 1) / 2 is computed as sin^2(pi rest / 2), rest = 1 - pct from the steps
    left: in float32 the cosine form cancels near a phase's end (the tiny learning rates, ~1e-9,
    of the last 1.5% of 11,200 steps were up to 0.3% off torch's); this form is within 1e-5 of
    torch's, relatively, at every step."""
    warmup_end = float(pct_start * total_steps) - 1  # torch's phase boundaries, as floats
    last = float(total_steps - 1)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warming = step <= warmup_end
        rest = jnp.where(warming, (warmup_end - step) / max(warmup_end, 1e-12),
                         (last - step) / max(last - warmup_end, 1e-12))
        start = jnp.where(warming, initial, peak)
        end = jnp.where(warming, peak, final)
        return end + (start - end) * jnp.sin(jnp.pi / 2 * rest) ** 2

    return schedule


TORCH_ADAM_BETA1 = 0.9  # torch.optim.Adam's default, which only a cycling OneCycleLR changes


def learning_rate_and_beta1(config: ml_collections.ConfigDict, total_steps: int
                            ) -> tuple[Callable | float, Callable | float]:
    """The learning-rate and Adam beta1 schedules of torch's OneCycleLR (beta1 cycles with
    cycle_momentum, else stays at torch Adam's 0.9), or constants for schedule="constant"."""
    train = config.train
    if train.schedule == "constant":
        return train.learning_rate, TORCH_ADAM_BETA1
    initial = train.learning_rate / train.div_factor
    learning_rate = one_cycle(total_steps, train.pct_start, initial, train.learning_rate,
                              initial / train.final_div_factor)
    if not train.cycle_momentum:
        return learning_rate, TORCH_ADAM_BETA1
    beta1 = one_cycle(total_steps, train.pct_start, train.max_momentum, train.base_momentum,
                      train.max_momentum)
    return learning_rate, beta1


def _adam(learning_rate: float, b1: float, *, b2: float, weight_decay: float,
          decoupled: bool) -> optax.GradientTransformation:
    """Adam with torch semantics: weight decay added to the gradient (torch Adam) or decoupled
    (torch AdamW, decay scaled by the learning rate)."""
    if decoupled:
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay)
    coupled_decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    return optax.chain(*coupled_decay, optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8),
                       optax.scale_by_learning_rate(learning_rate))


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int
                   ) -> optax.GradientTransformation:
    """Adam/AdamW whose learning rate and beta1 follow the configured schedule; the current values
    live in opt_state.hyperparams (optax.inject_hyperparams)."""
    learning_rate, beta1 = learning_rate_and_beta1(config, total_steps)
    return optax.inject_hyperparams(_adam, static_args=("b2", "weight_decay", "decoupled"))(
        learning_rate=learning_rate, b1=beta1, b2=config.train.beta2,
        weight_decay=config.train.weight_decay, decoupled=config.train.optimizer == "adamw")


# --------------------------------------------------------------------------- state and steps

Variables = dict[str, Any]  # a model's parameters or statistics as nested dicts of arrays


@struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree, checkpointed as a whole.

    Parameters and statistics are plain nested dicts of arrays (`nnx.to_pure_dict`), not
    `nnx.State`s of Variables: every jitted call flattens its arguments and rebuilds its outputs,
    and rebuilding ~900 Variable objects per step costs milliseconds of host time.
    """

    step: jax.Array
    params: Variables
    batch_stats: Variables
    opt_state: optax.OptState
    ema_params: Variables | None = None  # with train.ema_decay > 0: averages of params and
    ema_batch_stats: Variables | None = None  # batch_stats, as timm's ModelEmaV2 (whole state)


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of a split model: train- and eval-mode graphs, and the dropout RNG streams
    (a template, reseeded from the step key at every call)."""

    train_graph: nnx.GraphDef
    eval_graph: nnx.GraphDef
    rng_state: nnx.State


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How uint8 images become network inputs: flips (train only), /255, mean/std, dtype cast."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip_horizontal: bool
    flip_vertical: bool
    dtype: Any

    def __call__(self, images_u8: jax.Array, key: jax.Array | None) -> jax.Array:
        """uint8 [B, H, W, 3] -> normalised [B, H, W, 3] in `dtype`; key None = no flips."""
        if key is not None:
            horizontal_key, vertical_key = jax.random.split(key)
            shape = (images_u8.shape[0], 1, 1, 1)
            if self.flip_horizontal:
                flip = jax.random.bernoulli(horizontal_key, 0.5, shape)
                images_u8 = jnp.where(flip, images_u8[:, :, ::-1], images_u8)
            if self.flip_vertical:
                flip = jax.random.bernoulli(vertical_key, 0.5, shape)
                images_u8 = jnp.where(flip, images_u8[:, ::-1], images_u8)
        x = images_u8.astype(jnp.float32) / 255.0
        x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
        return x.astype(self.dtype)


def split_model(model: nnx.Module) -> tuple[ModelDef, Variables, Variables]:
    """Split `model` into its static ModelDef, parameters and BatchNorm statistics (pure dicts,
    which `nnx.merge` accepts in place of States)."""
    model.eval()
    eval_graph = nnx.graphdef(model)
    model.train()
    train_graph, params, batch_stats, rng_state = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return (ModelDef(train_graph, eval_graph, rng_state), nnx.to_pure_dict(params),
            nnx.to_pure_dict(batch_stats))


def reseeded(rng_state: nnx.State, key: jax.Array) -> nnx.State:
    """The model's RNG streams restarted from `key`: stream i gets fold_in(key, i), count 0."""
    leaves, treedef = jax.tree.flatten(rng_state)
    fresh = [jax.random.fold_in(key, i) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
             else jnp.zeros_like(leaf) for i, leaf in enumerate(leaves)]
    return jax.tree.unflatten(treedef, fresh)


def train_step(state: TrainState, images: jax.Array, targets: jax.Array,
               batch_indices: jax.Array, key: jax.Array, *, model_def: ModelDef,
               tx: optax.GradientTransformation, loss_fn: Callable, preprocess: Preprocess,
               ema_decay: float, batch_sharding: NamedSharding) -> tuple[TrainState, jax.Array]:
    """One optimisation step on images[batch_indices]; flips and dropout draw from
    fold_in(key, state.step), so the step is a pure function of its inputs."""
    flip_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
    batch = jax.lax.with_sharding_constraint(images[batch_indices], batch_sharding)
    inputs = preprocess(batch, flip_key)
    batch_targets = targets[batch_indices]

    def loss_and_batch_stats(params: Variables, batch_stats: Variables,
                             rng_state: nnx.State) -> tuple[jax.Array, Variables]:
        model = nnx.merge(model_def.train_graph, params, batch_stats, rng_state, copy=True)
        loss = loss_fn(model(inputs).astype(jnp.float32), batch_targets)
        return loss, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    (loss, batch_stats), grads = jax.value_and_grad(loss_and_batch_stats, has_aux=True)(
        state.params, state.batch_stats, reseeded(model_def.rng_state, dropout_key))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                          opt_state=opt_state)
    if state.ema_params is not None:
        ema_params, ema_batch_stats = jax.tree.map(
            lambda e, v: ema_decay * e + (1 - ema_decay) * v,
            (state.ema_params, state.ema_batch_stats), (params, batch_stats))
        state = state.replace(ema_params=ema_params, ema_batch_stats=ema_batch_stats)
    return state, loss


def train_steps(state: TrainState, images: jax.Array, targets: jax.Array,
                batch_indices: jax.Array, key: jax.Array, **step_options: Any
                ) -> tuple[TrainState, jax.Array]:
    """`batch_indices.shape[0]` consecutive train steps (batch_indices [K, B]) in one call: one
    dispatch and one output transfer per K steps instead of per step, so that a short step
    (224 px on a GPU) is not bound by the host. K > 1 is a `lax.scan`; K = 1 is the plain step
    (XLA:CPU runs a loop body's convolutions about 3x slower). Returns the state and K losses."""
    if batch_indices.shape[0] == 1:
        state, loss = train_step(state, images, targets, batch_indices[0], key, **step_options)
        return state, loss[None]

    def step(state: TrainState, indices: jax.Array) -> tuple[TrainState, jax.Array]:
        return train_step(state, images, targets, indices, key, **step_options)

    return jax.lax.scan(step, state, batch_indices)


def predict_step(params: Variables, batch_stats: Variables, images: jax.Array,
                 batch_indices: jax.Array, *, model_def: ModelDef, preprocess: Preprocess,
                 batch_sharding: NamedSharding) -> jax.Array:
    """Eval-mode sigmoid probabilities [B, C] of images[batch_indices] (no flips, no dropout)."""
    batch = jax.lax.with_sharding_constraint(images[batch_indices], batch_sharding)
    model = nnx.merge(model_def.eval_graph, params, batch_stats, model_def.rng_state)
    return jax.nn.sigmoid(model(preprocess(batch, None)).astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class Experiment:
    """The static parts of a run: its config, mesh and the two jitted, sharded steps (which hold
    the model's structure and the optimizer)."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    train_steps: Callable[..., tuple[TrainState, jax.Array]]
    predict_step: Callable[..., jax.Array]

    @property
    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec("data"))

    @property
    def steps_sharding(self) -> NamedSharding:
        """Layout of train_steps' [K, B] batch indices: each step's batch split over "data"."""
        return NamedSharding(self.mesh, PartitionSpec(None, "data"))

    @property
    def local_positions(self) -> list[int]:
        """Positions in the mesh of this process's devices (contiguous: jax orders the devices
        by process)."""
        return [i for i, device in enumerate(self.mesh.devices.flat)
                if device.process_index == jax.process_index()]


def create_experiment(config: ml_collections.ConfigDict, num_classes: int, total_steps: int,
                      mesh: Mesh, *, load_pretrained: bool = True) -> tuple[Experiment, TrainState]:
    """Build the model, optimizer, jitted steps and the initial TrainState, replicated over `mesh`;
    `total_steps` is the schedule's length (1 where the experiment only restores a checkpoint and
    predicts: the schedule never runs, and the optimizer state's layout does not depend on it).

    config.model.pretrained is loaded only with `load_pretrained`: a run that restores a checkpoint
    (resume, evaluation, prediction) takes its weights from there, not from the network or disk.
    """
    model = models.create_model(config.model.name, num_classes, head=config.model.head,
                                dtype=jnp.dtype(config.model.dtype), seed=config.seed,
                                **head_options(config))
    if config.model.pretrained and load_pretrained:
        convert.load_pretrained(model, config.model.pretrained)
    model_def, params, batch_stats = split_model(model)
    tx = make_optimizer(config, total_steps)
    ema = (params, batch_stats) if config.train.ema_decay > 0 else (None, None)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params), ema_params=ema[0], ema_batch_stats=ema[1])
    layout = Experiment(config, mesh, train_steps=None, predict_step=None)  # its shardings
    replicated, batch_sharding = layout.replicated, layout.batch_sharding
    # "device": the whole split on every device; "stream": each call's images only, split over
    # "data" in the layout of stream_chunk (every device gathers from its own rows)
    images_sharding = batch_sharding if config.data.pipeline == "stream" else replicated
    mean, std = normalisation(config)
    preprocess = Preprocess(mean, std, config.train.flip_horizontal, config.train.flip_vertical,
                            jnp.dtype(config.model.dtype))
    jitted_train = jax.jit(
        functools.partial(train_steps, model_def=model_def, tx=tx,
                          loss_fn=losses.make_loss(config.loss.name, **loss_hyper(config)),
                          preprocess=preprocess, ema_decay=config.train.ema_decay,
                          batch_sharding=batch_sharding),
        in_shardings=(replicated, images_sharding, images_sharding,
                      layout.steps_sharding, replicated),
        out_shardings=(replicated, replicated), donate_argnums=0)
    jitted_predict = jax.jit(
        functools.partial(predict_step, model_def=model_def, preprocess=preprocess,
                          batch_sharding=batch_sharding),
        in_shardings=(replicated, replicated, images_sharding, batch_sharding),
        out_shardings=replicated)
    state = jax.tree.map(lambda leaf: put(np.asarray(leaf), replicated), state)
    return dataclasses.replace(layout, train_steps=jitted_train, predict_step=jitted_predict), state


def stream_chunk(experiment: Experiment, split: StreamSplit, local_images: np.ndarray,
                 rows: np.ndarray) -> tuple[jax.Array, jax.Array, np.ndarray]:
    """A call's images, targets and [K, B] gather indices in the "stream" layout: each device's
    rows of K batches, device after device, so that the gather stays on the device.
    `local_images` [K, L * b, S, S, 3] are this process's rows of the K batches (L local devices,
    b = B / devices each), `rows` [K, B] the image indices of the K whole batches."""
    from annotate.data import stream  # grain: only for the "stream" pipeline

    steps, batch = rows.shape
    devices, local = experiment.mesh.size, len(experiment.local_positions)
    per_device = batch // devices

    def device_major(values: np.ndarray) -> np.ndarray:  # [K, L*b, ...] -> [L*K*b, ...]
        values = values.reshape(steps, local, per_device, *values.shape[2:])
        return np.swapaxes(values, 0, 1).reshape(local * steps * per_device, *values.shape[3:])

    this_process = stream.local_rows(rows.reshape(-1), batch, experiment.local_positions, devices)
    local_targets = split.sources.targets[this_process.reshape(steps, -1)]
    global_shape = lambda v: (devices * steps * per_device, *v.shape[1:])  # noqa: E731
    images, targets = (jax.make_array_from_process_local_data(
        experiment.batch_sharding, values, global_shape(values))
        for values in (device_major(local_images), device_major(local_targets)))
    position = np.arange(steps * batch).reshape(devices, steps, per_device)  # row of each entry
    return images, targets, np.swapaxes(position, 0, 1).reshape(steps, batch).astype(np.int32)


def predict(experiment: Experiment, params: Variables, batch_stats: Variables,
            split: "DeviceSplit | StreamSplit") -> np.ndarray:
    """Sigmoid probabilities [N, C] of all images of `split`, in chunks of eval_batch_size
    (rounded to the device count; the last chunk is padded by repeating the last image);
    a streamed split is decoded chunk by chunk."""
    num_images, devices = split.num_images, experiment.mesh.size
    chunk = min(experiment.config.train.eval_batch_size, num_images)
    chunk = -(-chunk // devices) * devices
    starts = range(0, num_images, chunk)
    padded = [np.minimum(np.arange(start, start + chunk), num_images - 1) for start in starts]
    if isinstance(split, StreamSplit):
        from annotate.data import stream  # grain: only for the "stream" pipeline

        local = len(experiment.local_positions) * (chunk // devices)
        rows = np.concatenate([stream.local_rows(indices, chunk, experiment.local_positions,
                                                 devices) for indices in padded])
        decoded = stream.decoded_batches(split.sources, rows, local, split.image_size)
    probs = []
    for indices in padded:
        if isinstance(split, StreamSplit):
            images, _, positions = stream_chunk(experiment, split, next(decoded)[None],
                                                indices[None])
            probs.append(experiment.predict_step(params, batch_stats, images,
                                                 put(positions[0], experiment.batch_sharding)))
        else:
            probs.append(experiment.predict_step(params, batch_stats, split.images,
                                                 put(indices.astype(np.int32),
                                                     experiment.batch_sharding)))
    return np.concatenate([to_host(p) for p in probs])[:num_images]


def eval_variables(state: TrainState) -> tuple[Variables, Variables]:
    """The parameters and BatchNorm statistics to evaluate: their moving averages when EMA is on
    (timm's ModelEmaV2 averages the whole state dict), else the trained ones."""
    if state.ema_params is not None:
        return state.ema_params, state.ema_batch_stats
    return state.params, state.batch_stats


# --------------------------------------------------------------------------- selection

SELECTION_METRIC = "per_class_f1"  # chooses the checkpoint under protocols "seed", "validation"


def selection_value(protocol: str, epoch: int, epoch_metrics: dict[str, float]) -> float:
    """What ranks an epoch's checkpoint: SELECTION_METRIC of the monitored split (test under
    "seed", the validation images under "validation"), or the epoch itself under "final", whose
    evaluated checkpoint is the last."""
    return float(epoch) if protocol == "final" else float(epoch_metrics[SELECTION_METRIC])


# --------------------------------------------------------------------------- the loop

CPU_WARNING_SECONDS = 3600.0  # a CPU run estimated longer than this gets a one-line warning
ESTIMATE_AFTER_SECONDS = 10.0  # timed steps this long suffice for train_epoch's estimate


def _check_steps_per_epoch(trained_steps: int, epochs: int, steps_per_epoch: int,
                           num_images: int, batch_size: int) -> None:
    """WorkdirError when the `epochs` checkpointed took another number of steps each than this
    run's epochs take: the training images changed (their count), and OneCycle, laid out over
    the run's steps, would jump."""
    if trained_steps != epochs * steps_per_epoch:
        raise WorkdirError(
            f"the {epochs} epoch(s) in the checkpoint took {trained_steps / epochs:g} steps each, "
            f"this run's take {steps_per_epoch} ({num_images} training images at batch "
            f"{batch_size}): the training images changed since, and the learning-rate "
            f"schedule would jump; resume with the images it started with, or use another "
            f"--workdir")


def _epoch_permutation(key: jax.Array, epoch: int, num_images: int) -> np.ndarray:
    """The image order of `epoch`: a permutation drawn from fold_in(key, epoch)."""
    return np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), num_images))


def _check_finite(losses_so_far: np.ndarray, first_step: int, epoch: int,
                  steps_per_epoch: int) -> None:
    bad = np.flatnonzero(~np.isfinite(losses_so_far))
    if bad.size:
        step = first_step + int(bad[0])
        raise FloatingPointError(
            f"non-finite training loss {losses_so_far[bad[0]]} at step {step} (epoch {epoch}, "
            f"batch {(step - 1) % steps_per_epoch + 1}/{steps_per_epoch}); training stopped, the "
            f"checkpoints of the last completed epoch are intact")


def steps_per_call(steps_per_epoch: int, log_every: int, platform: str) -> int:
    """Train steps per dispatch on `platform` ("cpu", "gpu", "tpu"): on an accelerator the largest
    divisor of `steps_per_epoch` not above `log_every` (the loop reads the losses back once per
    call; every call has one compiled shape); on the CPU 1, since the host dispatches far faster
    than a CPU step and XLA:CPU runs a scan's body about 3x slower (ResNet-18 at 32 px: 27
    against 76 images/s, docs/measurements/2026-11-29-cpu-scan-steps-per-call.jsonl)."""
    if platform == "cpu":
        return 1
    return max(k for k in range(1, min(log_every, steps_per_epoch) + 1) if steps_per_epoch % k == 0)


def train_epoch(experiment: Experiment, state: TrainState, train_split: DeviceSplit | StreamSplit,
                epoch: int,
                order_key: jax.Array, step_key: jax.Array, *, show_progress: bool,
                on_step_time: Callable[[float], None] | None = None,
                check_saves: Callable[[], None] | None = None
                ) -> tuple[TrainState, float, float]:
    """Run epoch `epoch` (1-based) over the permutation fold_in(order_key, epoch), K steps per
    dispatch (steps_per_call), showing loss and images/s; returns (state, mean loss, seconds).
    `on_step_time(seconds per step)` is called once, measured over the steps after the first
    call (which may compile): five, or fewer once they took ESTIMATE_AFTER_SECONDS (one step of
    the seed's recipe on 2 CPU cores takes two minutes); `check_saves()` after every call's
    losses arrive. A non-finite loss raises FloatingPointError."""
    batch_size, num_images = experiment.config.train.batch_size, train_split.num_images
    steps_per_epoch = num_images // batch_size
    chunk = steps_per_call(steps_per_epoch, experiment.config.train.log_every,
                           experiment.mesh.devices.flat[0].platform)
    permutation = _epoch_permutation(order_key, epoch, num_images)
    rows = permutation[:steps_per_epoch * batch_size].astype(np.int32)
    rows = rows.reshape(steps_per_epoch // chunk, chunk, batch_size)
    if isinstance(train_split, StreamSplit):  # this process's rows, decoded ahead by grain
        from annotate.data import stream

        devices, local_devices = experiment.mesh.size, len(experiment.local_positions)
        decoded = stream.decoded_batches(
            train_split.sources, stream.local_rows(permutation, batch_size,
                                                   experiment.local_positions, devices),
            local_devices * batch_size // devices, train_split.image_size)
    first_step = (epoch - 1) * steps_per_epoch + 1
    step_losses: list[np.ndarray] = []
    start_time = time.perf_counter()
    after_first: list[float] = []  # the time the first call's losses arrived
    with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{experiment.config.train.epochs}",
              disable=not show_progress, leave=False) as bar:

        def record(losses_of_chunk: jax.Array) -> None:
            recent = to_host(losses_of_chunk).astype(np.float32)
            _check_finite(recent, first_step + chunk * len(step_losses), epoch, steps_per_epoch)
            step_losses.append(recent)
            bar.update(len(recent))
            images_per_second = chunk * len(step_losses) * batch_size / (
                time.perf_counter() - start_time)
            bar.set_postfix(loss=f"{recent[-1]:.4f}", img_s=f"{images_per_second:.1f}")
            if check_saves is not None:
                check_saves()
            nonlocal on_step_time
            if on_step_time is not None and not after_first:
                after_first.append(time.perf_counter())
            elif on_step_time is not None:
                timed_steps = (len(step_losses) - 1) * chunk
                seconds = time.perf_counter() - after_first[0]
                if (timed_steps >= min(5, steps_per_epoch - chunk)
                        or seconds >= ESTIMATE_AFTER_SECONDS):
                    on_step_time(seconds / timed_steps)
                    on_step_time = None

        pending = None  # the previous call's losses, read while the device runs the next call
        for chunk_rows in rows:
            if isinstance(train_split, StreamSplit):
                local = np.stack([next(decoded) for _ in range(chunk)])
                images, targets, indices = stream_chunk(experiment, train_split, local,
                                                        chunk_rows)
            else:
                images, targets, indices = train_split.images, train_split.targets, chunk_rows
            state, losses_of_chunk = experiment.train_steps(
                state, images, targets, put(indices, experiment.steps_sharding), step_key)
            if pending is not None:
                record(pending)
            pending = losses_of_chunk
        record(pending)
    seconds = time.perf_counter() - start_time
    return state, float(np.mean(np.concatenate(step_losses))), seconds


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path | str) -> Evaluation:
    """Train as configured (resuming from workdir's latest checkpoint), scoring the monitored
    split (RunData.monitored) after each epoch, then evaluate the checkpoint that
    config.eval.protocol selects. The workdir is locked for the run (workdir.WorkdirLock); a
    resume with a config that does not fit its checkpoints is refused (workdir.check_config); a
    workdir whose run stopped before its first checkpoint starts afresh with the new config."""
    validate_config(config)
    config = resolved_config(config)
    workdir = Path(workdir).absolute()
    require_folder(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_writer = jax.process_index() == 0
    with WorkdirLock(workdir) if is_writer else contextlib.nullcontext():
        if has_checkpoint(workdir):  # nothing to resume, nothing to refuse otherwise
            check_config(workdir, config, training=True)
        return _train_and_evaluate(config, workdir, is_writer)


@contextlib.contextmanager
def interrupts_deferred(finishing: str) -> Iterator[None]:
    """Hold back a Ctrl-C (SIGINT raising KeyboardInterrupt) and a SIGTERM where a handler
    raises one (cli.terminate_as_interrupt) until the block ends, saying on stderr that it is
    `finishing` something first, then raise it; a second signal raises at once. A signal handled
    otherwise (SIGINT ignored in a background job, SIGTERM's default) is left alone, and outside
    the main thread nothing changes."""
    sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    previous = {**({signal.SIGINT: sigint} if sigint is signal.default_int_handler else {}),
                **({signal.SIGTERM: sigterm} if callable(sigterm) else {})}  # a Python handler
    if threading.current_thread() is not threading.main_thread() or not previous:
        yield
        return
    received = []

    def hold(signum: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"{name}: {finishing} first ({name} again stops at once)", file=sys.stderr,
              flush=True)

    for signum in previous:
        signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise KeyboardInterrupt


def _checkpoint_error(manager: ocp.CheckpointManager, error: BaseException) -> CheckpointSaveError:
    return CheckpointSaveError(f"saving a checkpoint in {manager.directory} failed "
                               f"({type(error).__name__}: {error}); the run stopped, the "
                               f"checkpoints saved before are intact")


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path,
                        is_writer: bool) -> Evaluation:
    mesh = make_mesh()
    batch_size = config.train.batch_size
    check_before_decoding(config, workdir, mesh.size)
    run_data = load_data(config, mesh)
    train_split = run_data.train
    steps_per_epoch = train_split.num_images // batch_size
    if steps_per_epoch == 0:  # check_before_decoding counted the index; the decoded split differs
        raise RuntimeError(f"the decoded training split holds {train_split.num_images} images, "
                           f"fewer than a batch of {batch_size}, although its index holds more")
    vocabulary = train_split.host.vocabulary
    checkpoints = checkpoint_manager(workdir)
    start_epoch = checkpoints.latest_step() or 0
    try:  # until the loop's own try: a refused start closes the manager (its threads) too
        if start_epoch:
            check_vocabulary(workdir, vocabulary)
        experiment, state = create_experiment(config, len(vocabulary),
                                              config.train.schedule_epochs * steps_per_epoch,
                                              mesh, load_pretrained=not start_epoch)
        if start_epoch:
            state = restore_state(checkpoints, start_epoch, state)
            _check_steps_per_epoch(int(to_host(state.step)), start_epoch, steps_per_epoch,
                                   train_split.num_images, batch_size)
            log.info("resumed from %s, epoch %d", checkpoints.directory, start_epoch)
        if is_writer and run_data.validation is not None:  # checked before config.json
            record_validation_images(run_data, config, workdir, resumed=bool(start_epoch))
        # the records kept (a damaged metrics.jsonl is refused before config.json is written):
        # those of an epoch interrupted before its checkpoint are dropped
        records = ([r for r in training_log.read_metrics(workdir) if r["epoch"] <= start_epoch]
                   if is_writer else [])
    except BaseException:
        checkpoints.close()
        raise
    writer = None
    if is_writer:  # the data load and the model fit: training starts, the workdir records it
        write_config(workdir, config, start_epoch)
        write_atomically(workdir / VOCABULARY_RECORD,
                         json.dumps({"labels": list(vocabulary)}, indent=1) + "\n")
        training_log.rewrite_metrics(workdir, records)
        writer = training_log.MetricsWriter(workdir, first_step=start_epoch * steps_per_epoch + 1)

    def check_saves() -> None:
        """Stop at once when the background save of a checkpoint failed (e.g. a full disk)."""
        try:
            checkpoints.check_for_errors()
        except Exception as error:  # orbax re-raises whatever its writer thread met
            raise _checkpoint_error(checkpoints, error) from error

    root_key = jax.random.key(config.seed)
    order_key, step_key = jax.random.split(root_key)
    step_key = put(jax.random.key_data(step_key), experiment.replicated)
    step_key = jax.random.wrap_key_data(step_key)
    monitor_prefix, monitored = run_data.monitored

    def warn_if_slow_on_cpu(seconds_per_step: float) -> None:
        """No accelerator: say what the run will cost while it goes on (the user may mean it)."""
        remaining = seconds_per_step * steps_per_epoch * (config.train.epochs - start_epoch)
        if remaining > CPU_WARNING_SECONDS:
            tqdm.write(f"warning: no accelerator found; training on the CPU at "
                       f"{seconds_per_step:.2f} s/step, about {remaining / 3600:.1f} h for the "
                       f"{config.train.epochs - start_epoch} epochs to go (for a quick CPU run: "
                       f"make train CONFIG=configs/smoke.py)", file=sys.stderr)

    on_cpu = is_writer and mesh.devices.flat[0].platform == "cpu"
    trained_at = None  # when the previous epoch's training ended
    try:
        for epoch in range(start_epoch + 1, config.train.epochs + 1):
            # the previous epoch's evaluation, record and save (its wait for the save before)
            between = {} if trained_at is None else {
                "train/seconds_between_epochs": time.perf_counter() - trained_at}
            state, train_loss, seconds = train_epoch(
                experiment, state, train_split, epoch, order_key, step_key,
                show_progress=is_writer,
                on_step_time=warn_if_slow_on_cpu if on_cpu and epoch == start_epoch + 1 else None,
                check_saves=check_saves)
            trained_at = time.perf_counter()
            # the epoch is trained: its record and save are kept
            with interrupts_deferred(f"recording epoch {epoch} and saving its checkpoint"):
                probs = predict(experiment, *eval_variables(state), monitored)
                if not np.isfinite(probs).all():  # its losses were finite, the last update not
                    raise FloatingPointError(
                        f"non-finite predictions after epoch {epoch}: training diverged in the "
                        f"epoch's last step; training stopped, the checkpoints of the last "
                        f"completed epoch are intact")
                epoch_metrics = metrics.annotation_metrics(monitored.host.targets, probs)
                hyper = state.opt_state.hyperparams
                record = {"epoch": epoch, "train/loss": train_loss,
                          "train/learning_rate": float(to_host(hyper["learning_rate"])),
                          "train/beta1": float(to_host(hyper["b1"])),
                          "train/epoch_seconds": seconds,
                          "train/images_per_second": steps_per_epoch * batch_size / seconds,
                          **between,
                          **{f"{monitor_prefix}/{k}": v for k, v in epoch_metrics.items()}}
                if writer:
                    writer.write(int(to_host(state.step)), record)
                    log.info("epoch %d: %s", epoch, json.dumps(record))
                selection = selection_value(config.eval.protocol, epoch, epoch_metrics)
                save_checkpoint(checkpoints, epoch, state, selection)
    except BaseException:  # an interrupted or failed run still completes the save already begun
        try:
            checkpoints.close()  # waits for the save, then ends the manager's threads
        except Exception:  # the error in flight is the one to report
            log.exception("a checkpoint save failed too")
        raise
    else:
        try:
            with interrupts_deferred("completing the last checkpoint"):
                checkpoints.close()
        except Exception as error:
            raise _checkpoint_error(checkpoints, error) from error
    finally:
        if writer:
            writer.close()
    return evaluate_best(experiment, state, run_data, workdir)


# --------------------------------------------------------------------------- evaluation

@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The evaluation of a workdir's selected checkpoint: results.json's content (see
    metrics.evaluation_results, plus "protocol" and "best_epoch") and what the reports draw
    from."""

    config: ml_collections.ConfigDict
    results: dict
    test: data.Split
    test_probs: np.ndarray
    num_train_images: int


def evaluate_best(experiment: Experiment, like: TrainState, run_data: RunData,
                  workdir: Path) -> Evaluation:
    """Evaluate the checkpoint the protocol selected: MCC thresholds on RunData.threshold_split,
    metrics and their bootstrap intervals on test (metrics.evaluation_results)."""
    state, best_epoch = restore_best(workdir, like)
    params, batch_stats = eval_variables(state)
    threshold_split, test = run_data.threshold_split, run_data.test
    threshold_probs = predict(experiment, params, batch_stats, threshold_split)
    test_probs = predict(experiment, params, batch_stats, test)
    config = experiment.config
    results = metrics.evaluation_results(
        threshold_split.host.targets, threshold_probs, test.host.targets, test_probs,
        test.host.vocabulary, train_counts=run_data.train.host.targets.sum(axis=0),
        resamples=config.eval.bootstrap_resamples, seed=config.seed)
    results["protocol"] = config.eval.protocol
    results["best_epoch"] = best_epoch
    return Evaluation(config, results, test.host, test_probs, run_data.train.num_images)


def evaluate(config: ml_collections.ConfigDict, workdir: Path | str) -> Evaluation:
    """Evaluate the best checkpoint of `workdir` (trained with `config`); see evaluate_best."""
    validate_config(config)
    config = resolved_config(config)
    workdir = Path(workdir).absolute()
    require_folder(workdir)
    require_checkpoint(workdir)
    check_config(workdir, config)  # evaluating never writes config.json
    with WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        mesh = make_mesh()
        run_data = load_data(config, mesh)
        check_vocabulary(workdir, run_data.train.host.vocabulary)
        if run_data.validation is not None:
            check_validation_images(run_data, config, workdir)
        experiment, state = create_experiment(config, len(run_data.train.host.vocabulary), 1,
                                              mesh, load_pretrained=False)
        return evaluate_best(experiment, state, run_data, workdir)
