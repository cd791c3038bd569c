"""Data layer: JSON validation, multi-hot targets, seed-identical decoding, the disk cache, TFDS."""
from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import annotate.data
from annotate.data import DatasetError, decode_image, load_split, read_split_index

SIZE = 16


def seed_decode(path: Path, size: int) -> np.ndarray:
    """The seed's decoding, written out independently: PIL RGB, bilinear square resize."""
    return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR))


def hand_multi_hot(json_path: Path) -> tuple[list[str], np.ndarray]:
    """Image names and 0/1 targets built directly from a JSON index, label by label."""
    content = json.loads(json_path.read_text())
    vocabulary = content["labels"]
    targets = np.zeros((len(content["samples"]), len(vocabulary)), np.float32)
    for i, sample in enumerate(content["samples"]):
        for label in sample["image_labels"]:
            targets[i, vocabulary.index(label)] = 1
    return [sample["image_name"] for sample in content["samples"]], targets


def cache_files(cache_dir: Path) -> list[str]:
    """Every file directly in the cache folder (cache entries and any stray temp file)."""
    return sorted(p.name for p in cache_dir.iterdir() if p.is_file()) if cache_dir.exists() else []


def edit_json(path: Path, change) -> None:
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.mark.parametrize("split", ["train", "test"])
def test_targets_and_images_match_independent_reference(tiny_dataset, cache_dir, split):
    gray = tiny_dataset / "images" / "1.jpeg"  # a greyscale JPEG must come out as RGB like the seed
    Image.open(gray).convert("L").save(gray)
    loaded = load_split(tiny_dataset, split, SIZE, cache_dir=cache_dir)
    names, targets = hand_multi_hot(tiny_dataset / f"{split}.json")
    assert loaded.image_names == names
    assert loaded.vocabulary == json.loads((tiny_dataset / f"{split}.json").read_text())["labels"]
    assert loaded.targets.dtype == np.float32
    np.testing.assert_array_equal(loaded.targets, targets)
    assert loaded.images.dtype == np.uint8 and loaded.images.shape == (len(names), SIZE, SIZE, 3)
    for image, name in zip(loaded.images, names):
        np.testing.assert_array_equal(image, seed_decode(tiny_dataset / "images" / name, SIZE))


def test_images_without_labels_get_zero_targets(tiny_dataset, cache_dir):
    edit_json(tiny_dataset / "train.json", lambda c: c["samples"][0].update(image_labels=[]))
    loaded = load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir)
    assert loaded.targets[0].sum() == 0


def test_second_load_reads_the_cache_without_decoding(tiny_dataset, cache_dir, monkeypatch):
    first = load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir)
    assert len(cache_files(cache_dir)) == 1 and cache_files(cache_dir)[0].endswith(".npy")

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(annotate.data, "decode_image", no_decoding)
    second = load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir)
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.targets, first.targets)


def test_default_cache_dir_follows_annotate_cache(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("ANNOTATE_CACHE", str(tmp_path / "env-cache"))
    assert annotate.data.default_cache_dir() == tmp_path / "env-cache"
    load_split(tiny_dataset, "test", SIZE)
    assert len(cache_files(tmp_path / "env-cache")) == 1


def count_decodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = annotate.data.decode_image

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(annotate.data, "decode_image", counting)
    return calls


def test_changed_json_or_image_invalidates_the_cache(tiny_dataset, cache_dir, monkeypatch):
    load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir)
    old_entry = cache_files(cache_dir)
    calls = count_decodes(monkeypatch)

    edit_json(tiny_dataset / "train.json", lambda c: c["samples"][0].update(image_labels=["sky"]))
    relabelled = load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir)
    assert len(calls) == 12
    np.testing.assert_array_equal(relabelled.targets, hand_multi_hot(tiny_dataset / "train.json")[1])
    assert len(cache_files(cache_dir)) == 1 and cache_files(cache_dir) != old_entry  # stale: pruned

    replaced = tiny_dataset / "images" / "0.jpeg"
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(replaced)
    redecoded = load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir)
    assert len(calls) == 24
    np.testing.assert_array_equal(redecoded.images[0], seed_decode(replaced, SIZE))

    load_split(tiny_dataset, "train", SIZE + 1, cache_dir=cache_dir)  # another size: its own entry
    assert len(cache_files(cache_dir)) == 2


