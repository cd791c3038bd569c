"""annotate.train: OneCycle/Adam against torch, the whole train step against the PyTorch reference
loop, preprocessing, the sharded step on 8 simulated devices, bit-exact resume, the
non-finite-loss stop, and the CPU smoke run on real Corel-5k."""
from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from annotate import devices, metrics, run_data, train, training_log
from annotate.config import resolved_config

REPO = Path(__file__).resolve().parents[1]
from configs import base, smoke  # noqa: E402
from conftest import latest_checkpoint_arrays, tiny_config  # noqa: E402


# --------------------------------------------------------------------------- optimizer


def _torch_schedule(total_steps: int, max_lr: float, **kwargs):
    """lr and Adam beta1 that torch's OneCycleLR gives the optimizer at each step."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=max_lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr,
                                                    total_steps=total_steps, pct_start=0.2, **kwargs)
    lrs, betas = [], []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        betas.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        scheduler.step()
    return np.array(lrs), np.array(betas)


@pytest.mark.parametrize("total_steps", [10, 23, 140, 11_200])  # 11,200: 80 epochs of 140
def test_one_cycle_lr_and_beta1_match_torch(total_steps):
    config = base.get_config(model="resnet18", loss="asl")
    config.train.learning_rate = 3e-4
    learning_rate, beta1 = train.learning_rate_and_beta1(config, total_steps)
    steps = jnp.arange(total_steps)
    torch_lr, torch_beta1 = _torch_schedule(total_steps, 3e-4)
    # float32 against torch's float64, relatively also at the end of a long schedule (lr ~1e-9)
    np.testing.assert_allclose(np.asarray(learning_rate(steps)), torch_lr, rtol=1e-5, atol=0)
    np.testing.assert_allclose(np.asarray(beta1(steps)), torch_beta1, rtol=1e-6)


def test_beta1_without_cycling_is_torch_adams():
    """OneCycleLR(cycle_momentum=False) and a constant schedule leave Adam's beta1 at its 0.9."""
    config = base.get_config(model="resnet18", loss="asl")
    config.train.update(learning_rate=3e-4, cycle_momentum=False)
    learning_rate, beta1 = train.learning_rate_and_beta1(config, 23)
    torch_lr, torch_beta1 = _torch_schedule(23, 3e-4, cycle_momentum=False)
    np.testing.assert_allclose(np.asarray(learning_rate(jnp.arange(23))), torch_lr, rtol=2e-5,
                               atol=3e-10)
    np.testing.assert_array_equal(np.full(23, beta1), torch_beta1)
    config.train.schedule = "constant"
    assert train.learning_rate_and_beta1(config, 23) == (3e-4, torch.optim.Adam(
        [torch.nn.Parameter(torch.zeros(1))]).defaults["betas"][0])


