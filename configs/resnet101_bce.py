"""ResNet-101 trained with BCE (torch MultiLabelSoftMarginLoss), the seed's recipe."""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """The base config with model resnet101 and loss bce."""
    return base.get_config(model="resnet101", loss="bce")
