"""Xception trained with focal loss (gamma 3), the seed's recipe."""
from configs import base


def get_config():
    """The base config with model xception and loss focal."""
    return base.get_config(model="xception", loss="focal")