def truncate_image(root: Path) -> str:
    """Cut 5.jpeg in half: its header is whole, its scan data ends midway."""
    path = root / "images" / "5.jpeg"
    encoded = path.read_bytes()
    path.write_bytes(encoded[:len(encoded) // 2])
    return "5.jpeg"


def garble_image(root: Path) -> str:
    (root / "images" / "7.jpeg").write_bytes(b"this is not a jpeg")
    return "7.jpeg"


def delete_image(root: Path) -> str:
    (root / "images" / "3.jpeg").unlink()
    return "3.jpeg"


def unknown_label(root: Path) -> str:
    edit_json(root / "train.json", lambda c: c["samples"][2].update(image_labels=["sky", "unicorn"]))
    return "train.json"


def duplicate_name(root: Path) -> str:
    edit_json(root / "train.json", lambda c: c["samples"][4].update(image_name="1.jpeg"))
    return "train.json"


def invalid_json(root: Path) -> str:
    (root / "train.json").write_text('{"samples": [')
    return "train.json"


def deeply_nested_json(root: Path) -> str:
    (root / "train.json").write_text("[" * 100_000 + "]" * 100_000)  # RecursionError in json
    return "train.json"


def images_a_file(root: Path) -> str:
    shutil.rmtree(root / "images")
    (root / "images").write_text("not a folder")
    return "images/0.jpeg"


def missing_key(root: Path) -> str:
    edit_json(root / "train.json", lambda c: c.pop("labels"))
    return "train.json"


def image_in_both_splits(root: Path) -> str:
    edit_json(root / "test.json", lambda c: c["samples"][0].update(image_name="3.jpeg"))
    return "test.json"


def nul_in_name(root: Path) -> str:
    edit_json(root / "train.json", lambda c: c["samples"][2].update(image_name="2\0.jpeg"))
    return "train.json: samples[2]"


def different_vocabulary(root: Path) -> str:
    edit_json(root / "test.json", lambda c: c.update(labels=c["labels"] + ["moon"]))
    return "test.json"


@pytest.mark.parametrize("spoil, reason", [
    (truncate_image, "cannot decode"), (garble_image, "cannot decode"), (delete_image, "missing"),
    (unknown_label, "unicorn"), (duplicate_name, "duplicate image name"),
    (invalid_json, "invalid JSON"), (deeply_nested_json, r"invalid JSON \(nested too deeply\)"),
    (images_a_file, "Not a directory"),
    (missing_key, "'labels'"), (different_vocabulary, "vocabulary"),
    (nul_in_name, "has no valid 'image_name'"),
    (image_in_both_splits, r"1 images are also in train.json \(first: \['3.jpeg'\]\)"),
])
def test_bad_input_names_the_file_and_leaves_no_cache(tiny_dataset, cache_dir, spoil, reason):
    culprit = spoil(tiny_dataset)
    with pytest.raises(DatasetError, match=reason) as caught:
        load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir)
    assert isinstance(caught.value, ValueError)
    assert culprit in str(caught.value)
    assert cache_files(cache_dir) == []  # neither a cache entry nor a leftover temp file


def test_decode_image_rejects_truncated_jpeg(tiny_dataset):
    truncate_image(tiny_dataset)
    path = tiny_dataset / "images" / "5.jpeg"
    with pytest.raises(DatasetError, match="5.jpeg.*cannot decode"):
        decode_image(path, SIZE)


@pytest.mark.parametrize("dtype, file_format", [(np.uint16, "PNG"), (np.int32, "TIFF")])
def test_sixteen_bit_greys_are_scaled_not_clipped(tmp_path, dtype, file_format):
    """A 16-bit grey image (PIL mode I;16 or I) decodes as its values / 257, rounded, in all three
    channels; PIL's own convert("RGB") clips at 255 and makes it near-white."""
    values = np.linspace(0, 65535, SIZE * SIZE).reshape(SIZE, SIZE).astype(dtype)
    path = tmp_path / f"grey.{file_format.lower()}"
    Image.fromarray(values).save(path, format=file_format)
    with Image.open(path) as opened:
        assert opened.mode in ("I;16", "I")
    expected = np.rint(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(path, SIZE), np.stack([expected] * 3, axis=-1))


@pytest.mark.parametrize("orientation, turns", [(3, 2), (6, 1), (8, -1)])
def test_exif_orientation_is_applied(tmp_path, orientation, turns):
    """A photo stored turned, with the EXIF orientation that tells viewers to turn it back (3:
    180 degrees, 6: 90 clockwise, 8: 90 anticlockwise), decodes as the upright image does."""
    upright = np.random.default_rng(orientation).integers(0, 256, (24, 16, 3), dtype=np.uint8)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, turns)))  # anticlockwise
    exif = stored.getexif()
    exif[0x0112] = orientation  # the EXIF Orientation tag
    stored.save(tmp_path / "turned.png", exif=exif)
    np.testing.assert_array_equal(decode_image(tmp_path / "turned.png", SIZE),
                                  seed_decode(tmp_path / "upright.png", SIZE))


