"""ML-WGAN training: K independent generator/critic pairs, one image each, in one jitted step.

The seed (augmentation/data_augmentation.py) trains one WGAN-GP per training image, one image
after another. Here `pair_iteration` is the seed's iteration for ONE pair as a pure function, and
`train_iterations` vmaps it over K pairs (stacked parameters, optimizer states, images and keys)
and scans it over iterations. `init_pairs` and `train_pairs` are jitted once per (setup, K,
iterations) and the K pairs' state never leaves the device; `train_chunk` drives one chunk.
Randomness is per image (`image_keys`), so an image's result does not depend on which images
share its chunk; the draws are therefore the seed's in distribution only (it drew every image's
noise from one torch stream, one image after another), while the computation given the draws is
the seed's (tests/test_wgan.py compares one iteration with its torch loop on the same draws).

Seed semantics kept: batch 1 per pair; every critic forward (fake, real, interpolate) normalises
with that one image's own statistics (the three share one batch-3 call: `BatchNorm2d` is per
image); the saved image of an iteration is the fake of its LAST critic step (made before that
iteration's generator update) in train mode.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from annotate.data import as_rgb
from wgan.models import IMAGE_HEIGHT, IMAGE_WIDTH, NOISE_DIM, Critic, Generator

SAVED_PER_IMAGE = 3  # the seed saves iterations 998, 999, 1000: the last three of 1001
CROP_HEIGHT, CROP_WIDTH = 122, 186


@dataclasses.dataclass(frozen=True)
class WganSetup:
    """Static description of a pair: architecture, optimizer and the seed's hyper-parameters."""
    width: int = 64
    compute_dtype: Any = jnp.float32
    optimizer: optax.GradientTransformation = optax.adam(2e-4, b1=0.5, b2=0.999)
    noise_dim: int = NOISE_DIM
    critic_steps: int = 5
    gradient_penalty_weight: float = 10.0
    flip_probability: float = 0.1

    def generator(self, key: jax.Array) -> Generator:
        """A freshly initialised generator (seed `weights_init`) drawn from `key`."""
        return Generator(noise_dim=self.noise_dim, width=self.width, dtype=self.compute_dtype,
                         rngs=nnx.Rngs(key))

    def critic(self, key: jax.Array) -> Critic:
        """A freshly initialised critic (seed `weights_init`) drawn from `key`."""
        return Critic(width=self.width, dtype=self.compute_dtype, rngs=nnx.Rngs(key))

    @functools.cached_property
    def graphs(self) -> tuple[nnx.GraphDef, nnx.GraphDef]:
        """(generator, critic) graph definitions, for `nnx.merge` with a pair's parameters."""
        key = jax.random.key(0)
        return (nnx.graphdef(nnx.eval_shape(lambda: self.generator(key))),
                nnx.graphdef(nnx.eval_shape(lambda: self.critic(key))))


class PairState(NamedTuple):
    """Parameters and Adam states of one generator/critic pair (stacked on axis 0 for K pairs)."""
    generator: nnx.State
    critic: nnx.State
    generator_opt: optax.OptState
    critic_opt: optax.OptState


def init_pair(setup: WganSetup, key: jax.Array) -> PairState:
    """Fresh generator and critic (the seed's `weights_init`) with zeroed Adam states."""
    generator_key, critic_key = jax.random.split(key)
    generator = nnx.state(setup.generator(generator_key), nnx.Param)
    critic = nnx.state(setup.critic(critic_key), nnx.Param)
    return PairState(generator, critic, setup.optimizer.init(generator),
                     setup.optimizer.init(critic))


def scores_and_penalty(critic_fn: Callable[[jax.Array], jax.Array], images: jax.Array,
                       index: int) -> tuple[jax.Array, jax.Array]:
    """critic_fn(images) [B] and WGAN-GP's penalty (||d score_index / d image_index||_2 - 1)^2
    from ONE call over the batch: the penalty's input gradient is the call's vjp with a one-hot
    cotangent (per-image BatchNorm: score i depends on image i alone, as in the seed's batch-1
    calls)."""
    scores, input_vjp = jax.vjp(critic_fn, images)
    (input_grads,) = input_vjp(jax.nn.one_hot(index, images.shape[0], dtype=scores.dtype))
    return scores, jnp.square(jnp.sqrt(jnp.sum(jnp.square(input_grads[index]))) - 1.0)


