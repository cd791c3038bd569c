"""What a run trains and evaluates on: its splits, decoded onto the accelerators or streamed
(config.data.pipeline), the validation images held out of the training split (protocol
"validation"), and the workdir's records of the labels and the held-out images that a resume or
an evaluation checks.

`check_before_decoding` refuses what the split indexes and the device count already rule out,
before minutes of decoding; `load_data` then builds the `RunData` the loop and the evaluation
read.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from annotate import convert, data
from annotate.checkpoints import has_checkpoint
from annotate.config import data_root
from annotate.devices import put, replicated
from annotate.workdir import WorkdirError, write_atomically


@dataclasses.dataclass(frozen=True)
class DeviceSplit:
    """A split on the accelerators (uint8 images, float32 targets, replicated) plus host copies
    (config.data.pipeline = "device"); images to annotate (annotate.predict) have neither
    targets nor host copies."""

    images: jax.Array
    targets: jax.Array | None
    host: data.Split | None

    @property
    def num_images(self) -> int:
        return self.images.shape[0]


class DecodedOnDemand(Sequence):
    """A streamed split's images as a sequence, each decoded when read (for the reports)."""

    def __init__(self, sources: data.SplitSources, image_size: int):
        self.sources, self.image_size = sources, image_size

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.sources.decode(i, self.image_size)


@dataclasses.dataclass(frozen=True)
class StreamSplit:
    """A split decoded batch by batch while it is used (config.data.pipeline = "stream"): its
    encoded sources, and host data (targets, names; images decoded on demand)."""

    sources: data.SplitSources
    image_size: int

    @property
    def num_images(self) -> int:
        return len(self.sources)

    @property
    def host(self) -> data.Split:
        return data.Split(DecodedOnDemand(self.sources, self.image_size), self.sources.targets,
                          self.sources.image_names, self.sources.vocabulary)


@dataclasses.dataclass(frozen=True)
class RunData:
    """The run's splits, on the devices or streamed (config.data.pipeline): `train` is trained
    on, `test` is the test set, and
    `validation` (protocol "validation" only) is held out of the training images."""

    train: DeviceSplit | StreamSplit
    test: DeviceSplit | StreamSplit
    validation: DeviceSplit | StreamSplit | None = None

    @property
    def monitored(self) -> tuple[str, DeviceSplit | StreamSplit]:
        """The split scored after every epoch and its prefix in metrics.jsonl: the validation
        images when held out, else the test set (which chooses the checkpoint under "seed" only)."""
        return ("val", self.validation) if self.validation is not None else ("test", self.test)

    @property
    def threshold_split(self) -> DeviceSplit | StreamSplit:
        """Where the per-label MCC thresholds are chosen: the validation images, else train."""
        return self.validation if self.validation is not None else self.train


def _training_rows(image_names: Sequence[str], num_originals: int,
                   held_out: np.ndarray) -> np.ndarray:
    """Rows of the training split (`image_names`: its originals, then its WGAN images) that stay
    for training when the original images `held_out` are validation images: the other originals
    and the WGAN images not made from a held-out image (data.augmented_names)."""
    held = set(held_out.tolist())
    held_stems = {image_names[i].split(".")[0] for i in held}
    keep = [i for i in range(num_originals) if i not in held]
    keep += [i for i in range(num_originals, len(image_names))
             if data.original_stem(image_names[i]) not in held_stems]
    return np.asarray(keep, dtype=np.int64)


def check_before_decoding(config: ml_collections.ConfigDict, workdir: Path,
                          devices: int) -> None:
    """What the device count, the split indexes and the pretrained checkpoint's name already
    refuse, before minutes of decoding: a batch the devices cannot share, a validation subset
    that leaves no training image, a batch larger than the training images, a pretrained file
    that does not exist or whose reader is not installed (checked only for a run that starts
    afresh: a resumed one does not load it)."""
    if config.train.batch_size % devices:
        raise ValueError(f"config.train.batch_size = {config.train.batch_size} must be a "
                         f"multiple of the device count {devices}")
    root = data_root(config)
    index = data.read_split_index(root, "train")
    originals = len(index.image_names)
    validation = config.eval.protocol == "validation"
    if validation and config.eval.validation_size >= originals:
        raise ValueError(f"config.eval.validation_size = {config.eval.validation_size}: must be "
                         f"less than the {originals} training images of {root / 'train.json'} "
                         f"(at least one is left to train on)")
    names = list(index.image_names)
    if config.data.augmentation:
        names += data.read_augmentation_index(config.data.augmentation_dir or root).image_names
    held_out = (data.validation_indices(data.multi_hot(index.image_labels, index.vocabulary),
                                        config.eval.validation_size, config.seed)
                if validation else np.zeros(0, np.int64))  # as load_data holds them out
    training_images = len(_training_rows(names, originals, held_out))
    if config.train.batch_size > training_images:
        raise ValueError(f"config.train.batch_size = {config.train.batch_size} exceeds the "
                         f"{training_images} training images")
    if config.model.pretrained and not has_checkpoint(workdir):
        convert.check_pretrained(config.model.pretrained)


