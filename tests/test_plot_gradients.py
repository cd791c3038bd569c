"""scripts/plot_gradients.py writes valid PNGs whose curves are the losses' true gradients."""
from __future__ import annotations


import numpy as np
from PIL import Image
from modules import load_module



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
    script = _load_script()
    probabilities = np.array([0.02, 0.3, 0.7])
    bce = dict(script.FIGURES["bce"])["BCE"]
    np.testing.assert_allclose(script.label_gradient(bce, probabilities, 1.0), probabilities - 1,
                               rtol=1e-5)
    np.testing.assert_allclose(script.label_gradient(bce, probabilities, 0.0), probabilities,
                               rtol=1e-5)
    (_, asl), = script.FIGURES["asl"]
    assert script.label_gradient(asl, probabilities, 0.0)[0] == 0.0  # p < m: discarded negative
