"""Annotate new images with a trained model and its MCC thresholds.

    python -m annotate.predict --workdir=runs/tresnet_asl photo.jpg holiday/ [--output tags.csv]

Folders are searched (not recursively) for image files. For every image the labels whose
probability exceeds the label's threshold (thresholds.json, written by the evaluation) are
printed with their probabilities, most probable first, as each batch is done (a run stopped
later keeps them); --output also writes them, when every image is done, as JSON (`.json`) or CSV
(`.csv`: image, label, probability). Files that are not images, or do not decode, are skipped
and listed at the end. The exit status is non-zero when nothing could be annotated or the output
could not be written. User errors are one line, `error: ...`, with exit status 2. Images are
decoded and annotated --batch_size (default: the run's train.eval_batch_size) at a time, so
memory does not grow with their number.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import flags
from absl import logging as absl_logging
from tqdm import tqdm

from annotate import checkpoints, cli, data, metrics, run_data, train
from annotate.config import COMPUTE_DTYPES, validate_config
from annotate.devices import enable_compilation_cache, is_out_of_memory, make_mesh, put
from annotate.workdir import CheckpointMismatchError, WorkdirError, write_atomically

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_paths(paths: Sequence[Path | str]) -> tuple[list[Path], list[Path]]:
    """(image files, other files) named by `paths`: files as given (an image file as far as the
    decoder is concerned), folders expanded to their image files (sorted), their other entries
    listed apart (a broken link named like an image is kept: it is then skipped with its
    reason, not lost; a pipe or device named like one is not read, where decoding it would
    wait forever). FileNotFoundError for a missing path, ValueError for one that is neither a
    file nor a folder."""

    def is_image_file(entry: Path) -> bool:  # a regular file or a broken link, named as images are
        return entry.suffix.lower() in IMAGE_SUFFIXES and (entry.is_file() or not entry.exists())

    found, others = [], []
    for path in map(Path, paths):
        if path.is_dir():
            entries = sorted(p for p in path.iterdir() if not p.is_dir())
            found += [p for p in entries if is_image_file(p)]
            others += [p for p in entries if not is_image_file(p)]
        elif path.is_file():
            found.append(path)
        elif path.exists():
            raise ValueError(f"image path {path} is not a file (a pipe or a device?)")
        else:
            raise FileNotFoundError(f"image path {path} does not exist")
    return found, others


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
        split = run_data.DeviceSplit(on_device, targets=None, host=None)  # predict reads the images
        return train.predict(self.experiment, self.params, self.batch_stats, split)

    @property
    def chunk_size(self) -> int:
        """Images decoded and annotated at once: the evaluation batch, rounded up to the device
        count, so host memory stays bounded for a folder of any size."""
        devices = self.experiment.mesh.size
        return -(-self.experiment.config.train.eval_batch_size // devices) * devices

    def images_at_once(self, count: int, chunk_size: int | None = None) -> int:
        """Images decoded and predicted per call when annotating `count` files: `chunk_size`
        (default: self.chunk_size), no more than there are files."""
        return min(chunk_size or self.chunk_size, max(count, 1))

    def annotate(self, files: Sequence[Path | str], chunk_size: int | None = None,
                 on_chunk: Callable[[list[dict]], None] | None = None,
                 ) -> tuple[list[dict], list[tuple[str, str]]]:
        """([{"image": path, "labels": [{"label", "probability"}, ...]}], [(path, why skipped)])
        for image files: labels above their threshold, most probable first; files that do not
        decode are skipped with the reason. Files are decoded and predicted `chunk_size` at a
        time (default: self.chunk_size), every chunk padded to one shape (one compilation);
        `on_chunk` receives each chunk's annotations as soon as they are done."""
        chunk_size = self.images_at_once(len(files), chunk_size)
        annotations, skipped = [], []
        with tqdm(total=len(files), unit="image", desc="annotate", file=sys.stderr,
                  disable=len(files) <= chunk_size) as bar:
            for start in range(0, len(files), chunk_size):
                chunk, decoded = files[start:start + chunk_size], []
                for path in chunk:
                    try:
                        decoded.append((path, data.decode_image(path, self.image_size)))
                    except data.DatasetError as error:  # its message starts with the path
                        skipped.append((str(path), str(error).removeprefix(f"{path}: ")))
                if decoded:
                    images = [image for _, image in decoded]
                    images += images[-1:] * (chunk_size - len(images))  # the compiled shape
                    probs = self.probabilities(np.stack(images))
                    done = [self._labels_above_threshold(path, image_probs)
                            for (path, _), image_probs in zip(decoded, probs)]
                    annotations += done
                    if on_chunk is not None:
                        on_chunk(done)
                bar.update(len(chunk))
        return annotations, skipped

    def _labels_above_threshold(self, path: Path | str, image_probs: np.ndarray) -> dict:
        """One image's annotation: its labels above their threshold, most probable first."""
        chosen = np.flatnonzero(metrics.above_thresholds(image_probs, self.thresholds))
        chosen = chosen[np.argsort(-image_probs[chosen], kind="stable")]
        return {"image": str(path), "labels": [
            {"label": self.vocabulary[j], "probability": round(float(image_probs[j]), 4)}
            for j in chosen]}


