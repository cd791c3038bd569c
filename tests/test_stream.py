"""The "stream" input pipeline: on Corel-5k it decodes the first epoch's batches exactly as the
"device" pipeline gathers them, and training with it gives the device pipeline's run (same image
order, same flips) on one device and on two."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from annotate import data, train, training_log
from annotate.data import stream
from conftest import tiny_config
from modules import REPO


def test_first_epoch_batches_are_the_device_pipelines(corel5k_dir, tmp_path):
    size, batch = 32, 32
    cached = data.load_split(corel5k_dir, "train", size, cache_dir=tmp_path)
    sources = data.split_sources(corel5k_dir, "train")
    key = jax.random.split(jax.random.key(0))[0]  # the loop's order key at seed 0
    permutation = train._epoch_permutation(key, 1, len(sources))
    rows = stream.local_rows(permutation, batch, [0], 1)
    batches = list(stream.decoded_batches(sources, rows, batch, size))
    assert len(batches) == len(sources) // batch == 140
    for step, images in enumerate(batches):
        np.testing.assert_array_equal(images, cached.images[permutation[step * batch:][:batch]])
    np.testing.assert_array_equal(sources.targets, cached.targets)


def test_the_read_ahead_is_two_batches_of_images():
    """Decoding runs ahead of training by two batches' images (or one per thread), not by twice
    the batch size in batches (at eval batch 250: 500 batches, 125,000 images, 75 GB at 448 px)."""
    decoded = []

    class CountedSources:
        def decode(self, index: int, image_size: int) -> np.ndarray:
            decoded.append(index)
            return np.full((image_size, image_size, 3), index % 256, np.uint8)

    rows_per_batch, threads = 8, 4
    batches = stream.decoded_batches(CountedSources(), np.arange(400), rows_per_batch, 2,
                                     num_threads=threads)
    first = next(batches)
    np.testing.assert_array_equal(first[:, 0, 0, 0], np.arange(8))
    time.sleep(0.5)  # time to read ahead as far as it goes
    assert rows_per_batch < len(decoded) <= 3 * rows_per_batch + threads


def test_local_rows_split_each_batch_by_device():
    order = np.arange(100, 116)  # 2 batches of 8 over 4 devices of 2 entries each
    assert stream.local_rows(order, 8, [2, 3], 4).tolist() == [104, 105, 106, 107,
                                                               112, 113, 114, 115]


def counting_decoded_batches(counts: dict[int, int]):
    """stream.decoded_batches that adds each batch's images to counts[split's image count]."""
    decoded_batches = stream.decoded_batches

    def counted(sources, rows, rows_per_batch, image_size, **options):
        for images in decoded_batches(sources, rows, rows_per_batch, image_size, **options):
            counts[len(sources)] = counts.get(len(sources), 0) + len(images)
            yield images
    return counted


def test_stream_training_equals_device_training(tiny_dataset, tiny_backbone, tmp_path,
                                                monkeypatch):
    records, decoded = {}, {}
    monkeypatch.setattr(stream, "decoded_batches", counting_decoded_batches(decoded))
    for pipeline in ("device", "stream"):
        config = tiny_config(tiny_dataset, tmp_path / "cache")
        config.data.pipeline = pipeline
        evaluation = train.train_and_evaluate(config, tmp_path / pipeline)
        records[pipeline] = (training_log.read_metrics(tmp_path / pipeline), evaluation)
        if pipeline == "device":
            assert decoded == {}  # the device pipeline decodes nothing batch by batch
    # the stream run decoded every image it used: 12 training images per epoch and once more
    # for the MCC thresholds, the 6 test images after every epoch and once at the end
    assert decoded == {12: 3 * 12 + 12, 6: 3 * 6 + 6}
    (device, device_eval), (streamed, stream_eval) = records["device"], records["stream"]
    assert [r["epoch"] for r in streamed] == [r["epoch"] for r in device] == [1, 2, 3]
    for ours, theirs in zip(streamed, device):
        np.testing.assert_allclose(ours["train/loss"], theirs["train/loss"], rtol=1e-6)
        np.testing.assert_allclose(ours["test/per_image_f1"], theirs["test/per_image_f1"],
                                   rtol=1e-6)
    np.testing.assert_allclose(stream_eval.test_probs, device_eval.test_probs, rtol=1e-5,
                               atol=1e-6)
    assert stream_eval.results["thresholds"] == device_eval.results["thresholds"]


TWO_DEVICES = r"""
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import jax
from conftest import register_tiny_backbone, tiny_config
from annotate import train, training_log
assert jax.device_count() == 2
from annotate.data import stream
from test_stream import counting_decoded_batches
register_tiny_backbone()
decoded = {{}}
stream.decoded_batches = counting_decoded_batches(decoded)
losses = {{}}
for pipeline in ("device", "stream"):
    config = tiny_config({root!r}, {cache!r})
    config.data.pipeline = pipeline
    train.train_and_evaluate(config, {workdir!r} + "/" + pipeline)
    losses[pipeline] = [r["train/loss"]
                        for r in training_log.read_metrics({workdir!r} + "/" + pipeline)]
print("LOSSES" + json.dumps(losses))
print("DECODED" + json.dumps(decoded))
"""


def test_stream_layout_on_two_devices(tiny_dataset, tmp_path):
    script = TWO_DEVICES.format(repo=str(REPO), tests=str(REPO / "tests"), root=str(tiny_dataset),
                                cache=str(tmp_path / "cache"), workdir=str(tmp_path))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = json.loads(done.stdout.split("LOSSES", 1)[1].split("DECODED")[0])
    assert len(losses["device"]) == 3  # one record per epoch
    # the stream run, and it alone, decoded its batches (as on one device)
    assert json.loads(done.stdout.split("DECODED", 1)[1]) == {"12": 3 * 12 + 12, "6": 3 * 6 + 6}
    np.testing.assert_allclose(losses["stream"], losses["device"], rtol=1e-6)
