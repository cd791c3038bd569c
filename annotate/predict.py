"""Annotate new images with a trained model and its MCC thresholds.

    python -m annotate.predict --workdir=runs/tresnet_asl photo.jpg holiday/ [--output out.json]

Folders are searched (not recursively) for image files. For every image the labels whose
probability exceeds the label's threshold (thresholds.json, written by the evaluation) are
printed with their probabilities, most probable first; --output also writes them as JSON.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np
from absl import app, flags

from annotate import data, train
from annotate.config import validate_config
from annotate.devices import enable_compilation_cache, make_mesh, put

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_paths(paths: Sequence[Path | str]) -> list[Path]:
    """The image files named by `paths`: files as given, folders expanded to their image files
    (sorted). Raises FileNotFoundError for a missing path or a folder without images."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise FileNotFoundError(f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            found += images
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"image path {path} does not exist")
    return found


@dataclasses.dataclass(frozen=True)
class Annotator:
    """A trained model (best checkpoint of a workdir) with its vocabulary and per-label thresholds."""

    experiment: train.Experiment
    params: train.Variables
    batch_stats: train.Variables
    vocabulary: list[str]
    thresholds: np.ndarray
    image_size: int

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Sigmoid probabilities [N, C] of uint8 images [N, S, S, 3] (S = the training size)."""
        on_device = put(images, self.experiment.replicated)
        return train.predict(self.experiment, self.params, self.batch_stats, on_device)

    def annotate(self, paths: Sequence[Path | str]) -> list[dict]:
        """[{"image": path, "labels": [{"label", "probability"}, ...]}] for the image files and
        folders in `paths`; labels above their threshold, most probable first."""
        files = image_paths(paths)
        images = np.stack([data.decode_image(path, self.image_size) for path in files])
        probs = self.probabilities(images)
        annotations = []
        for path, image_probs in zip(files, probs):
            chosen = np.flatnonzero(image_probs > self.thresholds)
            chosen = chosen[np.argsort(-image_probs[chosen], kind="stable")]
            annotations.append({"image": str(path), "labels": [
                {"label": self.vocabulary[j], "probability": round(float(image_probs[j]), 4)}
                for j in chosen]})
        return annotations


def load_annotator(workdir: Path | str) -> Annotator:
    """The best checkpoint of `workdir` with the config and thresholds stored beside it."""
    workdir = Path(workdir).absolute()
    config_path, thresholds_path = workdir / "config.json", workdir / "thresholds.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {workdir} is not a training workdir "
                                f"(python -m annotate.main --config=... --workdir={workdir})")
    if not thresholds_path.is_file():
        raise FileNotFoundError(f"{thresholds_path} not found: evaluate the run first "
                                f"(python -m annotate.main --config=... --workdir={workdir} --evaluate)")
    config = validate_config(ml_collections.ConfigDict(json.loads(config_path.read_text())))
    stored = json.loads(thresholds_path.read_text())
    vocabulary, thresholds = stored["vocabulary"], np.asarray(stored["thresholds"], np.float32)
    if len(vocabulary) != len(thresholds):
        raise ValueError(f"{thresholds_path}: {len(vocabulary)} labels but {len(thresholds)} thresholds")
    experiment, state = train.create_experiment(config, len(vocabulary), 1, make_mesh(),
                                                load_pretrained=False)
    state, _ = train.restore_best(workdir, state)
    return Annotator(experiment, train.eval_params(state), state.batch_stats, list(vocabulary),
                     thresholds, config.data.image_size)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Register the flags; done only when run as a program, so importing this module is harmless."""
    flags.DEFINE_string("workdir", None, "Training workdir (best checkpoint + thresholds.json).")
    flags.DEFINE_string("output", None, "Also write the annotations to this JSON file.")
    flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    """Annotate the image files and folders given as arguments."""
    if len(argv) < 2:
        raise app.UsageError("give image files or folders to annotate")
    files = image_paths(argv[1:])  # a bad path fails before the model is loaded
    enable_compilation_cache()
    annotations = load_annotator(FLAGS.workdir).annotate(files)
    for item in annotations:
        labels = ", ".join(f"{x['label']} ({x['probability']:.2f})" for x in item["labels"])
        print(f"{item['image']}: {labels or '(no label above its threshold)'}")
    if FLAGS.output:
        Path(FLAGS.output).write_text(json.dumps(annotations, indent=2) + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