def load_annotator(workdir: Path | str, batch_size: int | None = None) -> Annotator:
    """The best checkpoint of `workdir` with the config and thresholds stored beside it; it
    annotates `batch_size` images at once (default: the run's train.eval_batch_size)."""
    workdir = Path(workdir).absolute()
    config_path, thresholds_path = workdir / "config.json", workdir / "thresholds.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {workdir} is not a training workdir "
                                f"(python -m annotate.main --config=... --workdir={workdir})")
    if not thresholds_path.is_file():
        raise FileNotFoundError(f"{thresholds_path} not found: evaluate the run first "
                                f"(python -m annotate.main --config=... --workdir={workdir} --evaluate)")
    try:
        config = validate_config(ml_collections.ConfigDict(json.loads(config_path.read_text())))
    except (KeyError, AttributeError, TypeError, ValueError) as error:  # JSONDecodeError too
        raise ValueError(f"{config_path} does not hold a config of this version of annotate "
                         f"({type(error).__name__}: {error}); retrain, or annotate with the "
                         f"version that trained it") from error
    try:
        stored = json.loads(thresholds_path.read_text())
        vocabulary, thresholds = stored["vocabulary"], np.asarray(stored["thresholds"], np.float32)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{thresholds_path} is damaged ({type(error).__name__}: {error}); "
                         f"write it again with --evaluate") from error
    if not (isinstance(vocabulary, list) and all(isinstance(label, str) for label in vocabulary)):
        raise ValueError(f"{thresholds_path} is damaged: its vocabulary must be a list of label "
                         f"names; write it again with --evaluate")
    if stored.get("dtype") is not None:  # the thresholds' probabilities' precision (an --evaluate
        if stored["dtype"] not in COMPUTE_DTYPES:  # with another dtype than the training's)
            raise ValueError(f"{thresholds_path} is damaged (config.model.dtype = "
                             f"{stored['dtype']!r}: use one of {list(COMPUTE_DTYPES)}); write "
                             f"it again with --evaluate")
        config.model.dtype = stored["dtype"]
    if thresholds.shape != (len(vocabulary),) or not np.all((thresholds >= 0) & (thresholds <= 1)):
        raise ValueError(f"{thresholds_path} is damaged: it must hold one threshold in [0, 1] per "
                         f"label ({len(vocabulary)} labels, thresholds of shape "
                         f"{thresholds.shape}, NaN or out of range?); write it again with --evaluate")
    checkpoints.require_checkpoint(workdir)  # before the model is built
    config.data.pipeline = "device"  # each chunk of images to annotate is put on the device
    if batch_size is not None:
        config.train.eval_batch_size = batch_size
    experiment, state = train.create_experiment(config, len(vocabulary), 1, make_mesh(),
                                                load_pretrained=False)
    try:
        state, epoch = checkpoints.restore_best(workdir, state)
    except CheckpointMismatchError as error:  # e.g. another run's thresholds.json's label count
        raise CheckpointMismatchError(f"{error}; the model was built for the {len(vocabulary)} "
                                      f"labels of {thresholds_path}") from error
    if stored.get("epoch") is not None and stored["epoch"] != epoch:
        raise ValueError(f"{thresholds_path} holds the thresholds of epoch {stored['epoch']}'s "
                         f"checkpoint, but the workdir's selected checkpoint is now epoch {epoch} "
                         f"(training went on); write them again with --evaluate")
    return Annotator(experiment, *train.eval_variables(state), list(vocabulary),
                     thresholds, config.data.image_size)


OUTPUT_FORMATS = (".json", ".csv")
FLAGS = flags.FLAGS


