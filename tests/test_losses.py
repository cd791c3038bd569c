"""Losses against independent references: numpy transcriptions of the seed's formulas, torch
(MultiLabelSoftMarginLoss, the official ASL formulation with autograd), closed-form gradients of the
seed's "Gradient Analysis", and float64 finite differences for LSEP."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from annotate.losses import (LOSS_NAMES, asymmetric_loss, bce_loss, focal_loss, lsep_loss,
                             make_loss)


def value_of(loss_fn, logits, targets) -> float:
    """The loss under jit (as training uses it; compiling once is cheaper than eager op-by-op)."""
    return float(jax.jit(loss_fn)(logits, targets))


def gradient_of(loss_fn, logits, targets) -> np.ndarray:
    """jax.grad of the loss w.r.t. the logits, under jit."""
    return np.asarray(jax.jit(jax.grad(loss_fn))(logits, targets))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def seed_multilabel_loss(x, y, gamma_neg, gamma_pos, neg_margin, eps=1e-8):
    """Line-by-line numpy float64 transcription of the seed's MultiLabelLoss.forward."""
    p = _sigmoid(x)
    los_pos = y * np.log(np.maximum(p, eps)) * (1 - p) ** gamma_pos
    if neg_margin > 0:
        p_m = np.maximum(p - neg_margin, 0)
        los_neg = (1 - y) * np.log(np.maximum(1 - p_m, eps)) * p_m ** gamma_neg
    else:
        los_neg = (1 - y) * np.log(np.maximum(1 - p, eps)) * p ** gamma_neg
    return -np.mean(los_pos + los_neg)


def seed_lsep_loss(x, y):
    """The seed's LSEPLoss: a loop over images, explicit sum over (positive, negative) pairs."""
    total = 0.0
    for logits, targets in zip(x, y):
        positives, negatives = logits[targets == 1], logits[targets == 0]
        total += np.log(1 + np.sum(np.exp(negatives[None, :] - positives[:, None])))
    return total / len(x)


