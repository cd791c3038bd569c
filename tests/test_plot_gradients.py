"""scripts/plot_gradients.py writes valid PNGs whose curves are the losses' true gradients."""
from __future__ import annotations

import re

import matplotlib.figure
import numpy as np
from PIL import Image
from modules import load_module
from test_losses import (_asl_negative_gradient, _focal_negative_gradient,
                         _focal_positive_gradient)



def _load_script():
    return load_module("scripts/plot_gradients.py")


def _closed_form(name: str, probabilities: np.ndarray, target: float) -> np.ndarray:
    """dL/dx of one label from its closed form (tests/test_losses.py), with the hyper-parameters
    that the curve's legend name states: BCE p - y; focal at its gamma; ASL's positive side
    (gamma+ = 0: p - 1) and its shifted, clipped negative side."""
    values = [float(value) for value in re.findall(r"=([\d.]+)", name)]
    if name == "BCE":
        return probabilities - target
    if name.startswith("focal"):
        (gamma,) = values
        gradient = _focal_positive_gradient if target == 1.0 else _focal_negative_gradient
        return gradient(probabilities, gamma)
    assert name.startswith("ASL"), name
    gamma_pos, gamma_neg, clip = values
    if target == 1.0:
        return _focal_positive_gradient(probabilities, gamma_pos)
    return _asl_negative_gradient(probabilities, gamma_neg, clip)


def test_main_writes_png_figures_of_the_true_gradients(tmp_path, monkeypatch):
    """Four valid, non-blank PNGs; every line drawn in them (read from the figures as they are
    saved) is the closed-form gradient its legend names, for the target it names."""
    drawn = []  # (figure file name, legend label, x, y) of every line saved
    savefig = matplotlib.figure.Figure.savefig

    def recording_savefig(figure, path, *args, **kwargs):
        for axes in figure.axes:
            drawn.extend((path.name, line.get_label(), line.get_xdata(), line.get_ydata())
                         for line in axes.get_lines() if not line.get_label().startswith("_"))
        return savefig(figure, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
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
    # per family its curves for both targets; the comparison holds every curve twice over
    assert len(drawn) == 2 * (1 + 2 + 1) * 2
    for file_name, label, probabilities, gradient in drawn:
        name, kind = label.rsplit(", ", 1)
        target = {"positive": 1.0, "negative": 0.0}[kind]
        assert len(probabilities) == 49
        np.testing.assert_allclose(gradient, _closed_form(name, probabilities, target), rtol=1e-4,
                                   atol=1e-7, err_msg=f"{file_name}: {label}")


def test_plotted_curves_are_single_label_gradients():
    """Every curve of FIGURES against its closed form, with the hyper-parameters its legend
    label names, at both targets."""
    script = _load_script()
    probabilities = np.linspace(0.02, 0.98, 25)
    for curves in script.FIGURES.values():
        for name, loss in curves:
            for target in (1.0, 0.0):
                np.testing.assert_allclose(script.label_gradient(loss, probabilities, target),
                                           _closed_form(name, probabilities, target), rtol=1e-4,
                                           atol=1e-7, err_msg=f"{name}, target {target}")
