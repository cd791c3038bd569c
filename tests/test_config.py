"""annotate.config: errors name the key, the input normalisation, the head's options, and no jax on
import."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from annotate import cli
from annotate.config import (config_value, dataset_to_fetch, head_options, normalisation,
                             validate_config)
from configs import base
from modules import REPO


def test_normalisation_choice():
    config = base.get_config(model="tresnet_m", loss="asl")
    assert normalisation(config) == ((0.3928, 0.4079, 0.3531), (0.2559, 0.2436, 0.2544))
    config.model.pretrained = "timm:tresnet_m"  # the seed kept its statistics with ImageNet weights
    assert normalisation(config) == ((0.3928, 0.4079, 0.3531), (0.2559, 0.2436, 0.2544))
    config.data.augmentation = True  # the seed's get_mean_std for its 18,000 images
    assert normalisation(config) == ((0.4249, 0.4365, 0.3926), (0.1955, 0.1830, 0.1987))
    config.data.mean, config.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    assert normalisation(config) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_only_a_config_naming_no_dataset_folder_fetches_one(monkeypatch):
    """data/corel5k is fetched into only when neither data.root nor $COREL5K_DIR names a folder,
    for either source (a TFDS build is made from the folder)."""
    monkeypatch.delenv("COREL5K_DIR", raising=False)
    config = base.get_config(model="resnet18", loss="asl")
    assert str(dataset_to_fetch(config)) == "data/corel5k"
    config.data.source = "tfds"
    assert str(dataset_to_fetch(config)) == "data/corel5k"
    config.data.root = "elsewhere"
    assert dataset_to_fetch(config) is None
    config.data.root = None
    monkeypatch.setenv("COREL5K_DIR", "/data/corel5k")
    assert dataset_to_fetch(config) is None


def test_config_errors_name_the_key():
    config = base.get_config(model="resnet18", loss="asl")
    config.train.schedule_epochs = 10
    with pytest.raises(ValueError, match=r"config.train.schedule_epochs = 10: must be at least"):
        validate_config(config)
    config = base.get_config(model="resnet18", loss="asl")
    config.model.name = "no_such_net"
    with pytest.raises(ValueError, match="^config.model.name: unknown model 'no_such_net'; "
                                         "valid models: .*tresnet_m"):
        validate_config(config)
    config = base.get_config(model="resnet18", loss="asl")
    config.model.head = "no_such_head"
    with pytest.raises(ValueError, match="^config.model.head: unknown head 'no_such_head'; "
                                         "valid heads: linear"):
        validate_config(config)
    config = base.get_config(model="resnet18", loss="asl")
    config.loss.name = "hinge"
    with pytest.raises(ValueError, match="^config.loss.name: unknown loss 'hinge'; "
                                         "valid losses: .*asl"):
        validate_config(config)
    # a ZeroDivisionError traceback at the start, or a run with a negative or NaN learning rate
    for key, value, message in [("div_factor", 0.0, "must be positive and finite"),
                                ("final_div_factor", -1.0, "must be positive and finite"),
                                ("learning_rate", float("inf"), "must be positive and finite"),
                                ("beta2", 1.5, "must lie in [0, 1)"),
                                ("max_momentum", 1.2, "must lie in [0, 1)"),
                                ("base_momentum", -0.5, "must lie in [0, 1)"),
                                # a NaN loss at the second step
                                ("weight_decay", float("inf"), "must be >= 0 and finite")]:
        config = base.get_config(model="resnet18", loss="asl")
        config.train[key] = value
        with pytest.raises(ValueError, match=re.escape(f"config.train.{key} = {value!r}: {message}")):
            validate_config(config)
    # numpy's bootstrap refused a negative seed after the whole training; jax keeps 32 bits
    for seed in (-1, 2 ** 32):
        config = base.get_config(model="resnet18", loss="asl")
        config.seed = seed
        with pytest.raises(ValueError, match=re.escape(f"config.seed = {seed}: must lie in "
                                                       f"[0, 2**32)")):
            validate_config(config)
    # the run would fail mid-start, or (an infinite std) train on zeros
    for mean in [(0.5, "a", 0.5), (0.5, None, 0.5), (0.5, 0.5), (0.5, float("inf"), 0.5),
                 (float("nan"), 0.5, 0.5)]:
        config = base.get_config(model="resnet18", loss="asl")
        config.data.mean = mean
        with pytest.raises(ValueError, match=re.escape(
                f"config.data.mean = {mean!r}: needs 3 finite numbers (R, G, B)")):
            validate_config(config)
    # TResNet's space-to-depth stem failed at the first step, after the decoding
    config = base.get_config(model="tresnet_m", loss="asl")
    config.data.image_size = 17
    with pytest.raises(ValueError, match=re.escape(
            "config.data.image_size = 17: tresnet_m takes sizes that are multiples of 4")):
        validate_config(config)
    config.model.name = "resnet18"  # any size
    validate_config(config)
    # numpy's bootstrap ran out of memory after the whole training
    config = base.get_config(model="resnet18", loss="asl")
    config.eval.bootstrap_resamples = 10 ** 12
    with pytest.raises(ValueError, match=re.escape(
            "config.eval.bootstrap_resamples = 1000000000000: must lie in [100, 100000]")):
        validate_config(config)
    # a None where a value is needed: named, not "'>=' not supported between 'NoneType' ..."
    for key in ("train.schedule_epochs", "model.drop_rate", "loss.asl.clip"):
        config = base.get_config(model="resnet18", loss="asl")
        section, leaf = key.rsplit(".", 1)
        config_value(config, section)[leaf] = None
        with pytest.raises(ValueError, match=re.escape(f"config.{key} = None: it needs a value")):
            validate_config(config)
    config = base.get_config(model="resnet18", loss="asl")
    with config.unlocked():  # base's config is locked: a config built by hand
        del config.model["head"]
    with pytest.raises(AttributeError) as missing:
        validate_config(config)
    assert cli.explain(missing.value, []) == "the config has no key 'head'"


def test_linear_head_takes_the_seed_options():
    config = base.get_config(model="resnet18", loss="asl")
    config.model.drop_rate = 0.1
    assert head_options(config) == {"global_pool": "avg", "drop_rate": 0.1}


def test_the_linear_heads_options_are_refused_under_another_head():
    """global_pool and drop_rate are read by the linear head alone: a value other than its
    constructor's default under CSRA would be ignored, so it is refused, naming the key."""
    config = base.get_config(model="resnet18", loss="asl")
    config.model.head = "csra"
    validate_config(config)  # base's values are the linear head's defaults
    for key, value in (("global_pool", "max"), ("drop_rate", 0.0)):
        config = base.get_config(model="resnet18", loss="asl")
        config.model.head = "csra"
        config.model[key] = value
        with pytest.raises(ValueError, match=re.escape(
                f"config.model.{key} = {value!r}: read by the linear head only; head 'csra' "
                f"takes config.model.csra.*")):
            validate_config(config)


