"""Multi-label losses of the seed (BCE, focal, asymmetric, LSEP) as pure JAX functions.

Every loss maps logits [B, C] and 0/1 targets [B, C] to a scalar. Inputs narrower than float32
(bf16 logits from mixed precision) are promoted to float32 first; float64 inputs stay float64 so
that gradients can be checked against finite differences. Log-probabilities are computed with
`log_sigmoid`, so values and gradients stay finite for any logits a model produces (LSEP's
log-sum-exps overflow only beyond about 1e38, near float32's largest number).
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Callable

import jax
import jax.numpy as jnp

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _promote(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Check shapes ([B, C] both) and promote both arrays to at least float32."""
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    if logits.ndim != 2 or logits.shape != targets.shape:
        raise ValueError(f"loss expects logits and targets of equal shape [B, C]; got logits "
                         f"{logits.shape} and targets {targets.shape}")
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    return logits.astype(dtype), targets.astype(dtype)


def _focusing_weight(base: jax.Array, gamma: float) -> jax.Array:
    """base**gamma with a zero (not NaN) gradient where base == 0, and exactly 1 for gamma == 0."""
    if gamma == 0:
        return jnp.ones_like(base)
    positive = base > 0
    return jnp.where(positive, jnp.where(positive, base, 1.0) ** gamma, 0.0)


def _check_hyper(gamma_neg: float, gamma_pos: float, clip: float, eps: float) -> None:
    """Reject hyper-parameters outside the loss's domain with a message naming the bad one."""
    if not (0 <= gamma_neg < math.inf and 0 <= gamma_pos < math.inf):  # NaN fails too
        raise ValueError(f"focusing parameters must be finite and >= 0; got "
                         f"gamma_neg={gamma_neg}, gamma_pos={gamma_pos}")
    if not 0 <= clip < 1:
        raise ValueError(f"probability margin clip must be in [0, 1); got {clip}")
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1); got {eps}")


def bce_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Binary cross-entropy averaged over batch and labels (= torch MultiLabelSoftMarginLoss,
    the seed's "BCELoss"); dL/dx = (sigmoid(x) - y) / (B * C)."""
    logits, targets = _promote(logits, targets)
    log_p = jax.nn.log_sigmoid(logits)
    log_not_p = jax.nn.log_sigmoid(-logits)
    return -jnp.mean(targets * log_p + (1 - targets) * log_not_p)


def asymmetric_loss(logits: jax.Array, targets: jax.Array, gamma_neg: float = 4.0,
                    gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8) -> jax.Array:
    """The seed's MultiLabelLoss(gamma_neg, gamma_pos, neg_margin=clip), mean over batch and labels.

    p = sigmoid(x), p_m = max(p - clip, 0);
    loss = -mean(y log(max(p, eps)) (1-p)^gamma_pos + (1-y) log(max(1-p_m, eps)) p_m^gamma_neg).
    As in the seed, the gradient also flows through the focusing weights: the official
    `AsymmetricLoss` with `disable_torch_grad_focal_loss=False` (its default, True, detaches
    them; one version of that file has the detaching block commented out) or
    `AsymmetricLossOptimized` at its default. Negatives with p < clip get exactly zero gradient;
    as in the seed, so do labels whose log term is clamped at log(eps) (positives with
    x < log(eps)).
    """
    _check_hyper(gamma_neg, gamma_pos, clip, eps)
    logits, targets = _promote(logits, targets)
    log_eps = math.log(eps)
    p = jax.nn.sigmoid(logits)
    not_p = jax.nn.sigmoid(-logits)  # 1 - p without cancellation
    positive_term = (jnp.maximum(jax.nn.log_sigmoid(logits), log_eps)
                     * _focusing_weight(not_p, gamma_pos))
    if clip > 0:
        shifted_p = jnp.maximum(p - clip, 0.0)
        # 1 - p_m = min(1 - p + clip, 1) >= clip: the eps clamp acts only for a clip below eps
        log_not_shifted_p = jnp.maximum(jnp.log(jnp.minimum(not_p + clip, 1.0)), log_eps)
    else:
        shifted_p = p
        log_not_shifted_p = jnp.maximum(jax.nn.log_sigmoid(-logits), log_eps)
    negative_term = log_not_shifted_p * _focusing_weight(shifted_p, gamma_neg)
    return -jnp.mean(targets * positive_term + (1 - targets) * negative_term)


def focal_loss(logits: jax.Array, targets: jax.Array, gamma: float = 3.0,
               eps: float = 1e-8) -> jax.Array:
    """Symmetric focal loss: the seed's MultiLabelLoss(gamma_neg=gamma, gamma_pos=gamma,
    neg_margin=0), i.e. `asymmetric_loss` with equal focusing and no probability margin."""
    return asymmetric_loss(logits, targets, gamma_neg=gamma, gamma_pos=gamma, clip=0.0, eps=eps)


def _masked_logsumexp(values: jax.Array, mask: jax.Array) -> jax.Array:
    """log(sum over mask of exp(values)) along the last axis; 0 (not -inf) for an empty mask, so
    values and gradients stay finite. Masked-out entries receive zero gradient."""
    masked = jnp.where(mask, values, -jnp.inf)
    shift = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    total = jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, values - shift, 0.0)), 0.0), axis=-1)
    nonempty = jnp.any(mask, axis=-1)
    return jnp.where(nonempty, jnp.log(jnp.where(nonempty, total, 1.0)), 0.0) + shift[..., 0]


