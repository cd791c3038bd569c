"""annotate.run_data: the validation images held out of the training split with their WGAN
images, the record of them a resume checks, the WGAN images joining the split, and the checks
made before decoding."""
from __future__ import annotations

import json

import numpy as np
import pytest

from annotate import data, devices, run_data
from conftest import tiny_config


def test_the_validation_record_is_checked_on_resume_and_a_damaged_one_named(tmp_path):
    """validation_images.json records the held-out images; a resume holding out others, or
    finding the record unreadable, is refused with the file named."""
    from types import SimpleNamespace

    import ml_collections

    def held_out(names):
        return SimpleNamespace(validation=SimpleNamespace(host=SimpleNamespace(image_names=names)))

    config = ml_collections.ConfigDict({"seed": 3, "eval": {"validation_size": 2}})
    path = tmp_path / "validation_images.json"
    run_data.record_validation_images(held_out(["1.jpeg", "7.jpeg"]), config, tmp_path, False)
    assert json.loads(path.read_text()) == {"seed": 3, "size": 2,
                                            "image_names": ["1.jpeg", "7.jpeg"]}
    run_data.record_validation_images(held_out(["1.jpeg", "7.jpeg"]), config, tmp_path, True)
    with pytest.raises(ValueError, match="lists other validation images than this run holds out"):
        run_data.record_validation_images(held_out(["1.jpeg", "8.jpeg"]), config, tmp_path, True)
    # an evaluation checks it too, and writes nothing
    run_data.check_validation_images(held_out(["1.jpeg", "7.jpeg"]), config, tmp_path)
    with pytest.raises(ValueError, match="lists other validation images than this run holds out"):
        run_data.check_validation_images(held_out(["7.jpeg", "1.jpeg"]), config, tmp_path)
    path.write_text('{"seed": 3, "size"')  # damaged by hand
    with pytest.raises(ValueError, match=f"^{path} is damaged"):
        run_data.record_validation_images(held_out(["1.jpeg", "7.jpeg"]), config, tmp_path, True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["validation_images.json"]


def test_wgan_images_of_validation_images_are_held_out_too():
    names = ["1.jpeg", "2.jpeg", "3.jpeg", "1_aug.jpeg", "1_aug_hor_flip.jpeg", "3_aug.jpeg"]
    kept = run_data._training_rows(names, 3, np.array([0]))
    assert [names[i] for i in kept] == ["2.jpeg", "3.jpeg", "3_aug.jpeg"]


def test_wgan_images_of_a_validation_image_whose_name_holds_aug_are_held_out_too():
    names = ["my_augusta.jpeg", "my.jpeg", "my_augusta_aug.jpeg", "my_augusta_aug_hor_flip.jpeg",
             "my_augusta_aug_rot_90.jpeg", "my_aug.jpeg", "my_aug_rot_90.jpeg"]
    kept = run_data._training_rows(names, 2, np.array([0]))  # my_augusta held out
    assert [names[i] for i in kept] == ["my.jpeg", "my_aug.jpeg", "my_aug_rot_90.jpeg"]
    kept = run_data._training_rows(names, 2, np.array([1]))  # my held out
    assert [names[i] for i in kept] == ["my_augusta.jpeg", "my_augusta_aug.jpeg",
                                        "my_augusta_aug_hor_flip.jpeg", "my_augusta_aug_rot_90.jpeg"]


def test_augmentation_flag_adds_the_wgan_images(tiny_dataset, tmp_path):
    """--config.data.augmentation=True: train_aug.json's images (in the data root by default, where
    wgan.run writes them) join the train split with their labels; the test split is unchanged."""
    from test_data import write_augmentation

    vocabulary = json.loads((tiny_dataset / "train.json").read_text())["labels"]
    write_augmentation(tiny_dataset, vocabulary)
    config = tiny_config(tiny_dataset, tmp_path / "cache")
    plain = run_data.load_data(config, devices.make_mesh())
    plain_train, plain_test = plain.train, plain.test
    config.data.augmentation = True
    augmented = run_data.load_data(config, devices.make_mesh())
    augmented_train, augmented_test = augmented.train, augmented.test
    assert augmented_train.images.shape[0] == plain_train.images.shape[0] + 2
    np.testing.assert_array_equal(np.asarray(augmented_train.images[:-2]),
                                  np.asarray(plain_train.images))
    expected = np.zeros((2, len(vocabulary)), np.float32)
    expected[0, [vocabulary.index("sky"), vocabulary.index("tree")]] = 1
    np.testing.assert_array_equal(np.asarray(augmented_train.targets[-2:]), expected)
    assert augmented_test.images.shape == plain_test.images.shape


def test_a_batch_larger_than_the_images_left_to_train_on_is_refused_before_decoding(
        tiny_dataset, tmp_path):
    """Under the validation protocol with WGAN images, the count before any decoding is exact:
    the held-out originals' WGAN images leave with them (12 originals, 4 held out, 0.jpeg among
    them, and its 2 WGAN images: 8 training images, not 10)."""
    from test_data import write_augmentation

    vocabulary = json.loads((tiny_dataset / "train.json").read_text())["labels"]
    write_augmentation(tiny_dataset, vocabulary)  # 0_aug.jpeg, 0_aug_hor_flip.jpeg
    index = data.read_split_index(tiny_dataset, "train")
    targets = data.multi_hot(index.image_labels, index.vocabulary)
    seed = next(seed for seed in range(100) if 0 in data.validation_indices(targets, 4, seed))
    config = tiny_config(tiny_dataset, tmp_path / "cache")
    config.data.augmentation, config.seed = True, seed
    config.eval.protocol, config.eval.validation_size = "validation", 4
    config.train.batch_size = 9
    with pytest.raises(ValueError, match="batch_size = 9 exceeds the 8 training images"):
        run_data.check_before_decoding(config, tmp_path / "work", 1)
    config.train.batch_size = 8
    run_data.check_before_decoding(config, tmp_path / "work", 1)
    assert run_data.load_data(config, devices.make_mesh()).train.num_images == 8
