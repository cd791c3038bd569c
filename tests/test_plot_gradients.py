"""scripts/plot_gradients.py writes valid PNGs whose curves are the losses' true gradients."""
from __future__ import annotations

import re

import numpy as np
from PIL import Image
from modules import load_module
from test_losses import (_asl_negative_gradient, _focal_negative_gradient,
                         _focal_positive_gradient)



def _load_script():
    return load_module("scripts/plot_gradients.py")


def test_main_writes_png_figures(tmp_path):
    script = _load_script()
    written = script.main(["--out", str(tmp_path / "figures"), "--points", "49"])
    names = sorted(path.name for path in written)
    assert names == ["gradients_asl.png", "gradients_bce.png", "gradients_comparison.png",
                     "gradients_focal.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.verify()
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"))
            assert pixels.shape[0] > 100 and pixels.std() > 0  # not blank


def test_plotted_curves_are_single_label_gradients():
    """Every curve against its closed form (tests/test_losses.py), with the hyper-parameters its
    legend label names: BCE p - y; focal at its gamma; ASL's positive side (gamma+ = 0: p - 1)
    and its shifted, clipped negative side."""
    script = _load_script()
    probabilities = np.linspace(0.02, 0.98, 25)

    def label_values(label: str) -> list[float]:
        return [float(value) for value in re.findall(r"=([\d.]+)", label)]

    (_, bce), = script.FIGURES["bce"]
    np.testing.assert_allclose(script.label_gradient(bce, probabilities, 1.0), probabilities - 1,
                               rtol=1e-5)
    np.testing.assert_allclose(script.label_gradient(bce, probabilities, 0.0), probabilities,
                               rtol=1e-5)
    for label, focal in script.FIGURES["focal"]:
        (gamma,) = label_values(label)
        np.testing.assert_allclose(script.label_gradient(focal, probabilities, 1.0),
                                   _focal_positive_gradient(probabilities, gamma), rtol=1e-4,
                                   atol=1e-7, err_msg=label)
        np.testing.assert_allclose(script.label_gradient(focal, probabilities, 0.0),
                                   _focal_negative_gradient(probabilities, gamma), rtol=1e-4,
                                   atol=1e-7, err_msg=label)
    (label, asl), = script.FIGURES["asl"]
    gamma_pos, gamma_neg, clip = label_values(label)
    np.testing.assert_allclose(script.label_gradient(asl, probabilities, 1.0),
                               _focal_positive_gradient(probabilities, gamma_pos), rtol=1e-4)
    np.testing.assert_allclose(script.label_gradient(asl, probabilities, 0.0),
                               _asl_negative_gradient(probabilities, gamma_neg, clip), rtol=1e-4,
                               atol=1e-7)