@pytest.mark.parametrize("optimizer,weight_decay", [("adam", 0.0), ("adam", 0.05), ("adamw", 0.05)])
def test_optimizer_trajectory_matches_torch(optimizer, weight_decay):
    """Adam(W) + OneCycle (cycling beta1) on a fixed sequence of gradients: same parameters."""
    total_steps, lr = 12, 0.1
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(total_steps, 5)).astype(np.float32)
    start = rng.normal(size=5).astype(np.float32)

    parameter = torch.nn.Parameter(torch.tensor(start))
    torch_class = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    torch_optimizer = torch_class([parameter], lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(torch_optimizer, max_lr=lr,
                                                    total_steps=total_steps, pct_start=0.2)
    for g in grads:
        parameter.grad = torch.tensor(g)
        torch_optimizer.step()
        scheduler.step()

    config = base.get_config(model="resnet18", loss="asl")
    config.train.update(optimizer=optimizer, weight_decay=weight_decay, learning_rate=lr)
    tx = train.make_optimizer(config, total_steps)
    params = jnp.asarray(start)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(jnp.asarray(g), state, params)
        params = params + updates
    np.testing.assert_allclose(np.asarray(params), parameter.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_whole_train_step_matches_the_torch_reference_loop(tmp_path):
    """The whole program against ../shared/bench/torch_reference.py's loop (float32): TResNet-M
    from the same timm weights (loaded through config.model.pretrained), the reference recipe
    (Adam, OneCycle with cycling beta1, the seed's ASL) on the same batches without flips; the
    losses of every step and the eval-mode probabilities afterwards agree to float32 rounding."""
    import timm
    from annotate.config import normalisation
    from configs import reference_tresnet_asl_224

    batch, steps, total_steps, res = 4, 4, 6, 32
    torch.manual_seed(0)
    reference = timm.create_model("tresnet_m", pretrained=False, num_classes=7)
    torch.save(reference.state_dict(), tmp_path / "tresnet_m.pth")
    config = reference_tresnet_asl_224.get_config()
    config.model.update(name="tresnet_m", dtype="float32", pretrained=str(tmp_path / "tresnet_m.pth"))
    config.train.update(flip_horizontal=False, flip_vertical=False)
    config.data.image_size = res
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch * steps, res, res, 3), dtype=np.uint8)
    targets = (rng.random((batch * steps, 7)) < 0.3).astype(np.float32)

    experiment, state = train.create_experiment(config, 7, total_steps, devices.make_mesh())
    device_images = devices.put(images, experiment.replicated)
    device_targets = devices.put(targets, experiment.replicated)
    ours = []
    for step in range(steps):
        indices = np.arange(step * batch, (step + 1) * batch, dtype=np.int32)[None]
        state, loss = experiment.train_steps(state, device_images, device_targets,
                                             devices.put(indices, experiment.steps_sharding),
                                             jax.random.key(0))
        ours.append(float(np.asarray(loss)[0]))
    our_probs = np.asarray(experiment.predict_step(
        state.params, state.batch_stats, device_images,
        devices.put(np.arange(batch * steps, dtype=np.int32), experiment.batch_sharding)))

    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalisation(config))
    prep = lambda u8: (torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255 - mean) / std  # noqa: E731
    optimizer = torch.optim.Adam(reference.parameters(), lr=config.train.learning_rate)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.train.learning_rate,
                                                    total_steps=total_steps, pct_start=0.2)
    theirs = []
    reference.train()
    for step in range(steps):
        p = torch.sigmoid(reference(prep(images[step * batch:(step + 1) * batch])))
        y = torch.from_numpy(targets[step * batch:(step + 1) * batch])
        p_m = (p - 0.05).clamp(min=0)  # the seed's ASL: gamma_neg 4, gamma_pos 0, margin 0.05
        loss = -(y * torch.log(p.clamp(min=1e-8))
                 + (1 - y) * torch.log((1 - p_m).clamp(min=1e-8)) * p_m ** 4).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        theirs.append(loss.item())
    reference.eval()
    with torch.no_grad():
        their_probs = torch.sigmoid(reference(prep(images))).numpy()
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)  # same weights, same batch
    # then float32 rounding grows: Adam's first steps move every weight by about the learning
    # rate whatever its gradient's size, so rounding-level gradients move too
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    np.testing.assert_allclose(our_probs, their_probs, atol=5e-4)
    assert abs(ours[-1] - ours[0]) > 1e-3  # the steps did train


# --------------------------------------------------------------------------- preprocessing


def test_preprocess_flips_each_image_independently():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 5, 7, 3), dtype=np.uint8)
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    preprocess = train.Preprocess(mean, std, True, True, jnp.float32)
    out = np.asarray(preprocess(jnp.asarray(images), jax.random.key(1)))
    normalised = lambda u8: (u8.astype(np.float32) / 255 - np.array(mean)) / np.array(std)
    seen = set()
    for image, result in zip(images, out):
        variants = {"none": image, "h": image[:, ::-1], "v": image[::-1], "hv": image[::-1, ::-1]}
        matches = [k for k, v in variants.items() if np.allclose(result, normalised(v), atol=1e-5)]
        assert matches, "output is not a flip of its input"
        seen.add(matches[0])
    assert seen == {"none", "h", "v", "hv"}  # 64 images: all four variants occur
    np.testing.assert_allclose(np.asarray(preprocess(jnp.asarray(images), None)), normalised(images),
                               atol=1e-5)
    assert train.Preprocess(mean, std, True, True, jnp.bfloat16)(jnp.asarray(images), None).dtype == jnp.bfloat16


