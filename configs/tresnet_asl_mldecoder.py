"""TResNet-M + ASL (the seed's recipe) with the ML-Decoder head (Ridnik et al., WACV 2023) in
place of global pooling and a linear layer; its options are config.model.ml_decoder.*."""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """The base config with model tresnet_m, loss asl and head ml_decoder."""
    config = base.get_config(model="tresnet_m", loss="asl")
    config.model.head = "ml_decoder"
    return config