def test_transparency_is_composited_onto_white(tmp_path):
    """RGBA, grey + alpha and a palette with a transparent entry: colour * alpha + white *
    (1 - alpha), not the colour stored under a transparent pixel."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # transparent black: white, not black
    alpha = rgba[..., 3:] / 255.0
    expected = np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha))
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    decoded = decode_image(tmp_path / "rgba.png", SIZE)  # SIZE: the resize keeps every pixel
    assert tuple(decoded[0, 0]) == (255, 255, 255)
    np.testing.assert_allclose(decoded, expected, atol=1)
    grey_alpha = rgba[..., [0, 3]]
    Image.fromarray(grey_alpha, mode="LA").save(tmp_path / "la.png")
    alpha = grey_alpha[..., 1:] / 255.0
    expected = np.rint(grey_alpha[..., :1] * alpha + 255 * (1 - alpha))
    np.testing.assert_allclose(decode_image(tmp_path / "la.png", SIZE),
                               np.repeat(expected, 3, axis=-1), atol=1)
    palette = Image.fromarray((np.arange(SIZE * SIZE) % 2).reshape(SIZE, SIZE).astype(np.uint8),
                              mode="P")
    palette.putpalette([0, 0, 0, 200, 10, 10])  # entry 0 black, transparent; entry 1 red
    palette.save(tmp_path / "palette.gif", transparency=0)
    decoded = decode_image(tmp_path / "palette.gif", SIZE)
    np.testing.assert_array_equal(decoded[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(decoded[0, 1], (200, 10, 10))


def test_a_floating_point_image_is_refused_by_name(tmp_path):
    path = tmp_path / "depth.tiff"
    Image.fromarray(np.ones((SIZE, SIZE), np.float32)).save(path)
    with pytest.raises(DatasetError, match="depth.tiff: cannot decode.*floating-point image"):
        decode_image(path, SIZE)


def test_missing_dataset_folder_says_how_to_get_it(tmp_path, cache_dir):
    with pytest.raises(DatasetError) as caught:
        load_split(tmp_path / "nowhere", "train", SIZE, cache_dir=cache_dir)
    message = str(caught.value)
    assert "nowhere" in message and "annotate.data.fetch" in message and "COREL5K_DIR" in message


def test_unknown_split_or_source_lists_the_valid_ones(tiny_dataset, cache_dir):
    with pytest.raises(ValueError, match="train"):
        read_split_index(tiny_dataset, "validation")
    with pytest.raises(ValueError, match="folder"):
        load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir, source="lmdb")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def test_read_only_dataset_folder_loads_and_is_not_written(tiny_dataset, cache_dir):
    before = snapshot(tiny_dataset)
    paths = [tiny_dataset, tiny_dataset / "images", *tiny_dataset.rglob("*")]
    modes = {path: path.stat().st_mode for path in paths}
    for path in paths:
        path.chmod(stat.S_IMODE(modes[path]) & ~0o222)
    try:
        loaded = load_split(tiny_dataset, "test", SIZE, cache_dir=cache_dir)
    finally:
        for path in paths:
            path.chmod(modes[path])
    assert loaded.images.shape == (6, SIZE, SIZE, 3)
    assert snapshot(tiny_dataset) == before


def write_augmentation(augmentation_dir: Path, vocabulary: list[str]) -> list[str]:
    """Two WGAN-style samples in <dir>/train_aug.json with their images in <dir>/aug-images/."""
    images = augmentation_dir / "aug-images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = ["0_aug.jpeg", "0_aug_hor_flip.jpeg"]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), np.uint8)).save(images / name)
    samples = [{"image_name": names[0], "image_labels": ["sky", "tree"]},
               {"image_name": names[1], "image_labels": []}]
    index = {"samples": samples, "labels": vocabulary}
    (augmentation_dir / "train_aug.json").write_text(json.dumps(index))
    return names


def test_augmentation_appends_train_aug_samples(tiny_dataset, tmp_path, cache_dir):
    vocabulary = json.loads((tiny_dataset / "train.json").read_text())["labels"]
    augmentation_dir = tmp_path / "wgan-out"
    aug_names = write_augmentation(augmentation_dir, vocabulary)
    plain = load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir)
    augmented = load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir,
                           augmentation_dir=augmentation_dir)
    assert augmented.image_names == plain.image_names + aug_names
    _, aug_targets = hand_multi_hot(augmentation_dir / "train_aug.json")
    np.testing.assert_array_equal(augmented.targets, np.concatenate([plain.targets, aug_targets]))
    np.testing.assert_array_equal(augmented.images[:12], plain.images)
    for image, name in zip(augmented.images[12:], aug_names):
        reference = seed_decode(augmentation_dir / "aug-images" / name, SIZE)
        np.testing.assert_array_equal(image, reference)

    edit_json(augmentation_dir / "train_aug.json", lambda c: c.update(labels=c["labels"][::-1]))
    with pytest.raises(DatasetError, match="train_aug.json.*vocabulary"):
        load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir,
                   augmentation_dir=augmentation_dir)
    with pytest.raises(ValueError, match="train split"):
        load_split(tiny_dataset, "test", SIZE, cache_dir=cache_dir,
                   augmentation_dir=augmentation_dir)


def test_tfds_build_gives_the_same_arrays_without_tensorflow(tiny_dataset, tmp_path, cache_dir):
    assert importlib.util.find_spec("tensorflow") is None, "tensorflow must not be needed"
    import tensorflow_datasets as tfds

    from annotate.data.tfds_corel5k import build_tfds

    data_dir = annotate.data.tfds_data_dir(tiny_dataset, cache_dir)
    build_dir = build_tfds(tiny_dataset, data_dir)
    assert any(name.startswith("corel5k-train.array_record") for name in os.listdir(build_dir))
    records = tfds.data_source("corel5k", split="test", data_dir=str(data_dir), download=False)
    assert len(records) == 6 and records[0]["image"].ndim == 3

    for split in ("train", "test"):
        from_folder = load_split(tiny_dataset, split, SIZE, cache_dir=cache_dir)
        from_tfds = load_split(tiny_dataset, split, SIZE, cache_dir=cache_dir, source="tfds")
        assert from_tfds.image_names == from_folder.image_names
        assert from_tfds.vocabulary == from_folder.vocabulary
        np.testing.assert_array_equal(from_tfds.targets, from_folder.targets)
        np.testing.assert_array_equal(from_tfds.images, from_folder.images)

    edit_json(tiny_dataset / "test.json", lambda c: c["samples"][0].update(image_labels=["water"]))
    rebuilt = load_split(tiny_dataset, "test", SIZE, cache_dir=cache_dir, source="tfds")
    np.testing.assert_array_equal(rebuilt.targets, hand_multi_hot(tiny_dataset / "test.json")[1])
    assert "tensorflow" not in sys.modules


BUILD_SLOWLY = """
import sys, time
from annotate.data import tfds_corel5k
split_generators = tfds_corel5k.Corel5k._split_generators
def slowly(self, dl_manager):
    time.sleep(2)  # the other process reaches the build meanwhile
    return split_generators(self, dl_manager)
