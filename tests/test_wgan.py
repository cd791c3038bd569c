"""ML-WGAN: models and losses against torch (the seed's code), vmap independence, the CLI."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as tnn
from flax import nnx
from ml_collections import config_dict
from PIL import Image

from annotate.data import read_augmentation_index, read_split_index
from annotate.workdir import WorkdirError
from conftest import ADDRESS_SPACE_CAP, lock_held_by_another_run, write_dataset
from modules import load_module
from wgan import run as wgan_run
from wgan.models import BatchNorm2d, Conv2d, Critic, Generator
from wgan.train import (PairState, WganSetup, augmented_views, critic_loss, image_keys,
                        init_pairs, iteration_draws, load_wgan_image, pair_iteration,
                        scores_and_penalty, train_pairs)

WIDTH = 4  # the seed's architecture at hidden width 4 instead of 64: same code paths, fast on CPU
REPO = Path(__file__).resolve().parents[1]


def torch_generator(width: int) -> tnn.Sequential:
    """The seed's Generator layers (augmentation/gen_critic.py), written out from the issue."""
    channels = [width * 16, width * 8, width * 4, width * 2, width]
    layers = [tnn.ConvTranspose2d(100, channels[0], (4, 6), 1), tnn.BatchNorm2d(channels[0]),
              tnn.ReLU()]
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [tnn.ConvTranspose2d(c_in, c_out, 4, 2, 1), tnn.BatchNorm2d(c_out), tnn.ReLU()]
    return tnn.Sequential(*layers, tnn.ConvTranspose2d(width, 3, 4, 2, 1), tnn.Tanh())


def torch_critic(width: int) -> tnn.Sequential:
    """The seed's Critic layers."""
    channels = [3, width, width * 2, width * 4, width * 8, width * 16]
    layers = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [tnn.Conv2d(c_in, c_out, 4, 2, 1), tnn.BatchNorm2d(c_out), tnn.LeakyReLU(0.2)]
    return tnn.Sequential(*layers, tnn.Conv2d(channels[-1], 1, (4, 6), 1), tnn.Flatten())


def copy_torch_weights(torch_model: tnn.Sequential, convs: list, norms: list) -> None:
    """Load torch conv/BN weights into our layers (OIHW / IOHW -> [kh, kw, in, out])."""
    torch_convs = [m for m in torch_model if isinstance(m, (tnn.Conv2d, tnn.ConvTranspose2d))]
    torch_norms = [m for m in torch_model if isinstance(m, tnn.BatchNorm2d)]
    for source, target in zip(torch_convs, convs, strict=True):
        weight = source.weight.detach().numpy()
        order = (2, 3, 0, 1) if isinstance(source, tnn.ConvTranspose2d) else (2, 3, 1, 0)
        target.kernel.set_value(jnp.asarray(weight.transpose(order)))
        target.bias.set_value(jnp.asarray(source.bias.detach().numpy()))
    for source, target in zip(torch_norms, norms, strict=True):
        target.scale.set_value(jnp.asarray(source.weight.detach().numpy()))
        target.bias.set_value(jnp.asarray(source.bias.detach().numpy()))


@pytest.fixture(scope="module")
def torch_pair():
    """Seed-architecture torch generator/critic (BN scale N(1, 0.3) so activations are O(1)) and
    our modules holding the same weights."""
    torch.manual_seed(0)
    t_gen, t_crit = torch_generator(WIDTH), torch_critic(WIDTH)
    for module in [*t_gen, *t_crit]:
        if isinstance(module, tnn.BatchNorm2d):
            tnn.init.normal_(module.weight, 1.0, 0.3)
            tnn.init.normal_(module.bias, 0.0, 0.1)
    # Abstract modules (no random init to compile): every parameter is then set from torch.
    gen = nnx.eval_shape(lambda: Generator(width=WIDTH, rngs=nnx.Rngs(0)))
    crit = nnx.eval_shape(lambda: Critic(width=WIDTH, rngs=nnx.Rngs(1)))
    copy_torch_weights(t_gen, [gen.project, *gen.ups, gen.to_image], [gen.project_norm, *gen.norms])
    copy_torch_weights(t_crit, [*crit.downs, crit.score], list(crit.norms))
    return t_gen, t_crit, gen, crit