def out_of_memory_message(error: Exception, at_once: int | None, devices: int,
                          platform: str) -> str:
    """The one line for running out of device memory while the model loaded (`at_once` None) or
    annotated `at_once` images per call over `devices` devices: XLA's first line, what is kept,
    and what helps: a smaller --batch_size, unless each device already held one image."""
    reason = str(error).splitlines()[0][:200]
    elsewhere = ("" if platform == "cpu" else
                 ": use a device with more memory, or the CPU (JAX_PLATFORMS=cpu)")
    if at_once is None:
        return f"out of device memory loading the model ({reason}){elsewhere}"
    if at_once > devices:
        remedy = "annotate the rest with a smaller --batch_size"
    else:
        remedy = "one image per device does not fit" + (elsewhere or " in this machine's memory")
    return (f"out of device memory annotating {at_once} at a time ({reason}); the annotations "
            f"printed above are complete: {remedy}")


def define_flags() -> None:
    """Register the flags; done only when run as a program, so importing this module is harmless."""
    flags.DEFINE_string("workdir", None, "Training workdir (best checkpoint + thresholds.json).")
    flags.DEFINE_string("output", None, "Also write the annotations here: .json or .csv.")
    flags.DEFINE_integer("batch_size", None, "Images decoded and annotated at once (default: the "
                         "run's train.eval_batch_size); lower it if the device runs out of memory.",
                         lower_bound=1)
    flags.mark_flags_as_required(["workdir"])


def write_annotations(path: Path, annotations: list[dict]) -> None:
    """The annotations as JSON, or as CSV rows (image, label, probability; an image without a
    label above its threshold gets one row with an empty label), written atomically (a full
    disk leaves the previous file whole); a link is followed, not replaced."""
    if path.suffix.lower() == ".json":
        text = json.dumps(annotations, indent=2) + "\n"
    else:
        rows = io.StringIO(newline="")
        writer = csv.writer(rows)
        writer.writerow(["image", "label", "probability"])
        for item in annotations:
            labels = [[item["image"], x["label"], x["probability"]] for x in item["labels"]]
            writer.writerows(labels or [[item["image"], "", ""]])
        text = rows.getvalue()
    write_atomically(path.resolve(), text)


def print_annotations(annotations: list[dict]) -> None:
    """One line per image, "<path>: label (probability), ...", flushed at once."""
    for item in annotations:
        labels = ", ".join(f"{x['label']} ({x['probability']:.2f})" for x in item["labels"])
        print(f"{item['image']}: {labels or '(no label above its threshold)'}")
    sys.stdout.flush()


def check_output(output: str | None) -> Path | None:
    """The --output path, refused before any prediction when its folder or format is wrong."""
    if output is None:
        return None
    path = Path(output)
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise ValueError(f"--output {path}: use a .json or .csv file")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--output {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; name a file")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"--output {path}: not writable")
    return path


def main(argv: list[str]) -> None:
    """Annotate the image files and folders given as arguments."""
    if len(argv) < 2:
        cli.fail("give image files or folders to annotate: python -m annotate.predict "
                 "--workdir=runs/<experiment> photo.jpg holiday/")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and jax stay quiet
    annotator = None
    try:
        output = check_output(FLAGS.output)
        files, others = image_paths(argv[1:])  # a bad path fails before the model is loaded
        if not files:
            raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in "
                                    f"{', '.join(argv[1:])}")
        enable_compilation_cache()
        annotator = load_annotator(FLAGS.workdir, FLAGS.batch_size)
        # each chunk printed when done: a run stopped later keeps them
        annotations, skipped = annotator.annotate(files, on_chunk=print_annotations)
    except (FileNotFoundError, PermissionError, ValueError, data.DatasetError,
            WorkdirError) as error:
        cli.fail(error)
    except jax.errors.JaxRuntimeError as error:
        if not is_out_of_memory(error):
            raise
        at_once = annotator.images_at_once(len(files)) if annotator else None
        cli.fail(out_of_memory_message(error, at_once, jax.device_count(), jax.default_backend()))
    skipped += [(str(path), "not an image file") for path in others]
    if skipped:
        print(f"skipped {len(skipped)} file(s):", file=sys.stderr)
        for path, why in skipped:
            print(f"  {path}: {why}", file=sys.stderr)
    if output is not None and annotations:
        try:
            write_annotations(output, annotations)
        except OSError as error:  # the annotations are printed above; only the file is lost
            cli.fail(f"--output {output}: {error.strerror or error}")
    if not annotations:
        cli.fail("no image could be annotated")


if __name__ == "__main__":
    cli.run(main, define_flags, interrupted="the annotations printed above are complete; "
                                            "--output is written only when every image is done")
