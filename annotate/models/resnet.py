"""ResNet / ResNeXt in Flax NNX with timm's (torchvision's) layout, so timm checkpoints load 1:1.

Module names follow timm exactly (`conv1`, `bn1`, `layer1.0.conv1`, `layer2.0.downsample.0`, ...);
the classifier is the head's (annotate.models.heads), not the backbone's. Activations are NHWC.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from annotate.models.layers import BatchNorm2d, conv2d, max_pool2d

Dtype = Any


def downsample_conv(in_channels: int, out_channels: int, stride: int, *, dtype: Dtype,
                    rngs: nnx.Rngs) -> nnx.List:
    """timm's `downsample_conv`: `Sequential(Conv2d 1x1 strided, BatchNorm2d)`, keys `.0`/`.1`."""
    return nnx.List([conv2d(in_channels, out_channels, 1, stride=stride, dtype=dtype, rngs=rngs),
                     BatchNorm2d(out_channels)])


class BasicBlock(nnx.Module):
    """Two 3x3 convs with a residual add (ResNet-18/34); last BN zero-initialised as in timm."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, cardinality: int = 1,
                 base_width: int = 64, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if cardinality != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only cardinality=1 and base_width=64")
        out_channels = planes * self.expansion
        self.conv1 = conv2d(in_channels, planes, 3, stride=stride, padding=1, dtype=dtype,
                            rngs=rngs)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = conv2d(planes, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm2d(out_channels, zero_init=True)
        needs_projection = stride != 1 or in_channels != out_channels
        self.downsample = (downsample_conv(in_channels, out_channels, stride, dtype=dtype,
                                           rngs=rngs) if needs_projection else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + shortcut)


class Bottleneck(nnx.Module):
    """1x1 reduce -> 3x3 (strided, grouped for ResNeXt) -> 1x1 expand + residual; last BN zeroed."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, cardinality: int = 1,
                 base_width: int = 64, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        width = int(planes * base_width / 64) * cardinality
        out_channels = planes * self.expansion
        self.conv1 = conv2d(in_channels, width, 1, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm2d(width)
        self.conv2 = conv2d(width, width, 3, stride=stride, padding=1, groups=cardinality,
                            dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm2d(width)
        self.conv3 = conv2d(width, out_channels, 1, dtype=dtype, rngs=rngs)
        self.bn3 = BatchNorm2d(out_channels, zero_init=True)
        needs_projection = stride != 1 or in_channels != out_channels
        self.downsample = (downsample_conv(in_channels, out_channels, stride, dtype=dtype,
                                           rngs=rngs) if needs_projection else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return nnx.relu(y + shortcut)


BlockType = type[BasicBlock] | type[Bottleneck]


class ResNet(nnx.Module):
    """timm `ResNet` without its classifier: 7x7 stem, 3x3/2 max pool, four stages."""

    def __init__(self, block: BlockType, layers: tuple[int, int, int, int], *, cardinality: int = 1,
                 base_width: int = 64, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.conv1 = conv2d(3, 64, 7, stride=2, padding=3, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm2d(64)
        stages, in_channels = [], 64
        for stage_index, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for block_index in range(depth):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(block(in_channels, planes, stride=stride, cardinality=cardinality,
                                    base_width=base_width, dtype=dtype, rngs=rngs))
                in_channels = planes * block.expansion
            stages.append(nnx.List(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = in_channels

    def forward_features(self, x: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] -> pre-pool feature map [B, H/32, W/32, num_features]."""
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = max_pool2d(x, 3, 2, 1)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        return x


def resnet18(*, dtype: Dtype, rngs: nnx.Rngs) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), dtype=dtype, rngs=rngs)


def resnet50(*, dtype: Dtype, rngs: nnx.Rngs) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), dtype=dtype, rngs=rngs)


def resnet101(*, dtype: Dtype, rngs: nnx.Rngs) -> ResNet:
    """ResNet-101 (Bottleneck, 3-4-23-3)."""
    return ResNet(Bottleneck, (3, 4, 23, 3), dtype=dtype, rngs=rngs)


def resnext50_32x4d(*, dtype: Dtype, rngs: nnx.Rngs) -> ResNet:
    """ResNeXt-50 32x4d (Bottleneck, 3-4-6-3, 32 groups of width 4 in the first stage)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), cardinality=32, base_width=4, dtype=dtype, rngs=rngs)
