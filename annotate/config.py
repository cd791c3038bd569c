"""Experiment configuration: checks and derived values of an ml_collections config.

Jax-free on import, so that configs/ and the command lines load fast; `validate_config` imports
the loss functions (which need jax) only to check the loss's hyper-parameters.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import ml_collections

from annotate import data, models
from annotate.workdir import flat_config

COMPUTE_DTYPES = ("float32", "bfloat16")  # names for jnp.dtype(); the one dtype table
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("onecycle", "constant")
PROTOCOLS = ("seed", "validation", "final")  # see configs/base.py
PIPELINES = ("device", "stream")
LINEAR_HEAD_OPTIONS = ("global_pool", "drop_rate")  # config.model keys read by the linear head alone
# the keys that may be None (configs/base.py's placeholders): every other one needs a value
OPTIONAL_KEYS = ("model.pretrained", "data.root", "data.augmentation_dir", "data.cache_dir",
                 "data.mean", "data.std")
# the switches: every other key holds a number or a name (ml_collections takes True for an int,
# as bool is an int: `--config.train.batch_size=True` would train at batch 1)
BOOLEAN_KEYS = ("distributed", "data.augmentation", "train.cycle_momentum", "train.flip_horizontal",
                "train.flip_vertical")
MAX_BOOTSTRAP_RESAMPLES = 100_000  # each holds a row of weights per test image and label counts


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check names, ranges and combinations of `config`; raise ValueError naming the bad key."""
    from annotate import losses  # jax: only here, to check the loss's hyper-parameters

    for key, value in flat_config(config.to_dict()).items():  # before any comparison meets a None
        if value is None and key not in OPTIONAL_KEYS:
            raise ValueError(f"config.{key} = None: it needs a value")
        if isinstance(value, bool) and key not in BOOLEAN_KEYS:
            raise ValueError(f"config.{key} = {value!r}: it needs a number or a name, not a bool")

    def named(key: str, check: Any, *arguments: Any, **keywords: Any) -> None:
        try:
            check(*arguments, **keywords)
        except ValueError as error:
            raise ValueError(f"config.{key}: {error}") from None

    named("model.name", models.check_model_name, config.model.name)
    named("model.head", models.check_head_name, config.model.head)
    named("loss.name", losses.check_loss_name, config.loss.name)
    named(f"loss.{config.loss.name}", losses.make_loss, config.loss.name, **loss_hyper(config))

    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ValueError(f"config.{key} = {config_value(config, key)!r}: {message}")

    # the head's options: config.model.<head>, the linear head's config.model.global_pool, ...
    section = "model" if config.model.head == "linear" else f"model.{config.model.head}"
    options = head_options(config)
    named(section, models.check_head_options, config.model.head, options)
    if config.model.head != "linear":  # else a pooling or dropout asked for would be ignored
        defaults = models.head_defaults("linear")
        for key in LINEAR_HEAD_OPTIONS:
            require(config.model[key] == defaults[key], f"model.{key}",
                    f"read by the linear head only; head {config.model.head!r} takes "
                    f"config.model.{config.model.head}.* (leave model.{key} at {defaults[key]!r})")
    try:  # the head's constructor checks the values: "<option> = <value>: <why>"
        models.check_head_values(config.model.head, options)
    except ValueError as error:
        raise ValueError(f"config.{section}.{error}") from None
    train = config.train
    require(config.model.dtype in COMPUTE_DTYPES, "model.dtype",
            f"use one of {list(COMPUTE_DTYPES)}")
    require(config.data.source in data.SOURCES, "data.source", f"use one of {list(data.SOURCES)}")
    require(config.data.pipeline in PIPELINES, "data.pipeline", f"use one of {list(PIPELINES)}")
    require(config.data.image_size > 0, "data.image_size", "must be positive")
    multiple = models.model_info(config.model.name).size_multiple  # else the first step fails
    require(config.data.image_size % multiple == 0, "data.image_size",
            f"{config.model.name} takes sizes that are multiples of {multiple}")
    for key in ("mean", "std"):
        value = config.data[key]
        require(value is None or (len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value)), f"data.{key}", "needs 3 finite numbers (R, G, B)")
    require(config.data.std is None or min(config.data.std) > 0, "data.std", "must be positive")
    require(train.batch_size > 0, "train.batch_size", "must be positive")
    for key in ("learning_rate", "div_factor", "final_div_factor"):  # NaN and inf fail too
        require(0 < train[key] < math.inf, f"train.{key}", "must be positive and finite")
    for key in ("beta2", "max_momentum", "base_momentum"):  # Adam's betas (beta1 cycles between
        require(0 <= train[key] < 1, f"train.{key}", "must lie in [0, 1)")  # the momenta)
    require(train.eval_batch_size > 0, "train.eval_batch_size", "must be positive")
    require(train.epochs > 0, "train.epochs", "must be positive")
    require(train.schedule_epochs >= train.epochs, "train.schedule_epochs",
            f"must be at least train.epochs={train.epochs} (the schedule covers every epoch)")
    require(train.optimizer in OPTIMIZERS, "train.optimizer", f"use one of {list(OPTIMIZERS)}")
    require(train.schedule in SCHEDULES, "train.schedule", f"use one of {list(SCHEDULES)}")
    require(0 < train.pct_start < 1, "train.pct_start", "must lie in (0, 1)")
    require(0 <= train.weight_decay < math.inf, "train.weight_decay", "must be >= 0 and finite")
    require(0 <= train.ema_decay < 1, "train.ema_decay", "must lie in [0, 1); 0 disables EMA")
    require(train.log_every > 0, "train.log_every", "must be positive")
    require(config.eval.protocol in PROTOCOLS, "eval.protocol", f"use one of {list(PROTOCOLS)}")
    # jax.random.key keeps 32 bits of a larger seed, numpy refuses a negative one (the bootstrap,
    # after the training)
    require(0 <= config.seed < 2 ** 32, "seed", "must lie in [0, 2**32)")
    require(config.eval.validation_size > 0, "eval.validation_size", "must be positive")
    require(100 <= config.eval.bootstrap_resamples <= MAX_BOOTSTRAP_RESAMPLES,
            "eval.bootstrap_resamples", f"must lie in [100, {MAX_BOOTSTRAP_RESAMPLES}]")
    return config


