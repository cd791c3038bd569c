"""The seed's ML-WGAN generator and critic (augmentation/gen_critic.py) in Flax NNX, NHWC.

Convolutions are written as patch matrices times the kernel (im2col / col2im) rather than
`lax.conv`: under `jax.vmap` over K independent generator/critic pairs every layer then becomes
one batched matrix product with a per-pair weight, instead of a K-group convolution whose weight
gradient XLA handles poorly on GPU. Kernels are stored [kh, kw, in, out] so that torch weights map
by a transpose alone: Conv2d (out, in, kh, kw) -> (2, 3, 1, 0); ConvTranspose2d (in, out, kh, kw)
-> (2, 3, 0, 1), no spatial flip.

BatchNorm keeps only scale and bias: the seed runs both networks in train mode throughout, saving
images straight from the training loop, so its running statistics are never read. Its batches are
always one image, so batch statistics are that image's per-channel mean/variance over H and W; we
compute them per image, which lets one call carry several of the seed's batch-1 calls.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from annotate.models.layers import torch_default_uniform

Dtype = Any

NOISE_DIM = 100
IMAGE_HEIGHT, IMAGE_WIDTH = 128, 192


def _normal_init(stddev: float):
    """The seed's `weights_init`: N(0, stddev) (conv kernels and BatchNorm scales alike)."""
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return stddev * jax.random.normal(key, shape, dtype)
    return init


def conv2d_patches(x: jax.Array, kernel_size: tuple[int, int], stride: int,
                   padding: int) -> jax.Array:
    """im2col: [B, H, W, C] -> [B, Ho, Wo, kh*kw*C], patch features ordered (i, j, c) like HWIO.

    Done by space-to-depth: with i = a*s + r, tap (i, j) of output (y, x) reads phase (r, t) of
    coarse pixel (y + a, x + b), so only (kh/s)*(kw/s) shifted slices are needed, not kh*kw.
    """
    kh, kw = kernel_size
    if kh % stride or kw % stride:
        raise ValueError(f"kernel {kh}x{kw} must be a multiple of stride {stride}")
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    batch, _, _, channels = x.shape
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    if out_h == 1 and out_w == 1:  # the kernel covers the whole (padded) input
        return x[:, :kh, :kw].reshape(batch, 1, 1, kh * kw * channels)
    ah, aw = kh // stride, kw // stride
    coarse_h, coarse_w = out_h - 1 + ah, out_w - 1 + aw
    coarse = x[:, :coarse_h * stride, :coarse_w * stride].reshape(
        batch, coarse_h, stride, coarse_w, stride, channels)
    taps = jnp.stack([jnp.stack([coarse[:, a:a + out_h, :, b:b + out_w] for b in range(aw)],
                                axis=-1) for a in range(ah)], axis=-2)
    # taps: [B, Ho, r, Wo, t, C, a, b] -> [B, Ho, Wo, a, r, b, t, C]
    taps = taps.transpose(0, 1, 3, 6, 2, 7, 4, 5)
    return taps.reshape(batch, out_h, out_w, kh * kw * channels)


def conv_transpose_overlap_add(columns: jax.Array, stride: int, padding: int) -> jax.Array:
    """col2im for a transposed conv: [B, H, W, kh, kw, O] per-input-pixel contributions ->
    [B, (H-1)s + kh - 2p, (W-1)s + kw - 2p, O], torch ConvTranspose2d placement.

    Input pixel (y, x) tap (i, j) lands on output (y*s + i, x*s + j). Writing i = a*s + r, it lands
    on phase r of coarse row y + a, so each phase is a sum of shifted (padded) slices, and the
    phases interleave by a reshape: no scatter.
    """
    batch, height, width, kh, kw, out = columns.shape
    if kh % stride or kw % stride:
        raise ValueError(f"kernel {kh}x{kw} must be a multiple of stride {stride}")
    if height == 1 and width == 1:  # one input pixel: tap (i, j) is output (i, j)
        full = columns.reshape(batch, kh, kw, out)
        return full[:, padding:kh - padding, padding:kw - padding]
    ah, aw = kh // stride, kw // stride
    columns = columns.reshape(batch, height, width, ah, stride, aw, stride, out)
    coarse = 0
    for a in range(ah):
        for b in range(aw):
            coarse = coarse + jnp.pad(columns[:, :, :, a, :, b],
                                      ((0, 0), (a, ah - 1 - a), (b, aw - 1 - b),
                                       (0, 0), (0, 0), (0, 0)))
    # coarse: [B, H + ah - 1, W + aw - 1, s (row phase), s (column phase), O]
    coarse_h, coarse_w = height + ah - 1, width + aw - 1
    full = coarse.transpose(0, 1, 3, 2, 4, 5).reshape(batch, coarse_h * stride,
                                                      coarse_w * stride, out)
    return full[:, padding:full.shape[1] - padding, padding:full.shape[2] - padding]


