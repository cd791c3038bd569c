"""Model registry: `create_model(name, num_classes, head="linear")` builds a backbone with a head.

A backbone maps NHWC images [B, H, W, 3] to a feature map [B, h, w, num_features]
(`forward_features`) and knows nothing of the classifier; a head (annotate.models.heads) maps the
feature map to logits [B, num_classes]. `model.train()` / `model.eval()` switch BatchNorm and
dropout. Each registry entry also carries what timm's `pretrained_cfg` says of the backbone: its
timm name, ImageNet normalisation, the classifier's checkpoint key and its initialisation.

Importing this module does not import jax: configs and command lines check names cheaply.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A registered backbone: where its constructor lives and timm's metadata for it."""

    constructor: str  # "module:function" in annotate.models; function(*, dtype, rngs) -> backbone
    timm_name: str  # the timm model whose state_dict maps onto this backbone
    mean: tuple[float, float, float]  # input normalisation of its ImageNet weights
    std: tuple[float, float, float]
    classifier: str  # key prefix of the classifier in timm's state_dict
    classifier_init_std: float | None = None  # N(0, std) weights; None: torch's nn.Linear default
    size_multiple: int = 1  # input height and width must be multiples of it


_REGISTRY: dict[str, ModelInfo] = {
    "resnet18": ModelInfo("resnet:resnet18", "resnet18", IMAGENET_MEAN, IMAGENET_STD, "fc"),
    "resnet50": ModelInfo("resnet:resnet50", "resnet50", IMAGENET_MEAN, IMAGENET_STD, "fc"),
    "resnet101": ModelInfo("resnet:resnet101", "resnet101", IMAGENET_MEAN, IMAGENET_STD, "fc"),
    "resnext50_32x4d": ModelInfo("resnet:resnext50_32x4d", "resnext50_32x4d", IMAGENET_MEAN,
                                 IMAGENET_STD, "fc"),
    "xception": ModelInfo("xception:xception", "legacy_xception", (0.5, 0.5, 0.5),
                          (0.5, 0.5, 0.5), "fc"),
    "tresnet_m": ModelInfo("tresnet:tresnet_m", "tresnet_m", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                           "head.fc", classifier_init_std=0.01,
                           size_multiple=4),  # its stem's space-to-depth takes 4x4 blocks
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)

# head name -> "module:class" in annotate.models;
# class(num_features, num_classes, *, rngs, **options)
_HEADS: dict[str, str] = {
    "linear": "heads:LinearHead",
    "ml_decoder": "heads:MLDecoderHead",
    "csra": "heads:CSRAHead",
}

HEAD_NAMES: tuple[str, ...] = tuple(_HEADS)


def check_model_name(name: str) -> None:
    """Raise a ValueError listing the valid names when `name` is not a registered backbone."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")


def check_head_name(name: str) -> None:
    """Raise a ValueError listing the valid heads when `name` is not a registered head."""
    if name not in _HEADS:
        raise ValueError(f"unknown head {name!r}; valid heads: {', '.join(HEAD_NAMES)}")


def check_head_options(name: str, options: dict[str, Any]) -> None:
    """Raise a ValueError listing what head `name` accepts when `options` holds a keyword its
    class does not take (a misspelt config.model.<head> key); imports the head (jax)."""
    accepted = list(_head_keywords(name))
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"head {name!r} got unknown options {unknown}; it accepts "
                         f"{accepted or 'none'}")


def head_defaults(name: str) -> dict[str, Any]:
    """The default values of head `name`'s keyword-only options (its constructor's signature)."""
    return {key: parameter.default for key, parameter in _head_keywords(name).items()
            if parameter.default is not parameter.empty}


def _head_keywords(name: str) -> dict[str, inspect.Parameter]:
    """Head `name`'s options: its constructor's keyword-only parameters but rngs."""
    check_head_name(name)
    parameters = inspect.signature(_constructor(_HEADS[name]).__init__).parameters
    return {key: parameter for key, parameter in parameters.items()
            if parameter.kind == parameter.KEYWORD_ONLY and key != "rngs"}


def check_head_values(name: str, options: dict[str, Any]) -> None:
    """Run head `name`'s constructor abstractly (nnx.eval_shape: shapes only, nothing computed)
    with `options`, for its checks of their values: ValueError "<option> = <value>: <why>"."""
    from flax import nnx

    head = _constructor(_HEADS[name])
    nnx.eval_shape(lambda: head(8, 2, rngs=nnx.Rngs(0), **options))


def _constructor(spec: str) -> Any:
    """The callable named by a registry spec "module:attribute" of annotate.models."""
    module_name, attribute = spec.split(":")
    return getattr(importlib.import_module(f"annotate.models.{module_name}"), attribute)


def model_info(name: str) -> ModelInfo:
    """The registry entry of backbone `name` (ValueError listing the valid names if unknown)."""
    check_model_name(name)
    return _REGISTRY[name]


def _build_backbone(name: str, dtype: Any, rngs: Any) -> Any:
    import jax.numpy as jnp

    return _constructor(model_info(name).constructor)(
        dtype=jnp.float32 if dtype is None else dtype, rngs=rngs)


def create_model(name: str, num_classes: int, *, head: str = "linear", dtype: Any = None,
                 seed: int = 0, **head_options: Any) -> Any:
    """Backbone `name` with head `head` (one of HEAD_NAMES; "linear" is the seed's global pool ->
    dropout -> linear, with `global_pool` and `drop_rate` options) as one `heads.Classifier`.
    Parameters are float32; `dtype` is the backbone's compute dtype."""
    from flax import nnx

    from annotate.models.heads import Classifier

    check_head_options(head, head_options)
    info = model_info(name)
    rngs = nnx.Rngs(seed)
    backbone = _build_backbone(name, dtype, rngs)  # first: the seed's draws come in this order
    if head == "linear":  # timm's classifier, initialised as timm initialises it for this family
        head_options.setdefault("init_std", info.classifier_init_std)
    head_module = _constructor(_HEADS[head])(backbone.num_features, num_classes, rngs=rngs,
                                             **head_options)
    return Classifier(backbone, head_module, info)


def count_params(model: Any) -> int:
    """Number of trainable parameters (nnx.Param leaves), as torch's `numel` sum over the
    parameters with requires_grad (ML-Decoder's fixed queries are a Buffer here, a frozen
    parameter in torch)."""
    import jax
    from flax import nnx

    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
