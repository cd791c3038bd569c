"""The PyTorch reference's from-scratch recipe (issue #6 anchor, `torch_reference.py train`).

TResNet-M from random weights on Corel-5k at 224 px: 40 epochs of Adam with OneCycle (max lr 1e-3,
pct_start 0.2) and no early stop, ASL (gamma- 4, gamma+ 0, clip 0.05), batch 32, bf16 compute,
random horizontal and vertical flips, seed 1, and no dropout before the classifier (the reference
builds `timm.create_model("tresnet_m", num_classes=260)`, whose drop_rate is 0). On one H100 the
reference reaches test per-class F1 0.333, per-image F1 0.494, N+ 148 at threshold 0.5 (with MCC
thresholds 0.327 / 0.528 / 133), 6.2 s per epoch. Like the reference, the run is evaluated
after its last epoch (protocol "final": no checkpoint selection).

The heads of the label-correlation comparison run on the same recipe:
`--config.model.head=ml_decoder` or `--config.model.head=csra` (options under config.model.<head>),
with `--config.eval.protocol=validation` for a comparison that the test set does not decide.
"""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """The base config (tresnet_m, asl) with the reference's size, schedule, lr, dtype and seed."""
    config = base.get_config(model="tresnet_m", loss="asl")
    config.seed = 1
    config.model.dtype = "bfloat16"
    config.model.drop_rate = 0.0
    config.data.image_size = 224
    config.train.epochs = 40
    config.train.schedule_epochs = config.train.get_ref("epochs")  # no early stop
    config.train.learning_rate = 1e-3
    config.train.batch_size = 32
    config.train.flip_horizontal = True
    config.train.flip_vertical = True
    config.loss.asl.gamma_neg = 4.0
    config.loss.asl.gamma_pos = 0.0
    config.loss.asl.clip = 0.05
    config.eval.protocol = "final"  # the reference reports its final model
    return config
