"""The seed's recipe (CNN_Image_Annotaion) as an ml_collections config; the per-run files pick
the backbone and the loss: `get_config(model="tresnet_m", loss="asl")`.

From scratch by default: the seed fine-tuned ImageNet weights, which these machines cannot
download. To rerun it as published add --config.model.pretrained=timm:tresnet_m (the seed's
other backbones: timm:resnet101.tv_in1k, timm:resnext50_32x4d.tv_in1k, timm:legacy_xception).

Override anything on the command line, e.g. `--config.train.epochs=5 --config.data.image_size=224`.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from annotate.config import validate_config


def get_config(model: str = "tresnet_m", loss: str = "asl") -> ml_collections.ConfigDict:
    """Seed hyper-parameters: 448 px, batch 32, Adam 1e-4 with OneCycle (pct 0.2) over 80 epochs,
    stopped after 60, flips h+v, dropout 0.3, avg pool; validated before it is returned."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # True: one process of a multi-process run (jax.distributed; README "More devices")
    config.distributed = False

    config.model = ml_collections.ConfigDict()
    config.model.name = model
    config.model.pretrained = config_dict.placeholder(str)  # path, orbax dir or "timm:<name>"
    config.model.head = "linear"  # the seed's: global pool -> dropout -> linear (annotate.models)
    # the options of the other heads, at the official code's defaults (annotate/models/heads.py)
    config.model.ml_decoder = ml_collections.ConfigDict({
        "num_groups": 100, "embedding_dim": 768, "num_heads": 8, "feedforward_dim": 2048,
        "dropout": 0.1})
    config.model.csra = ml_collections.ConfigDict({"num_heads": 1, "lam": 0.1})
    config.model.global_pool = "avg"
    config.model.drop_rate = 0.3
    config.model.dtype = "float32"  # compute dtype of the backbone: "float32" or "bfloat16"

    config.loss = ml_collections.ConfigDict()
    config.loss.name = loss
    config.loss.focal = ml_collections.ConfigDict({"gamma": 3.0})
    config.loss.asl = ml_collections.ConfigDict({"gamma_neg": 4.0, "gamma_pos": 0.0, "clip": 0.05})

    config.data = ml_collections.ConfigDict()
    config.data.root = config_dict.placeholder(str)  # else $COREL5K_DIR, else data/corel5k
    config.data.source = "folder"  # or "tfds" (array_record build of the same folder)
    # "device": the decoded split lives on every device (Corel-5k: 2.7 GB at 448 px);
    # "stream": batches decoded while training runs, for datasets larger than device memory
    config.data.pipeline = "device"
    config.data.image_size = 448
    config.data.augmentation = False  # add the WGAN images of train_aug.json (seed --augmentation)
    config.data.augmentation_dir = config_dict.placeholder(str)  # default: the data root
    config.data.cache_dir = config_dict.placeholder(str)  # default: $ANNOTATE_CACHE or ~/.cache/annotate
    # Input normalisation; unset = the seed's Corel-5k statistics (of the 18,000 images with
    # data.augmentation), pretrained or not, as the seed did (annotate.config.normalisation)
    config.data.mean = config_dict.placeholder(tuple)
    config.data.std = config_dict.placeholder(tuple)

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 32
    config.train.epochs = 60  # epochs trained
    # Length of the OneCycle schedule in epochs. The seed's early stop: a schedule of 80 epochs,
    # stopped after 60, i.e. the schedule is 4/3 of the epochs trained; as a reference to
    # train.epochs, `--config.train.epochs=N` trains N epochs of a schedule of 4N/3.
    config.train.schedule_epochs = config.train.get_ref("epochs") * 4 // 3
    config.train.optimizer = "adam"  # or "adamw" (decoupled weight decay)
    config.train.learning_rate = 1e-4  # OneCycle max_lr
    config.train.weight_decay = 0.0
    config.train.beta2 = 0.999
    config.train.schedule = "onecycle"  # or "constant"
    config.train.pct_start = 0.2
    config.train.div_factor = 25.0
    config.train.final_div_factor = 1e4
    config.train.cycle_momentum = True  # Adam beta1 cycles max_momentum -> base -> max
    config.train.base_momentum = 0.85
    config.train.max_momentum = 0.95
    config.train.flip_horizontal = True
    config.train.flip_vertical = True
    config.train.ema_decay = 0.0  # > 0: evaluate moving averages of the weights and BN statistics
    config.train.eval_batch_size = 250
    # on an accelerator, at most this many train steps per dispatch: the losses are read back,
    # checked and shown once per dispatch (annotate.train.steps_per_call); 1 on the CPU
    config.train.log_every = 10

    config.eval = ml_collections.ConfigDict()
    # "seed": the seed's protocol (checkpoint chosen on test, MCC thresholds on train);
    # "validation": a held-out validation subset of train chooses both, test is scored once;
    # "final": no selection, the last epoch with MCC thresholds on train (the PyTorch reference).
    config.eval.protocol = "seed"
    config.eval.validation_size = 500  # images held out of train under "validation"
    config.eval.bootstrap_resamples = 1000  # test-image resamples of results.json's ci95

    config.lock()  # a per-run config that sets a key base has not (a typo) fails as it loads
    return validate_config(config)