tfds_corel5k.Corel5k._split_generators = slowly
print(tfds_corel5k.build_tfds(sys.argv[1], sys.argv[2]))
"""


def test_processes_building_the_tfds_copy_at_once_take_turns(tiny_dataset, tmp_path):
    """Two processes (say, two runs with source="tfds") build the same TFDS copy at once: one
    builds while the other waits on the lock and then finds the build (it failed renaming its
    own build onto the first one's with FileExistsError)."""
    data_dir = tmp_path / "tfds"
    command = [sys.executable, "-c", BUILD_SLOWLY, str(tiny_dataset), str(data_dir)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    builds = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    outputs = [build.communicate(timeout=120)[0] for build in builds]  # the errors go to stderr
    assert [build.returncode for build in builds] == [0, 0]
    build_dir = str(data_dir / "corel5k" / "1.0.0")
    assert [output.splitlines()[-1] for output in outputs] == [build_dir, build_dir]
    assert sum("downloaded and prepared" in output for output in outputs) == 1  # built once

    # reusing the current build writes nothing (a read-only copy stays usable): no lock taken
    (data_dir / ".corel5k.lock").unlink()
    from annotate.data.tfds_corel5k import build_tfds
    assert str(build_tfds(tiny_dataset, data_dir)) == build_dir
    assert not (data_dir / ".corel5k.lock").exists()


@pytest.fixture(scope="module")
def corel5k_train(corel5k_dir, tmp_path_factory):
    return load_split(corel5k_dir, "train", 32, cache_dir=tmp_path_factory.mktemp("corel-cache"))


def test_real_corel5k_statistics(corel5k_dir, corel5k_train, tmp_path):
    train_json = json.loads((corel5k_dir / "train.json").read_text())
    label_counts = [len(sample["image_labels"]) for sample in train_json["samples"]]
    assert corel5k_train.images.shape == (4500, 32, 32, 3)
    assert len(corel5k_train.vocabulary) == 260 == len(train_json["labels"])
    assert int((corel5k_train.targets.sum(1) == 0).sum()) == 7 == label_counts.count(0)
    mean_labels = corel5k_train.targets.sum(1).mean()
    assert mean_labels == pytest.approx(np.mean(label_counts)) and 3.3 < mean_labels < 3.5
    for i in (0, 1234, 4499):
        reference = seed_decode(corel5k_dir / "images" / corel5k_train.image_names[i], 32)
        np.testing.assert_array_equal(corel5k_train.images[i], reference)
    test = read_split_index(corel5k_dir, "test")
    assert len(test.image_names) == 499 and test.vocabulary == corel5k_train.vocabulary
    # the seed's hard-coded "4500 images" means are this split's channel means at 32 px (0.389,
    # 0.404, 0.350) to within 0.007 (at full size, 0.386, 0.401, 0.347, they differ by up to 0.0073)
    channel_means = corel5k_train.images.mean(axis=(0, 1, 2), dtype=np.float64) / 255
    np.testing.assert_allclose(channel_means, annotate.data.COREL5K_MEAN, atol=0.007)


def test_validation_subset_is_stratified_on_the_real_training_labels(corel5k_dir):
    """500 of the 4,500 Corel-5k training images: every label with at least 2 training images
    keeps one on each side, the subset is a function of the seed, and its label frequencies
    follow the training set's."""
    index = annotate.data.read_split_index(corel5k_dir, "train")
    targets = annotate.data.multi_hot(index.image_labels, index.vocabulary)
    held_out = annotate.data.validation_indices(targets, 500, seed=0)
    assert len(held_out) == len(set(held_out.tolist())) == 500
    rest = np.setdiff1d(np.arange(len(targets)), held_out)
    counts = targets.sum(axis=0)
    on_validation, on_train = targets[held_out].sum(axis=0), targets[rest].sum(axis=0)
    assert (counts >= 2).sum() > 200
    assert np.all(on_validation[counts >= 2] >= 1) and np.all(on_train[counts >= 2] >= 1)
    np.testing.assert_array_equal(on_validation + on_train, counts)
    # frequent labels follow the split's 1/9 (the rare-label images of step 1 pull a few of their
    # frequent co-labels above it: at most 0.163 here, 0.06 allowed); a random subset of 500
    # strays further: binomial sd 0.03 at 100 images, over 36 labels
    frequent = counts >= 100
    np.testing.assert_allclose(on_validation[frequent] / counts[frequent], 500 / 4500, atol=0.06)
    assert np.median(np.abs(on_validation[frequent] / counts[frequent] - 1 / 9)) < 0.01
    np.testing.assert_array_equal(annotate.data.validation_indices(targets, 500, seed=0), held_out)
    assert set(annotate.data.validation_indices(targets, 500, seed=1).tolist()) != set(held_out.tolist())
    with pytest.raises(ValueError, match="validation size 4500"):
        annotate.data.validation_indices(targets, 4500, seed=0)


def test_a_large_validation_share_still_leaves_every_label_a_training_image():
    """Random label sets with validation taking up to 3/4 of the images: a label of at least 2
    images keeps one on the training side (step 2 no longer sends its last one to validation)."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        num_images, num_labels = int(rng.integers(10, 200)), int(rng.integers(2, 40))
        targets = rng.random((num_images, num_labels)) < rng.choice([0.01, 0.03, 0.1, 0.4],
                                                                    num_labels)
        size = int(rng.integers(1, num_images * 3 // 4))
        held_out = np.zeros(num_images, bool)
        held_out[annotate.data.validation_indices(targets, size, seed=trial)] = True
        assert held_out.sum() == size
        assert np.all(targets[~held_out].sum(axis=0)[targets.sum(axis=0) >= 2] >= 1), trial


def test_empty_samples_and_missing_augmentation_index_name_the_fix(tiny_dataset, tmp_path):
    edit_json(tiny_dataset / "train.json", lambda c: c.update(samples=[]))
    with pytest.raises(DatasetError, match="train.json: 'samples' is empty"):
        read_split_index(tiny_dataset, "train")
    with pytest.raises(DatasetError, match="train_aug.json: file is missing; write it with "
                                           "`python -m wgan.run"):
        annotate.data.read_augmentation_index(tmp_path)


def test_a_killed_decodes_temp_file_is_deleted_by_the_next_write(tiny_dataset, cache_dir):
    """The rerun after a killed decode deletes the killed one's temp file (no process holds its
    flock), however young: before, one younger than an hour stayed for good (a split's size,
    2.7 GB at 448 px), since the rerun's entry made every later run a cache hit."""
    load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir)
    (entry,) = cache_files(cache_dir)
    prefix = entry.rsplit("-", 1)[0]  # <prefix>-<key>.npy
    abandoned, in_progress = (cache_dir / f".{prefix}-{tag}.npy.x1y2z3.tmp" for tag in "ab")
    for path in (abandoned, in_progress):
        path.write_bytes(b"partial decode")
    edit_json(tiny_dataset / "train.json", lambda c: c["samples"][0].update(image_labels=["sky"]))
    with open(in_progress) as writer:  # another process's decode, still being written
        fcntl.flock(writer, fcntl.LOCK_EX)
        load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir)  # a new entry is written
    files = cache_files(cache_dir)
    assert abandoned.name not in files  # a killed decode's, a moment ago
    assert in_progress.name in files
    assert len(files) == 2