# --------------------------------------------------------------------------- sharding

SHARDED_SCRIPT = r"""
import sys, json
import jax, jax.numpy as jnp, numpy as np
sys.path[:0] = [{repo!r}, {tests!r}]
from conftest import register_tiny_backbone
from configs import base
from annotate import devices, run_data, train
assert jax.device_count() == 8, jax.devices()
config = base.get_config(model="resnet18", loss="asl")
config.model.name = register_tiny_backbone()
config.data.image_size = 16
config.train.batch_size = 16
config.train.learning_rate = 1e-2
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
targets = (rng.random((40, 5)) < 0.3).astype(np.float32)
batches = [rng.permutation(40)[:16].astype(np.int32) for _ in range(3)]
results = {{}}
for name, device_list in (("one", jax.devices()[:1]), ("eight", jax.devices())):
    mesh = devices.make_mesh(device_list)
    experiment, state = train.create_experiment(config, 5, 30, mesh)
    on_device = lambda a: devices.put(a, experiment.replicated)
    key = jax.random.wrap_key_data(on_device(jax.random.key_data(jax.random.key(0))))
    losses = []
    for batch in batches:
        state, loss = experiment.train_steps(state, on_device(images), on_device(targets),
                                             devices.put(batch[None], experiment.steps_sharding), key)
        losses.append(float(loss[0]))
    probs = train.predict(experiment, state.params, state.batch_stats,
                          run_data.DeviceSplit(on_device(images), None, None))
    leaves = [np.asarray(x).ravel() for x in jax.tree.leaves((state.params, state.batch_stats))]
    results[name] = dict(losses=losses, params=np.concatenate(leaves).tolist(), probs=probs.tolist(),
                         devices=len(state.step.sharding.device_set))
print("RESULT" + json.dumps(results))
"""


def test_sharded_step_equals_single_device():
    script = SHARDED_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.split("RESULT", 1)[1])
    one, eight = results["one"], results["eight"]
    assert (one["devices"], eight["devices"]) == (1, 8)
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
    np.testing.assert_allclose(eight["params"], one["params"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(eight["probs"], one["probs"], rtol=1e-4, atol=1e-6)
    assert one["losses"][0] != one["losses"][-1]  # the steps did train


def test_ema_of_weights_and_batch_statistics(tiny_backbone):
    """With train.ema_decay = d, ema = d * ema + (1 - d) * value after every step, for the
    parameters and the BatchNorm statistics alike (timm's ModelEmaV2 averages the whole state
    dict); evaluation uses both averages."""
    config = base.get_config(model="resnet18", loss="bce")
    config.model.name = tiny_backbone
    config.train.update(ema_decay=0.5, batch_size=4, learning_rate=1e-2)
    experiment, state = train.create_experiment(config, 5, 10, devices.make_mesh())
    rng = np.random.default_rng(0)
    images = devices.put(rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), experiment.replicated)
    targets = devices.put((rng.random((8, 5)) < 0.3).astype(np.float32), experiment.replicated)
    flat = lambda tree: np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])
    expected_params, expected_stats = flat(state.params), flat(state.batch_stats)
    for step in range(3):
        batch = devices.put(np.arange(4 * (step % 2), 4 * (step % 2) + 4, dtype=np.int32)[None],
                          experiment.steps_sharding)
        state, _ = experiment.train_steps(state, images, targets, batch, jax.random.key(0))
        expected_params = 0.5 * expected_params + 0.5 * flat(state.params)
        expected_stats = 0.5 * expected_stats + 0.5 * flat(state.batch_stats)
    np.testing.assert_allclose(flat(state.ema_params), expected_params, rtol=1e-6)
    np.testing.assert_allclose(flat(state.ema_batch_stats), expected_stats, rtol=1e-6)
    assert not np.allclose(flat(state.ema_params), flat(state.params))
    assert not np.allclose(flat(state.ema_batch_stats), flat(state.batch_stats))
    params, batch_stats = train.eval_variables(state)
    assert params is state.ema_params and batch_stats is state.ema_batch_stats