def nchw(x: np.ndarray) -> torch.Tensor:
    """NHWC numpy -> NCHW torch."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def jitted_call(module: nnx.Module, x: np.ndarray) -> jax.Array:
    """module(x) through jax.jit (one compile instead of op-by-op dispatch)."""
    graph, params = nnx.split(module)
    return jax.jit(lambda p, v: nnx.merge(graph, p)(v))(params, jnp.asarray(x))


def test_models_match_torch_seed_architecture(torch_pair):
    t_gen, t_crit, gen, crit = torch_pair
    noise = np.random.default_rng(0).standard_normal((1, 100)).astype(np.float32)
    expected = t_gen(torch.from_numpy(noise)[:, :, None, None]).detach().numpy()
    np.testing.assert_allclose(np.asarray(jitted_call(gen, noise)),
                               expected.transpose(0, 2, 3, 1), atol=2e-5)
    images = np.random.default_rng(1).uniform(-1, 1, (2, 128, 192, 3)).astype(np.float32)
    # Our batch of 2 == the seed's two separate batch-1 calls (per-image BatchNorm statistics).
    expected = [t_crit(nchw(images[i:i + 1])).item() for i in range(2)]
    np.testing.assert_allclose(np.asarray(jitted_call(crit, images)), expected, rtol=1e-4,
                               atol=1e-5)


def test_parameter_count_and_init_as_seed(trained):
    def torch_count(model):
        return sum(p.numel() for p in model.parameters())
    gen = nnx.eval_shape(lambda: Generator(rngs=nnx.Rngs(0)))
    crit = nnx.eval_shape(lambda: Critic(rngs=nnx.Rngs(0)))
    count = lambda m: sum(int(p.size) for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert count(gen) == torch_count(torch_generator(64)) == 13_607_747
    assert count(crit) == torch_count(torch_critic(64)) == 11_174_721
    # The seed's weights_init: conv weights and BN scales ~ N(0, 0.02), BN bias 0.
    initial = trained["initial"]
    kernel = np.asarray(initial.critic["downs"][4]["kernel"][...])
    assert abs(kernel.mean()) < 1e-3 and abs(kernel.std() - 0.02) < 1e-3
    norms = [*initial.critic["norms"].values(), *initial.generator["norms"].values()]
    scales = np.concatenate([np.asarray(n["scale"][...]).ravel() for n in norms])
    assert abs(scales.mean()) < 3e-3 and abs(scales.std() - 0.02) < 3e-3
    assert all(np.all(np.asarray(n["bias"][...]) == 0) for n in norms)
    # torch's default conv bias, untouched by weights_init: U(+-1/sqrt(fan_in)), fan_in 3*4*4.
    first_bias = np.asarray(initial.critic["downs"][0]["bias"][...])
    assert np.all(np.abs(first_bias) <= 1 / np.sqrt(48)) and first_bias.std() > 0.02


def test_gradient_penalty_matches_finite_differences():
    conv = Conv2d(3, 4, 4, stride=2, padding=1, rngs=nnx.Rngs(0))
    norm = BatchNorm2d(4, rngs=nnx.Rngs(1))
    norm.scale[...] = jnp.ones(4)

    def small_critic(x):
        return jnp.sum(jax.nn.leaky_relu(norm(conv(x)), 0.2) ** 2, axis=(1, 2, 3)) * 10.0

    image = jax.random.uniform(jax.random.key(2), (6, 8, 3), minval=-1, maxval=1)
    step = 1e-2
    flat = np.asarray(image, np.float64).ravel()
    basis = np.eye(flat.size) * step
    plus = small_critic(jnp.asarray((flat + basis).reshape(-1, 6, 8, 3), jnp.float32))
    minus = small_critic(jnp.asarray((flat - basis).reshape(-1, 6, 8, 3), jnp.float32))
    grad_fd = (np.asarray(plus, np.float64) - np.asarray(minus, np.float64)) / (2 * step)
    expected = (np.linalg.norm(grad_fd) - 1.0) ** 2
    _, penalty = scores_and_penalty(small_critic, image[None], 0)
    np.testing.assert_allclose(float(penalty), expected, rtol=1e-3)


def test_losses_and_gradients_match_torch(torch_pair):
    t_gen, t_crit, gen, crit = torch_pair
    rng = np.random.default_rng(4)
    fake = rng.uniform(-1, 1, (1, 128, 192, 3)).astype(np.float32)
    real = rng.uniform(-1, 1, (1, 128, 192, 3)).astype(np.float32)
    eps = 0.3
    # The seed's critic loss: three separate critic calls, GP through autograd.grad.
    t_fake, t_real = nchw(fake), nchw(real)
    mixed = (eps * t_real + (1 - eps) * t_fake).requires_grad_(True)
    (input_grad,) = torch.autograd.grad(t_crit(mixed).sum(), mixed, create_graph=True)
    penalty = (input_grad.flatten(1).norm(2, dim=1) - 1) ** 2
    t_loss = (t_crit(t_fake) - t_crit(t_real) + 10 * penalty).sum()
    t_crit.zero_grad()
    t_loss.backward()
    setup = WganSetup(width=WIDTH)
    params = nnx.state(crit, nnx.Param)
    loss, grads = jax.jit(jax.value_and_grad(critic_loss), static_argnums=1)(
        params, setup, jnp.asarray(fake[0]), jnp.asarray(real[0]), jnp.float32(eps))
    np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-4)
    # every critic parameter's gradient, conv by conv, then BatchNorm by BatchNorm
    torch_convs = [m for m in t_crit if isinstance(m, tnn.Conv2d)]
    torch_norms = [m for m in t_crit if isinstance(m, tnn.BatchNorm2d)]
    convs = [grads["downs"][i] for i in range(len(torch_convs) - 1)] + [grads["score"]]
    norms = [grads["norms"][i] for i in range(len(torch_norms))]
    pairs = [(conv["kernel"][...], t.weight.grad.numpy().transpose(2, 3, 1, 0))
             for conv, t in zip(convs, torch_convs, strict=True)]
    pairs += [(conv["bias"][...], t.bias.grad.numpy()) for conv, t in zip(convs, torch_convs)]
    pairs += [(norm[name][...], getattr(t, attribute).grad.numpy())
              for norm, t in zip(norms, torch_norms, strict=True)
              for name, attribute in (("scale", "weight"), ("bias", "bias"))]
    assert len(pairs) == 2 * len(torch_convs) + 2 * len(torch_norms) == 22
    scale = max(np.abs(theirs).max() for _, theirs in pairs)
    for ours, theirs in pairs:  # conv biases before BatchNorm: exact gradient 0, noise at 1e-7
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-3, atol=1e-5 * scale)
    # The generator loss -critic(generator(z)) (its gradient is plain autodiff of this).
    noise = rng.standard_normal(100).astype(np.float32)
    t_gen_loss = -t_crit(t_gen(torch.from_numpy(noise)[None, :, None, None])).sum()
    gen_loss = jax.jit(lambda g, c, z: -nnx.merge(setup.graphs[1], c)(
        nnx.merge(setup.graphs[0], g)(z[None]))[0])(nnx.state(gen, nnx.Param), params,
                                                   jnp.asarray(noise))
    np.testing.assert_allclose(float(gen_loss), t_gen_loss.item(), rtol=1e-4)


def assert_same_gradients(ours, theirs) -> None:
    """Equal to float32 reassociation: 1e-4 relative, and 2e-5 of the largest gradient absolute
    (the conv biases before BatchNorm have an exact gradient of 0: what they get is noise)."""
    scale = max(float(np.abs(np.asarray(leaf)).max()) for leaf in jax.tree.leaves(theirs))
    for mine, reference in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(reference), rtol=1e-4,
                                   atol=2e-5 * scale)


def test_batched_critic_call_equals_the_seeds_separate_calls(torch_pair):
    """critic_loss's one batch-3 call (fake, real, interpolate) against three batch-1 calls and
    the penalty's own jax.grad, loss and weight gradients to float32 precision."""
    _, _, _, crit = torch_pair
    setup = WganSetup(width=WIDTH)
    params = nnx.state(crit, nnx.Param)
    rng = np.random.default_rng(5)
    fake, real = (jnp.asarray(rng.uniform(-1, 1, (128, 192, 3)), jnp.float32) for _ in range(2))

    def separate_calls(params, fake, real, eps):
        critic = nnx.merge(setup.graphs[1], params)
        mixed = eps * real + (1 - eps) * fake
        input_grad = jax.grad(lambda x: critic(x[None])[0])(mixed)
        penalty = jnp.square(jnp.sqrt(jnp.sum(jnp.square(input_grad))) - 1.0)
        return critic(fake[None])[0] - critic(real[None])[0] + 10.0 * penalty

    batched = jax.jit(jax.value_and_grad(critic_loss), static_argnums=1)(
        params, setup, fake, real, jnp.float32(0.3))
    separate = jax.jit(jax.value_and_grad(separate_calls))(params, fake, real, jnp.float32(0.3))
    np.testing.assert_allclose(float(batched[0]), float(separate[0]), rtol=1e-5)
    assert_same_gradients(batched[1], separate[1])