def official_asl_torch(x, y, gamma_neg, gamma_pos, clip, eps=1e-8):
    """Alibaba-MIIL ASL formulation (clip on 1-p, weight (1-pt)^gamma) with gradients through the
    weight, as a sum; differs from the seed's form only in notation and in reducing by sum."""
    x_sigmoid = torch.sigmoid(x)
    xs_pos, xs_neg = x_sigmoid, (1 - x_sigmoid + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    pt = xs_pos * y + xs_neg * (1 - y)
    loss = loss * torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
    return -loss.sum()


@pytest.fixture(scope="module")
def batch():
    """Moderate logits (eps clamps inactive) and sparse multi-hot targets, with an empty row."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, (6, 17)).astype(np.float32)
    targets = (rng.random((6, 17)) < 0.25).astype(np.float32)
    targets[0] = 0.0  # an image without labels (Corel-5k has 7)
    targets[1, :3] = 1.0
    return logits, targets


# ---------------------------------------------------------------- values vs references


def test_bce_matches_torch_multilabel_soft_margin(batch):
    logits, targets = batch
    expected = torch.nn.MultiLabelSoftMarginLoss()(torch.from_numpy(logits).double(),
                                                   torch.from_numpy(targets).double()).item()
    np.testing.assert_allclose(value_of(bce_loss, logits, targets), expected, rtol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 2.0, 3.0])
def test_focal_matches_seed_formula(batch, gamma):
    logits, targets = batch
    expected = seed_multilabel_loss(logits.astype(np.float64), targets, gamma, gamma, 0.0)
    loss = functools.partial(focal_loss, gamma=gamma)
    np.testing.assert_allclose(value_of(loss, logits, targets), expected, rtol=1e-5)


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", [(4.0, 0.0, 0.05), (2.0, 1.0, 0.2),
                                                      (4.0, 0.0, 0.0), (1.5, 0.5, 0.05)])
def test_asl_matches_seed_formula(batch, gamma_neg, gamma_pos, clip):
    logits, targets = batch
    expected = seed_multilabel_loss(logits.astype(np.float64), targets, gamma_neg, gamma_pos, clip)
    loss = functools.partial(asymmetric_loss, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
    np.testing.assert_allclose(value_of(loss, logits, targets), expected, rtol=1e-5)


def test_asl_value_and_gradient_match_official_asl_without_detach(batch):
    logits, targets = batch
    x = torch.from_numpy(logits).double().requires_grad_(True)
    official = official_asl_torch(x, torch.from_numpy(targets).double(), 4.0, 0.0, 0.05)
    official.backward()
    scale = logits.size  # seed: mean over batch and labels; official: sum
    ours = value_of(asymmetric_loss, logits, targets)
    np.testing.assert_allclose(ours * scale, official.item(), rtol=1e-5)
    gradient = gradient_of(asymmetric_loss, logits, targets)
    np.testing.assert_allclose(gradient * scale, x.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_lsep_matches_seed_loop(batch):
    logits, targets = batch
    expected = seed_lsep_loss(logits.astype(np.float64), targets)
    np.testing.assert_allclose(value_of(lsep_loss, logits, targets), expected, rtol=1e-5)


def test_lsep_zero_for_images_without_positives_or_negatives():
    logits = np.array([[3.0, -1.0, 0.5], [2.0, 1.0, -4.0]], np.float32)
    assert value_of(lsep_loss, logits, np.zeros_like(logits)) == 0.0
    assert value_of(lsep_loss, logits, np.ones_like(logits)) == 0.0
    assert np.all(gradient_of(lsep_loss, logits, np.zeros_like(logits)) == 0.0)


# ---------------------------------------------------------------- closed-form gradients


PROBABILITIES = np.linspace(0.01, 0.99, 99)


def _elementwise_gradient(loss_fn, target: float) -> tuple[np.ndarray, np.ndarray]:
    """dL/dx per element on the p-grid (one row of logits); returns (p, gradient) in float64."""
    logits = np.log(PROBABILITIES / (1 - PROBABILITIES)).astype(np.float32)[None, :]
    targets = np.full_like(logits, target)
    gradient = gradient_of(loss_fn, logits, targets).astype(np.float64) * logits.size
    return _sigmoid(logits[0].astype(np.float64)), gradient[0]


def _focal_positive_gradient(p, gamma):
    return -(1 - p) ** gamma * (1 - p - gamma * p * np.log(p))


def _focal_negative_gradient(p, gamma):
    return p ** gamma * (p - gamma * (1 - p) * np.log(1 - p))


def _asl_negative_gradient(p, gamma, clip):
    shifted = np.maximum(p - clip, 0)
    inner = shifted ** gamma / (1 - shifted) - gamma * shifted ** (gamma - 1) * np.log(1 - shifted)
    return np.where(p > clip, p * (1 - p) * inner, 0.0)


def test_bce_gradient_is_p_minus_y():
    for target in (1.0, 0.0):
        p, gradient = _elementwise_gradient(bce_loss, target)
        np.testing.assert_allclose(gradient, p - target, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("gamma", [2.0, 3.0])
def test_focal_gradient_closed_form(gamma):
    loss = functools.partial(focal_loss, gamma=gamma)
    p, gradient = _elementwise_gradient(loss, 1.0)
    np.testing.assert_allclose(gradient, _focal_positive_gradient(p, gamma), rtol=2e-4, atol=1e-10)
    p, gradient = _elementwise_gradient(loss, 0.0)
    np.testing.assert_allclose(gradient, _focal_negative_gradient(p, gamma), rtol=2e-4, atol=1e-10)


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", [(4.0, 0.0, 0.05), (2.0, 1.0, 0.2)])
def test_asl_gradient_closed_form(gamma_neg, gamma_pos, clip):
    loss = functools.partial(asymmetric_loss, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
    p, gradient = _elementwise_gradient(loss, 1.0)
    np.testing.assert_allclose(gradient, _focal_positive_gradient(p, gamma_pos), rtol=2e-4,
                               atol=1e-10)
    p, gradient = _elementwise_gradient(loss, 0.0)
    np.testing.assert_allclose(gradient, _asl_negative_gradient(p, gamma_neg, clip), rtol=2e-4,
                               atol=1e-10)
    assert np.all(gradient[p < clip] == 0.0)  # hard threshold: exactly no gradient
    assert np.all(gradient[p > clip + 1e-3] > 0.0)


def test_lsep_gradient_matches_finite_differences(batch):
    logits, targets = batch
    step = 1e-6
    with jax.enable_x64(True):
        x = jnp.asarray(logits, jnp.float64)
        gradient = np.asarray(jax.grad(lsep_loss)(x, targets))
        assert gradient.dtype == np.float64
        offsets = step * jnp.eye(x.size, dtype=jnp.float64).reshape(x.size, *x.shape)
        perturbed_loss = jax.jit(jax.vmap(lambda offset: lsep_loss(x + offset, targets)))
        numeric = np.asarray(perturbed_loss(offsets) - perturbed_loss(-offsets)) / (2 * step)
    np.testing.assert_allclose(gradient, numeric.reshape(x.shape), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- robustness


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_values_and_gradients_finite_at_large_logits(name):
    loss = make_loss(name)
    logits = np.array([[100.0, -100.0, 100.0, -100.0], [-100.0, 100.0, 0.0, 60.0]], np.float32)
    targets = np.array([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]], np.float32)
    value, gradient = jax.jit(jax.value_and_grad(loss))(logits, targets)
    assert np.isfinite(float(value)) and float(value) > 0
    assert np.all(np.isfinite(np.asarray(gradient)))


def test_large_logit_values_match_references():
    """At logits far beyond log(eps) = -18.4 every loss equals its reference: focal and ASL clamp
    the log of a confident wrong positive (x = -100, -30, -17 with y = 1) or negative (clip 0)
    at log(eps) as the seed does; under ASL's gamma+ = 0 (a constant weight) a clamped positive
    gets no gradient."""
    logits = np.array([[100.0, -100.0, 30.0, -30.0, 17.0, -17.0, -30.0, 30.0]], np.float32)
    targets = np.array([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]], np.float32)
    expected_bce = torch.nn.MultiLabelSoftMarginLoss()(torch.tensor(logits).double(),
                                                       torch.tensor(targets).double()).item()
    np.testing.assert_allclose(value_of(bce_loss, logits, targets), expected_bce, rtol=1e-6)
    np.testing.assert_allclose(value_of(lsep_loss, logits, targets),
                               seed_lsep_loss(logits.astype(np.float64), targets), rtol=1e-6)
    seed = functools.partial(seed_multilabel_loss, logits.astype(np.float64), targets)
    np.testing.assert_allclose(value_of(asymmetric_loss, logits, targets), seed(4.0, 0.0, 0.05),
                               rtol=1e-6)
    np.testing.assert_allclose(value_of(focal_loss, logits, targets), seed(3.0, 3.0, 0.0),
                               rtol=1e-6)
    gradient = gradient_of(asymmetric_loss, logits, targets)[0]
    assert gradient[1] == gradient[3] == 0.0  # positive at -100 clamped; negative at -30 < clip
    assert gradient[6] == 0.0 and gradient[5] < 0  # -30 clamped; -17 > log(eps) still learns


def test_asl_with_a_margin_below_eps_clamps_like_the_seed():
    """clip < eps: confident negatives have 1 - p_m below eps, where the seed clamps the log."""
    logits = np.array([[30.0, 25.0, -2.0]], np.float32)
    targets = np.zeros_like(logits)
    loss = functools.partial(asymmetric_loss, gamma_neg=4.0, gamma_pos=0.0, clip=1e-9)
    np.testing.assert_allclose(value_of(loss, logits, targets), seed_multilabel_loss(
        logits.astype(np.float64), targets, 4.0, 0.0, 1e-9), rtol=1e-6)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bfloat16_logits_accepted(name, batch):
    logits, targets = batch
    loss = make_loss(name)
    low = jnp.asarray(logits, jnp.bfloat16)
    value = jax.jit(loss)(low, targets)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(float(value), value_of(loss, np.asarray(low, np.float32), targets),
                               rtol=1e-6)
    assert gradient_of(loss, low, targets).dtype == jnp.bfloat16


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="equal shape"):
        bce_loss(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        lsep_loss(np.zeros(3), np.zeros(3))


# ---------------------------------------------------------------- make_loss


def test_make_loss_binds_hyper_parameters(batch):
    logits, targets = batch
    assert {"bce", "focal", "asl", "lsep"} <= set(LOSS_NAMES)  # the seed's; more may be added
    bound = make_loss("asl", gamma_neg=2, gamma_pos=1, clip=0.1)
    expected = seed_multilabel_loss(logits.astype(np.float64), targets, 2.0, 1.0, 0.1)
    np.testing.assert_allclose(value_of(bound, logits, targets), expected, rtol=1e-5)
    np.testing.assert_allclose(value_of(make_loss("focal", gamma=2), logits, targets),
                               seed_multilabel_loss(logits.astype(np.float64), targets, 2, 2, 0),
                               rtol=1e-5)


def test_make_loss_rejects_bad_names_and_hyper_parameters():
    with pytest.raises(ValueError, match=f"valid losses: {', '.join(LOSS_NAMES)}$"):
        make_loss("bceloss")
    with pytest.raises(ValueError, match="unknown hyper-parameters"):
        make_loss("lsep", gamma=2.0)
    with pytest.raises(ValueError, match="unknown hyper-parameters.*'gamma'"):
        make_loss("asl", gamma=2.0)
    with pytest.raises(ValueError, match="clip"):
        make_loss("asl", clip=1.5)
    for gamma in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be finite and >= 0"):
            make_loss("focal", gamma=gamma)