def critic_loss(critic_params: nnx.State, setup: WganSetup, fake: jax.Array, real: jax.Array,
                mix_weight: jax.Array) -> jax.Array:
    """critic(fake) - critic(real) + 10 * GP(eps * real + (1 - eps) * fake) for one pair, from
    one batch-3 critic call (fake, real, interpolate): its gradient reads the critic's weights
    four times (forward, the penalty's input-gradient pass, that pass's own derivative, the
    final backward) instead of the 8 of the seed's three batch-1 calls
    (tests/test_benchmark.py counts both)."""
    critic = nnx.merge(setup.graphs[1], critic_params)
    mixed = mix_weight * real + (1.0 - mix_weight) * fake
    scores, penalty = scores_and_penalty(critic, jnp.stack([fake, real, mixed]), 2)
    return scores[0] - scores[1] + setup.gradient_penalty_weight * penalty


def iteration_draws(setup: WganSetup, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The random draws of one iteration from its `key`: whether the real image is flipped, the
    noise of the 5 critic steps' fakes and then of the generator step's [6, noise_dim], and the
    critic steps' interpolation weights [5]."""
    flip_key, critic_key, generator_key = jax.random.split(key, 3)
    step_keys = jax.vmap(jax.random.split)(jax.random.split(critic_key, setup.critic_steps))
    noise = jnp.concatenate([
        jax.vmap(lambda k: jax.random.normal(k, (setup.noise_dim,)))(step_keys[:, 0]),
        jax.random.normal(generator_key, (setup.noise_dim,))[None]])
    return (jax.random.uniform(flip_key) < setup.flip_probability, noise,
            jax.vmap(jax.random.uniform)(step_keys[:, 1]))


def pair_iteration(setup: WganSetup, state: PairState, real: jax.Array,
                   key: jax.Array) -> tuple[PairState, jax.Array]:
    """One seed iteration for one pair: 5 critic steps, then 1 generator step (Adam each).

    `real` [128, 192, 3] in [-1, 1] is flipped vertically with probability 0.1 first. The six
    fakes come from one batch-6 generator forward, each critic step is one batch-3 critic call
    (critic_loss): per-image BatchNorm makes both the seed's batch-1 computations. Returns the
    new state and the fake of the last critic step (the image the seed saves). Its random draws
    are `iteration_draws(setup, key)`.
    """
    flip, noise, mix_weights = iteration_draws(setup, key)
    real = jnp.where(flip, real[::-1], real)
    # The generator is fixed during the critic steps: all six fakes come from one batch-6
    # forward (per-image BatchNorm: each equals the seed's batch-1 call), whose vjp later gives
    # the generator step's gradient.
    generator_graph, critic_graph = setup.graphs
    fakes, generator_vjp = jax.vjp(lambda params: nnx.merge(generator_graph, params)(noise),
                                   state.generator)

    def critic_step(carry, inputs):
        critic_params, critic_opt = carry
        fake, mix_weight = inputs
        grads = jax.grad(critic_loss)(critic_params, setup, fake, real, mix_weight)
        updates, critic_opt = setup.optimizer.update(grads, critic_opt, critic_params)
        return (optax.apply_updates(critic_params, updates), critic_opt), None

    (critic_params, critic_opt), _ = jax.lax.scan(
        critic_step, (state.critic, state.critic_opt),
        (fakes[:setup.critic_steps], mix_weights))
    critic = nnx.merge(critic_graph, critic_params)  # the generator step: -critic(fake)
    fake_grad = jax.grad(lambda fake: -critic(fake[None])[0])(fakes[setup.critic_steps])
    (grads,) = generator_vjp(jnp.zeros_like(fakes).at[setup.critic_steps].set(fake_grad))
    updates, generator_opt = setup.optimizer.update(grads, state.generator_opt, state.generator)
    generator_params = optax.apply_updates(state.generator, updates)
    last_fake = fakes[setup.critic_steps - 1]
    return PairState(generator_params, critic_params, generator_opt, critic_opt), last_fake


def train_iterations(setup: WganSetup, state: PairState, images: jax.Array, keys: jax.Array,
                     iterations: int) -> tuple[PairState, jax.Array]:
    """Run `iterations` seed iterations of K pairs at once (vmap over pairs, scan over iterations).

    `state` and `keys` (one key per pair) are stacked on axis 0; `images` is [K, 128, 192, 3].
    Returns the final state and the fakes of the last 3 iterations, [K, 3, 128, 192, 3] — for the
    seed's 1001 iterations exactly its iterations 998, 999, 1000.
    """
    if iterations < SAVED_PER_IMAGE:
        raise ValueError(f"iterations must be >= {SAVED_PER_IMAGE} (the images saved come from "
                         f"the last {SAVED_PER_IMAGE} iterations), got {iterations}")
    step = jax.vmap(lambda s, image, key: pair_iteration(setup, s, image, key))
    first_saved = iterations - SAVED_PER_IMAGE

    def body(carry, iteration):
        state, saved = carry
        iteration_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, iteration)
        state, fakes = step(state, images, iteration_keys)
        # slot 0 before the first saved iteration, which then overwrites it: no select over the
        # whole buffer needed
        slot = jnp.clip(iteration - first_saved, 0, SAVED_PER_IMAGE - 1)
        saved = jax.lax.dynamic_update_index_in_dim(saved, fakes, slot, axis=1)
        return (state, saved), None

    saved = jnp.zeros((images.shape[0], SAVED_PER_IMAGE) + images.shape[1:], images.dtype)
    (state, saved), _ = jax.lax.scan(body, (state, saved), jnp.arange(iterations))
    return state, saved


