"""Layers shared by every backbone, written so a timm/torchvision state_dict maps onto them 1:1.

Parameter names follow flax (`kernel`, `scale`, `bias`, `mean`, `var`) and the module tree follows
timm's attribute names, so `annotate.convert` needs one generic rule per tensor kind and no
per-model key tables. Activations are NHWC.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any
Initializer = Callable[..., jax.Array]


def torch_default_uniform(fan_in: int) -> Initializer:
    """torch's default init of a conv or linear bias (and of an nn.Linear weight):
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = input channels per group x kernel area."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


# timm's (and torch's kaiming_normal_ fan-out) conv kernel initialisation
KAIMING_FAN_OUT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv2d(in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], *,
           stride: int = 1, padding: int | tuple[int, int] = 0, groups: int = 1,
           dilation: int = 1, bias: bool = False, dtype: Dtype = jnp.float32,
           rngs: nnx.Rngs) -> nnx.Conv:
    """A torch `nn.Conv2d` as `nnx.Conv`, initialised as timm initialises its backbones: symmetric
    explicit padding, kaiming-normal fan-out kernel, torch's default uniform bias."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return nnx.Conv(in_channels, out_channels, (kh, kw), strides=stride,
                    padding=((ph, ph), (pw, pw)), kernel_dilation=dilation,
                    feature_group_count=groups, use_bias=bias, dtype=dtype,
                    param_dtype=jnp.float32,
                    kernel_init=KAIMING_FAN_OUT,
                    bias_init=torch_default_uniform(in_channels // groups * kh * kw),
                    rngs=rngs)


class DepthwiseConv2d(nnx.Module):
    """A torch `nn.Conv2d(channels, channels, k, padding=p, groups=channels, bias=False)`: each
    channel convolved with its own k x k filter, stride 1; `kernel` [k, k, 1, channels] as nnx.Conv
    stores it, drawn as `conv2d` draws it.

    Computed as k*k shifted multiply-adds (`implementation = "taps"`), which XLA fuses into
    elementwise loops whose gradients are elementwise loops and reductions too. A grouped
    convolution with one group per channel ("grouped") is what XLA would otherwise hand to cuDNN,
    known to be slow on GPUs, in its backward pass above all (jax issue 13800). The products and
    their sum are float32 (exact products for bfloat16 inputs), as cuDNN accumulates.
    """

    implementation = "taps"  # "taps" or "grouped": read when traced (scripts/benchmark.py times both)

    def __init__(self, channels: int, kernel_size: int, *, padding: int = 0,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param(KAIMING_FAN_OUT(rngs.params(),
                                                (kernel_size, kernel_size, 1, channels),
                                                jnp.float32))
        self.padding = padding
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        if self.implementation == "grouped":  # exactly what nnx.Conv(groups=channels) calls
            return jax.lax.conv_general_dilated(
                x, kernel, (1, 1), ((self.padding, self.padding),) * 2,
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=kernel.shape[-1])
        return depthwise_taps(x, kernel, self.padding)


@functools.partial(jax.jit, static_argnums=2)  # one dispatch when called eagerly (tests, eval)
def depthwise_taps(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """Depthwise stride-1 convolution of NHWC `x` with `kernel` [k, k, 1, C] as k*k shifted
    products summed in float32, in `x`'s dtype."""
    size, kernel = kernel.shape[0], kernel.astype(jnp.float32)
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    padded = padded.astype(jnp.float32)
    height, width = padded.shape[1] - size + 1, padded.shape[2] - size + 1
    taps = [padded[:, i:i + height, j:j + width, :] * kernel[i, j, 0]
            for i in range(size) for j in range(size)]
    return sum(taps[1:], taps[0]).astype(x.dtype)


@contextlib.contextmanager
def depthwise_implementation(implementation: str | None) -> Iterator[None]:
    """Trace every DepthwiseConv2d as `implementation` ("taps" or "grouped") inside the block, to
    time or test one against the other; None keeps the default. Only traces made inside the
    block see it: a function jitted and traced before keeps what it was traced with."""
    if implementation not in (None, "taps", "grouped"):
        raise ValueError(f"unknown depthwise implementation {implementation!r}; "
                         "valid: taps, grouped")
    previous = DepthwiseConv2d.implementation
    DepthwiseConv2d.implementation = implementation or previous
    try:
        yield
    finally:
        DepthwiseConv2d.implementation = previous


class BatchNorm2d(nnx.Module):
    """torch `nn.BatchNorm2d` semantics: eps 1e-5, momentum 0.1, unbiased running variance.

    Statistics and parameters stay float32 whatever the compute dtype; the output has the input's
    dtype. `model.train()` / `model.eval()` flip `use_running_average`.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 zero_init: bool = False, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.momentum = momentum
        self.use_running_average = False
        init = jnp.zeros if zero_init else jnp.ones
        self.scale = nnx.Param(init((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axes)
            var = jnp.mean(jnp.square(xf - mean), axes)
            n = x.size // x.shape[-1]
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            self.mean[...] = jax.lax.stop_gradient((1 - m) * self.mean[...] + m * mean)
            self.var[...] = jax.lax.stop_gradient((1 - m) * self.var[...] + m * unbiased)
        inv = self.scale[...] * jax.lax.rsqrt(var + self.eps)
        shift = self.bias[...] - mean * inv
        return (x * inv.astype(x.dtype) + shift.astype(x.dtype)).astype(x.dtype)


def max_pool2d(x: jax.Array, kernel_size: int, stride: int, padding: int) -> jax.Array:
    """torch `nn.MaxPool2d` on NHWC input: padded cells are -inf, so they never win the max."""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max,
        window_dimensions=(1, kernel_size, kernel_size, 1), window_strides=(1, stride, stride, 1),
        padding=((0, 0), (padding, padding), (padding, padding), (0, 0)))