def test_batch_6_generator_forward_and_its_vjp_equal_the_separate_calls(torch_pair):
    """The six fakes of one batch-6 forward equal six batch-1 forwards, and the generator step's
    gradient through that forward's vjp equals jax.grad of its own batch-1 call."""
    _, _, gen, crit = torch_pair
    setup = WganSetup(width=WIDTH)
    generator, critic = nnx.state(gen, nnx.Param), nnx.state(crit, nnx.Param)
    noise = jnp.asarray(np.random.default_rng(6).standard_normal((6, 100)), jnp.float32)

    @jax.jit
    def compare(generator, critic, noise):
        forward = lambda params, z: nnx.merge(setup.graphs[0], params)(z)
        fakes, vjp = jax.vjp(lambda params: forward(params, noise), generator)
        separate = jnp.stack([forward(generator, noise[i:i + 1])[0] for i in range(6)])
        score = lambda fake: -nnx.merge(setup.graphs[1], critic)(fake[None])[0]
        (via_vjp,) = vjp(jnp.zeros_like(fakes).at[5].set(jax.grad(score)(fakes[5])))
        direct = jax.grad(lambda params: score(forward(params, noise[5:6])[0]))(generator)
        return fakes, separate, via_vjp, direct

    fakes, separate, via_vjp, direct = compare(generator, critic, noise)
    np.testing.assert_allclose(np.asarray(fakes), np.asarray(separate), atol=2e-6)
    assert_same_gradients(via_vjp, direct)