def test_steps_per_call_scan_equals_single_steps(tiny_backbone):
    """train_steps over a [3, B] chunk (a scan) gives the parameters and losses of three one-step
    calls (float32 reassociation tolerance); the loop's chunk divides the epoch on accelerators
    and is one step on the CPU."""
    config = base.get_config(model="resnet18", loss="asl")
    config.model.name = tiny_backbone
    config.train.update(batch_size=4, learning_rate=1e-2)
    rng = np.random.default_rng(1)
    host_images = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    host_targets = (rng.random((12, 5)) < 0.3).astype(np.float32)
    chunk = rng.permutation(12).astype(np.int32).reshape(3, 4)
    results = []
    for calls in (chunk[:, None], chunk[None]):  # three calls of one step; one call of three
        experiment, state = train.create_experiment(config, 5, 10, devices.make_mesh())
        images = devices.put(host_images, experiment.replicated)
        targets = devices.put(host_targets, experiment.replicated)
        losses = []
        for indices in calls:
            state, chunk_losses = experiment.train_steps(
                state, images, targets, devices.put(indices, experiment.steps_sharding),
                jax.random.key(3))
            losses.extend(np.asarray(chunk_losses).tolist())
        leaves = jax.tree.leaves((state.params, state.batch_stats))
        results.append((losses, np.concatenate([np.asarray(x).ravel() for x in leaves]),
                        int(state.step)))
    (single_losses, single_params, single_step), (scan_losses, scan_params, scan_step) = results
    assert single_step == scan_step == 3
    np.testing.assert_allclose(scan_losses, single_losses, rtol=1e-5)
    np.testing.assert_allclose(scan_params, single_params, rtol=1e-5, atol=1e-6)
    assert single_losses[0] != single_losses[-1]
    assert [train.steps_per_call(140, 10, "gpu"), train.steps_per_call(140, 30, "gpu"),
            train.steps_per_call(7, 10, "tpu"), train.steps_per_call(3, 1, "gpu"),
            train.steps_per_call(140, 10, "cpu")] == [10, 28, 7, 1, 1]


# --------------------------------------------------------------------------- resume / NaN


