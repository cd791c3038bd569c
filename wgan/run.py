"""Augment the training split with ML-WGAN images, K images at a time; resumable.

    python -m wgan.run --config=configs/wgan.py [--config.data.root=DIR] [--config.out_dir=DIR]
        [--config.limit=N] [--config.iterations=N] [--config.pairs=K] [--config.model_width=W]

Writes `<out_dir>/aug-images/<stem>_aug.jpeg`, `<stem>_aug_hor_flip.jpeg`, `<stem>_aug_rot_90.jpeg`
per training image and `<out_dir>/train_aug.json` (seed format, each image with its original's
labels). Images whose three files exist are skipped, so a killed run started again resumes; every
file is written to a temporary name and renamed, so none is ever half-written.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_dict, config_flags
from PIL import Image
from tqdm import tqdm

from annotate import cli
from annotate.data import (AUGMENTATION_IMAGES, AUGMENTATION_INDEX, DatasetError, SplitIndex,
                           augmented_names, read_split_index)
from annotate.config import COMPUTE_DTYPES, dataset_folder
from annotate.data.cache import hash_parts
from annotate.data.folder import check_images_exist
from annotate.devices import enable_compilation_cache, is_out_of_memory
from annotate.workdir import WorkdirError, WorkdirLock, remove_abandoned_writes, write_atomically
from wgan.train import (SAVED_PER_IMAGE, WganSetup, augmented_views, image_keys, load_wgan_image,
                        train_chunk)


def save_jpeg(path: Path, pixels: np.ndarray) -> None:
    """Save uint8 [H, W, 3] as JPEG, byte for byte the file the seed's plt.imsave writes (through
    PIL, at its default quality, with matplotlib's 100 dpi in the header)."""
    write_atomically(path, lambda file: Image.fromarray(pixels).save(file, format="JPEG",
                                                                     dpi=(100, 100)))


def is_done(image_dir: Path, image_name: str) -> bool:
    """True when all three augmented images of `image_name` exist."""
    return all((image_dir / name).is_file() for name in augmented_names(image_name))


def check_distinct_outputs(index: SplitIndex) -> None:
    """ValueError when two training images would write the same augmented files: names with one
    stem before their first '.' (a.jpg and a.png, or photo.1.jpg and photo.2.jpg). The second
    would overwrite the first's images, and train_aug.json would list each name twice, under
    the labels of both."""
    first: dict[str, str] = {}
    for name in index.image_names:
        output = augmented_names(name)[0]
        if output in first:
            raise ValueError(
                f"training images '{first[output]}' and '{name}' of {index.json_path} would both "
                f"be augmented as {output} (the seed names the augmentations by the image name "
                f"up to its first '.'); rename one of them, in images/ and in train.json")
        first[output] = name


def write_augmentation_index(out_dir: Path, index: SplitIndex) -> int:
    """Rewrite `train_aug.json` from the training images whose three files exist (split order);
    returns the number of samples."""
    image_dir = out_dir / AUGMENTATION_IMAGES
    samples = [{"image_name": name, "image_labels": list(labels)}
               for original, labels in zip(index.image_names, index.image_labels)
               if is_done(image_dir, original) for name in augmented_names(original)]
    text = json.dumps({"samples": samples, "labels": list(index.vocabulary)})
    write_atomically(out_dir / AUGMENTATION_INDEX, text)
    return len(samples)


RUN_KEYS = ("seed", "iterations", "model_width", "compute_dtype")  # what the images depend on


def dataset_fingerprint(index: SplitIndex) -> str:
    """What the images depend on in the dataset: the training images in their order (an image's
    random key is its position) and their files' sizes; a copy of the dataset elsewhere has the
    same, another dataset with the same file names has not."""
    return hash_parts(f"{name}:{stat.st_size}" for name, stat in
                      zip(index.image_names, check_images_exist(index)))[:16]