def test_one_iteration_equals_the_seeds_torch_loop(torch_pair):
    """pair_iteration against the seed's iteration written in torch (5 critic steps of three
    batch-1 critic calls with the penalty through autograd.grad, then 1 generator step; torch's
    Adam at 2e-4, betas 0.5 and 0.999), fed the same draws (iteration_draws, flip included):
    the last critic step's fake, and the updated critic and generator on fixed inputs, agree to
    float32 precision (outputs, not weights: the conv biases before BatchNorm have a gradient of
    exactly 0, so Adam moves them by lr x the sign of rounding noise, which BatchNorm cancels)."""
    t_gen, t_crit, gen, crit = (copy.deepcopy(module) for module in torch_pair)
    setup = WganSetup(width=WIDTH)
    key = next(key for key in map(jax.random.key, range(100))
               if iteration_draws(setup, key)[0])  # a key whose iteration flips the real image
    flip, noise, mix_weights = (np.array(draw) for draw in iteration_draws(setup, key))
    real = np.random.default_rng(7).uniform(-1, 1, (128, 192, 3)).astype(np.float32)
    generator, critic = nnx.state(gen, nnx.Param), nnx.state(crit, nnx.Param)
    state = PairState(generator, critic, setup.optimizer.init(generator),
                      setup.optimizer.init(critic))
    new_state, last_fake = jax.jit(lambda state, real, key: pair_iteration(
        setup, state, real, key))(state, jnp.asarray(real), key)

    adam = lambda module: torch.optim.Adam(module.parameters(), 2e-4, betas=(0.5, 0.999))
    critic_opt, generator_opt = adam(t_crit), adam(t_gen)
    t_real = torch.flip(nchw(real[None]), dims=[2]) if flip else nchw(real[None])
    t_noise = torch.from_numpy(noise)[:, :, None, None]
    for step in range(5):
        critic_opt.zero_grad()
        fake = t_gen(t_noise[step:step + 1]).detach()
        mixed = (mix_weights[step] * t_real + (1 - mix_weights[step]) * fake).requires_grad_(True)
        (input_grad,) = torch.autograd.grad(t_crit(mixed).sum(), mixed, create_graph=True)
        penalty = (input_grad.flatten(1).norm(2, dim=1) - 1) ** 2
        (t_crit(fake) - t_crit(t_real) + 10 * penalty).mean().backward()
        critic_opt.step()
    generator_opt.zero_grad()
    (-t_crit(t_gen(t_noise[5:6]))).mean().backward()
    generator_opt.step()

    np.testing.assert_allclose(np.asarray(last_fake), fake[0].numpy().transpose(1, 2, 0),
                               atol=1e-5)
    probe = np.stack([real, np.asarray(last_fake)])
    scores = jitted_call(nnx.merge(setup.graphs[1], new_state.critic), probe)
    with torch.no_grad():
        torch_scores = [t_crit(nchw(image[None])).item() for image in probe]  # batch 1 each
        np.testing.assert_allclose(np.asarray(scores), torch_scores, rtol=1e-4, atol=1e-4)
        image = jitted_call(nnx.merge(setup.graphs[0], new_state.generator), noise[5:6])
        np.testing.assert_allclose(np.asarray(image),
                                   t_gen(t_noise[5:6]).numpy().transpose(0, 2, 3, 1), atol=1e-4)


@pytest.fixture(scope="module")
def trained():
    """Pairs 0 and 1 trained together, and pair 0 again beside another partner, 3 iterations
    (the CLI smoke test's setup and K, so the compiled step is shared)."""
    setup = WganSetup(width=WIDTH)
    keys = jax.vmap(jax.random.split)(image_keys(7, np.arange(3)))  # [3, 2]: init, training
    images = jax.random.uniform(jax.random.key(3), (3, 128, 192, 3), minval=-1, maxval=1)
    runs = {}
    for name, pairs in [("together", np.array([0, 1])), ("new_partner", np.array([0, 2]))]:
        state = init_pairs(setup, keys[pairs, 0])
        runs[name] = train_pairs(setup, state, images[pairs], keys[pairs, 1], 3)
    runs["initial"] = init_pairs(setup, keys[:2, 0])
    return runs


def test_vmapped_pair_does_not_depend_on_its_partners(trained):
    """Pair 0's whole trajectory is the same whoever trains beside it in the vmapped step.

    (Against a separate K=1 run the results agree only to ~1e-6 per gradient, and Adam's first
    steps, lr * sign(g), turn that into lr-sized differences wherever a gradient is ~0 — e.g. the
    conv biases before BatchNorm, whose exact gradient is 0 — so the K=1 comparison cannot be
    tight. Swapping the partner inside the same compiled program can.)
    """
    (state, saved), (state_other, saved_other) = trained["together"], trained["new_partner"]
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_other), strict=True):
        np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(saved[0]), np.asarray(saved_other[0]), atol=1e-6)
    # Both pairs trained (their parameters moved) and differ from each other.
    moved = np.abs(np.asarray(state.critic["score"]["kernel"][...])
                   - np.asarray(trained["initial"].critic["score"]["kernel"][...]))
    assert moved.max() > 1e-4
    assert not np.allclose(np.asarray(saved[0]), np.asarray(saved[1]), atol=1e-2)
    assert not np.allclose(np.asarray(saved[1]), np.asarray(saved_other[1]), atol=1e-2)


@pytest.mark.parametrize("iterations", [3, 5])
def test_the_fakes_of_the_last_three_iterations_are_saved_in_order(monkeypatch, iterations):
    """train_iterations keeps iteration i's fake (drawn with fold_in(pair key, i)) in slot
    i - (iterations - 3): the seed's 998, 999, 1000 of 1001. A stand-in iteration whose fake is
    a number drawn from its key shows which iteration filled each slot."""
    import wgan.train as wgan_train

    def stand_in(setup, state, image, key):
        return state + 1, jnp.full_like(image, jax.random.uniform(key))

    monkeypatch.setattr(wgan_train, "pair_iteration", stand_in)
    keys = jax.random.split(jax.random.key(3), 2)
    images = jnp.zeros((2, 4, 6, 3), jnp.float32)
    state, saved = wgan_train.train_iterations(None, jnp.zeros(2), images, keys, iterations)
    np.testing.assert_array_equal(np.asarray(state), [iterations, iterations])
    for pair in range(2):
        for slot, iteration in enumerate(range(iterations - 3, iterations)):
            drawn = jax.random.uniform(jax.random.fold_in(keys[pair], iteration))
            np.testing.assert_array_equal(np.asarray(saved[pair, slot]),
                                          np.full((4, 6, 3), drawn, np.float32))


