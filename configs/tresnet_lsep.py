"""TResNet-M trained with LSEP ranking loss, the seed's recipe."""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """The base config with model tresnet_m and loss lsep."""
    return base.get_config(model="tresnet_m", loss="lsep")
