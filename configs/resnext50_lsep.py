"""ResNeXt-50-32x4d trained with LSEP ranking loss, the seed's recipe."""
from configs import base


def get_config():
    """The base config with model resnext50_32x4d and loss lsep."""
    return base.get_config(model="resnext50_32x4d", loss="lsep")