class Conv2d(nnx.Module):
    """torch `nn.Conv2d` (with bias) as im2col + one matrix product; kernel [kh, kw, in, out]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 *, stride: int = 1, padding: int = 0, dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.kernel_size = (kh, kw)
        self.stride = stride
        self.padding = padding
        self.dtype = dtype
        self.kernel = nnx.Param(_normal_init(0.02)(rngs.params(), (kh, kw, in_channels,
                                                                   out_channels)))
        self.bias = nnx.Param(torch_default_uniform(in_channels * kh * kw)(rngs.params(),
                                                                      (out_channels,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        patches = conv2d_patches(x.astype(self.dtype), self.kernel_size, self.stride,
                                 self.padding)
        kernel = self.kernel[...].reshape(-1, self.kernel.shape[-1]).astype(self.dtype)
        y = jnp.einsum("bhwk,ko->bhwo", patches, kernel, preferred_element_type=jnp.float32)
        return y + self.bias[...]


class ConvTranspose2d(nnx.Module):
    """torch `nn.ConvTranspose2d` (with bias) as one matrix product + overlap-add (col2im)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 *, stride: int = 1, padding: int = 0, dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.stride = stride
        self.padding = padding
        self.dtype = dtype
        self.kernel = nnx.Param(_normal_init(0.02)(rngs.params(), (kh, kw, in_channels,
                                                                   out_channels)))
        # torch computes a ConvTranspose2d's fan-in from weight.size(1) = out_channels.
        self.bias = nnx.Param(torch_default_uniform(out_channels * kh * kw)(rngs.params(),
                                                                       (out_channels,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        columns = jnp.einsum("bhwc,ijco->bhwijo", x.astype(self.dtype),
                             self.kernel[...].astype(self.dtype),
                             preferred_element_type=jnp.float32)
        return conv_transpose_overlap_add(columns, self.stride, self.padding) + self.bias[...]


class BatchNorm2d(nnx.Module):
    """torch `nn.BatchNorm2d` in train mode on a batch of ONE image, applied to each image of the
    batch separately: per-image, per-channel statistics over H and W (eps 1e-5).

    So a batch of images gives exactly the seed's separate batch-1 calls, and several of them can
    share one pass over the weights. Scale ~ N(0, 0.02) and bias 0 as the seed's `weights_init`.
    No running statistics: the seed never reads them (it stays in train mode throughout).
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = nnx.Param(_normal_init(0.02)(rngs.params(), (num_features,)))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = jnp.mean(x, axis=(1, 2), keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
        inv = self.scale[...] * jax.lax.rsqrt(var + self.eps)
        return x * inv + (self.bias[...] - mean * inv)


class Generator(nnx.Module):
    """100-d noise -> [B, 128, 192, 3] in (-1, 1): ConvT(4x6) to 4x6x16h, four ConvT(4, 2, 1)
    halving channels with BN + ReLU, ConvT(4, 2, 1) to 3 channels, tanh (h = 64 in the seed)."""

    def __init__(self, *, noise_dim: int = NOISE_DIM, width: int = 64,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.noise_dim = noise_dim
        channels = [width * 16, width * 8, width * 4, width * 2, width]
        self.project = ConvTranspose2d(noise_dim, channels[0], (4, 6), dtype=dtype, rngs=rngs)
        self.project_norm = BatchNorm2d(channels[0], rngs=rngs)
        self.ups = nnx.List([ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, dtype=dtype,
                                             rngs=rngs)
                             for c_in, c_out in zip(channels[:-1], channels[1:])])
        self.norms = nnx.List([BatchNorm2d(c, rngs=rngs) for c in channels[1:]])
        self.to_image = ConvTranspose2d(width, 3, 4, stride=2, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, noise: jax.Array) -> jax.Array:
        x = noise.reshape(noise.shape[0], 1, 1, self.noise_dim)
        x = jax.nn.relu(self.project_norm(self.project(x)))
        for up, norm in zip(self.ups, self.norms):
            x = jax.nn.relu(norm(up(x)))
        return jnp.tanh(self.to_image(x))


class Critic(nnx.Module):
    """[B, 128, 192, 3] -> [B] scores: five Conv(4, 2, 1) with h..16h channels, each BN +
    LeakyReLU(0.2), then Conv(4x6) to one score (h = 64 in the seed)."""

    def __init__(self, *, width: int = 64, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        channels = [3, width, width * 2, width * 4, width * 8, width * 16]
        self.downs = nnx.List([Conv2d(c_in, c_out, 4, stride=2, padding=1, dtype=dtype,
                                      rngs=rngs)
                               for c_in, c_out in zip(channels[:-1], channels[1:])])
        self.norms = nnx.List([BatchNorm2d(c, rngs=rngs) for c in channels[1:]])
        self.score = Conv2d(channels[-1], 1, (4, 6), dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images
        for down, norm in zip(self.downs, self.norms):
            x = jax.nn.leaky_relu(norm(down(x)), 0.2)
        return self.score(x).reshape(images.shape[0])