def test_a_killed_decodes_temp_file_is_deleted_before_the_next_write_reserves_space(
        tiny_dataset, cache_dir, monkeypatch):
    """The killed decode's temp file (a split's size) and the stale entry are deleted before the
    new entry's space is reserved: when they are what fills the disk, the rerun that fails on it
    leaves the disk with room again."""
    load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir)
    (entry,) = cache_files(cache_dir)
    (cache_dir / f".{entry.rsplit('-', 1)[0]}-a.npy.x1y2z3.tmp").write_bytes(b"partial decode")
    edit_json(tiny_dataset / "train.json", lambda c: c["samples"][0].update(image_labels=["sky"]))

    def disk_full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", disk_full)
    with pytest.raises(DatasetError, match="no space left on device"):
        load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir)
    assert cache_files(cache_dir) == []


def test_a_truncated_cache_file_is_rebuilt(tiny_dataset, cache_dir):
    first = load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir)
    (cached,) = [cache_dir / name for name in cache_files(cache_dir)]
    cached.write_bytes(cached.read_bytes()[:200])  # a killed write or a full disk
    again = load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir)
    np.testing.assert_array_equal(again.images, first.images)
    assert cached.stat().st_size > 200


def test_a_full_cache_disk_is_one_error_naming_the_folder_and_leaves_no_temp_file(
        tiny_dataset, cache_dir, monkeypatch):
    """The cache's space is reserved before the memory-mapped decode writes into it: a full disk
    is a DatasetError, not a bus error (SIGBUS, exit 135) with the temp file left behind."""
    def disk_full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", disk_full)
    with pytest.raises(DatasetError) as caught:
        load_split(tiny_dataset, "train", 256, cache_dir=cache_dir)
    assert str(caught.value) == (
        f"no space left on device for the 2 MB image cache in {cache_dir}; free space there, or "
        f"put the cache elsewhere with $ANNOTATE_CACHE or --config.data.cache_dir")
    assert cache_files(cache_dir) == []

    def unsupported(fd, offset, length):  # a file system that cannot reserve: decoded as before
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    assert load_split(tiny_dataset, "train", SIZE, cache_dir=cache_dir).images.shape[0] == 12
    monkeypatch.delattr(os, "posix_fallocate")  # macOS has none: decoded as before
    assert load_split(tiny_dataset, "test", SIZE, cache_dir=cache_dir).images.shape[0] == 6


def test_a_cache_folder_that_is_a_file_is_named_before_any_decoding(tiny_dataset, tmp_path):
    """config.data.cache_dir pointing at a file: named as the cache folder, not mkdir's bare
    'File exists'."""
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=re.escape(
            f"the cache folder {tmp_path / 'afile'} (config.data.cache_dir, else $ANNOTATE_CACHE) "
            f"is a file")):
        load_split(tiny_dataset, "train", SIZE, cache_dir=tmp_path / "afile")


@pytest.mark.parametrize("image_name", ["1000.jpeg", "my_aug.png", "a_aug_rot_90.b.jpg"])
def test_original_stem_inverts_augmented_names(image_name):
    """The seed's WGAN names (<stem><suffix>.jpeg, the stem up to the first '.'), and back: a
    stem that itself ends with a suffix is kept whole."""
    stem = image_name.split(".")[0]
    names = annotate.data.augmented_names(image_name)
    assert names == [f"{stem}_aug.jpeg", f"{stem}_aug_hor_flip.jpeg", f"{stem}_aug_rot_90.jpeg"]
    assert [annotate.data.original_stem(name) for name in names] == [stem] * 3
