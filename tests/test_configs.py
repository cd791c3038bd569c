"""configs/: every model x loss file loads with the seed's hyper-parameters; bad names are refused."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from annotate import losses, models

REPO = Path(__file__).resolve().parents[1]
from configs import base  # noqa: E402

MODEL_FILES = {"resnet101": "resnet101", "resnext50": "resnext50_32x4d", "xception": "xception",
               "tresnet": "tresnet_m"}
LOSSES = ("bce", "focal", "asl", "lsep")


def load_config_file(path: Path):
    """Load a config file the way ml_collections' config_flags does (by path)."""
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("stem,model", sorted(MODEL_FILES.items()))
@pytest.mark.parametrize("loss", LOSSES)
def test_model_loss_files(stem, model, loss):
    config = load_config_file(REPO / "configs" / f"{stem}_{loss}.py")
    assert (config.model.name, config.loss.name) == (model, loss)
    # the seed's recipe (CNN_Image_Annotaion: main.py / engine.py)
    assert config.data.image_size == 448
    assert config.train.batch_size == 32
    assert (config.train.optimizer, config.train.learning_rate) == ("adam", 1e-4)
    assert (config.train.schedule, config.train.pct_start) == ("onecycle", 0.2)
    assert (config.train.epochs, config.train.stop_epoch) == (80, 60)
    assert config.loss.focal.gamma == 3.0
    assert dict(config.loss.asl) == {"gamma_neg": 4.0, "gamma_pos": 0.0, "clip": 0.05}
    assert (config.model.drop_rate, config.model.global_pool) == (0.3, "avg")
    assert config.train.flip_horizontal and config.train.flip_vertical
    assert config.model.pretrained is None and config.data.mean is None


def test_every_seed_combination_has_a_file():
    names = {p.stem for p in (REPO / "configs").glob("*.py")}
    assert {f"{stem}_{loss}" for stem in MODEL_FILES for loss in LOSSES} <= names
    assert set(MODEL_FILES.values()) <= set(models.MODEL_NAMES)
    assert set(LOSSES) == set(losses.LOSS_NAMES)


def test_smoke_config_loads():
    config = load_config_file(REPO / "configs" / "smoke.py")
    assert config.model.name in models.MODEL_NAMES
    assert config.train.stop_epoch <= config.train.epochs


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'vgg16'.*tresnet_m"):
        base.get_config(model="vgg16", loss="asl")
    with pytest.raises(ValueError, match="unknown loss 'hinge'.*bce, focal, asl, lsep"):
        base.get_config(model="resnet101", loss="hinge")