def config_value(config: ml_collections.ConfigDict, dotted_key: str) -> Any:
    """The value at `dotted_key` ("train.batch_size") of `config`."""
    value = config
    for part in dotted_key.split("."):
        value = value[part]
    return value


def loss_hyper(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The hyper-parameters of the configured loss: config.loss.<name> (e.g. loss.asl), or none."""
    name = config.loss.name
    return dict(config.loss[name]) if name in config.loss else {}


def head_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword options of the configured head: the seed's global_pool and drop_rate for
    "linear", else config.model.<head> (e.g. model.ml_decoder), or none."""
    head = config.model.head
    if head == "linear":
        return {key: config.model[key] for key in LINEAR_HEAD_OPTIONS}
    return dict(config.model[head]) if head in config.model else {}


def dataset_folder(configured: str | None) -> Path:
    """The dataset folder, absolute: `configured`, else $COREL5K_DIR, else data/corel5k."""
    root = Path(configured or os.environ.get("COREL5K_DIR") or data.DEFAULT_DATASET_FOLDER)
    return root.expanduser().absolute()


def dataset_to_fetch(config: ml_collections.ConfigDict) -> Path | None:
    """data/corel5k (relative) when `config` names no dataset folder (no data.root, no
    $COREL5K_DIR): the main job's first run fetches Corel-5k there; else None. Both sources
    need the folder (a TFDS build is made from it)."""
    if config.data.root or os.environ.get("COREL5K_DIR"):
        return None
    return data.DEFAULT_DATASET_FOLDER


def data_root(config: ml_collections.ConfigDict) -> Path:
    """The dataset folder of `config` (dataset_folder of config.data.root), checked to hold a
    dataset (both sources read it: a TFDS build is made from the folder)."""
    root = dataset_folder(config.data.root)
    if not (root / "train.json").is_file():
        raise data.DatasetError(
            f"no Corel-5k dataset at {root} (train.json missing): download it with "
            f"`python -m annotate.data.fetch` (writes {data.DEFAULT_DATASET_FOLDER}), or point "
            f"--config.data.root or $COREL5K_DIR at a folder with images/, train.json, test.json")
    return root


def normalisation(config: ml_collections.ConfigDict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean/std: config.data.mean/std if set, else the seed's (its dataset.get_mean_std):
    the Corel-5k training images' statistics, those of the 18,000 images with the ML-WGAN ones
    under data.augmentation; the seed kept them with ImageNet weights too."""
    if config.data.augmentation:
        mean, std = data.COREL5K_AUGMENTED_MEAN, data.COREL5K_AUGMENTED_STD
    else:
        mean, std = data.COREL5K_MEAN, data.COREL5K_STD
    return (tuple(config.data.mean or mean), tuple(config.data.std or std))


def resolved_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with the data root and the input normalisation filled in."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.root = str(data_root(config))
    config.data.mean, config.data.std = normalisation(config)
    return config
