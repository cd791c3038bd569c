"""Xception trained with asymmetric loss (gamma- 4, gamma+ 0, clip 0.05), the seed's recipe."""
from configs import base


def get_config():
    """The base config with model xception and loss asl."""
    return base.get_config(model="xception", loss="asl")
