"""ResNeXt-50-32x4d trained with focal loss (gamma 3), the seed's recipe."""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """The base config with model resnext50_32x4d and loss focal."""
    return base.get_config(model="resnext50_32x4d", loss="focal")
