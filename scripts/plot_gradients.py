"""Draw the seed's "Gradient Analysis" figures: dL/dx against p = sigmoid(x) for positive and
negative labels, for BCE, focal (gamma 2 and 3) and ASL (gamma+ 0, gamma- 4, m 0.05).

Gradients come from `jax.grad` of `annotate.losses` on a single label, so the figures show what
training actually optimises rather than re-derived formulas.

    python scripts/plot_gradients.py --out results/gradients
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402

from annotate.losses import LossFn, asymmetric_loss, bce_loss, focal_loss  # noqa: E402

# figure name -> curves (legend label, loss); one PNG per family as in the seed's README.
FIGURES: dict[str, list[tuple[str, LossFn]]] = {
    "bce": [("BCE", bce_loss)],
    "focal": [("focal $\\gamma$=2", functools.partial(focal_loss, gamma=2.0)),
              ("focal $\\gamma$=3", functools.partial(focal_loss, gamma=3.0))],
    "asl": [("ASL $\\gamma_+$=0 $\\gamma_-$=4 m=0.05",
             functools.partial(asymmetric_loss, gamma_neg=4.0, gamma_pos=0.0, clip=0.05))],
}


@functools.lru_cache(maxsize=None)
def _compiled_label_gradient(loss_fn: LossFn) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """jit(vmap(grad)) of `loss_fn` on a single label: (logits [N], target) -> dL/dx [N]."""
    def single(logit: jax.Array, target: jax.Array) -> jax.Array:
        return loss_fn(logit.reshape(1, 1), target.reshape(1, 1))
    return jax.jit(jax.vmap(jax.grad(single), in_axes=(0, None)))


def label_gradient(loss_fn: LossFn, probabilities: np.ndarray, target: float) -> np.ndarray:
    """dL/dx of `loss_fn` for one label with target 0/1, at logits x = logit(p) for each p."""
    logits = jnp.asarray(np.log(probabilities) - np.log1p(-probabilities), jnp.float32)
    gradient = _compiled_label_gradient(loss_fn)(logits, jnp.float32(target))
    return np.asarray(gradient, np.float64)


def _draw(axes: plt.Axes, probabilities: np.ndarray, curves: list[tuple[str, LossFn]],
          targets: Sequence[float]) -> None:
    """Plot one line per (curve, target) pair on `axes`: solid for positives, dashed negatives;
    later curves are thinner so coinciding ones (BCE and ASL positives) both stay visible."""
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, loss_fn) in enumerate(curves):
        for target in targets:
            kind = "positive" if target == 1.0 else "negative"
            axes.plot(probabilities, label_gradient(loss_fn, probabilities, target),
                      color=colours[index % len(colours)], linewidth=max(2.5 - 0.5 * index, 1.0),
                      linestyle="-" if target == 1.0 else "--", label=f"{name}, {kind}")
    axes.axhline(0.0, color="grey", linewidth=0.6)
    axes.set_xlabel("p = sigmoid(x)")
    axes.set_ylabel("dL/dx")
    axes.set_xlim(0.0, 1.0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)


def plot_gradients(out_dir: Path, num_points: int = 999) -> list[Path]:
    """Write gradients_<family>.png for each loss family plus gradients_comparison.png (all losses,
    positives and negatives side by side) into `out_dir`; return the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    probabilities = np.linspace(0.0, 1.0, num_points + 2)[1:-1]
    written = []
    for family, curves in FIGURES.items():
        figure, axes = plt.subplots(figsize=(6, 4.5))
        _draw(axes, probabilities, curves, targets=(1.0, 0.0))
        axes.set_title(f"{family.upper()} loss gradients")
        written.append(out_dir / f"gradients_{family}.png")
        figure.tight_layout()
        figure.savefig(written[-1], dpi=120)
        plt.close(figure)
    all_curves = [curve for curves in FIGURES.values() for curve in curves]
    figure, (positive_axes, negative_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    _draw(positive_axes, probabilities, all_curves, targets=(1.0,))
    positive_axes.set_title("positive labels (y = 1)")
    _draw(negative_axes, probabilities, all_curves, targets=(0.0,))
    negative_axes.set_title("negative labels (y = 0)")
    written.append(out_dir / "gradients_comparison.png")
    figure.tight_layout()
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)
    return written


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """CLI entry point: parse --out and draw the figures there."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    parser.add_argument("--points", type=int, default=999, help="probabilities per curve")
    args = parser.parse_args(argv)
    if args.points < 2:
        parser.error(f"--points must be at least 2; got {args.points}")
    written = plot_gradients(args.out, args.points)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
