"""configs/: every model x loss file loads with the seed's hyper-parameters; bad names are refused."""
from __future__ import annotations

from pathlib import Path

import pytest

from annotate import losses, models
from annotate.config import config_value

REPO = Path(__file__).resolve().parents[1]
from configs import base  # noqa: E402
from modules import load_module

MODEL_FILES = {"resnet101": "resnet101", "resnext50": "resnext50_32x4d", "xception": "xception",
               "tresnet": "tresnet_m"}
LOSSES = ("bce", "focal", "asl", "lsep")


def load_config_file(path: Path):
    """Load a config file the way ml_collections' config_flags does (by path)."""
    return load_module(path).get_config()


# the seed's recipe (CNN_Image_Annotaion: main.py / engine.py), which every model x loss file keeps
SEED_RECIPE = {
    "data.image_size": 448, "train.batch_size": 32, "train.optimizer": "adam",
    "train.learning_rate": 1e-4, "train.schedule": "onecycle", "train.pct_start": 0.2,
    "train.epochs": 60, "train.schedule_epochs": 80, "loss.focal.gamma": 3.0,
    "loss.asl.gamma_neg": 4.0, "loss.asl.gamma_pos": 0.0, "loss.asl.clip": 0.05,
    "model.head": "linear", "model.drop_rate": 0.3, "model.global_pool": "avg",
    "train.flip_horizontal": True, "train.flip_vertical": True, "model.pretrained": None,
    "data.mean": None,
}


@pytest.mark.parametrize("stem,model", sorted(MODEL_FILES.items()))
@pytest.mark.parametrize("loss", LOSSES)
def test_model_loss_files(stem, model, loss):
    config = load_config_file(REPO / "configs" / f"{stem}_{loss}.py")
    assert (config.model.name, config.loss.name) == (model, loss)
    assert {key: config_value(config, key) for key in SEED_RECIPE} == SEED_RECIPE
    assert dict(config.loss.asl) == {"gamma_neg": 4.0, "gamma_pos": 0.0, "clip": 0.05}


def test_every_seed_combination_has_a_file():
    names = {p.stem for p in (REPO / "configs").glob("*.py")}
    assert {f"{stem}_{loss}" for stem in MODEL_FILES for loss in LOSSES} <= names
    assert set(MODEL_FILES.values()) <= set(models.MODEL_NAMES)
    assert set(LOSSES) <= set(losses.LOSS_NAMES)  # a loss added since needs no seed files


def test_smoke_config_loads():
    config = load_config_file(REPO / "configs" / "smoke.py")
    assert config.model.name in models.MODEL_NAMES
    assert config.train.schedule_epochs == config.train.epochs == 2


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'vgg16'.*tresnet_m"):
        base.get_config(model="vgg16", loss="asl")
    with pytest.raises(ValueError, match=f"unknown loss 'hinge'.*{', '.join(losses.LOSS_NAMES)}"):
        base.get_config(model="resnet101", loss="hinge")
