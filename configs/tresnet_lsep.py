"""TResNet-M trained with LSEP ranking loss, the seed's recipe."""
from configs import base


def get_config():
    """The base config with model tresnet_m and loss lsep."""
    return base.get_config(model="tresnet_m", loss="lsep")
