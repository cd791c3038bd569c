"""TResNet-M trained with BCE (torch MultiLabelSoftMarginLoss), the seed's recipe."""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """The base config with model tresnet_m and loss bce."""
    return base.get_config(model="tresnet_m", loss="bce")
