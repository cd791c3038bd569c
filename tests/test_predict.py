"""annotate.predict: paths, the trained smoke model on Corel-5k test images, and the command line."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from annotate import predict

REPO = Path(__file__).resolve().parents[1]


def test_image_paths(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.JPG", "a.png", "notes.txt"):
        (folder / name).write_bytes(b"x")
    (folder / "c.jpg").symlink_to(tmp_path / "gone.jpg")  # a broken link: listed, then skipped
    (folder / "sub").mkdir()
    os.mkfifo(folder / "pipe.jpg")  # decoding it would wait for a writer forever
    single = tmp_path / "single.jpeg"
    single.write_bytes(b"x")
    assert predict.image_paths([folder, single]) == (
        [folder / "a.png", folder / "b.JPG", folder / "c.jpg", single],
        [folder / "notes.txt", folder / "pipe.jpg"])
    with pytest.raises(FileNotFoundError, match="missing.jpg does not exist"):
        predict.image_paths([tmp_path / "missing.jpg"])
    with pytest.raises(ValueError, match="pipe.jpg is not a file"):
        predict.image_paths([folder / "pipe.jpg"])
    (tmp_path / "empty").mkdir()
    assert predict.image_paths([tmp_path / "empty"]) == ([], [])


def test_untrained_workdir_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a training workdir"):
        predict.load_annotator(tmp_path)


def test_workdir_without_checkpoints_is_refused_and_left_alone(smoke_workdir, tmp_path):
    for name in ("config.json", "thresholds.json"):
        (tmp_path / name).write_bytes((smoke_workdir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*checkpoints; train first"):
        predict.load_annotator(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "thresholds.json"]


def test_damaged_thresholds_and_a_folder_as_output_are_named(smoke_workdir, tmp_path):
    (tmp_path / "config.json").write_bytes((smoke_workdir / "config.json").read_bytes())
    (tmp_path / "thresholds.json").write_bytes((smoke_workdir / "thresholds.json").read_bytes()[:100])
    with pytest.raises(ValueError, match="thresholds.json is damaged .*JSONDecodeError"):
        predict.load_annotator(tmp_path)
    (tmp_path / "out.json").mkdir()
    with pytest.raises(ValueError, match="out.json is a folder"):
        predict.check_output(str(tmp_path / "out.json"))


@pytest.mark.parametrize("thresholds,found", [
    (0.5, "()"), ([[0.5]] * 260, "(260, 1)"), ([0.5] * 259, "(259,)"), ([None] * 260, "(260,)"),
    ([1.5] * 260, "(260,)")])
def test_thresholds_that_are_not_one_probability_per_label_are_named(smoke_workdir, tmp_path,
                                                                     thresholds, found):
    """A number, nested lists, one too few, null (NaN) or above 1: refused before the model is
    built, where they would fail with a traceback or silently annotate nothing."""
    stored = json.loads((smoke_workdir / "thresholds.json").read_text())
    (tmp_path / "config.json").write_bytes((smoke_workdir / "config.json").read_bytes())
    (tmp_path / "thresholds.json").write_text(json.dumps({**stored, "thresholds": thresholds}))
    with pytest.raises(ValueError, match=re.escape(
            f"thresholds.json is damaged: it must hold one threshold in [0, 1] per label "
            f"(260 labels, thresholds of shape {found}")):
        predict.load_annotator(tmp_path)


def test_thresholds_of_another_label_count_are_named(smoke_workdir, tmp_path):
    stored = json.loads((smoke_workdir / "thresholds.json").read_text())
    workdir = tmp_path / "run"
    shutil.copytree(smoke_workdir, workdir)
    (workdir / "thresholds.json").write_text(json.dumps(
        {**stored, "vocabulary": stored["vocabulary"][:5], "thresholds": stored["thresholds"][:5]}))
    with pytest.raises(predict.WorkdirError, match=(
            r"does not fit this run's model: params.head.fc.bias is \(260,\) in the checkpoint, "
            r"\(5,\) in the model \(and 5 more arrays\); the model was built for the 5 labels "
            r"of .*thresholds.json$")):
        predict.load_annotator(workdir)


def test_thresholds_of_another_epoch_are_refused(smoke_workdir, tmp_path):
    """thresholds.json names the checkpoint its thresholds were chosen for; when training went on
    and another checkpoint is selected, predict refuses the stale pair."""
    stored = json.loads((smoke_workdir / "thresholds.json").read_text())
    assert stored["epoch"] == json.loads((smoke_workdir / "results.json").read_text())["best_epoch"]
    workdir = tmp_path / "run"
    shutil.copytree(smoke_workdir, workdir)
    (workdir / "thresholds.json").write_text(json.dumps({**stored, "epoch": stored["epoch"] + 7}))
    with pytest.raises(ValueError, match=f"thresholds of epoch {stored['epoch'] + 7}'s checkpoint, "
                                         f"but .* is now epoch {stored['epoch']}"):
        predict.load_annotator(workdir)


def test_predict_computes_in_the_dtype_the_thresholds_were_chosen_in(smoke_workdir, tmp_path):
    """thresholds.json records the compute dtype of the evaluation that chose them (the run's,
    unless --evaluate was given another); predict computes in it, and names a bad one."""
    stored = json.loads((smoke_workdir / "thresholds.json").read_text())
    assert stored["dtype"] == json.loads((smoke_workdir / "config.json").read_text())["model"][
        "dtype"] == "float32"
    workdir = tmp_path / "run"
    shutil.copytree(smoke_workdir, workdir)
    (workdir / "thresholds.json").write_text(json.dumps({**stored, "dtype": "bfloat16"}))
    assert predict.load_annotator(workdir).experiment.config.model.dtype == "bfloat16"
    (workdir / "thresholds.json").write_text(json.dumps({**stored, "dtype": "float8"}))
    with pytest.raises(ValueError, match="thresholds.json is damaged .*model.dtype = 'float8'"):
        predict.load_annotator(workdir)


def test_config_of_another_version_is_named(smoke_workdir, tmp_path):
    config = json.loads((smoke_workdir / "config.json").read_text())
    del config["model"]["head"]  # as a config.json written before heads existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "thresholds.json").write_bytes((smoke_workdir / "thresholds.json").read_bytes())
    with pytest.raises(ValueError, match="does not hold a config of this version of annotate"):
        predict.load_annotator(tmp_path)
    config = json.loads((smoke_workdir / "config.json").read_text())
    config["train"]["epochs"] = "3"  # hand-edited: a TypeError inside validate_config
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not hold a config of this version of annotate "
                                         r"\(TypeError: "):
        predict.load_annotator(tmp_path)


def test_annotations_reproduce_test_metrics(smoke_workdir, corel5k_dir, tmp_path):
    """Annotating the 499 test image files reproduces the evaluation's per-image F1 and N+ (MCC
    thresholds): the same checkpoint, normalisation, image decoding and thresholds. They go in
    chunks of 120 files (the last one padded), with a broken file among them, which is skipped."""
    index = json.loads((corel5k_dir / "test.json").read_text())
    vocabulary = index["labels"]
    paths = [corel5k_dir / "images" / s["image_name"] for s in index["samples"]]
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(paths[0].read_bytes()[:300])
    annotator = predict.load_annotator(smoke_workdir)
    assert annotator.chunk_size == 500  # configs/smoke.py's eval_batch_size, on one device
    annotations, skipped = annotator.annotate([*paths[:200], broken, *paths[200:]], chunk_size=120)
    assert [path for path, _ in skipped] == [str(broken)]
    assert [a["image"] for a in annotations] == [str(p) for p in paths]
    truth = np.zeros((len(paths), len(vocabulary)), int)
    predicted = np.zeros_like(truth)
    for i, (sample, annotation) in enumerate(zip(index["samples"], annotations)):
        truth[i, [vocabulary.index(label) for label in sample["image_labels"]]] = 1
        predicted[i, [vocabulary.index(x["label"]) for x in annotation["labels"]]] = 1
        probabilities = [x["probability"] for x in annotation["labels"]]
        assert probabilities == sorted(probabilities, reverse=True)
    results = json.loads((smoke_workdir / "results.json").read_text())
    assert f1_score(truth, predicted, average="micro") == pytest.approx(results["mcc"]["per_image_f1"], abs=1e-5)
    assert int(((truth == 1) & (predicted == 1)).any(axis=0).sum()) == results["mcc"]["n_plus"]


def test_command_line(smoke_workdir, corel5k_dir, tmp_path):
    """Images of a folder (png) and a file annotated; a text file and a broken jpeg in the folder
    skipped and listed; JSON and CSV outputs; user errors are one line with status 2, found
    before the model is loaded."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("1000.jpeg", "10001.jpeg"):
        Image.open(corel5k_dir / "images" / name).save(folder / name.replace(".jpeg", ".png"))
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpeg").write_bytes((corel5k_dir / "images" / "1000.jpeg").read_bytes()[:300])
    output = tmp_path / "out.json"
    command = [sys.executable, "-m", "annotate.predict", f"--workdir={smoke_workdir}",
               f"--output={output}", str(folder), str(corel5k_dir / "images" / "1001.jpeg")]

    def run(arguments):
        return subprocess.run(arguments, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env=os.environ)

    done = run(command)
    assert done.returncode == 0, done.stderr[-3000:]
    annotations = json.loads(output.read_text())
    assert [Path(a["image"]).name for a in annotations] == ["1000.png", "10001.png", "1001.jpeg"]
    for annotation in annotations:
        assert f"{annotation['image']}:" in done.stdout
    assert "skipped 2 file(s)" in done.stderr
    assert f"  {folder / 'broken.jpeg'}: cannot decode image" in done.stderr  # the path once
    assert "notes.txt: not an image file" in done.stderr
    assert "Traceback" not in done.stderr and " I1" not in done.stderr  # no library log lines

    csv_output = tmp_path / "out.csv"
    assert run([*command[:4], f"--output={csv_output}", *command[5:]]).returncode == 0
    rows = list(csv.reader(csv_output.open()))
    assert rows[0] == ["image", "label", "probability"]
    assert {row[0] for row in rows[1:]} == {a["image"] for a in annotations}
    assert len(rows) - 1 == sum(max(1, len(a["labels"])) for a in annotations)

    # an output that cannot be written (a link into a missing folder): the annotations are
    # printed, then one line names the file
    (tmp_path / "dangling.json").symlink_to(tmp_path / "no" / "out.json")
    unwritten = run([*command[:4], f"--output={tmp_path / 'dangling.json'}", *command[5:]])
    assert unwritten.returncode == 2 and annotations[0]["image"] in unwritten.stdout
    assert unwritten.stderr.strip().splitlines()[-1] == (
        f"error: --output {tmp_path / 'dangling.json'}: No such file or directory")

    empty = tmp_path / "empty"
    empty.mkdir()
    for arguments, message in (
            (command[:-2] + [str(tmp_path / "missing.jpg")], "missing.jpg does not exist"),
            ([*command[:4], f"--output={tmp_path / 'no' / 'out.json'}", *command[5:]],
             "folder " + str(tmp_path / "no") + " does not exist"),
            (command[:-2] + [str(folder / "notes.txt")], "no image could be annotated"),
            (command[:-2] + [str(empty)], f"no image files (.bmp, .gif, .jpeg, .jpg, .png, "
                                          f".tif, .tiff, .webp) in {empty}")):
        bad = run(arguments)
        assert bad.returncode == 2, bad.stderr[-2000:]
        assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
        assert message in bad.stderr and "Traceback" not in bad.stderr