class _KilledBar:
    """Stands in for tqdm: raises KeyboardInterrupt at the `kill_at`-th completed step."""

    completed = 0

    def __init__(self, kill_at):
        self.kill_at = kill_at

    def __call__(self, *args, **kwargs):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        _KilledBar.completed += n
        if _KilledBar.completed >= self.kill_at:
            raise KeyboardInterrupt(f"killed at step {_KilledBar.completed}")

    def set_postfix(self, **kwargs):
        pass


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def test_resume_is_bit_exact_and_nan_stops_cleanly(tiny_dataset, tiny_backbone, tmp_path, monkeypatch):
    config = tiny_config(tiny_dataset, tmp_path / "cache")
    uninterrupted = train.train_and_evaluate(config, tmp_path / "full")

    killed = tmp_path / "killed"
    _KilledBar.completed = 0
    with monkeypatch.context() as patch:
        patch.setattr(train, "tqdm", _KilledBar(kill_at=5))  # mid-way through epoch 2 of 3
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(config, killed)
    assert latest_checkpoint_arrays(killed)[0] == 1
    assert [r["epoch"] for r in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines())] == [1]

    # A non-finite loss (a diverging learning rate from epoch 2 on) stops with the step named;
    # the checkpoints of epoch 1 stay as they were.
    poisoned = tmp_path / "poisoned"
    shutil.copytree(killed, poisoned)
    before = _files(poisoned / "checkpoints")
    bad_config = tiny_config(tiny_dataset, tmp_path / "cache")
    bad_config.train.learning_rate = 1e30
    with pytest.raises(FloatingPointError, match=r"at step 5 \(epoch 2, batch 2/3\)"):
        train.train_and_evaluate(bad_config, poisoned)
    assert _files(poisoned / "checkpoints") == before
    # diverged in an epoch's last step (its loss was finite): the predictions say so, by epoch
    bad_config.train.batch_size, bad_config.train.epochs = 12, 1  # one step per epoch
    with pytest.raises(FloatingPointError, match=r"^non-finite predictions after epoch 1: "):
        train.train_and_evaluate(bad_config, tmp_path / "diverged")

    resumed = train.train_and_evaluate(config, killed)  # the same command again
    full_epoch, full_arrays = latest_checkpoint_arrays(tmp_path / "full")
    resumed_epoch, resumed_arrays = latest_checkpoint_arrays(killed)
    assert full_epoch == resumed_epoch == 3
    assert full_arrays.keys() == resumed_arrays.keys() and "params.head.fc.kernel" in full_arrays
    for name, array in full_arrays.items():
        np.testing.assert_array_equal(array, resumed_arrays[name], err_msg=name)
    assert resumed.results == uninterrupted.results
    epochs = [json.loads(line)["epoch"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


@pytest.mark.parametrize("signum, name, sigint", [
    (signal.SIGINT, "Ctrl-C", signal.default_int_handler),
    (signal.SIGTERM, "SIGTERM", signal.default_int_handler),
    (signal.SIGTERM, "SIGTERM", signal.SIG_IGN)])  # a background job's SIGINT, ignored
def test_ctrl_c_while_a_checkpoint_is_saved_keeps_that_checkpoint(tiny_dataset, tiny_backbone,
                                                                   tmp_path, monkeypatch, capsys,
                                                                   signum, name, sigint):
    """Ctrl-C, or SIGTERM (`timeout`, a cluster's preemption) as the apps take it, also in a
    background job, as epoch 1's checkpoint is being saved: the save is completed first, then
    the run stops (before, the epoch was lost and left an orbax temporary folder)."""
    from annotate import cli

    config = tiny_config(tiny_dataset, tmp_path / "cache")
    real_save = ocp.CheckpointManager.save

    def interrupted_save(self, step, *args, **kwargs):
        signal.raise_signal(signum)  # at the start of the save
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", interrupted_save)
    previous = signal.signal(signal.SIGINT, sigint)  # as in a terminal, or a background job
    previous_term = signal.signal(signal.SIGTERM, cli.terminate_as_interrupt)  # as cli.run sets
    try:
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(config, tmp_path / "run")
        assert signal.getsignal(signal.SIGTERM) is cli.terminate_as_interrupt
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1"]
    assert signal.getsignal(signal.SIGINT) is previous
    assert (f"{name}: recording epoch 1 and saving its checkpoint first ({name} again stops at "
            f"once)") in capsys.readouterr().err


def test_a_run_killed_before_its_first_checkpoint_starts_afresh_with_a_new_config(
        tiny_dataset, tiny_backbone, tmp_path, monkeypatch):
    """Killed at step 1, before any checkpoint: the workdir holds config.json and
    validation_images.json but nothing to resume, so another seed and schedule (refused on a
    resume) start a fresh run, which records its own settings and held-out images."""
    config = tiny_config(tiny_dataset, tmp_path / "cache")
    config.eval.protocol, config.eval.validation_size = "validation", 4
    workdir = tmp_path / "run"
    _KilledBar.completed = 0
    with monkeypatch.context() as patch:
        patch.setattr(train, "tqdm", _KilledBar(kill_at=1))
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(config, workdir)
    assert not train.has_checkpoint(workdir)
    first_held_out = json.loads((workdir / "validation_images.json").read_text())
    assert first_held_out["seed"] == 0

    config.seed, config.train.schedule_epochs = 1, 4
    evaluation = train.train_and_evaluate(config, workdir)
    assert evaluation.results["best_epoch"] in (1, 2, 3) and train.has_checkpoint(workdir)
    saved = json.loads((workdir / "config.json").read_text())
    assert (saved["seed"], saved["train"]["schedule_epochs"]) == (1, 4)
    held_out = json.loads((workdir / "validation_images.json").read_text())
    assert held_out["seed"] == 1 and held_out["image_names"] != first_held_out["image_names"]
    with pytest.raises(train.WorkdirError, match=r"trained with .*seed=1.*not .*seed=0"):
        config.seed = 0  # now there is a checkpoint: a resume with another seed is refused
        train.train_and_evaluate(config, workdir)


def test_a_resume_whose_epochs_take_another_step_count_is_refused(tiny_dataset, tiny_backbone,
                                                                  tmp_path):
    """A resume after the training images changed in number (another copy of the dataset, more
    or fewer images with the same labels) is refused before training: its epochs would take
    another number of steps, and OneCycle, laid out over the run's steps, would jump."""
    config = tiny_config(tiny_dataset, tmp_path / "cache")
    config.train.epochs = 1
    train.train_and_evaluate(config, tmp_path / "run")
    index = json.loads((tiny_dataset / "train.json").read_text())
    index["samples"] = index["samples"][:8]  # 12 -> 8 images: 2 steps of 4, not 3
    (tiny_dataset / "train.json").write_text(json.dumps(index))
    config.train.epochs = 2
    with pytest.raises(train.WorkdirError, match=re.escape(
            "the 1 epoch(s) in the checkpoint took 3 steps each, this run's take 2 (8 training "
            "images at batch 4): the training images changed since")):
        train.train_and_evaluate(config, tmp_path / "run")


def _shuffle_test_labels(root: Path, seed: int) -> None:
    """Shuffle test.json's labels: each image's label set moves to another image and every label
    is renamed to another vocabulary entry (same vocabulary, other targets)."""
    index = json.loads((root / "test.json").read_text())
    rng = np.random.default_rng(seed)
    rename = dict(zip(index["labels"], np.roll(index["labels"], 1).tolist()))
    labels = [sample["image_labels"] for sample in index["samples"]]
    for sample, source in zip(index["samples"], rng.permutation(len(labels))):
        sample["image_labels"] = [rename[label] for label in labels[source]]
    (root / "test.json").write_text(json.dumps(index))


def test_validation_protocol_never_looks_at_the_test_labels(tiny_dataset, tiny_backbone,
                                                            tmp_path):
    """Protocol "validation": 4 of the 12 training images held out (written to
    validation_images.json); the epochs are scored on them alone; with the test labels shuffled
    between two runs, the chosen epoch, the thresholds, every per-epoch number and the model are
    the same; only the final scoring reads the (changed) test labels."""
    config = tiny_config(tiny_dataset, tmp_path / "cache")
    config.eval.protocol, config.eval.validation_size = "validation", 4
    first = train.train_and_evaluate(config, tmp_path / "first")
    _shuffle_test_labels(tiny_dataset, seed=5)
    second = train.train_and_evaluate(config, tmp_path / "second")

    held_out = json.loads((tmp_path / "first" / "validation_images.json").read_text())
    assert len(held_out["image_names"]) == 4 and first.num_train_images == 8
    timing = ("train/epoch_seconds", "train/images_per_second", "train/seconds_between_epochs")
    records = [[{k: v for k, v in record.items() if k not in timing}
                for record in training_log.read_metrics(tmp_path / run)]
               for run in ("first", "second")]
    assert records[0] == records[1] and len(records[0]) == 3
    # the time outside training before epochs 2 and 3 (an evaluation and a save each)
    between = [r.get(timing[2]) for r in training_log.read_metrics(tmp_path / "first")]
    assert between[0] is None and all(0 < seconds < 60 for seconds in between[1:]), between
    assert all(key.startswith(("train/", "val/")) or key in ("epoch", "step")
               for record in records[0] for key in record), "a test number was computed per epoch"
    assert first.results["protocol"] == second.results["protocol"] == "validation"
    assert first.results["best_epoch"] == second.results["best_epoch"]
    assert first.results["thresholds"] == second.results["thresholds"]
    best = max(records[0], key=lambda r: (r["val/per_class_f1"], -r["epoch"]))
    assert first.results["best_epoch"] == best["epoch"]
    np.testing.assert_array_equal(first.test_probs, second.test_probs)  # the same model
    test_counts = [[row["test_count"] for row in run.results["per_label"]]
                   for run in (first, second)]
    assert test_counts[0] != test_counts[1]  # the shuffled test labels were read and scored


def test_final_protocol_evaluates_the_last_epoch(tiny_dataset, tiny_backbone, tmp_path):
    """Protocol "final" (with the CSRA head: the loop does not know which head it trains)."""
    config = tiny_config(tiny_dataset, tmp_path / "cache")
    config.eval.protocol = "final"
    config.model.head = "csra"
    evaluation = train.train_and_evaluate(config, tmp_path / "run")
    assert (evaluation.results["protocol"], evaluation.results["best_epoch"]) == ("final", 3)
    low, high = evaluation.results["ci95"]["mcc"]["per_image_f1"]
    assert low < evaluation.results["mcc"]["per_image_f1"] < high
    # the intervals are those of the test images' probabilities at the chosen thresholds
    assert evaluation.results["ci95"]["mcc"] == metrics.bootstrap_ci(
        evaluation.test.targets, evaluation.test_probs,
        np.asarray(evaluation.results["thresholds"]),
        resamples=config.eval.bootstrap_resamples, seed=config.seed)


def test_batch_larger_than_the_split_is_named(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path, model="resnet18")
    config.train.batch_size = 64
    with pytest.raises(ValueError, match="batch_size = 64 exceeds the 12 training images"):
        train.train_and_evaluate(config, tmp_path / "work")


# --------------------------------------------------------------------------- smoke run


def test_smoke_run_beats_top3_baseline(smoke_workdir, corel5k_dir):
    from sklearn.metrics import f1_score

    def multi_hot(split):
        index = json.loads((corel5k_dir / f"{split}.json").read_text())
        position = {label: i for i, label in enumerate(index["labels"])}
        y = np.zeros((len(index["samples"]), len(position)), int)
        for i, sample in enumerate(index["samples"]):
            y[i, [position[label] for label in sample["image_labels"]]] = 1
        return y

    train_y, test_y = multi_hot("train"), multi_hot("test")
    top3 = np.zeros_like(test_y)
    top3[:, np.argsort(-train_y.sum(0), kind="stable")[:3]] = 1
    baseline_f1 = f1_score(test_y, top3, average="micro")  # pooled over labels = per-image F1
    assert baseline_f1 == pytest.approx(0.193, abs=1e-3)

    results = json.loads((smoke_workdir / "results.json").read_text())
    print(results["fixed_0.5"], results["mcc"])
    assert results["mcc"]["per_image_f1"] > baseline_f1
    assert results["mcc"]["n_plus"] >= 10
    assert len(results["thresholds"]) == 260 and len(results["per_label"]) == 260
    records = [json.loads(line) for line in (smoke_workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, smoke.get_config().train.epochs + 1))


def test_a_long_cpu_run_says_what_it_will_cost(tiny_dataset, tiny_backbone, tmp_path, capsys,
                                               monkeypatch):
    """On the CPU, once the first steps are timed: one line with s/step, the estimate and the
    smoke command, when the estimate exceeds train.CPU_WARNING_SECONDS (here 0); training goes on."""
    monkeypatch.setattr(train, "CPU_WARNING_SECONDS", 0.0)
    train.train_and_evaluate(tiny_config(tiny_dataset, tmp_path / "cache"), tmp_path / "run")
    warnings = [line[line.index("warning: "):] for line in capsys.readouterr().err.splitlines()
                if "warning: no accelerator" in line]
    assert len(warnings) == 1
    assert "s/step" in warnings[0] and "3 epochs to go" in warnings[0]
    assert "make train CONFIG=configs/smoke.py" in warnings[0]
    assert [r["epoch"] for r in training_log.read_metrics(tmp_path / "run")] == [1, 2, 3]


@pytest.mark.parametrize("estimate_after_seconds, estimated_at_call", [(1e9, 6), (0.0, 2)])
def test_the_step_time_estimate_comes_after_five_timed_steps_or_once_they_took_long(
        tiny_dataset, tiny_backbone, tmp_path, monkeypatch, estimate_after_seconds,
        estimated_at_call):
    """train_epoch times the steps after its first call (which compiles): five of them, or fewer
    once they took ESTIMATE_AFTER_SECONDS (here 0: the first timed call), so that a CPU run of
    two minutes per step is told its cost after 2 steps, not 6."""
    monkeypatch.setattr(train, "ESTIMATE_AFTER_SECONDS", estimate_after_seconds)
    config = resolved_config(tiny_config(tiny_dataset, tmp_path / "cache"))
    config.train.batch_size = 1  # 12 steps, one per call on the CPU
    mesh = devices.make_mesh()
    splits = run_data.load_data(config, mesh)
    experiment, state = train.create_experiment(config, 5, 12, mesh)
    calls, estimated = [], []
    key = jax.random.key(0)
    train.train_epoch(experiment, state, splits.train, 1, key, key, show_progress=False,
                      on_step_time=lambda seconds: estimated.append((len(calls), seconds)),
                      check_saves=lambda: calls.append(1))
    assert len(calls) == 12 and [call for call, _ in estimated] == [estimated_at_call]
    assert estimated[0][1] > 0


def test_a_dataset_with_other_labels_is_refused_on_resume_and_evaluation(
        tiny_dataset, tiny_backbone, tmp_path):
    """The workdir records its outputs' labels (vocabulary.json) when training starts; a dataset
    whose vocabulary has as many labels in another order (a label removed and another added,
    a rename) would read every output as another label: a resume and an evaluation refuse it
    before writing anything (results.json and thresholds.json stay those of the trained labels).
    A workdir without the record is checked against its thresholds.json."""
    config = tiny_config(tiny_dataset, tmp_path / "cache")
    config.train.epochs = 1
    workdir = tmp_path / "run"
    evaluation = train.train_and_evaluate(config, workdir)
    labels = evaluation.test.vocabulary
    assert json.loads((workdir / "vocabulary.json").read_text()) == {"labels": labels}
    (workdir / "thresholds.json").write_text(json.dumps({"vocabulary": labels}))
    for split in ("train", "test"):
        index = json.loads((tiny_dataset / f"{split}.json").read_text())
        index["labels"] = index["labels"][::-1]
        (tiny_dataset / f"{split}.json").write_text(json.dumps(index))
    message = (rf"{workdir} was trained on other labels than this dataset's \(output 0 is "
               rf"'{labels[0]}' there, '{labels[-1]}' here; see {workdir}/")
    with pytest.raises(train.WorkdirError, match=message + "vocabulary.json"):
        train.evaluate(config, workdir)
    config.train.epochs = 2
    with pytest.raises(train.WorkdirError, match=message + "vocabulary.json"):
        train.train_and_evaluate(config, workdir)
    assert [p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()] == ["1"]
    (workdir / "vocabulary.json").unlink()  # a workdir of an earlier version
    with pytest.raises(train.WorkdirError, match=message + "thresholds.json"):
        train.evaluate(config, workdir)
    run_data.check_vocabulary(workdir, labels)
