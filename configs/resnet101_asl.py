"""ResNet-101 trained with asymmetric loss (gamma- 4, gamma+ 0, clip 0.05), the seed's recipe."""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """The base config with model resnet101 and loss asl."""
    return base.get_config(model="resnet101", loss="asl")
