"""Corel-5k data layer: validated JSON indices, decoded uint8 splits cached on disk, a TFDS builder.

    split = load_split("data/corel5k", "train", 448)            # images uint8 [N,448,448,3]
    split = load_split(root, "train", 448, augmentation_dir=aug)  # + <aug>/train_aug.json samples
    split = load_split(root, "test", 448, source="tfds")          # same arrays via array_record

Images are decoded once per (folder content, split, size) and cached as one `.npy` file in
`default_cache_dir()`; later loads read that file in seconds. Any bad input raises DatasetError.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from annotate.data.cache import (CACHE_FORMAT_VERSION, cached_uint8_array, default_cache_dir,
                                 directory_fingerprint_parts, hash_parts, index_fingerprint_parts,
                                 short_hash)
from annotate.data.folder import (DEFAULT_DATASET_FOLDER, SPLITS, DatasetError, SplitIndex, as_rgb,
                                  check_same_vocabulary, decode_image, decode_into, multi_hot,
                                  read_dataset_indices, read_index_file, read_split_index,
                                  validate_dataset)
from annotate.data.validation import validation_indices

# The seed's input normalisation, its get_mean_std() verbatim: per-channel mean/std in [0, 1]
# labelled "4500 images" (the training split: on this project's copy its full-size pixel means
# differ from these by 0.006 to 0.0073, at 32 px by under 0.005, tests/test_data.py), and for
# the 18,000 images of its --augmentation (with its ML-WGAN images). Kept for parity.
COREL5K_MEAN = (0.3928, 0.4079, 0.3531)
COREL5K_STD = (0.2559, 0.2436, 0.2544)
COREL5K_AUGMENTED_MEAN = (0.4249, 0.4365, 0.3926)
COREL5K_AUGMENTED_STD = (0.1955, 0.1830, 0.1987)

SOURCES = ("folder", "tfds")
AUGMENTATION_INDEX = "train_aug.json"
AUGMENTATION_IMAGES = "aug-images"
# the seed's names of an original's three WGAN images: <stem><suffix>.jpeg, in save order
AUGMENTATION_SUFFIXES = ("_aug", "_aug_hor_flip", "_aug_rot_90")


def augmented_names(image_name: str) -> list[str]:
    """The seed's three WGAN image names for a training image: stem (up to the first '.') +
    suffix + .jpeg."""
    stem = image_name.split(".")[0]
    return [f"{stem}{suffix}.jpeg" for suffix in AUGMENTATION_SUFFIXES]


def original_stem(augmented_name: str) -> str:
    """The stem of the training image a WGAN image was made from (augmented_names' inverse): its
    stem less the longest suffix it ends with (a stem may itself hold "_aug")."""
    stem = augmented_name.split(".")[0]
    suffix = max((s for s in AUGMENTATION_SUFFIXES if stem.endswith(s)), key=len, default="")
    return stem[:len(stem) - len(suffix)]

__all__ = [
    "COREL5K_AUGMENTED_MEAN", "COREL5K_AUGMENTED_STD", "COREL5K_MEAN", "COREL5K_STD",
    "DEFAULT_DATASET_FOLDER", "DatasetError", "Split", "SplitIndex", "as_rgb", "augmented_names",
    "decode_image", "original_stem",
    "default_cache_dir", "load_split", "multi_hot", "read_augmentation_index",
    "read_dataset_indices", "read_split_index", "split_sources", "SplitSources", "tfds_data_dir",
    "validate_dataset", "validation_indices",
]


@dataclass(frozen=True)
class Split:
    """A decoded split: images uint8 [N,S,S,3], multi-hot targets float32 [N,C], names, labels."""

    images: np.ndarray
    targets: np.ndarray
    image_names: list[str]
    vocabulary: list[str]

    def take(self, indices: np.ndarray) -> "Split":
        """The images at `indices` (in that order) as a split of their own."""
        return Split(self.images[indices], self.targets[indices],
                     [self.image_names[i] for i in indices], self.vocabulary)


def read_augmentation_index(augmentation_dir: Path | str) -> SplitIndex:
    """Read `<augmentation_dir>/train_aug.json` (images in `<augmentation_dir>/aug-images/`)."""
    index_path = Path(augmentation_dir).expanduser() / AUGMENTATION_INDEX
    return read_index_file(index_path, AUGMENTATION_IMAGES, missing_hint=(
        "write it with `python -m wgan.run --config=configs/wgan.py` (into the data root, or set "
        "--config.data.augmentation_dir to its --config.out_dir)"))


def tfds_data_dir(root: Path | str, cache_dir: Path | str) -> Path:
    """Where load_split keeps the TFDS (array_record) build of dataset folder `root`."""
    root = Path(root).expanduser().absolute()
    return Path(cache_dir).expanduser() / "tfds" / f"{root.name}-{short_hash(str(root))}"


@dataclass(frozen=True)
class SplitSources:
    """A split's images still encoded (file paths, or the bytes of a TFDS build) with their names,
    multi-hot targets and vocabulary: what load_split decodes into the cache and the "stream"
    pipeline decodes batch by batch."""

    sources: list[Path | bytes]
    error_names: list[str]
    image_names: list[str]
    targets: np.ndarray
    vocabulary: list[str]
    fingerprint: list[str | bytes]  # what the cache key of the decoded split hashes

    def __len__(self) -> int:
        return len(self.sources)

    def decode(self, i: int, image_size: int) -> np.ndarray:
        """Image i as uint8 [S, S, 3], exactly as the cached split holds it."""
        return decode_image(self.sources[i], image_size, name=self.error_names[i])

    def take(self, indices: np.ndarray) -> "SplitSources":
        """The images at `indices` (in that order) as a split of their own."""
        pick = lambda values: [values[i] for i in indices]  # noqa: E731
        return SplitSources(pick(self.sources), pick(self.error_names), pick(self.image_names),
                            self.targets[indices], self.vocabulary, self.fingerprint)


def split_sources(root: Path | str, split: str, *, cache_dir: Path | str | None = None,
                  source: str = "folder",
                  augmentation_dir: Path | str | None = None) -> SplitSources:
    """Split "train"/"test" of dataset folder `root`, not decoded: source="folder" reads
    `root/images`; source="tfds" the `corel5k` TFDS build in `tfds_data_dir(root, cache_dir)`,
    built from `root` when missing or out of date. `augmentation_dir` (train only) appends the
    samples of its train_aug.json (same vocabulary required), as the seed's `--augmentation`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; valid splits: {list(SPLITS)}")
    if source not in SOURCES:
        raise ValueError(f"unknown source '{source}'; valid sources: {list(SOURCES)}")
    if augmentation_dir is not None and split != "train":
        raise ValueError("augmentation_dir only applies to the train split")
    root = Path(root).expanduser().absolute()
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if source == "folder":
        index = read_dataset_indices(root)[split]
        sources: list[Path | bytes] = list(index.image_paths)
        error_names = [str(path) for path in sources]
        names, labels = list(index.image_names), list(index.image_labels)
        fingerprint = index_fingerprint_parts(index)
    else:
        from annotate.data.tfds_corel5k import build_tfds, read_tfds_split

        data_dir = tfds_data_dir(root, cache_dir)
        if root.is_dir():
            build_tfds(root, data_dir)
        build_dir, vocabulary, records = read_tfds_split(data_dir, split)
        sources = [record["image"] for record in records]
        names = [record["image_name"] for record in records]
        labels = [record["labels"] for record in records]
        error_names = [f"{name} in TFDS build {build_dir}" for name in names]
        fingerprint = directory_fingerprint_parts(build_dir)
        index = SplitIndex(names, labels, vocabulary, build_dir, build_dir / "metadata.json")
    if augmentation_dir is not None:
        augmentation = read_augmentation_index(augmentation_dir)
        check_same_vocabulary(index, augmentation)
        sources += augmentation.image_paths
        names += augmentation.image_names
        error_names += [str(path) for path in augmentation.image_paths]
        labels += augmentation.image_labels
        fingerprint += index_fingerprint_parts(augmentation)
    return SplitSources(sources, error_names, names, multi_hot(labels, index.vocabulary),
                        list(index.vocabulary), fingerprint)


def load_split(root: Path | str, split: str, image_size: int, *, cache_dir: Path | str | None = None,
               source: str = "folder", augmentation_dir: Path | str | None = None) -> Split:
    """Split "train"/"test" of dataset folder `root` (see split_sources) decoded at
    `image_size`, through the cache: decoded once per (folder content, split, size, source)."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    sources = split_sources(root, split, cache_dir=cache_dir, source=source,
                            augmentation_dir=augmentation_dir)
    root = Path(root).expanduser().absolute()
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    prefix = f"{root.name}-{short_hash(str(root))}-{split}-{image_size}px-{source}"
    if augmentation_dir is not None:
        prefix += f"-aug{short_hash(str(Path(augmentation_dir).expanduser().absolute()))}"
    key = hash_parts([f"format {CACHE_FORMAT_VERSION}", source, split, str(image_size),
                      *sources.fingerprint])

    def fill(out: np.ndarray) -> None:
        decode_into(out, lambda i: sources.decode(i, image_size),
                    description=f"decoding {root.name} {split} at {image_size}px")

    images = cached_uint8_array(cache_dir, prefix, key, (len(sources), image_size, image_size, 3),
                                fill)
    return Split(images, sources.targets, sources.image_names, sources.vocabulary)
