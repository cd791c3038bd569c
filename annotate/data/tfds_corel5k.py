"""TFDS builder `corel5k`: the seed-format folder as array_record files, readable without TensorFlow.

Each example stores the image file's encoded bytes (decoding numpy images would need TensorFlow),
its name and its label words; the vocabulary lives in the build's metadata. Examples keep the JSON
order (`disable_shuffling`), so a TFDS split lines up with the folder split row for row.

    build_tfds("data/corel5k", "~/.cache/annotate/tfds/corel5k")   # once
    tfds.data_source("corel5k", split="test", data_dir=...)         # anywhere, no TensorFlow
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath

from annotate.data.cache import hash_parts, index_fingerprint_parts
from annotate.data.folder import (FETCH_HINT, SPLITS, DatasetError, SplitIndex,
                                  check_dataset_root, read_dataset_indices)


class Corel5k(tfds.core.GeneratorBasedBuilder):
    """Corel-5k multi-label annotation (4,500 train / 499 test images, 260 labels), local folder."""

    # TFDS would locate this file through `importlib_resources`, which it only requires (and which
    # is only installed) on Python < 3.9; give it the path directly.
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Encoded image bytes, image names and label words, seed JSON order."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the dataset folder (images/, train.json, test.json in the CNN_Image_Annotaion format) "
        f"as manual_dir, e.g. build_tfds(root, data_dir). To {FETCH_HINT}.")

    def _info(self) -> tfds.core.DatasetInfo:
        """Features: encoded image, its file name, its label words; metadata: the vocabulary."""
        return tfds.core.DatasetInfo(
            builder=self,
            description="Corel-5k images with their annotation words (multi-label).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "image_name": tfds.features.Text(),
                "labels": tfds.features.Sequence(tfds.features.Text()),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
            homepage="https://github.com/parham1998/CNN_Image_Annotaion",
            citation=("@inproceedings{duygulu2002object, title={Object recognition as machine "
                      "translation}, author={Duygulu, P. and Barnard, K. and de Freitas, J. F. G. "
                      "and Forsyth, D. A.}, booktitle={ECCV}, year={2002}}"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        """Validate the folder in manual_dir and record its vocabulary and fingerprint."""
        indices = read_dataset_indices(Path(os.fspath(dl_manager.manual_dir)))
        self.info.metadata["vocabulary"] = indices["train"].vocabulary
        self.info.metadata["source_fingerprint"] = folder_fingerprint(indices)
        return {split: self._generate_examples(index) for split, index in indices.items()}

    def _generate_examples(self, index: SplitIndex) -> Iterator[tuple[int, dict]]:
        """Yield (position in the JSON, example) so the stored order is the JSON order."""
        for position, (name, labels, path) in enumerate(
                zip(index.image_names, index.image_labels, index.image_paths)):
            yield position, {"image": path.read_bytes(), "image_name": name, "labels": labels}


def folder_fingerprint(indices: dict[str, SplitIndex]) -> str:
    """Digest of both JSON files and every image's name/size/mtime: changes when the folder does."""
    parts: list[str | bytes] = []
    for split in SPLITS:
        parts += index_fingerprint_parts(indices[split])
    return hash_parts(parts)


def build_tfds(root: Path | str, data_dir: Path | str) -> Path:
    """Write (or reuse) the `corel5k` array_record build of folder `root` under `data_dir`.

    An existing build is reused only when it was made from the folder's current content; otherwise
    it is regenerated. Processes building at once take turns on the lock file `.corel5k.lock` in
    `data_dir`: one builds, the others then find its build. Returns the build's version folder.
    """
    root = check_dataset_root(root)
    fingerprint = folder_fingerprint(read_dataset_indices(root))
    data_dir = Path(data_dir).expanduser()

    def current_build() -> Path | None:
        builder = Corel5k(data_dir=os.fspath(data_dir), file_format="array_record")  # as it is now
        if builder.is_prepared() and builder.info.metadata.get("source_fingerprint") == fingerprint:
            return Path(os.fspath(builder.data_dir))
        return None

    if data_dir.is_dir() and (built := current_build()) is not None:  # reading writes nothing
        return built
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".corel5k.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (built := current_build()) is not None:  # another process built it meanwhile
            return built
        builder = Corel5k(data_dir=os.fspath(data_dir), file_format="array_record")
        mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if builder.is_prepared()
                else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(root), download_mode=mode))
        return Path(os.fspath(builder.data_dir))


def read_tfds_split(data_dir: Path | str, split: str) -> tuple[Path, list[str], list[dict]]:
    """Read a built split back with `tfds.data_source` (no TensorFlow), images left encoded.

    Returns (build folder, vocabulary, records) where each record has `image` (bytes),
    `image_name` (str) and `labels` (list[str]), in the JSON order.
    """
    data_dir = os.fspath(Path(data_dir).expanduser())
    builder = Corel5k(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        raise DatasetError(f"{data_dir}: no corel5k TFDS build there; create it with "
                           "build_tfds(root, data_dir) or load_split(root, ..., source='tfds'); "
                           f"to {FETCH_HINT}")
    source = tfds.data_source("corel5k", split=split, data_dir=data_dir, download=False,
                              decoders={"image": tfds.decode.SkipDecoding()})
    records = [{"image": record["image"], "image_name": record["image_name"].decode(),
                "labels": [label.decode() for label in record["labels"]]}
               for record in (source[i] for i in range(len(source)))]
    return Path(os.fspath(builder.data_dir)), list(builder.info.metadata["vocabulary"]), records
