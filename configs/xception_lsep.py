"""Xception trained with LSEP ranking loss, the seed's recipe."""
from configs import base


def get_config():
    """The base config with model xception and loss lsep."""
    return base.get_config(model="xception", loss="lsep")