def test_preprocessing_matches_seed_transforms(tmp_path):
    from torchvision import transforms  # timm's dependency (dev extras)
    rng = np.random.default_rng(5)
    for size in [(192, 128), (128, 192)]:  # landscape and portrait (W, H) as in Corel-5k
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8)).save(path)
        image = Image.open(path).convert("RGB")
        if image.height == 192:
            image = image.rotate(90, expand=True)
        expected = transforms.Compose([
            transforms.CenterCrop((122, 186)), transforms.Resize((128, 192)),
            transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])(image)
        np.testing.assert_allclose(load_wgan_image(path), expected.numpy().transpose(1, 2, 0),
                                   atol=1e-5)


def test_augmented_views_are_the_seeds():
    fakes = np.tanh(np.random.default_rng(6).standard_normal((3, 128, 192, 3))).astype(np.float32)
    views = augmented_views(fakes)
    to_uint8 = lambda img: (img * 255).astype(np.uint8)  # matplotlib imsave on floats in [0, 1]
    flipped = torch.flip(torch.from_numpy(fakes[1]).permute(2, 0, 1), dims=[2])
    expected = [to_uint8(fakes[0] / 2 + 0.5),
                to_uint8((flipped / 2 + 0.5).permute(1, 2, 0).numpy()),
                to_uint8(np.rot90(fakes[2] / 2 + 0.5, -1))]
    for view, reference in zip(views, expected, strict=True):
        np.testing.assert_array_equal(view, reference)
    assert views[2].shape == (192, 128, 3)


def test_saved_files_are_the_seeds_bytes(tmp_path):
    """The three files as the seed writes them, plt.imsave of the float views in [0, 1], and ours
    (augmented_views, then save_jpeg) are the same bytes: pixels, quality and header."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fakes = np.tanh(np.random.default_rng(7).standard_normal((3, 128, 192, 3))).astype(np.float32)
    seed_views = [fakes[0] / 2 + 0.5, (fakes[1] / 2 + 0.5)[:, ::-1],
                  np.rot90(fakes[2] / 2 + 0.5, -1)]
    for i, (ours, theirs) in enumerate(zip(augmented_views(fakes), seed_views, strict=True)):
        plt.imsave(tmp_path / f"seed{i}.jpeg", np.ascontiguousarray(theirs))
        wgan_run.save_jpeg(tmp_path / f"ours{i}.jpeg", ours)
        assert (tmp_path / f"ours{i}.jpeg").read_bytes() == (tmp_path / f"seed{i}.jpeg").read_bytes()


def wgan_config(**overrides) -> config_dict.ConfigDict:
    """configs/wgan.py's get_config() with `overrides` (dotted keys as double underscores)."""
    config = load_module("configs/wgan.py").get_config()
    for key, value in overrides.items():
        *parents, leaf = key.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def test_cli_writes_jpegs_and_index_then_resumes(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "data", n_train=3, n_test=1)
    out = tmp_path / "out"
    # What `python -m wgan.run --config=configs/wgan.py --config.data.root=... ...` runs (absl's
    # config_flags reads overrides from sys.argv at import, so the test calls run() itself).
    config = wgan_config(data__root=str(root), out_dir=str(out), limit=2, iterations=3, pairs=2,
                         model_width=WIDTH)
    trained = []  # the fakes train_chunk returned, to compare with the files
    real_train_chunk = wgan_run.train_chunk
    monkeypatch.setattr(wgan_run, "train_chunk",
                        lambda *args: trained.append(real_train_chunk(*args)) or trained[-1])
    assert wgan_run.run(config) == out
    monkeypatch.undo()
    train = read_split_index(root, "train")
    files = sorted(p.name for p in (out / "aug-images").iterdir())
    stems = [name.split(".")[0] for name in train.image_names[:2]]
    assert files == sorted(f"{s}{suffix}.jpeg" for s in stems
                           for suffix in ("_aug", "_aug_hor_flip", "_aug_rot_90"))
    (fakes,) = trained
    for position, stem in enumerate(stems):
        for suffix, expected in zip(("_aug", "_aug_hor_flip", "_aug_rot_90"),
                                    augmented_views(fakes[position])):
            with Image.open(out / "aug-images" / f"{stem}{suffix}.jpeg") as image:
                assert image.format == "JPEG"
                assert image.size == ((128, 192) if "rot_90" in suffix else (192, 128))
                pixels = np.asarray(image.convert("RGB"), np.float32)
            # the pair's own generated view, up to JPEG's rounding (the views differ by far more)
            assert np.abs(pixels - expected).mean() < 2.0
    index = read_augmentation_index(out)
    assert index.vocabulary == train.vocabulary
    assert len(index.image_names) == 6
    for name, labels in zip(index.image_names, index.image_labels):
        original = train.image_names.index(f"{name.split('_aug')[0]}.jpeg")
        assert labels == train.image_labels[original]
    first_index = (out / "train_aug.json").read_text()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "aug-images").iterdir()}

    def must_not_train(*args, **kwargs):
        raise AssertionError("finished images must be skipped")

    monkeypatch.setattr(wgan_run, "train_chunk", must_not_train)
    killed_write = out / "aug-images" / f".{stems[0]}_aug.jpeg.4242-7.tmp"  # no flock held
    killed_write.write_bytes(b"half a JPEG")
    wgan_run.run(config)
    assert not killed_write.exists()
    assert {p.name: p.stat().st_mtime_ns for p in (out / "aug-images").iterdir()} == mtimes
    assert json.loads((out / "train_aug.json").read_text()) == json.loads(first_index)
    # a rerun with other settings over these images is refused, naming them
    with pytest.raises(ValueError, match=r"made with seed=1, iterations=3, not seed=2, "
                                         r"iterations=4; use another --config.out_dir"):
        wgan_run.run(wgan_config(data__root=str(root), out_dir=str(out), limit=2, iterations=4,
                                 pairs=2, model_width=WIDTH, seed=2))


