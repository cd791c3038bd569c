"""Xception in Flax NNX, identical to timm's `legacy_xception` (the model timm's `xception` names).

Module names follow timm exactly: `conv1`/`bn1`/`conv2`/`bn2` stem, `block1`..`block12` with
`skip`/`skipbn` and `rep.N` (N = index in timm's `nn.Sequential`, parameter-free ReLU/MaxPool slots
hold None), exit flow `conv3`/`bn3`/`conv4`/`bn4`; separable convs are `conv1` (depthwise) +
`pointwise`. The classifier lives at `head.fc` (timm's `fc`). Activations are NHWC.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from annotate.models.layers import BatchNorm2d, DepthwiseConv2d, conv2d, max_pool2d

Dtype = Any


class SeparableConv2d(nnx.Module):
    """Depthwise kxk conv (`conv1`) followed by a pointwise 1x1 conv (`pointwise`), no biases."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *,
                 padding: int = 0, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.conv1 = DepthwiseConv2d(in_channels, kernel_size, padding=padding, dtype=dtype,
                                     rngs=rngs)
        self.pointwise = conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.pointwise(self.conv1(x))


class Block(nnx.Module):
    """`reps` x (ReLU -> SeparableConv 3x3 -> BN), optional 3x3 max pool, plus a (1x1 conv) skip."""

    def __init__(self, in_channels: int, out_channels: int, reps: int, stride: int = 1, *,
                 start_with_relu: bool = True, grow_first: bool = True,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if out_channels != in_channels or stride != 1:
            self.skip = conv2d(in_channels, out_channels, 1, stride=stride, dtype=dtype, rngs=rngs)
            self.skipbn = BatchNorm2d(out_channels)
        else:
            self.skip, self.skipbn = None, None
        kinds, layers = [], []
        for i in range(reps):
            if grow_first:
                rep_in = in_channels if i == 0 else out_channels
                rep_out = out_channels
            else:
                rep_in = in_channels
                rep_out = in_channels if i < reps - 1 else out_channels
            kinds += ["relu", "sepconv", "bn"]
            layers += [None, SeparableConv2d(rep_in, rep_out, 3, padding=1, dtype=dtype, rngs=rngs),
                       BatchNorm2d(rep_out)]
        if not start_with_relu:
            kinds, layers = kinds[1:], layers[1:]
        if stride != 1:
            kinds.append("maxpool")
            layers.append(None)
        self.stride = stride
        self.rep_kinds = tuple(kinds)
        self.rep = nnx.List(layers)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        x = inputs
        for kind, layer in zip(self.rep_kinds, self.rep):
            if kind == "relu":
                x = nnx.relu(x)
            elif kind == "maxpool":
                x = max_pool2d(x, 3, self.stride, 1)
            else:
                x = layer(x)
        skip = inputs if self.skip is None else self.skipbn(self.skip(inputs))
        return x + skip


class Xception(nnx.Module):
    """timm `legacy_xception` without its classifier: entry flow (block1-3), middle flow
    (block4-11), exit flow."""

    def __init__(self, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        def block(in_channels: int, out_channels: int, reps: int, stride: int,
                  **options: bool) -> Block:
            return Block(in_channels, out_channels, reps, stride, dtype=dtype, rngs=rngs, **options)

        self.conv1 = conv2d(3, 32, 3, stride=2, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm2d(32)
        self.conv2 = conv2d(32, 64, 3, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm2d(64)
        self.block1 = block(64, 128, 2, 2, start_with_relu=False)
        self.block2 = block(128, 256, 2, 2)
        self.block3 = block(256, 728, 2, 2)
        self.block4 = block(728, 728, 3, 1)
        self.block5 = block(728, 728, 3, 1)
        self.block6 = block(728, 728, 3, 1)
        self.block7 = block(728, 728, 3, 1)
        self.block8 = block(728, 728, 3, 1)
        self.block9 = block(728, 728, 3, 1)
        self.block10 = block(728, 728, 3, 1)
        self.block11 = block(728, 728, 3, 1)
        self.block12 = block(728, 1024, 2, 2, grow_first=False)
        self.conv3 = SeparableConv2d(1024, 1536, 3, padding=1, dtype=dtype, rngs=rngs)
        self.bn3 = BatchNorm2d(1536)
        self.conv4 = SeparableConv2d(1536, 2048, 3, padding=1, dtype=dtype, rngs=rngs)
        self.bn4 = BatchNorm2d(2048)
        self.num_features = 2048

    def forward_features(self, x: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] -> pre-pool map [B, ~H/32, ~W/32, 2048] (the stem is unpadded)."""
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        for block in (self.block1, self.block2, self.block3, self.block4, self.block5,
                      self.block6, self.block7, self.block8, self.block9, self.block10,
                      self.block11, self.block12):
            x = block(x)
        x = nnx.relu(self.bn3(self.conv3(x)))
        return nnx.relu(self.bn4(self.conv4(x)))


def xception(*, dtype: Dtype, rngs: nnx.Rngs) -> Xception:
    """Xception as timm's `legacy_xception` (alias `xception`), 2048 features."""
    return Xception(dtype=dtype, rngs=rngs)
