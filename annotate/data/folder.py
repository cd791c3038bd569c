"""The seed's dataset folder format: validated JSON indices, multi-hot targets and image decoding.

A dataset folder holds `images/`, `train.json` and `test.json`; each JSON file is
`{"samples": [{"image_name": "1001.jpeg", "image_labels": ["sky", ...]}, ...],
  "labels": [vocabulary]}`.
"""
from __future__ import annotations

import errno
import io
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

SPLITS: tuple[str, ...] = ("train", "test")
DEFAULT_DATASET_FOLDER = Path("data") / "corel5k"  # where the fetch writes, relative to the cwd
FETCH_HINT = (f"get Corel-5k with `python -m annotate.data.fetch` (writes "
              f"{DEFAULT_DATASET_FOLDER}), or point COREL5K_DIR / --config.data.root at a "
              "folder holding images/, train.json and test.json")


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file and what is wrong."""


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is the file system's "no space left" (or "quota exceeded"): a full disk,
    not a failed download, a damaged archive or a bad image."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class SplitIndex:
    """The validated content of one JSON index: image names, their labels and the vocabulary.

    Images live in `root / image_folder` (`images/` for the seed's splits, `aug-images/` for the
    WGAN augmentation written next to `train_aug.json`).
    """

    image_names: list[str]
    image_labels: list[list[str]]
    vocabulary: list[str]
    root: Path
    json_path: Path
    image_folder: str = "images"

    @property
    def image_paths(self) -> list[Path]:
        """Absolute path of every image, in sample order."""
        folder = self.root / self.image_folder
        return [folder / name for name in self.image_names]


def multi_hot(image_labels: Sequence[Sequence[str]], vocabulary: Sequence[str]) -> np.ndarray:
    """Encode per-image label lists as float32 [N, len(vocabulary)] 0/1 rows (vocabulary order)."""
    position = {label: j for j, label in enumerate(vocabulary)}
    targets = np.zeros((len(image_labels), len(vocabulary)), np.float32)
    for i, labels in enumerate(image_labels):
        targets[i, [position[label] for label in labels]] = 1.0
    return targets


def check_dataset_root(root: Path | str) -> Path:
    """Return `root` as an absolute Path, or raise DatasetError explaining how to get the dataset."""
    path = Path(root).expanduser().absolute()
    if not path.is_dir():
        raise DatasetError(f"dataset folder {path} does not exist; {FETCH_HINT}")
    return path


def read_index_file(json_path: Path | str, image_folder: str = "images", *,
                    missing_hint: str = FETCH_HINT) -> SplitIndex:
    """Read and validate one JSON index (structure, vocabulary, labels, unique image names; at
    least one sample); `missing_hint` says how to get a missing file."""
    json_path = Path(json_path).absolute()
    if not json_path.is_file():
        raise DatasetError(f"{json_path}: file is missing; {missing_hint}")
    try:
        content = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{json_path}: invalid JSON ({error})") from error
    except RecursionError:  # arrays nested thousands deep
        raise DatasetError(f"{json_path}: invalid JSON (nested too deeply)") from None
    if not isinstance(content, dict):
        raise DatasetError(f"{json_path}: top level must be an object with keys 'samples' and "
                           "'labels'")
    for key in ("samples", "labels"):
        if not isinstance(content.get(key), list):
            raise DatasetError(f"{json_path}: key '{key}' is missing or is not a list")
    vocabulary = content["labels"]
    if not all(isinstance(word, str) for word in vocabulary):
        raise DatasetError(f"{json_path}: 'labels' must be a list of strings")
    if len(set(vocabulary)) != len(vocabulary):
        repeated = sorted({word for word in vocabulary if vocabulary.count(word) > 1})
        raise DatasetError(f"{json_path}: 'labels' repeats {repeated}")
    known = set(vocabulary)
    first_seen: dict[str, int] = {}
    image_names, image_labels = [], []
    for i, sample in enumerate(content["samples"]):
        if not isinstance(sample, dict):
            raise DatasetError(f"{json_path}: samples[{i}] is not an object")
        name, labels = sample.get("image_name"), sample.get("image_labels")
        if (not isinstance(name, str) or name in ("", "..") or Path(name).name != name
                or "\0" in name):
            raise DatasetError(f"{json_path}: samples[{i}] has no valid 'image_name' (a plain file "
                               "name)")
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise DatasetError(f"{json_path}: samples[{i}] ({name}) has no valid 'image_labels' "
                               "(a list of strings)")
        unknown = [label for label in labels if label not in known]
        if unknown:
            raise DatasetError(f"{json_path}: samples[{i}] ({name}) has labels {unknown} that are "
                               "not in the vocabulary ('labels')")
        if name in first_seen:
            raise DatasetError(f"{json_path}: duplicate image name '{name}' "
                               f"(samples[{first_seen[name]}] and samples[{i}])")
        first_seen[name] = i
        image_names.append(name)
        image_labels.append(list(labels))
    if not image_names:
        raise DatasetError(f"{json_path}: 'samples' is empty")
    return SplitIndex(image_names, image_labels, list(vocabulary), json_path.parent, json_path,
                      image_folder)


def read_split_index(root: Path | str, split: str) -> SplitIndex:
    """Read and validate `<root>/<split>.json` ("train" or "test") of a seed-format folder."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; valid splits: {list(SPLITS)}")
    return read_index_file(check_dataset_root(root) / f"{split}.json")


