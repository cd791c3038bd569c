"""Xception trained with LSEP ranking loss, the seed's recipe."""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """The base config with model xception and loss lsep."""
    return base.get_config(model="xception", loss="lsep")