def record_run(out_dir: Path, index: SplitIndex, config: config_dict.ConfigDict) -> None:
    """Write out_dir/wgan_run.json (the settings and the dataset the images depend on). A rerun
    with other settings or another dataset over finished images is refused, unless config.force:
    then the index and every existing image are deleted first, so that the folder never holds
    images of two settings (a forced run killed during the deletions is run again with force;
    one killed later is resumed by the same command without force). A run that stopped before
    its first image leaves nothing to protect: the new record replaces its record."""
    path = out_dir / "wgan_run.json"
    settings = {**{key: config[key] for key in RUN_KEYS}, "dataset": dataset_fingerprint(index)}
    image_dir = out_dir / AUGMENTATION_IMAGES
    finished = sum(is_done(image_dir, name) for name in index.image_names)
    if path.is_file() and finished and not config.force:
        try:
            stored = json.loads(path.read_text())
            if not isinstance(stored, dict):
                raise ValueError(f"a JSON {type(stored).__name__}, not an object")
        except ValueError as error:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path} is damaged ({error}); delete it to keep the {finished} "
                             f"finished images as they are, or use --config.force=True to make "
                             f"them all again") from error
        changed = [key for key in RUN_KEYS if stored.get(key) != settings[key]]
        if changed:
            raise ValueError(
                f"{out_dir} holds {finished} images' augmentations made with " + ", ".join(
                    f"{key}={stored.get(key)!r}" for key in changed) + ", not " + ", ".join(
                    f"{key}={settings[key]!r}" for key in changed) +
                "; use another --config.out_dir, or --config.force=True to make them all again")
        # a record from before the fingerprint cannot tell: its images are kept
        if stored.get("dataset", settings["dataset"]) != settings["dataset"]:
            raise ValueError(
                f"{out_dir} holds {finished} images' augmentations made from another dataset "
                f"(other training images, sizes or order than {index.json_path}'s); use another "
                f"--config.out_dir, or --config.force=True to make them all again")
    if config.force:  # the index first: never one that lists deleted images
        (out_dir / AUGMENTATION_INDEX).unlink(missing_ok=True)
        for image_name in index.image_names:
            for name in augmented_names(image_name):
                (image_dir / name).unlink(missing_ok=True)
        write_augmentation_index(out_dir, index)
    write_atomically(path, json.dumps(settings) + "\n")


def check_writable(folder: Path) -> None:
    """OSError now, before any training, when files cannot be created in `folder`."""
    probe = folder / ".write_probe"
    probe.write_bytes(b"")
    probe.unlink()


def run(config: config_dict.ConfigDict) -> Path:
    """Train one WGAN-GP per (pending) training image, K at once; returns the output folder."""
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"config.compute_dtype must be one of {list(COMPUTE_DTYPES)}, "
                         f"got {config.compute_dtype!r}")
    for key in ("pairs", "model_width", "seed", "iterations", "limit"):
        if isinstance(config[key], bool):  # ml_collections takes True for an int field
            raise ValueError(f"config.{key} = {config[key]!r}: it needs a number, not a bool")
    for key in ("pairs", "model_width"):
        if config[key] < 1:
            raise ValueError(f"config.{key} = {config[key]}: must be >= 1")
    if not 0 <= config.seed < 2 ** 32:  # jax.random.key keeps 32 bits of a larger one
        raise ValueError(f"config.seed = {config.seed}: must lie in [0, 2**32)")
    if config.limit is not None and config.limit < 1:
        raise ValueError(f"config.limit = {config.limit}: must be >= 1, or None for every "
                         f"training image")
    if config.iterations < SAVED_PER_IMAGE:
        raise ValueError(f"config.iterations = {config.iterations}: must be >= {SAVED_PER_IMAGE} "
                         f"(the images are the fakes of the last {SAVED_PER_IMAGE} iterations)")
    root = dataset_folder(config.data.root)
    index = read_split_index(root, "train")
    check_distinct_outputs(index)
    out_dir = Path(config.out_dir).expanduser() if config.out_dir else root
    image_dir = out_dir / AUGMENTATION_IMAGES
    image_dir.mkdir(parents=True, exist_ok=True)
    # one run per output folder (the lock also clears the killed writes there)
    with WorkdirLock(out_dir, flag="--config.out_dir"):
        check_writable(image_dir)
        remove_abandoned_writes(image_dir)
        _train_pending(config, root, index, out_dir, image_dir)
    return out_dir


