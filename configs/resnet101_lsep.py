"""ResNet-101 trained with LSEP ranking loss, the seed's recipe."""
from configs import base


def get_config():
    """The base config with model resnet101 and loss lsep."""
    return base.get_config(model="resnet101", loss="lsep")
