"""Shared fixtures: the real Corel-5k (from $COREL5K_DIR) and tiny synthetic datasets in its format."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from annotate import devices, models
from annotate.models.layers import BatchNorm2d, conv2d

# The apps' persistent compilation cache ($XDG_CACHE_HOME/annotate/jax), for the test processes
# too: the two pytest-xdist workers, the tests' many experiments of one shape (each a new jitted
# function, compiled again without it) and the apps the tests start share their compiled programs
# (on .ci/run, when it came in, about a tenth less CPU time and wall time for the same tests).
devices.enable_compilation_cache()


@pytest.fixture(scope="session")
def corel5k_dir() -> Path:
    """The real Corel-5k folder: $COREL5K_DIR, else data/corel5k (where the first `make train`
    fetches it); tests that need it are skipped when neither is there."""
    root = os.environ.get("COREL5K_DIR")
    if not root:
        fetched = Path(__file__).resolve().parents[1] / "data" / "corel5k"
        if not (fetched / "train.json").is_file():
            pytest.skip("COREL5K_DIR is not set and data/corel5k holds no dataset")
        return fetched
    path = Path(root)
    assert (path / "train.json").is_file(), f"COREL5K_DIR={root} has no train.json"
    return path


def write_dataset(root: Path, *, n_train: int = 12, n_test: int = 6, vocabulary=None,
                  seed: int = 0, size: tuple[int, int] = (48, 32)) -> Path:
    """Write a tiny dataset in the seed's folder format: images/ + train.json + test.json.

    Image i is a smooth colour gradient plus noise; labels are drawn at random from `vocabulary`.
    """
    rng = np.random.default_rng(seed)
    vocabulary = list(vocabulary or ["sky", "water", "tree", "grass", "people"])
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 1000)):
        samples = []
        for i in range(n):
            name = f"{offset + i}.jpeg"
            w, h = size if i % 3 else size[::-1]  # some portrait images
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / name, quality=95)
            k = int(rng.integers(0, 3))
            labels = [str(v) for v in rng.choice(vocabulary, size=k, replace=False)]
            samples.append({"image_name": name, "image_labels": labels})
        (root / f"{split}.json").write_text(json.dumps({"samples": samples, "labels": vocabulary}))
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """A fresh tiny dataset folder (12 train / 6 test images, 5 labels)."""
    return write_dataset(tmp_path / "tiny")


# A child process's first lines: its address space capped at 1 TiB, so that a 1 TiB buffer
# (`jnp.zeros(2 ** 38)`) fails to allocate on any Linux host, whether or not its kernel overcommits
# memory: the apps' out-of-memory errors, raised for real.
ADDRESS_SPACE_CAP = ("import resource\n"
                     "resource.setrlimit(resource.RLIMIT_AS, (1 << 40, 1 << 40))\n")


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory, corel5k_dir: Path) -> Path:
    """The workdir of one `python -m annotate.main --config=configs/smoke.py` run on the real
    Corel-5k, shared read-only by the train, main and predict tests. It is trained once per pytest
    session: under pytest-xdist (`make test` runs two workers) by the first worker that needs it,
    while the others wait on a lock beside it. Its JAX compilation cache goes to the default
    folder under XDG_CACHE_HOME=<workdir>/../cache."""
    session = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        session = session.parent  # the folder the workers' own folders are in
    root = session / "smoke"
    root.mkdir(exist_ok=True)
    workdir, failure = root / "run", root / "failure.txt"  # failure: empty when it succeeded
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not failure.exists():
            env = dict(os.environ, COREL5K_DIR=str(corel5k_dir), XDG_CACHE_HOME=str(root / "cache"))
            env.pop("JAX_COMPILATION_CACHE_DIR", None)
            done = subprocess.run(
                [sys.executable, "-m", "annotate.main", "--config=configs/smoke.py",
                 f"--workdir={workdir}"],
                cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                timeout=600)
            failure.write_text("" if done.returncode == 0 else
                               f"status {done.returncode}: {done.stderr[-3000:]}")
    assert not failure.read_text(), f"the smoke run failed with {failure.read_text()}"
    return workdir


# --------------------------------------------------------------------------- a tiny backbone

class TinyNet(nnx.Module):
    """A few-thousand-parameter backbone with the real BatchNorm (fast to compile), registered
    as "tiny" by the `tiny_backbone` fixture; create_model gives it the seed's linear head."""

    def __init__(self, *, dtype, rngs):
        self.conv = conv2d(3, 8, 3, stride=2, padding=1, dtype=dtype, rngs=rngs)
        self.bn = BatchNorm2d(8)
        self.num_features = 8

    def forward_features(self, x):
        return nnx.relu(self.bn(self.conv(x)))


@contextlib.contextmanager
def lock_held_by_another_run(folder: Path) -> Iterator[None]:
    """`folder`'s WorkdirLock held, for the block, by another thread, as another run holds it
    (the thread that holds a lock may take it again: a block of the test's own would nest)."""
    from annotate.workdir import WorkdirLock

    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with WorkdirLock(folder):
            taken.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(60), f"the other run could not take {folder}'s lock"
        yield
    finally:
        release.set()
        holder.join()


def latest_checkpoint_arrays(workdir: Path) -> tuple[int, dict[str, np.ndarray]]:
    """The epoch of `workdir`'s latest checkpoint and its arrays by dotted name."""
    from annotate import checkpoints

    directory = workdir / "checkpoints"
    epoch = max(int(path.name) for path in directory.iterdir() if path.name.isdigit())
    return epoch, checkpoints.read_arrays(directory / str(epoch))


def register_tiny_backbone() -> str:
    """Register TinyNet as model "tiny" (in this process only)."""
    module = types.ModuleType("annotate.models.tiny_test_backbone")
    module.tiny = TinyNet
    sys.modules[module.__name__] = module
    models._REGISTRY["tiny"] = models.ModelInfo("tiny_test_backbone:tiny", "tiny",
                                                models.IMAGENET_MEAN, models.IMAGENET_STD, "fc")
    return "tiny"


@pytest.fixture
def tiny_backbone():
    name = register_tiny_backbone()
    yield name
    models._REGISTRY.pop(name)
    sys.modules.pop("annotate.models.tiny_test_backbone")


def tiny_config(root: Path, cache_dir: Path, model: str = "tiny"):
    """12 training images at 16 px, batch 4: 3 steps per epoch, 3 epochs, dropout and flips on."""
    from configs import base

    config = base.get_config(model="resnet18", loss="asl")
    config.model.name = model
    config.data.root, config.data.cache_dir = str(root), str(cache_dir)
    config.data.image_size = 16
    config.train.batch_size = 4
    config.train.epochs = config.train.schedule_epochs = 3
    config.train.learning_rate = 1e-2
    config.train.log_every = 1
    return config
