"""annotate.predict: paths, the trained smoke model on Corel-5k test images, and the command line."""
from __future__ import annotations

import json
import os
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
    single = tmp_path / "single.jpeg"
    single.write_bytes(b"x")
    assert predict.image_paths([folder, single]) == [folder / "a.png", folder / "b.JPG", single]
    with pytest.raises(FileNotFoundError, match="missing.jpg does not exist"):
        predict.image_paths([tmp_path / "missing.jpg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no image files"):
        predict.image_paths([tmp_path / "empty"])


def test_untrained_workdir_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a training workdir"):
        predict.load_annotator(tmp_path)


def test_annotations_reproduce_test_metrics(smoke_workdir, corel5k_dir):
    """Annotating the 499 test image files reproduces the evaluation's per-image F1 and N+ (MCC
    thresholds): the same checkpoint, normalisation, image decoding and thresholds."""
    index = json.loads((corel5k_dir / "test.json").read_text())
    vocabulary = index["labels"]
    paths = [corel5k_dir / "images" / s["image_name"] for s in index["samples"]]
    annotations = predict.load_annotator(smoke_workdir).annotate(paths)
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
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("1000.jpeg", "10001.jpeg"):
        Image.open(corel5k_dir / "images" / name).save(folder / name.replace(".jpeg", ".png"))
    output = tmp_path / "out.json"
    command = [sys.executable, "-m", "annotate.predict", f"--workdir={smoke_workdir}",
               f"--output={output}", str(folder), str(corel5k_dir / "images" / "1001.jpeg")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ)
    assert done.returncode == 0, done.stderr[-3000:]
    annotations = json.loads(output.read_text())
    assert [Path(a["image"]).name for a in annotations] == ["1000.png", "10001.png", "1001.jpeg"]
    for annotation in annotations:
        assert f"{annotation['image']}:" in done.stdout

    bad = subprocess.run(command[:-2] + [str(tmp_path / "missing.jpg")], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=os.environ)
    assert bad.returncode != 0 and "missing.jpg does not exist" in bad.stderr
