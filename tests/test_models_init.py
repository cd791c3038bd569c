"""Initialisation: every backbone (with the linear head) starts from the distributions of timm's
freshly created model, tensor by tensor: mean, std and shape (normal or uniform) within sampling
tolerance, constants (BatchNorm, zero-initialised last BN) exactly."""
from __future__ import annotations

import numpy as np
import pytest
import timm
from flax import nnx

from annotate.convert import _flat_variables, _target_key, module_path
from annotate.models import create_model, model_info

SIGMAS = 6.0  # sampling tolerance of each statistic; ~1,000 tensors are compared


def _kurtosis(values: np.ndarray) -> float:
    centred = values - values.mean()
    return float(np.mean(centred ** 4) / np.mean(centred ** 2) ** 2)


@pytest.mark.parametrize("name", ["resnet18", "resnet101", "resnext50_32x4d", "xception",
                                  "tresnet_m"])
def test_parameters_start_from_timms_distributions(name):
    torch_model = timm.create_model(model_info(name).timm_name, pretrained=False, num_classes=260)
    model = create_model(name, 260, seed=3)
    ours = {key: np.asarray(variable[...], np.float64)
            for key, variable in _flat_variables(model).items()}
    compared = set()
    for torch_key, tensor in torch_model.state_dict().items():
        if torch_key.endswith("num_batches_tracked"):
            continue
        key, theirs = _target_key(module_path(model, torch_key),
                                  tensor.detach().numpy().astype(np.float64))
        values = ours[key]
        assert values.shape == theirs.shape, key
        compared.add(key)
        if theirs.std() == 0:  # BatchNorm scale/bias/statistics, zero-initialised last BNs
            np.testing.assert_array_equal(values, theirs, err_msg=key)
            continue
        sigma, n = theirs.std(), theirs.size
        assert abs(values.mean() - theirs.mean()) < SIGMAS * sigma / np.sqrt(n) + 1e-12, key
        assert abs(values.std() - sigma) < SIGMAS * sigma / np.sqrt(2 * n), (key, values.std(),
                                                                             sigma)
        if n >= 2000:  # normal (kurtosis 3) vs uniform (1.8): sampling sd about sqrt(24 / n)
            assert abs(_kurtosis(values) - _kurtosis(theirs)) < SIGMAS * np.sqrt(24 / n), key
    assert compared == set(ours), set(ours) - compared


def test_tresnet_classifier_and_se_biases_as_timm():
    """The values the issue found different: TResNet's head N(0, 0.01) with a uniform bias, and its
    squeeze-excite convolutions' biases U(+-1/sqrt(fan_in)) rather than zeros."""
    model = create_model("tresnet_m", 260, seed=0)
    kernel = np.asarray(model.head.fc.kernel[...])
    assert abs(kernel.std() - 0.01) < 0.0002 and abs(_kurtosis(kernel.ravel()) - 3) < 0.1
    bias = np.asarray(model.head.fc.bias[...])
    assert 0 < np.abs(bias).max() <= 1 / np.sqrt(2048)
    se_bias = np.asarray(model.backbone.body.layer1[0].se.fc1.bias[...])
    assert np.abs(se_bias).max() <= 1 / np.sqrt(64) and se_bias.std() > 0.05
    assert isinstance(model.head.fc, nnx.Linear)