def _train_pending(config: config_dict.ConfigDict, root: Path, index: SplitIndex,
                   out_dir: Path, image_dir: Path) -> None:
    """run's work once it holds `out_dir`: every pending image's augmentations and the index."""
    count = len(index.image_names) if config.limit is None else min(config.limit,
                                                                     len(index.image_names))
    # with force every image is made again (record_run deletes them, once the decoding passed)
    pending = [i for i in range(count)
               if config.force or not is_done(image_dir, index.image_names[i])]
    setup = WganSetup(width=config.model_width,
                      compute_dtype=jnp.dtype(config.compute_dtype))
    unreadable = []  # decoding every pending image takes seconds; meeting one hours in, not
    for i in pending:
        try:
            load_wgan_image(root / index.image_folder / index.image_names[i])
        except ValueError as error:
            unreadable.append(str(error))
    if unreadable:
        raise ValueError(f"{len(unreadable)} training image(s) cannot be read, nothing was "
                         f"trained: {unreadable[0]}" + (f" (and {len(unreadable) - 1} more)"
                                                       if len(unreadable) > 1 else ""))
    record_run(out_dir, index, config)
    diverged: list[str] = []
    with tqdm(total=count, initial=count - len(pending), unit="image", desc="ML-WGAN") as bar:
        for start in range(0, len(pending), config.pairs):
            chunk = pending[start:start + config.pairs]
            # A short last chunk repeats its last image so every chunk has the compiled shape K.
            padded = chunk + [chunk[-1]] * (config.pairs - len(chunk))
            images = np.stack([load_wgan_image(root / index.image_folder / index.image_names[i])
                               for i in padded])
            fakes = train_chunk(setup, image_keys(config.seed, np.asarray(padded)), images,
                                config.iterations)
            for position, image_index in enumerate(chunk):
                if not np.all(np.isfinite(fakes[position])):  # saved, NaN would be black pixels
                    diverged.append(index.image_names[image_index])
                    continue
                names = augmented_names(index.image_names[image_index])
                for name, pixels in zip(names, augmented_views(fakes[position])):
                    save_jpeg(image_dir / name, pixels)
            write_augmentation_index(out_dir, index)
            bar.update(len(chunk))
    write_augmentation_index(out_dir, index)
    if diverged:
        raise ValueError(f"the WGAN-GP of {len(diverged)} image(s) diverged (non-finite fakes), "
                         f"so their augmentations were not written: "
                         f"{', '.join(diverged[:5])}{', ...' if len(diverged) > 5 else ''}; the "
                         f"other images are done and indexed")


def main(argv: list[str]) -> None:
    """absl entry point: run with the --config file and its overrides."""
    if len(argv) > 1:
        cli.fail(cli.unexpected_arguments(argv[1:], "--config.pairs=32; a boolean one as "
                                                   "--config.force=True"))
    absl_logging.set_verbosity(absl_logging.WARNING)  # jax's backend notices stay quiet
    enable_compilation_cache()  # a resumed run loads the chunk step instead of compiling it
    config = flags.FLAGS.config
    try:
        run(config)
    except (DatasetError, ValueError, OSError, WorkdirError) as error:  # finished images stay
        cli.fail(error)
    except jax.errors.JaxRuntimeError as error:
        if not is_out_of_memory(error):
            raise
        cli.fail(f"out of device memory ({str(error).splitlines()[0][:200]}) training "
                 f"{config.pairs} WGAN-GP pairs at once; a rerun with a smaller --config.pairs "
                 f"keeps the finished images")


def define_flags() -> None:
    """Register --config; done only when run as a program, so importing this module is harmless."""
    config_flags.DEFINE_config_file("config", "configs/wgan.py",
                                    "ML-WGAN config file (get_config()).")


if __name__ == "__main__":
    cli.run(main, define_flags)