def check_same_vocabulary(reference: SplitIndex, other: SplitIndex) -> None:
    """Raise DatasetError when two indices do not share the same vocabulary in the same order."""
    if reference.vocabulary == other.vocabulary:
        return
    only_reference = sorted(set(reference.vocabulary) - set(other.vocabulary))
    only_other = sorted(set(other.vocabulary) - set(reference.vocabulary))
    detail = (f"only in {reference.json_path.name}: {only_reference[:10]}, only in "
              f"{other.json_path.name}: {only_other[:10]}" if only_reference or only_other
              else "same words in a different order")
    raise DatasetError(f"{other.json_path}: vocabulary ('labels') differs from "
                       f"{reference.json_path} ({detail})")


def read_dataset_indices(root: Path | str) -> dict[str, SplitIndex]:
    """Read train.json and test.json of a dataset folder and check that their vocabularies agree
    and that no image is in both (test images seen in training would inflate every test score)."""
    indices = {split: read_split_index(root, split) for split in SPLITS}
    train, test = indices["train"], indices["test"]
    check_same_vocabulary(train, test)
    shared = sorted(set(train.image_names) & set(test.image_names))
    if shared:
        raise DatasetError(f"{test.json_path}: {len(shared)} images are also in "
                           f"{train.json_path.name} (first: {shared[:5]}); a test image must not "
                           f"be trained on")
    return indices


def check_images_exist(index: SplitIndex) -> list[os.stat_result]:
    """Stat every image of `index`; raise DatasetError naming the first missing or unreadable
    file (e.g. `images` a file, not a folder)."""
    stats = []
    for name, path in zip(index.image_names, index.image_paths):
        try:
            stats.append(path.stat())
        except FileNotFoundError:
            raise DatasetError(f"{path}: image file is missing (listed as '{name}' in "
                               f"{index.json_path})") from None
        except OSError as error:
            raise DatasetError(f"{path}: {error.strerror} (listed as '{name}' in "
                               f"{index.json_path})") from None
    return stats


def as_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, upright as viewers show it: its EXIF orientation applied (a phone's
    portrait photo is stored sideways; no Corel-5k image has one). Single-channel images of more
    than 8 bits (16-bit PNG or TIFF greys, PIL modes "I;16*" and "I") are scaled from 0..65535,
    where PIL's convert("RGB") would clip at 255 and make them near-white; images with
    transparency are composited onto white, where convert("RGB") would show the colour stored
    under transparent pixels (often black); floating-point images (mode "F") have no agreed
    range and are refused with a ValueError."""
    if image.mode == "F":
        raise ValueError("a floating-point image (PIL mode F) has no agreed value range; save it "
                         "with 8 or 16 bits per channel")
    image = ImageOps.exif_transpose(image)  # a copy: the caller's image is left as it is
    if image.mode.startswith("I"):
        grey = np.rint(np.asarray(image, dtype=np.float64) * (255.0 / 65535.0))
        image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), mode="L")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def decode_image(source: Path | str | bytes, image_size: int, *,
                 name: str | None = None) -> np.ndarray:
    """Decode an image file (or its encoded bytes) as the seed does: PIL RGB (as_rgb, which also
    turns it upright), bilinear S x S resize.

    Returns uint8 [S, S, 3] (aspect ratio squashed). The image is fully decoded, so truncated or
    corrupt files raise DatasetError naming `name` (default: the path).
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<encoded image bytes>")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
            resized = as_rgb(image).resize((image_size, image_size), Image.Resampling.BILINEAR)
    except FileNotFoundError:
        raise DatasetError(f"{label}: image file is missing") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{label}: cannot decode image ({type(error).__name__}: "
                           f"{error})") from error
    return np.asarray(resized, dtype=np.uint8)


def available_cores() -> int:
    """Number of CPU cores this process may use (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_into(out: np.ndarray, read_image: Callable[[int], np.ndarray], *,
                description: str) -> None:
    """Fill `out[i] = read_image(i)` for every i with a thread pool and a progress bar.

    PIL releases the GIL while decoding and resizing, so threads use all cores. The first error
    cancels the remaining work and is re-raised.
    """
    executor = ThreadPoolExecutor(max_workers=available_cores())
    try:
        def store(i: int) -> None:
            out[i] = read_image(i)

        for _ in tqdm(executor.map(store, range(len(out))), total=len(out), desc=description,
                      unit="img"):
            pass
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def validate_dataset(root: Path | str, *, image_size: int = 32) -> dict[str, SplitIndex]:
    """Fully check a dataset folder: both JSON indices, equal vocabularies, every image decodes."""
    indices = read_dataset_indices(root)
    for split, index in indices.items():
        check_images_exist(index)
        paths = index.image_paths
        scratch = np.empty((len(paths), image_size, image_size, 3), np.uint8)
        decode_into(scratch, lambda i: decode_image(paths[i], image_size),
                    description=f"checking {split} images")
    return indices