@pytest.mark.parametrize("key", ["train.batch_size", "data.image_size", "model.csra.num_heads",
                                 "eval.validation_size"])
def test_a_bool_where_a_number_is_needed_is_refused(key):
    """ml_collections takes True for an int field (bool is an int) and keeps it a bool: refused,
    named. (A float field casts it to 1.0, as it casts any int.)"""
    config = base.get_config(model="resnet18", loss="asl")
    section, leaf = key.rsplit(".", 1)
    config_value(config, section)[leaf] = True
    assert config_value(config, key) is True
    with pytest.raises(ValueError, match=re.escape(
            f"config.{key} = True: it needs a number or a name, not a bool")):
        validate_config(config)


def test_config_and_registry_import_without_jax():
    code = ("import sys; import annotate.config, annotate.models; "
            "annotate.models.model_info('tresnet_m'); assert 'jax' not in sys.modules, 'jax'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_other_heads_take_their_config_section():
    config = base.get_config(model="tresnet_m", loss="asl")
    config.model.head = "ml_decoder"
    assert head_options(config) == {"num_groups": 100, "embedding_dim": 768, "num_heads": 8,
                                    "feedforward_dim": 2048, "dropout": 0.1}
    config.model.ml_decoder.num_heads = 7
    with pytest.raises(ValueError, match="model.ml_decoder.embedding_dim = 768: must be divisible"):
        validate_config(config)
    config.model.head = "csra"
    assert head_options(config) == {"num_heads": 1, "lam": 0.1}
    config.model.csra.num_heads = 3
    with pytest.raises(ValueError, match=re.escape("config.model.csra.num_heads = 3: use one of [1, 2, 4, 6, 8]")):
        validate_config(config)
    config.model.csra.num_heads, config.model.csra.lam = 2, -0.5
    with pytest.raises(ValueError, match=re.escape("config.model.csra.lam = -0.5: must be >= 0")):
        validate_config(config)
    config.model.head, config.model.drop_rate = "linear", 1.0  # the linear head's own keys
    with pytest.raises(ValueError, match=re.escape("config.model.drop_rate = 1.0: must lie in")):
        validate_config(config)


def test_an_unknown_head_option_is_named_with_the_accepted_ones():
    config = base.get_config(model="resnet18", loss="asl")
    config.model.head = "csra"
    with config.unlocked():  # a config file adding it to base's config fails as it loads
        config.model.csra.temperature = 2.0
    with pytest.raises(ValueError, match=re.escape(
            "config.model.csra: head 'csra' got unknown options ['temperature']; it accepts "
            "['num_heads', 'lam']")):
        validate_config(config)


def test_an_unknown_loss_hyper_parameter_names_its_config_section():
    config = base.get_config(model="resnet18", loss="asl")
    with config.unlocked():  # a config file adding it to base's config fails as it loads
        config.loss.asl.gamma = 2.0
    with pytest.raises(ValueError, match=re.escape(
            "config.loss.asl: loss 'asl' got unknown hyper-parameters ['gamma']")):
        validate_config(config)