def load_data(config: ml_collections.ConfigDict, mesh: Mesh) -> RunData:
    """Train and test at config.data.image_size: with data.pipeline "device", decoded (or read
    from the cache) and put on every device of `mesh`; with "stream", indexed only, decoded
    batch by batch when used. With data.augmentation the WGAN samples join the train split;
    under protocol "validation" config.eval.validation_size of the training images
    (data.validation_indices, seeded by config.seed) are held out, with the WGAN images made
    from them."""
    root = data_root(config)
    common = dict(cache_dir=config.data.cache_dir, source=config.data.source)
    augmentation_dir = (config.data.augmentation_dir or root) if config.data.augmentation else None
    stream = config.data.pipeline == "stream"
    if stream:
        train = data.split_sources(root, "train", augmentation_dir=augmentation_dir, **common)
        test = data.split_sources(root, "test", **common)
    else:
        train = data.load_split(root, "train", config.data.image_size,
                                augmentation_dir=augmentation_dir, **common)
        test = data.load_split(root, "test", config.data.image_size, **common)
    validation = None
    if config.eval.protocol == "validation":
        num_originals = len(train.image_names)
        if augmentation_dir is not None:
            num_originals -= len(data.read_augmentation_index(augmentation_dir).image_names)
        held_out = data.validation_indices(train.targets[:num_originals],
                                           config.eval.validation_size, config.seed)
        validation = train.take(held_out)
        train = train.take(_training_rows(train.image_names, num_originals, held_out))
    on_every_device = replicated(mesh)

    def prepared(split: data.Split | data.SplitSources | None) -> DeviceSplit | StreamSplit | None:
        if split is None:
            return None
        if stream:
            return StreamSplit(split, config.data.image_size)
        return DeviceSplit(put(split.images, on_every_device), put(split.targets, on_every_device),
                           split)

    return RunData(prepared(train), prepared(test), prepared(validation))


VOCABULARY_RECORD = "vocabulary.json"  # the labels of the workdir's outputs, in their order


def _trained_vocabulary(workdir: Path) -> tuple[list[str] | None, Path | None]:
    """The labels the workdir's checkpoints output, and the file that says so: vocabulary.json
    (written when training starts), else, in a workdir of an earlier version, the vocabulary
    of its last evaluation's thresholds.json; (None, None) when neither holds one."""
    for name, key in ((VOCABULARY_RECORD, "labels"), ("thresholds.json", "vocabulary")):
        path = workdir / name
        try:
            vocabulary = json.loads(path.read_text())[key]
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise WorkdirError(f"{path} is damaged ({type(error).__name__}: {error}); it names the "
                               f"labels of the workdir's outputs, so they cannot be checked: "
                               f"restore it, or use another --workdir") from error
        if isinstance(vocabulary, list):
            return vocabulary, path
    return None, None


def check_vocabulary(workdir: Path, vocabulary: Sequence[str]) -> None:
    """WorkdirError when `vocabulary` (the dataset's labels) is not the one the workdir's
    checkpoints were trained on: a resume or an evaluation would read every output from a
    moved, renamed or replaced label as another label."""
    trained, path = _trained_vocabulary(workdir)
    if trained is None or list(trained) == list(vocabulary):
        return
    if len(trained) != len(vocabulary):
        detail = f"{len(trained)} labels there, {len(vocabulary)} here"
    else:
        j = next(j for j, (a, b) in enumerate(zip(trained, vocabulary)) if a != b)
        detail = f"output {j} is {trained[j]!r} there, {vocabulary[j]!r} here"
    raise WorkdirError(f"{workdir} was trained on other labels than this dataset's ({detail}; "
                       f"see {path}): its outputs would be read as other labels; use the "
                       f"dataset it was trained on (config.data.root), or another --workdir")


def _validation_record(run_data: RunData, config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {"seed": config.seed, "size": config.eval.validation_size,
            "image_names": run_data.validation.host.image_names}


def check_validation_images(run_data: RunData, config: ml_collections.ConfigDict,
                            workdir: Path) -> None:
    """ValueError when workdir/validation_images.json, written when the run started, lists other
    held-out images than `run_data` holds out (a changed dataset, seed or size would mix the
    two sides: train on images the epochs or thresholds are then chosen on); nothing to check
    without it."""
    path = workdir / "validation_images.json"
    if not path.exists():
        return
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is damaged ({error}); it names the images this run held out, "
                         f"so the run cannot be resumed or evaluated safely: use a new "
                         f"workdir") from error
    if stored != _validation_record(run_data, config):
        raise ValueError(f"{path} lists other validation images than this run holds out (the "
                         f"dataset, config.seed or config.eval.validation_size changed since "
                         f"the run started); use those it was trained with, or a new workdir")


def record_validation_images(run_data: RunData, config: ml_collections.ConfigDict,
                              workdir: Path, resumed: bool) -> None:
    """Write workdir/validation_images.json, after checking that a `resumed` run holds out the
    same images (check_validation_images)."""
    if resumed:
        check_validation_images(run_data, config, workdir)
    write_atomically(workdir / "validation_images.json",
                     json.dumps(_validation_record(run_data, config), indent=1) + "\n")
