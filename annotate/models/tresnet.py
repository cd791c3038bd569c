"""TResNet-M (Ridnik et al., 2021) in Flax NNX, layer for layer as timm's `tresnet_m`.

SpaceToDepth stem -> 3x3 ConvNormAct (LeakyReLU 1e-2) -> BasicBlock stages 1-2 -> Bottleneck stages
3-4 (LeakyReLU 1e-3 inside blocks). Every stride-2 convolution runs at stride 1 and is followed by
a 3x3 binomial BlurPool (reflect padding); downsample shortcuts average-pool 2x2 (ceil mode) before
their 1x1 convolution; SE sits in stages 1-3. Module names mirror timm's state_dict keys
(`body.conv1.conv`, `body.layer3.0.se.fc1`, ...) so `annotate.convert` maps them 1:1; timm's
classifier (`head.fc`) is the head's (annotate.models.heads), not the backbone's.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from annotate.models.layers import BatchNorm2d, Dtype, conv2d

STEM_LEAKY_SLOPE = 1e-2  # timm builds the stem with nn.LeakyReLU's default slope
BLOCK_LEAKY_SLOPE = 1e-3  # every activated ConvNormAct inside a residual block
INPLACE_ABN_EPS = 1e-5  # timm's inplace-ABN -> BatchNorm weight conversion: |w| + eps


def space_to_depth(x: jax.Array, block_size: int = 4) -> jax.Array:
    """timm's SpaceToDepth on NHWC: [B,H,W,C] -> [B,H/4,W/4,16C], channel = (row*4 + col)*C + c."""
    batch, height, width, channels = x.shape
    if height % block_size or width % block_size:
        raise ValueError(f"TResNet needs H and W divisible by {block_size}, got {height}x{width}")
    x = x.reshape(batch, height // block_size, block_size, width // block_size, block_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height // block_size, width // block_size, block_size ** 2 * channels)


def _blur_stride2_along(x: jax.Array, axis: int) -> jax.Array:
    """[1, 2, 1] / 4 filter at stride 2 along `axis` of an input already reflect-padded by 1."""
    out_len = (x.shape[axis] - 3) // 2 + 1

    def taps(start: int) -> jax.Array:
        return jax.lax.slice_in_dim(x, start, start + 2 * out_len - 1, stride=2, axis=axis)

    return (taps(0) + 2 * taps(1) + taps(2)) * 0.25


def blur_pool(x: jax.Array) -> jax.Array:
    """timm's BlurPool2d(filt_size=3, stride=2, pad_mode='reflect') on NHWC, as two 1-D passes."""
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    return _blur_stride2_along(_blur_stride2_along(x, 1), 2)


def avg_pool_2x2_ceil(x: jax.Array) -> jax.Array:
    """torch AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False): edge windows average what they cover."""
    batch, height, width, channels = x.shape
    out_height, out_width = -(-height // 2), -(-width // 2)
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
    window_sum = x.reshape(batch, out_height, 2, out_width, 2, channels).sum(axis=(2, 4))
    rows = np.minimum(2, height - 2 * np.arange(out_height))
    cols = np.minimum(2, width - 2 * np.arange(out_width))
    counts = (rows[:, None] * cols[None, :])[None, :, :, None]
    return window_sum / jnp.asarray(counts, x.dtype)


class AvgPoolCeil2x2(nnx.Module):
    """Parameter-free module for `downsample.0` (keeps timm's index of the shortcut's conv at 1)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return avg_pool_2x2_ceil(x)


class ConvNormAct(nnx.Module):
    """timm ConvNormAct: conv (padding k//2, no bias) -> BatchNorm -> optional LeakyReLU.

    With stride 2 the conv runs at stride 1 and a BlurPool does the striding (timm's `aa_layer`).
    `negative_slope=None` means no activation (timm's `apply_act=False`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 negative_slope: float | None = None, zero_init_bn: bool = False,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if stride not in (1, 2):
            raise ValueError(f"ConvNormAct supports stride 1 or 2 (BlurPool), got {stride}")
        self.conv = conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                           dtype=dtype, rngs=rngs)
        self.bn = BatchNorm2d(out_channels, zero_init=zero_init_bn)
        self.negative_slope = negative_slope
        self.blur_stride = stride == 2

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.bn(self.conv(x))
        if self.negative_slope is not None:
            x = jax.nn.leaky_relu(x, self.negative_slope)
        return blur_pool(x) if self.blur_stride else x


class SqueezeExcite(nnx.Module):
    """timm SEModule with explicit `rd_channels`: mean -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid gate."""

    def __init__(self, channels: int, rd_channels: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.fc1 = conv2d(channels, rd_channels, 1, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = conv2d(rd_channels, channels, 1, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        squeezed = jnp.mean(x, axis=(1, 2), keepdims=True)
        gate = jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(squeezed))))
        return x * gate.astype(x.dtype)


def _downsample(in_channels: int, out_channels: int, stride: int, *, dtype: Dtype,
                rngs: nnx.Rngs) -> nnx.List:
    """timm's shortcut projection: [AvgPool 2x2 ceil if stride 2] + 1x1 ConvNormAct without act."""
    pool = [AvgPoolCeil2x2()] if stride == 2 else []
    return nnx.List(pool + [ConvNormAct(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)])


def _shortcut(downsample: nnx.List | None, x: jax.Array) -> jax.Array:
    """Apply the downsample sequence, or return `x` for an identity shortcut."""
    if downsample is None:
        return x
    for layer in downsample:
        x = layer(x)
    return x


class BasicBlock(nnx.Module):
    """timm TResNet BasicBlock: 3x3 (LeakyReLU 1e-3, BlurPool stride) -> 3x3 -> SE -> + shortcut -> ReLU."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, *, stride: int, use_se: bool,
                 downsample: nnx.List | None, dtype: Dtype, rngs: nnx.Rngs):
        self.downsample = downsample
        self.conv1 = ConvNormAct(in_channels, planes, 3, stride=stride,
                                 negative_slope=BLOCK_LEAKY_SLOPE, dtype=dtype, rngs=rngs)
        self.conv2 = ConvNormAct(planes, planes, 3, zero_init_bn=True, dtype=dtype, rngs=rngs)
        rd_channels = max(planes * self.expansion // 4, 64)
        self.se = SqueezeExcite(planes, rd_channels, dtype=dtype, rngs=rngs) if use_se else None

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = _shortcut(self.downsample, x)
        out = self.conv2(self.conv1(x))
        if self.se is not None:
            out = self.se(out)
        return jax.nn.relu(out + shortcut)


class Bottleneck(nnx.Module):
    """timm TResNet Bottleneck: 1x1 -> 3x3 (BlurPool stride) -> SE -> 1x1 expand -> + shortcut -> ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, *, stride: int, use_se: bool,
                 downsample: nnx.List | None, dtype: Dtype, rngs: nnx.Rngs):
        self.downsample = downsample
        self.conv1 = ConvNormAct(in_channels, planes, 1, negative_slope=BLOCK_LEAKY_SLOPE,
                                 dtype=dtype, rngs=rngs)
        self.conv2 = ConvNormAct(planes, planes, 3, stride=stride, negative_slope=BLOCK_LEAKY_SLOPE,
                                 dtype=dtype, rngs=rngs)
        rd_channels = max(planes * self.expansion // 8, 64)
        self.se = SqueezeExcite(planes, rd_channels, dtype=dtype, rngs=rngs) if use_se else None
        self.conv3 = ConvNormAct(planes, planes * self.expansion, 1, zero_init_bn=True,
                                 dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = _shortcut(self.downsample, x)
        out = self.conv2(self.conv1(x))
        if self.se is not None:
            out = self.se(out)
        return jax.nn.relu(self.conv3(out) + shortcut)


class TResNetBody(nnx.Module):
    """timm's `body` Sequential: s2d (no parameters) -> conv1 -> layer1..layer4."""

    def __init__(self, layers: tuple[int, int, int, int], *, dtype: Dtype, rngs: nnx.Rngs):
        planes = 64
        self.conv1 = ConvNormAct(3 * 16, planes, 3, negative_slope=STEM_LEAKY_SLOPE,
                                 dtype=dtype, rngs=rngs)
        self.in_channels = planes
        stage_specs = ((BasicBlock, planes, 1, True), (BasicBlock, planes * 2, 2, True),
                       (Bottleneck, planes * 4, 2, True), (Bottleneck, planes * 8, 2, False))
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            self._make_layer(block, stage_planes, depth, stride, use_se, dtype=dtype, rngs=rngs)
            for (block, stage_planes, stride, use_se), depth in zip(stage_specs, layers))

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, depth: int,
                    stride: int, use_se: bool, *, dtype: Dtype, rngs: nnx.Rngs) -> nnx.List:
        """One stage as timm's `_make_layer`: the first block strides and projects the shortcut."""
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self.in_channels != out_channels:
            downsample = _downsample(self.in_channels, out_channels, stride, dtype=dtype, rngs=rngs)
        blocks = []
        for index in range(depth):
            blocks.append(block(self.in_channels, planes, stride=stride if index == 0 else 1,
                                use_se=use_se, downsample=downsample if index == 0 else None,
                                dtype=dtype, rngs=rngs))
            self.in_channels = out_channels
        return nnx.List(blocks)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv1(space_to_depth(x))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        return x


def _inplace_abn_key(key: str) -> str:
    """timm's checkpoint_filter_fn key rules: convN.0.0/convN.0 -> conv, convN.0.1/convN.1 -> bn."""
    key = re.sub(r"conv(\d+)\.0\.0", r"conv\1.conv", key)
    key = re.sub(r"conv(\d+)\.0\.1", r"conv\1.bn", key)
    key = re.sub(r"conv(\d+)\.0", r"conv\1.conv", key)
    key = re.sub(r"conv(\d+)\.1", r"conv\1.bn", key)
    key = re.sub(r"downsample\.(\d+)\.0", r"downsample.\1.conv", key)
    return re.sub(r"downsample\.(\d+)\.1", r"downsample.\1.bn", key)


class TResNet(nnx.Module):
    """TResNet (v1 layout, width 1) without its classifier; `tresnet_m` is layers (3, 4, 11, 3)."""

    def __init__(self, layers: tuple[int, int, int, int], *, dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.body = TResNetBody(layers, dtype=dtype, rngs=rngs)
        self.num_features = self.body.in_channels

    @staticmethod
    def filter_state_dict(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
        """Convert an inplace-ABN era checkpoint to current timm keys, as timm's checkpoint_filter_fn.

        `body.conv1.0.weight` -> `body.conv1.conv.weight`, `.1.*` -> `.bn.*`, and inplace-ABN
        weights w -> |w| + 1e-5 (a `model`/`state_dict` wrapper is removed before, when the file is
        read). A dict already in the current format (has `body.conv1.conv.weight`) is returned
        unchanged.
        """
        if "body.conv1.conv.weight" in state_dict:
            return state_dict
        converted = {}
        for key, value in state_dict.items():
            key = _inplace_abn_key(key)
            converted[key] = abs(value) + INPLACE_ABN_EPS if key.endswith("bn.weight") else value
        return converted

    def forward_features(self, x: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] (H, W divisible by 4) -> pre-pool feature map [B, H/32, W/32, 2048]."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"TResNet expects NHWC images [B, H, W, 3], got shape {x.shape}")
        return self.body(x)


def tresnet_m(*, dtype: Dtype, rngs: nnx.Rngs) -> TResNet:
    """timm's `tresnet_m` backbone: layers (3, 4, 11, 3); 29,872,772 parameters with the linear
    head of 260 classes."""
    return TResNet((3, 4, 11, 3), dtype=dtype, rngs=rngs)