# Initialisation runs once per chunk, but its ~44 separate random draws dominate compile time at
# full LLVM optimisation (~30 s on a CPU); unoptimised code generation compiles ~8x faster.
@functools.partial(jax.jit, static_argnums=0,
                   compiler_options={"xla_backend_optimization_level": 0})
def init_pairs(setup: WganSetup, keys: jax.Array) -> PairState:
    """Jitted `init_pair` for K pairs, one key each: state stacked on axis 0."""
    return jax.vmap(lambda key: init_pair(setup, key))(keys)


@functools.partial(jax.jit, static_argnames=("setup", "iterations"), donate_argnames="state")
def train_pairs(setup: WganSetup, state: PairState, images: jax.Array, keys: jax.Array,
                iterations: int) -> tuple[PairState, jax.Array]:
    """Jitted `train_iterations`; `state` is donated (updated in place on the device)."""
    return train_iterations(setup, state, images, keys, iterations)


def image_keys(seed: int, image_indices: np.ndarray) -> jax.Array:
    """One key per training image (from its index in the split): independent of the chunking."""
    base = jax.random.key(seed)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.asarray(image_indices))


def shard_pairs(tree: Any) -> Any:
    """Place arrays with a leading K axis on the devices: split over a 1-D "pairs" mesh when there
    are several devices (K must then be a multiple of their count), else on the default device."""
    devices = jax.devices()
    if len(devices) == 1:
        return jax.device_put(tree)
    for leaf in jax.tree.leaves(tree):
        if leaf.shape[0] % len(devices):
            raise ValueError(f"pairs={leaf.shape[0]} must be a multiple of the {len(devices)} "
                             "devices to shard the pairs across them")
    mesh = jax.make_mesh((len(devices),), ("pairs",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("pairs"))
    return jax.device_put(tree, sharding)


def train_chunk(setup: WganSetup, keys: jax.Array, images: np.ndarray,
                iterations: int) -> np.ndarray:
    """Train one pair per image from its key (init from the key's first split, training noise from
    the second) and return the fakes of the last 3 iterations, float32 [K, 3, 128, 192, 3]."""
    init_keys, train_keys, images = chunk_inputs(keys, images)
    state = init_pairs(setup, init_keys)
    _, saved = train_pairs(setup, state, images, train_keys, iterations)
    return np.asarray(saved)


def chunk_inputs(keys: jax.Array, images: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init keys, training keys, images) for a chunk, placed on the devices by `shard_pairs`."""
    pair_keys = jax.vmap(jax.random.split)(keys)
    return shard_pairs((pair_keys[:, 0], pair_keys[:, 1], jnp.asarray(images, jnp.float32)))


def load_wgan_image(path: str | Path) -> np.ndarray:
    """The seed's preprocessing: portrait -> landscape (PIL rotate 90, counter-clockwise), centre
    crop 122x186, bilinear resize to 128x192, scale to [-1, 1]; float32 [128, 192, 3]."""
    try:
        with Image.open(path) as opened:
            image = as_rgb(opened)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    if image.height > image.width:  # the seed tests height == 192 on Corel's 192x128 / 128x192
        image = image.rotate(90, expand=True)
    left = int(round((image.width - CROP_WIDTH) / 2.0))  # torchvision CenterCrop's offsets
    top = int(round((image.height - CROP_HEIGHT) / 2.0))
    image = image.crop((left, top, left + CROP_WIDTH, top + CROP_HEIGHT))
    image = image.resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.BILINEAR)
    return np.asarray(image, np.float32) / 127.5 - 1.0


def augmented_views(fakes: np.ndarray) -> list[np.ndarray]:
    """The seed's three saved images from the fakes of its last 3 iterations [3, H, W, 3]: the
    first as is, the second flipped horizontally, the third `np.rot90(img, -1)`; uint8 as
    matplotlib's imsave makes them (x / 2 + 0.5, times 255, truncated)."""
    pixels = [np.asarray(fake, np.float32) / 2 + 0.5 for fake in fakes]
    views = [pixels[0], pixels[1][:, ::-1], np.rot90(pixels[2], -1)]
    return [np.ascontiguousarray((view * 255).astype(np.uint8))
            for view in views]