def _constant_fakes(value: float):
    """A train_chunk stand-in whose fakes are all `value` (no compile on the CPU)."""
    return lambda setup, keys, images, iterations: np.full(
        (images.shape[0], 3, 128, 192, 3), value, np.float32)


def test_a_killed_forced_run_never_mixes_two_settings(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "data", n_train=4, n_test=1)
    out = tmp_path / "out"
    settings = dict(data__root=str(root), out_dir=str(out), iterations=3, pairs=2,
                    model_width=WIDTH)

    def values_on_disk() -> dict[str, float]:  # each image's fake value, from its "_aug" view
        return {path.name: round(float(np.asarray(Image.open(path)).mean()) / 255 * 2 - 1, 1)
                for path in sorted((out / "aug-images").glob("*_aug.jpeg"))}

    monkeypatch.setattr(wgan_run, "train_chunk", _constant_fakes(-0.6))
    wgan_run.run(wgan_config(seed=1, **settings))
    assert sorted(values_on_disk().values()) == [-0.6] * 4
    calls = []

    def killed_in_second_chunk(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _constant_fakes(0.6)(*args)

    monkeypatch.setattr(wgan_run, "train_chunk", killed_in_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        wgan_run.run(wgan_config(seed=2, force=True, **settings))
    # the seed-1 images are gone, the first chunk's seed-2 images are kept and indexed
    assert sorted(values_on_disk().values()) == [0.6, 0.6]
    assert len(read_augmentation_index(out).image_names) == 6
    monkeypatch.setattr(wgan_run, "train_chunk", _constant_fakes(0.6))
    wgan_run.run(wgan_config(seed=2, **settings))  # the same command without force resumes
    assert sorted(values_on_disk().values()) == [0.6] * 4
    assert len(read_augmentation_index(out).image_names) == 12


def test_a_forced_run_killed_while_it_deletes_leaves_no_index_of_deleted_images(tmp_path,
                                                                                 monkeypatch):
    """The index goes before the images it lists: a kill between two deletions leaves no
    train_aug.json (the classifier's augmentation then says how to write it), never one that
    lists deleted files; the old record refuses a rerun without force."""
    root = write_dataset(tmp_path / "data", n_train=3, n_test=1)
    out = tmp_path / "out"
    settings = dict(data__root=str(root), out_dir=str(out), iterations=3, pairs=2,
                    model_width=WIDTH)
    monkeypatch.setattr(wgan_run, "train_chunk", _constant_fakes(-0.6))
    wgan_run.run(wgan_config(seed=1, **settings))
    unlink, deleted = Path.unlink, []

    def killed_at_the_second_image(path, *args, **kwargs):
        if path.parent.name == "aug-images" and path.suffix == ".jpeg":
            deleted.append(path)
            if len(deleted) == 2:
                raise KeyboardInterrupt
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", killed_at_the_second_image)
    with pytest.raises(KeyboardInterrupt):
        wgan_run.run(wgan_config(seed=2, force=True, **settings))
    monkeypatch.setattr(Path, "unlink", unlink)
    assert not (out / "train_aug.json").exists()
    with pytest.raises(ValueError, match="made with seed=1, not seed=2; .* --config.force=True"):
        wgan_run.run(wgan_config(seed=2, **settings))
    monkeypatch.setattr(wgan_run, "train_chunk", _constant_fakes(0.6))
    wgan_run.run(wgan_config(seed=2, force=True, **settings))
    assert len(read_augmentation_index(out).image_names) == 9


def test_another_datasets_rerun_into_the_same_folder_is_refused(tmp_path, monkeypatch):
    """Images made from one dataset are not another dataset's augmentations, even under the same
    file names: the record holds the training images' fingerprint (names, order, file sizes)."""
    first, other = (write_dataset(tmp_path / name, n_train=3, n_test=1) for name in "ab")
    (other / "images" / "0.jpeg").write_bytes((other / "images" / "0.jpeg").read_bytes() + b"\0")
    out = tmp_path / "out"
    monkeypatch.setattr(wgan_run, "train_chunk", _constant_fakes(-0.6))
    wgan_run.run(wgan_config(data__root=str(first), out_dir=str(out), iterations=3, pairs=2,
                             model_width=WIDTH))
    monkeypatch.setattr(wgan_run, "train_chunk", lambda *args: pytest.fail("trained"))
    with pytest.raises(ValueError, match="made from another dataset"):
        wgan_run.run(wgan_config(data__root=str(other), out_dir=str(out), iterations=3, pairs=2,
                                 model_width=WIDTH))
    elsewhere = tmp_path / "copy"  # the same dataset elsewhere: its images are done
    shutil.copytree(first, elsewhere)
    wgan_run.run(wgan_config(data__root=str(elsewhere), out_dir=str(out), iterations=3, pairs=2,
                             model_width=WIDTH))


def test_an_unwritable_image_folder_fails_before_any_training(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "data", n_train=3, n_test=1)
    (tmp_path / "out" / "aug-images" / ".write_probe").mkdir(parents=True)  # no file there
    monkeypatch.setattr(wgan_run, "train_chunk", lambda *args: pytest.fail("trained first"))
    with pytest.raises(IsADirectoryError, match="write_probe"):
        wgan_run.run(wgan_config(data__root=str(root), out_dir=str(tmp_path / "out"),
                                 iterations=3, pairs=2, model_width=WIDTH))


def test_a_second_run_on_one_output_folder_is_refused_before_any_training(tmp_path,
                                                                          monkeypatch):
    """Two runs on one output folder would train the same pending images twice (and a forced one
    would delete the other's): the second is refused, naming the first."""
    root = write_dataset(tmp_path / "data", n_train=3, n_test=1)
    monkeypatch.setattr(wgan_run, "train_chunk", lambda *args: pytest.fail("trained"))
    with lock_held_by_another_run(tmp_path / "out"):
        with pytest.raises(WorkdirError, match=(f"{tmp_path / 'out'} is in use by process .*; "
                                                f"wait for it to end or use another "
                                                f"--config.out_dir")):
            wgan_run.run(wgan_config(data__root=str(root), out_dir=str(tmp_path / "out"),
                                     iterations=3, pairs=2, model_width=WIDTH))


@pytest.mark.parametrize("overrides,message", [
    ({"iterations": 2}, "config.iterations = 2: must be >= 3"),
    ({"pairs": 0}, "config.pairs = 0: must be >= 1"),
    ({"model_width": 0}, "config.model_width = 0: must be >= 1"),
    ({"limit": -5}, "config.limit = -5: must be >= 1, or None for every training image"),
    ({"seed": -1}, r"config.seed = -1: must lie in \[0, 2\*\*32\)"),
    ({"pairs": True}, "config.pairs = True: it needs a number, not a bool"),  # not 1 pair
])
def test_bad_settings_are_refused_before_any_work(tmp_path, overrides, message):
    root = write_dataset(tmp_path / "data", n_train=3, n_test=1)
    config = wgan_config(**{"data__root": str(root), "out_dir": str(tmp_path / "out"),
                            "model_width": WIDTH, **overrides})
    with pytest.raises(ValueError, match=message):
        wgan_run.run(config)
    assert not (tmp_path / "out").exists()


def test_a_corrupt_image_is_one_line_before_any_training_and_keeps_finished_images(
        tmp_path, monkeypatch):
    """Every pending image is decoded before the first chunk trains: a corrupt one stops the run
    at once (not when its chunk comes, hours in), naming it; images finished before stay."""
    root = write_dataset(tmp_path / "data", n_train=3, n_test=1)
    train_index = read_split_index(root, "train")
    fakes = np.random.default_rng(0).uniform(-1, 1, (2, 3, 128, 192, 3)).astype(np.float32)
    monkeypatch.setattr(wgan_run, "train_chunk", lambda *args: fakes)  # no compile on the CPU
    config = wgan_config(data__root=str(root), out_dir=str(tmp_path / "out"), iterations=3,
                         pairs=2, model_width=WIDTH, limit=2)
    wgan_run.run(config)  # the first two images are done
    (root / "images" / train_index.image_names[2]).write_bytes(b"not a jpeg")
    monkeypatch.setattr(wgan_run, "train_chunk", lambda *args: pytest.fail("trained first"))
    config.limit = None
    with pytest.raises(ValueError, match=f"1 training image\\(s\\) cannot be read, nothing was "
                                         f"trained: cannot read image .*{train_index.image_names[2]}"):
        wgan_run.run(config)
    assert len(list((tmp_path / "out" / "aug-images").iterdir())) == 6  # the first two images'
    assert len(read_augmentation_index(tmp_path / "out").image_names) == 6
    config.force = True  # a forced rerun deletes the finished images only once decoding passed
    with pytest.raises(ValueError, match="1 training image\\(s\\) cannot be read"):
        wgan_run.run(config)
    assert len(list((tmp_path / "out" / "aug-images").iterdir())) == 6

    (root / "images" / train_index.image_names[0]).write_bytes(b"not a jpeg either")
    command = [sys.executable, "-m", "wgan.run", f"--config.data.root={root}",
               f"--config.out_dir={tmp_path / 'out2'}", "--config.iterations=3",
               "--config.pairs=2", f"--config.model_width={WIDTH}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: 2 training image(s) cannot be read, nothing was trained: cannot read image")
    assert "(and 1 more)" in done.stderr and "Traceback" not in done.stderr


def test_a_run_stopped_before_its_first_image_leaves_its_settings_free(tmp_path, monkeypatch):
    """Killed while compiling: wgan_run.json exists but no image does, so a corrected rerun with
    other settings proceeds (and is recorded); once images exist, other settings are refused."""
    root = write_dataset(tmp_path / "data", n_train=3, n_test=1)
    settings = dict(data__root=str(root), out_dir=str(tmp_path / "out"), iterations=3, pairs=2,
                    model_width=WIDTH)

    def killed(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(wgan_run, "train_chunk", killed)
    with pytest.raises(KeyboardInterrupt):
        wgan_run.run(wgan_config(seed=1, **settings))
    assert json.loads((tmp_path / "out" / "wgan_run.json").read_text())["seed"] == 1
    monkeypatch.setattr(wgan_run, "train_chunk", _constant_fakes(0.2))
    wgan_run.run(wgan_config(seed=2, **settings))
    assert json.loads((tmp_path / "out" / "wgan_run.json").read_text())["seed"] == 2
    with pytest.raises(ValueError, match="holds 3 images' augmentations made with seed=2, not "
                                         "seed=3"):
        wgan_run.run(wgan_config(seed=3, **settings))
    (tmp_path / "out" / "wgan_run.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"wgan_run.json is damaged \(a JSON list, not an "
                                         r"object\); delete it to keep the 3 finished images"):
        wgan_run.run(wgan_config(seed=3, **settings))


def test_a_diverged_pair_is_named_and_not_saved(tmp_path, monkeypatch):
    """Non-finite fakes (a WGAN-GP that diverged) would be saved as black JPEGs and counted as
    done: the image is named instead, the other image of its chunk is written and indexed, and
    a rerun trains the diverged one again."""
    root = write_dataset(tmp_path / "data", n_train=2, n_test=1)
    names = read_split_index(root, "train").image_names
    fakes = np.zeros((2, 3, 128, 192, 3), np.float32)
    fakes[1, 2, 5, 5, 0] = np.nan
    monkeypatch.setattr(wgan_run, "train_chunk", lambda *args: fakes)
    config = wgan_config(data__root=str(root), out_dir=str(tmp_path / "out"), iterations=3,
                         pairs=2, model_width=WIDTH)
    with pytest.raises(ValueError, match=f"the WGAN-GP of 1 image\\(s\\) diverged .*: {names[1]}; "
                                         f"the other images are done"):
        wgan_run.run(config)
    assert [wgan_run.is_done(tmp_path / "out" / "aug-images", name) for name in names] == [
        True, False]
    assert len(read_augmentation_index(tmp_path / "out").image_names) == 3
    retrained = []
    monkeypatch.setattr(wgan_run, "train_chunk",
                        lambda setup, keys, images, iterations: retrained.append(len(keys))
                        or np.zeros((images.shape[0], 3, 128, 192, 3), np.float32))
    wgan_run.run(config)
    assert retrained == [2] and wgan_run.is_done(tmp_path / "out" / "aug-images", names[1])


def test_training_images_whose_augmentations_share_names_are_refused_before_any_work(tmp_path):
    """1000.a.jpeg and 1000.b.jpeg would both be augmented as 1000_aug*.jpeg: the second's
    images would replace the first's and train_aug.json would list each name twice (which
    training then refuses); the run is refused at once, naming both images."""
    root = write_dataset(tmp_path / "data", n_train=3, n_test=1)
    index = json.loads((root / "train.json").read_text())
    for sample, name in zip(index["samples"], ["1000.a.jpeg", "1000.b.jpeg"]):
        (root / "images" / sample["image_name"]).rename(root / "images" / name)
        sample["image_name"] = name
    (root / "train.json").write_text(json.dumps(index))
    config = wgan_config(data__root=str(root), out_dir=str(tmp_path / "out"), iterations=3,
                         pairs=2, model_width=WIDTH, limit=1)
    with pytest.raises(ValueError, match=r"training images '1000\.a\.jpeg' and '1000\.b\.jpeg' "
                                         r"of .*train\.json would both be augmented as "
                                         r"1000_aug\.jpeg"):
        wgan_run.run(config)
    assert not (tmp_path / "out").exists()


def test_out_of_device_memory_is_one_line_and_keeps_the_finished_images(tmp_path):
    """XLA's RESOURCE_EXHAUSTED in a chunk (here a real one, on the second chunk: a 1 TiB buffer
    in a process capped at 1 TiB of address space) ends the app with one line naming
    --config.pairs; the first chunk's images stay indexed."""
    root = write_dataset(tmp_path / "data", n_train=3, n_test=1)
    script = (
        ADDRESS_SPACE_CAP +
        "import jax.numpy as jnp, numpy as np\n"
        "from annotate import cli\n"
        "from wgan import run\n"
        "calls = []\n"
        "def train_chunk(setup, keys, images, iterations):\n"
        "    calls.append(1)\n"
        "    if len(calls) > 1:\n"
        "        jnp.zeros(2 ** 38).block_until_ready()\n"
        "    return np.full((images.shape[0], 3, 128, 192, 3), 0.5, np.float32)\n"
        "run.train_chunk = train_chunk\n"
        "cli.run(run.main, run.define_flags)\n")
    done = subprocess.run(
        [sys.executable, "-c", script, "--config=configs/wgan.py", f"--config.data.root={root}",
         f"--config.out_dir={tmp_path / 'out'}", "--config.iterations=3", "--config.pairs=2",
         f"--config.model_width={WIDTH}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: out of device memory (RESOURCE_EXHAUSTED: Out of memory") and \
        last.endswith("training 2 WGAN-GP pairs at once; a rerun with a smaller --config.pairs "
                      "keeps the finished images"), last
    assert len(read_augmentation_index(tmp_path / "out").image_names) == 6  # two images, 3 views
