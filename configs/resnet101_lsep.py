"""ResNet-101 trained with LSEP ranking loss, the seed's recipe."""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """The base config with model resnet101 and loss lsep."""
    return base.get_config(model="resnet101", loss="lsep")
