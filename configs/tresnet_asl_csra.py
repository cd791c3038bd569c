"""TResNet-M + ASL (the seed's recipe) with the class-specific residual attention head (CSRA, Zhu
and Wu, ICCV 2021) in place of global pooling and a linear layer; its options are
config.model.csra.*."""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """The base config with model tresnet_m, loss asl and head csra."""
    config = base.get_config(model="tresnet_m", loss="asl")
    config.model.head = "csra"
    return config