def test_out_of_device_memory_keeps_the_printed_annotations(smoke_workdir, corel5k_dir):
    """--batch_size=1 over two images, the second batch running out of device memory (a real
    XLA RESOURCE_EXHAUSTED: a 1 TiB buffer in a process capped at 1 TiB of address space): the
    first image's annotation was printed before, and one line says what to do (one image per
    device did not fit, so not a smaller --batch_size)."""
    from conftest import ADDRESS_SPACE_CAP

    script = (ADDRESS_SPACE_CAP + "import jax.numpy as jnp\n"
              "from annotate import cli, predict\n"
              "real, calls = predict.Annotator.probabilities, []\n"
              "def probabilities(self, images):\n"
              "    calls.append(len(images))\n"
              "    if len(calls) == 2:\n"
              "        jnp.zeros(2 ** 38).block_until_ready()\n"
              "    return real(self, images)\n"
              "predict.Annotator.probabilities = probabilities\n"
              "cli.run(predict.main, predict.define_flags)\n")
    first, second = (corel5k_dir / "images" / name for name in ("1000.jpeg", "1001.jpeg"))
    done = subprocess.run([sys.executable, "-c", script, f"--workdir={smoke_workdir}",
                           "--batch_size=1", str(first), str(second)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stdout.startswith(f"{first}: ") and str(second) not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: out of device memory annotating 1 at a time "
                           "(RESOURCE_EXHAUSTED: Out of memory "), last
    assert last.endswith("the annotations printed above are complete: one image per device does "
                         "not fit in this machine's memory"), last  # on the CPU already


@pytest.mark.parametrize("at_once, devices, platform, remedy", [
    (8, 1, "gpu", "annotate the rest with a smaller --batch_size"),
    (2, 2, "gpu", "one image per device does not fit: use a device with more memory, or the CPU "
                  "(JAX_PLATFORMS=cpu)"),
    (1, 1, "cpu", "one image per device does not fit in this machine's memory")])
def test_out_of_memory_advice_names_a_smaller_batch_only_where_one_exists(at_once, devices,
                                                                          platform, remedy):
    error = RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 8 bytes.\nmore")
    message = predict.out_of_memory_message(error, at_once, devices, platform)
    assert message == (f"out of device memory annotating {at_once} at a time (RESOURCE_EXHAUSTED: "
                       f"Out of memory allocating 8 bytes.); the annotations printed above are "
                       f"complete: {remedy}")


def test_out_of_memory_while_the_model_loads_claims_no_annotations():
    error = RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 8 bytes.")
    assert predict.out_of_memory_message(error, None, 1, "gpu") == (
        "out of device memory loading the model (RESOURCE_EXHAUSTED: Out of memory allocating 8 "
        "bytes.): use a device with more memory, or the CPU (JAX_PLATFORMS=cpu)")
    assert predict.out_of_memory_message(error, None, 1, "cpu") == (
        "out of device memory loading the model (RESOURCE_EXHAUSTED: Out of memory allocating 8 "
        "bytes.)")


def test_the_output_is_written_through_a_link(tmp_path):
    """--output naming a link writes the file it points to (an atomic write's rename would
    otherwise replace the link with a file)."""
    target = tmp_path / "kept" / "tags.csv"
    target.parent.mkdir()
    target.write_text("old")
    (tmp_path / "tags.csv").symlink_to(target)
    annotations = [{"image": "a.jpg", "labels": [{"label": "sky", "probability": 0.9}]},
                   {"image": "b.jpg", "labels": []}]
    predict.write_annotations(tmp_path / "tags.csv", annotations)
    assert (tmp_path / "tags.csv").is_symlink()
    assert list(csv.reader(target.open())) == [["image", "label", "probability"],
                                               ["a.jpg", "sky", "0.9"], ["b.jpg", "", ""]]

