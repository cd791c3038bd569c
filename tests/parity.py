"""Helpers shared by the timm-parity tests: randomise a torch model, compare arrays, export weights.

timm builds its models with BatchNorm gamma=1, beta=0, mean=0, var=1 and some last-BN gammas at 0,
so a parity test on a fresh model would never exercise those tensors. `randomize_torch_model_`
draws every parameter and BN statistic at random with scales that keep activations O(1).
"""
from __future__ import annotations

import copy
import math

import jax.numpy as jnp
import numpy as np
import timm
import torch
from flax import nnx

from annotate.convert import load_timm_weights
from annotate.models import create_model

# Eval-mode logits must agree to this relative L2 error in float32.
EVAL_TOLERANCE = 1e-4
# Train mode normalises with batch statistics; torch's CPU BatchNorm computes them less exactly
# (1e-6..1e-5 relative error per layer against float64, ours ~1e-6) and a 100-layer net compounds
# it: resnet101 measured 7e-5 on logits, so train mode gets a little more room.
TRAIN_MODE_TOLERANCE = 3e-4


@torch.no_grad()
def randomize_torch_model_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter and BatchNorm running statistic of `model` in place; return it.

    Weights with >= 2 dims ~ N(0, 1/fan_in) (variance preserving); 1-D weights (norm gammas)
    ~ 1 + 0.2 N(0,1); 1-D biases ~ 0.1 N(0,1); running means ~ 0.1 N(0,1); running vars
    ~ U(0.5, 1.5). Other buffers (fixed blur filters, counters) are left alone.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    for name, param in model.named_parameters():
        if param.ndim >= 2:
            fan_in = math.prod(param.shape[1:])
            param.copy_(normal(param.shape) / math.sqrt(fan_in))
        elif name.endswith("weight"):
            param.copy_(1.0 + 0.2 * normal(param.shape))
        else:
            param.copy_(0.1 * normal(param.shape))
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(0.1 * normal(buffer.shape))
        elif name.endswith("running_var"):
            buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
    return model


def relative_l2(actual: np.ndarray, reference: np.ndarray) -> float:
    """||actual - reference|| / ||reference|| in float64: the backbone tests' parity metric."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if actual.shape != reference.shape:
        raise ValueError(f"shape mismatch: {actual.shape} vs reference {reference.shape}")
    return float(np.linalg.norm(actual - reference) / np.linalg.norm(reference))


def torch_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """`model.state_dict()` as numpy arrays (copies: later torch updates don't leak into them)."""
    return {key: value.detach().cpu().numpy().copy() for key, value in model.state_dict().items()}


def nchw_tensor(images_nhwc: np.ndarray) -> torch.Tensor:
    """NHWC numpy images -> NCHW float32 torch tensor (timm's layout)."""
    nchw = np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2), dtype=np.float32)
    return torch.from_numpy(nchw)


def random_images(batch: int, height: int, width: int, seed: int) -> np.ndarray:
    """Standard-normal NHWC float32 images (what normalised inputs look like)."""
    return np.random.default_rng(seed).standard_normal((batch, height, width, 3), dtype=np.float32)


def batch_stats_by_torch_key(model: nnx.Module) -> dict[str, np.ndarray]:
    """Our BatchNorm statistics keyed like timm's state_dict (`backbone.bn1.mean` ->
    `bn1.running_mean`)."""
    stats = {}
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.BatchStat):
            module, leaf = ".".join(str(p) for p in path[:-1]), path[-1]
            module = module.removeprefix("backbone.")
            stats[f"{module}.running_{leaf}"] = np.asarray(variable[...])
    return stats


def timm_and_flax_models(name: str, timm_name: str, *, num_classes: int = 260, seed: int = 0,
                         dtype=jnp.float32) -> tuple[torch.nn.Module, nnx.Module]:
    """A randomised eval-mode timm model and our `name` model (eval mode, no dropout) holding its
    weights, imported with `load_timm_weights`."""
    torch_model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes)
    randomize_torch_model_(torch_model, seed).eval()
    model = create_model(name, num_classes, drop_rate=0.0, dtype=dtype, seed=seed)
    load_timm_weights(model, torch_state_dict(torch_model))
    model.eval()
    return torch_model, model


def assert_eval_matches_timm(torch_model: torch.nn.Module, model: nnx.Module, height: int,
                             width: int, *, seed: int, tolerance: float = EVAL_TOLERANCE) -> None:
    """Eval mode on random images of height x width: our feature map and logits equal timm's
    `forward_features` and `forward_head` to `tolerance` (relative L2)."""
    images = random_images(2, height, width, seed=seed)
    features = model.forward_features(jnp.asarray(images))
    logits = np.asarray(model.head(features))
    with torch.no_grad():
        reference_features = torch_model.forward_features(nchw_tensor(images))
        reference = torch_model.forward_head(reference_features).numpy()
    assert features.shape[-1] == model.num_features == torch_model.num_features
    assert relative_l2(np.asarray(features),
                       reference_features.numpy().transpose(0, 2, 3, 1)) < tolerance
    assert reference.std() > 0.1, "random weights should give non-degenerate logits"
    assert relative_l2(logits, reference) < tolerance


def assert_train_mode_matches_timm(torch_model: torch.nn.Module, model: nnx.Module,
                                   images: np.ndarray, *,
                                   tolerance: float = TRAIN_MODE_TOLERANCE) -> dict[str, np.ndarray]:
    """Train mode (batch statistics) on `images`: our logits equal timm's, and every BatchNorm
    running statistic is updated as timm updates it (each one changed by the step). Returns
    timm's updated statistics."""
    torch_train = copy.deepcopy(torch_model).train()
    reference = torch_train(nchw_tensor(images)).detach().numpy()
    model_train = nnx.clone(model)
    model_train.train()
    logits = np.asarray(model_train(jnp.asarray(images)))
    assert relative_l2(logits, reference) < tolerance
    ours, before = batch_stats_by_torch_key(model_train), batch_stats_by_torch_key(model)
    theirs = {key: value for key, value in torch_state_dict(torch_train).items()
              if key.endswith(("running_mean", "running_var"))}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert not np.allclose(before[key], value), f"{key} was not updated by timm"
        assert relative_l2(ours[key], value) < tolerance, key
    return theirs