def lsep_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Log-sum-exp pairwise ranking loss (Li et al., CVPR 2017), mean over images of
    log(1 + sum_{u positive, v negative} exp(x_v - x_u)).

    The pair sum factorises: log(1 + exp(LSE_neg(x) + LSE_pos(-x))) = softplus(...), which needs
    O(C) instead of O(C^2) work. An image without positives or without negatives contributes 0.
    """
    logits, targets = _promote(logits, targets)
    positive = targets > 0.5
    negative = ~positive
    pair_logsumexp = (_masked_logsumexp(logits, negative)
                      + _masked_logsumexp(-logits, positive))
    has_pairs = jnp.any(positive, axis=-1) & jnp.any(negative, axis=-1)
    per_image = jnp.where(has_pairs, jax.nn.softplus(pair_logsumexp), 0.0)
    return jnp.mean(per_image)


_LOSSES: dict[str, LossFn] = {
    "bce": bce_loss,
    "focal": focal_loss,
    "asl": asymmetric_loss,
    "lsep": lsep_loss,
}
LOSS_NAMES: tuple[str, ...] = tuple(_LOSSES)


def check_loss_name(name: str) -> None:
    """Raise a ValueError listing the valid names when `name` is not a registered loss."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSS_NAMES)}")


def make_loss(name: str, **hyper: float) -> LossFn:
    """Return loss `name` (one of LOSS_NAMES) with its hyper-parameters bound, e.g.
    make_loss("asl", gamma_neg=4, gamma_pos=0, clip=0.05); bad names fail here, not mid-training."""
    check_loss_name(name)
    loss_fn = _LOSSES[name]
    signature = inspect.signature(loss_fn)
    accepted = list(signature.parameters)[2:]  # everything after (logits, targets)
    unknown = sorted(set(hyper) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} got unknown hyper-parameters {unknown}; it accepts "
                         f"{accepted or 'none'}")
    hyper = {key: float(value) for key, value in hyper.items()}
    bound = signature.bind(None, None, **hyper)
    bound.apply_defaults()
    settings = bound.arguments
    if name == "asl":
        _check_hyper(settings["gamma_neg"], settings["gamma_pos"], settings["clip"],
                     settings["eps"])
    elif name == "focal":
        _check_hyper(settings["gamma"], settings["gamma"], 0.0, settings["eps"])
    return functools.partial(loss_fn, **hyper) if hyper else loss_fn
