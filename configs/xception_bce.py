"""Xception trained with BCE (torch MultiLabelSoftMarginLoss), the seed's recipe."""
from configs import base


def get_config():
    """The base config with model xception and loss bce."""
    return base.get_config(model="xception", loss="bce")
