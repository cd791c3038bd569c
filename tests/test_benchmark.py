"""scripts/benchmark.py at the tiniest sizes on the CPU: the train-step record's fields, its FLOP
count against torch's flop counter on the same timm model, the profile of the step and the
trace summariser, the WGAN record and the report table."""
from __future__ import annotations

import functools
import gzip
import json
import time
import types
from pathlib import Path

import pytest
from modules import load_module

TRAIN_ARGS = ["train", "--models", "resnet18", "--dtypes", "float32", "--res", "32", "--batch",
              "2", "--warmup", "1", "--steps", "2", "--repeats", "2", "--batches-on-device", "2"]


@pytest.fixture(scope="module")
def benchmark():
    """The script as a module (scripts/ is not a package)."""
    return load_module("scripts/benchmark.py")


@pytest.fixture(scope="module")
def train_records(benchmark, tmp_path_factory) -> tuple[list[dict], Path]:
    """The records of a tiny ResNet-18 train-step benchmark with its profile (compiled once per
    module), and the profile folder."""
    profile_dir = tmp_path_factory.mktemp("profile")
    records = benchmark.main(TRAIN_ARGS + ["--profile-dir", str(profile_dir),
                                           "--profile-models", "resnet18"])
    assert [r["what"] for r in records] == ["train_throughput", "train_profile"], records
    assert not any("error" in r for r in records), records
    return records, profile_dir


@pytest.fixture(scope="module")
def train_record(train_records) -> dict:
    """The timed record of the tiny benchmark."""
    return train_records[0][0]


def test_train_record_is_sane(train_record, capsys):
    record = train_record
    assert (record["model"], record["dtype"], record["batch"], record["res"],
            record["steps_per_call"]) == ("resnet18", "float32", 2, 32, 1)
    assert record["img_per_s"] > 0 and record["step_ms"] > 0
    # images/s and ms/step are two views of the same median
    assert record["img_per_s"] == pytest.approx(2 * 1000.0 / record["step_ms"], rel=1e-9)
    low, high = record["spread"]
    assert 0 < low <= 1.0 <= high
    assert record["compile_s"] > 0 and record["lower_s"] > 0
    assert record["achieved_tflop_per_s"] == pytest.approx(
        record["train_flops_per_img"] * record["img_per_s"] / 1e12, rel=1e-9)
    # the donated state aliases its output: the memory analysis sees the ~11.8M f32 parameters
    # (params + two Adam moments, ~142 MB) among the arguments
    assert record["argument_bytes"] > 3 * 11_000_000 * 4
    assert record["temp_bytes"] > 0  # the step's activations live in temporaries


def test_train_flops_match_torch_flop_counter(train_record):
    """XLA's count for the whole step (forward, backward, Adam) vs torch's count of the same timm
    ResNet-18's convolutions and matmuls in forward + backward: equal up to elementwise work and
    XLA's rewrites (measured here: 0.93), so within a factor of 1.5 either way."""
    import timm  # the dev extras' (pyproject.toml), as in the parity tests: a failure, not a skip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model("resnet18", pretrained=False, num_classes=260)
    images = torch.randn(2, 3, 32, 32)
    counter = FlopCounterMode(display=False)
    with counter:
        model(images).sum().backward()
    torch_per_image = counter.get_total_flops() / 2
    ratio = train_record["train_flops_per_img"] / torch_per_image
    assert 1 / 1.5 < ratio < 1.5, (train_record["train_flops_per_img"], torch_per_image)


def test_profile_record_traces_the_step_and_keeps_its_hlo(train_records):
    """The traced steps: executing threads busy for part of each step's wall time, the Python
    thread's dispatch measured, the compiled HLO of the step saved beside the trace."""
    (_, profile), profile_dir = train_records
    assert profile["calls"] == 3 and profile["wall_ms_per_call"] > 0
    assert Path(profile["trace"]).is_file()
    busy = [thread["busy_ms_per_call"] for thread in profile["device_threads"].values()]
    assert busy and 0 < max(busy) <= profile["wall_ms_per_call"] * 1.05
    assert 0 < profile["host_dispatch_ms_per_call"] <= profile["wall_ms_per_call"]
    (hlo,) = profile_dir.glob("resnet18_float32_32px_b2_k1.hlo.txt.gz")
    assert "ENTRY" in gzip.open(hlo, "rt").read()


def test_trace_summary_sums_kernels_per_call(benchmark, tmp_path):
    """A hand-made perfetto trace of 2 calls: stream busy time (4 kernels, 5.5 ms) per call,
    instance numbers folded into kernel families, a nested event counted once in the busy time,
    Python dispatch separate."""
    metadata = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
                {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7,
                 "args": {"name": "Stream #7"}},
                {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
                {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
                {"ph": "M", "name": "thread_name", "pid": 2, "tid": 3, "args": {"name": "python"}}]
    kernels = [("loop_add_fusion.1", 0.0, 1000.0), ("loop_add_fusion.1", 1000.0, 1000.0),
               ("loop_add_fusion.12", 2000.0, 500.0), ("sm90_gemm_bf16", 2500.0, 3000.0)]
    events = metadata + [{"ph": "X", "pid": 1, "tid": 7, "name": name, "ts": ts, "dur": dur}
                         for name, ts, dur in kernels]
    events += [{"ph": "X", "pid": 1, "tid": 8, "name": "fusion", "ts": 0.0, "dur": 4000.0},
               {"ph": "X", "pid": 1, "tid": 8, "name": "dot", "ts": 1000.0, "dur": 1000.0}]
    events += [{"ph": "X", "pid": 2, "tid": 3, "name": "PjitFunction(step)", "ts": 0,
                "dur": 200.0}] * 2
    trace = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(trace, "wt") as handle:
        json.dump({"traceEvents": events}, handle)
    summary = benchmark.trace_summary(trace, calls=2)
    stream = summary["device_threads"]["/device:GPU:0: Stream #7"]
    assert stream["busy_ms_per_call"] == pytest.approx(5.5 / 2)
    assert stream["top"][0] == ["sm90_gemm_bf16", pytest.approx(1.5), 0]
    assert stream["top"][1] == ["loop_add_fusion.1", pytest.approx(1.0), 1]
    assert dict(map(tuple, stream["top_families"])) == {
        "loop_add_fusion": pytest.approx(1.25), "sm90_gemm_bf16": pytest.approx(1.5)}
    assert summary["device_threads"]["/device:GPU:0: XLA Ops"]["busy_ms_per_call"] == (
        pytest.approx(4.0 / 2))
    assert summary["host_dispatch_ms_per_call"] == pytest.approx(0.2)
    # with the timed loop's length, work outside [first dispatch, + wall] is not counted:
    # the stream's kernels within [0, 3 ms) are 1 + 1 + 0.5 + 0.5 ms
    clipped = benchmark.trace_summary(trace, calls=2, wall_ms=3.0)
    assert clipped["device_threads"]["/device:GPU:0: Stream #7"]["busy_ms_per_call"] == (
        pytest.approx(3.0 / 2))


def test_wgan_record_extrapolates_against_the_seed(benchmark, monkeypatch):
    """The WGAN command's plumbing with a stand-in measurement (the real one compiles for minutes
    on a CPU): speed-up = images/hour over the seed's 3600 / (0.077 s x 1001)."""
    measured = {"pairs": 8, "iterations": 3, "compile_s": 1.0, "s_per_iteration": 0.5,
                "images_per_hour": 8 * 3600 / (0.5 * 1001),
                "hours_for_4500_images": 4500 / (8 * 3600 / (0.5 * 1001))}
    monkeypatch.setattr(benchmark, "wgan_throughput", lambda *args, **kwargs: dict(measured))
    monkeypatch.setattr(benchmark, "wgan_bound", lambda width: {"what": "wgan_bound"})
    monkeypatch.setattr(benchmark, "precompile_wgan",
                        lambda variants, iterations, width: {v: 2.0 for v in variants})
    record, reads = benchmark.main(["wgan", "--pairs", "8", "--dtypes", "float32", "--width",
                                    "4"])
    assert reads["what"] == "wgan_bound"
    assert record["speedup_vs_seed"] == pytest.approx(0.077 / 0.5 * 8)
    assert record["precompile_s"] == 2.0 and record["dtype"] == "float32"


def test_report_divides_by_the_torch_line_of_the_same_model(benchmark, train_records, tmp_path,
                                                           capsys):
    (train_record, profile), _ = train_records
    ours = dict(train_record, dtype="bfloat16")
    torch_lines = [{"what": "throughput", "model": "resnet18", "mode": "bf16", "img_per_s": 1.0,
                    "res": 32},
                   {"what": "throughput", "model": "resnet18", "mode": "bf16compile",
                    "img_per_s": 2.0, "res": 32},
                   {"what": "throughput", "model": "resnet18", "mode": "bf16compile",
                    "img_per_s": 9.0, "res": 64},  # another size: not a ratio for 32 px
                   {"what": "throughput", "model": "tresnet_m", "mode": "bf16", "img_per_s": 3.0,
                    "res": 448}]
    wgan_line = {"what": "wgan_throughput", "pairs": 64, "dtype": "float32",
                 "s_per_iteration": 0.2, "images_per_hour": 1151.0,
                 "hours_for_4500_images": 3.91, "speedup_vs_seed": 24.6}
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(["log line, not JSON", json.dumps(ours), "{broken"]
                              + [json.dumps(line) for line in torch_lines + [wgan_line, profile]])
                    + "\n")
    records = benchmark.main(["report", str(path)])
    assert len(records) == 7
    table = capsys.readouterr().out
    wall = profile["wall_ms_per_call"]
    assert f"Profile of resnet18 32 px K=1 float32: {wall:.1f} ms wall per call" in table
    resnet_row = next(line for line in table.splitlines() if line.startswith("| resnet18 | 32 "))
    assert f"{ours['img_per_s'] / 2.0:.2f}x (vs compile)" in resnet_row  # compiled torch preferred
    assert "| 9.00 |" in next(line for line in table.splitlines()
                              if line.startswith("| resnet18 | 64 "))
    tresnet_row = next(line for line in table.splitlines() if line.startswith("| tresnet_m "))
    assert "| 3.00 |" in tresnet_row and "x" not in tresnet_row  # torch only: no ratio
    assert "| 64 | float32 | 0.2000 | 1,151 | 3.91 | 25x |" in table


def test_depthwise_variants_each_divide_by_their_backbones_torch_line(benchmark, train_record,
                                                                    tmp_path, capsys):
    """Only a backbone with depthwise convolutions gets a variant per implementation, and the
    report keeps the two apart, each against the same PyTorch line of that backbone (which runs
    the linear head: another head's row has no PyTorch figure)."""
    assert benchmark.has_depthwise_convs("xception")
    assert not benchmark.has_depthwise_convs("resnet18")
    assert not benchmark.has_depthwise_convs("no_such_model")  # build_variant reports it
    ours = [dict(train_record, model="xception", dtype="bfloat16", depthwise=depthwise,
                 img_per_s=rate) for depthwise, rate in (("taps", 30.0), ("grouped", 10.0))]
    ours.append(dict(ours[0], head="csra"))  # PyTorch has no CSRA head: no ratio
    theirs = {"what": "throughput", "model": "xception", "mode": "bf16compile", "img_per_s": 20.0,
              "res": train_record["res"]}
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in ours + [theirs]))
    benchmark.main(["report", str(path)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| xception")]
    assert [row.split(" | ")[0] for row in rows] == ["| xception (depthwise taps)",
                                                     "| xception (depthwise grouped)",
                                                     "| xception + csra (depthwise taps)"]
    assert "1.50x (vs compile)" in rows[0] and "0.50x (vs compile)" in rows[1]
    assert "20.00" not in rows[2] and "x (vs compile)" not in rows[2]


def test_time_variant_divides_by_the_steps_not_the_calls(benchmark, monkeypatch):
    """A call of K = 2 steps that takes 10 ms on a stand-in clock is 5 ms per step; 3 timed steps
    are rounded up to 2 whole calls (4 steps), the warm-up's call is not timed."""
    clock = [100.0]
    calls_run = []

    def run_steps(variant, calls):
        calls_run.append(calls)
        clock[0] += 0.010 * calls
        return 0.5  # the last loss, finite

    monkeypatch.setattr(benchmark, "run_steps", run_steps)
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock[0])
    variant = types.SimpleNamespace(steps_per_call=2, model="stand-in", dtype="float32")
    times = benchmark.time_variant(variant, warmup=1, steps=3, repeats=2)
    assert calls_run == [1, 2, 2]
    assert times == pytest.approx([0.005, 0.005], rel=1e-9)


def test_k_steps_per_call_time_per_step_and_borrow_the_step_flops(benchmark):
    """K = 2 steps per call: the same per-step FLOPs as K = 1 (the lowered call's cost analysis
    counts the scan's body once), and images per second that follow from the step time (the
    time per step itself: test_time_variant_divides_by_the_steps_not_the_calls)."""
    records = benchmark.main(["train", "--models", "resnet18", "--dtypes", "float32", "--res", "32",
                              "--batch", "2", "--warmup", "1", "--steps", "3", "--repeats", "1",
                              "--batches-on-device", "2", "--steps-per-call", "1,2"])
    one, two = records
    assert (one["steps_per_call"], two["steps_per_call"]) == (1, 2)
    assert two["train_flops_per_img"] == one["train_flops_per_img"] > 0
    assert two["img_per_s"] == pytest.approx(2 * 1000.0 / two["step_ms"], rel=1e-9)


def test_flops_command_counts_the_timed_step(benchmark, train_record):
    """`flops` (lowering only) gives the FLOPs per image of the timed train step; with --memory it
    compiles that step too, for the same temporaries as the timed one."""
    (record,) = benchmark.main(["flops", "--models", "resnet18", "--dtypes", "float32",
                                "--res", "32", "--batch", "2"])
    assert record["what"] == "train_flops" and record["res"] == 32
    assert record["train_flops_per_img"] == pytest.approx(train_record["train_flops_per_img"])
    assert "temp_bytes" not in record
    (compiled,) = benchmark.main(["flops", "--models", "resnet18", "--dtypes", "float32",
                                  "--res", "32", "--batch", "2", "--memory"])
    assert compiled["temp_bytes"] == train_record["temp_bytes"] > 0
    assert compiled["compiled_on"] == "cpu"


def test_wgan_bound_counts_the_fewest_weight_reads(benchmark):
    """Counted on the traced pair iteration: a critic step reads the critic's weights 4 times
    (one batch-3 call and its gradient-penalty derivatives), the generator step's critic twice
    more, and the generator is read twice (one batch-6 forward, its backward). The bytes follow
    from the parameter counts: 24 for Adam, 4 per read."""
    bound = benchmark.wgan_bound(width=4)
    assert bound["critic_reads_per_critic_step"] == bound["fewest"]["critic_reads_per_critic_step"] == 4
    assert bound["critic_reads_per_iteration"] == bound["fewest"]["critic_reads_per_iteration"] == 22
    assert bound["generator_reads_per_iteration"] == 2
    assert bound["bytes_per_pair_iteration"] == (bound["critic_params"] * (24 * 5 + 4 * 22)
                                                 + bound["generator_params"] * (24 + 4 * 2))
    assert bound["flops_per_pair_iteration"] > 0
    # the batch-6 forward's backward also runs through the five fakes with zero cotangents:
    # more than twice a batch-5 forward beside a batch-1 forward and backward
    assert bound["flops_generator_batched"] > 2 * bound["flops_generator_split"] > 0


@pytest.mark.parametrize("calls, reads", [((3,), 4), ((2, 1), 6), ((1, 1, 1), 8)])
def test_weight_reads_of_a_critic_step_grow_with_its_separate_calls(benchmark, calls, reads):
    """The counter on the critic loss's gradient with (fake, real, interpolate) split into
    separate critic calls: each call reads a middle layer's weights once forward and once in its
    backward, and the penalty's input gradient adds one pass and its own derivative one more,
    so 2 x calls + 2: 4 for the one batch-3 call, 6 for fake and real together with the
    interpolate apart, 8 for the seed's three batch-1 calls."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from wgan import train as wgan_train

    setup = wgan_train.WganSetup(width=4)
    critic_params = nnx.state(setup.critic(jax.random.key(0)), nnx.Param)
    fake, real = jnp.zeros((128, 192, 3)), jnp.ones((128, 192, 3))
    loss = functools.partial(benchmark.critic_loss_in_calls(setup, calls), fake=fake, real=real,
                             mix_weight=jnp.float32(0.3))

    closed = jax.make_jaxpr(jax.grad(loss))(critic_params)
    paths = [jax.tree_util.keystr(path)
             for path, _ in jax.tree_util.tree_flatten_with_path(critic_params)[0]]
    kernel = closed.jaxpr.invars[paths.index("['downs'][2]['kernel'].value")]
    assert benchmark.count_weight_reads(closed.jaxpr, {kernel}) == reads


def test_stream_command_times_the_decoding(benchmark, tiny_dataset, monkeypatch):
    """images/s = batches x batch / the seconds the decoding took: with each decode made to take
    at least 20 ms, 2 threads decode at most 100 images/s, and the 12 images take no longer
    than the command's own wall time."""
    from annotate import data

    decode = data.SplitSources.decode

    def slow_decode(self, index, image_size):
        time.sleep(0.02)
        return decode(self, index, image_size)

    monkeypatch.setattr(data.SplitSources, "decode", slow_decode)
    start = time.perf_counter()
    (record,) = benchmark.main(["stream", "--data", str(tiny_dataset), "--res", "16",
                                "--batch", "4", "--batches", "3", "--threads", "2"])
    wall = time.perf_counter() - start
    assert (record["what"], record["res"], record["threads"]) == ("stream_throughput", 16, 2)
    assert record["batches"] == 3 and 3 * 4 / wall <= record["img_per_s"] <= 2 / 0.02


def test_checkpoint_command_times_the_loops_saves(benchmark, tmp_path):
    """Each variant gets a record of ResNet-18's TrainState saved (timm's parameter count x 3 for
    Adam's two moments, plus the BatchNorm statistics) the loop's way (packed: a float32 and an
    int32 array) or an orbax array per leaf: uncompressed, a checkpoint holds every byte of the
    state plus a little metadata; a save's blocking part is within the whole save, which is
    within the wall time; the saves ran in --dir and left nothing there."""
    import timm

    reference = timm.create_model("resnet18", num_classes=260)
    adam_state_mb = 3 * 4 * sum(p.numel() for p in reference.parameters()) / 1e6
    start = time.perf_counter()
    records = benchmark.main(["checkpoint", "--models", "resnet18", "--saves", "2",
                              "--variants", "packed,leaves", "--dir", str(tmp_path)])
    wall = time.perf_counter() - start
    assert [(r["what"], r["model"], r["format"], r["compression"]) for r in records] == [
        ("checkpoint_save", "resnet18", "packed", "none"),
        ("checkpoint_save", "resnet18", "leaves", "none")]
    packed, leaves = records
    assert packed["state_mb"] == leaves["state_mb"]
    assert adam_state_mb < packed["state_mb"] < adam_state_mb + 0.1  # + BatchNorm statistics
    assert (packed["arrays_saved"], leaves["arrays_saved"]) == (2, leaves["arrays"])
    for record in records:
        assert record["state_mb"] < record["disk_mb"] < 1.01 * record["state_mb"]
        assert 0 < record["save_blocking_s"] <= record["save_s"] <= max(record["save_s_each"])
        assert sum(record["save_s_each"]) < wall / 2 and record["save_cpu_s"] > 0
    assert list(tmp_path.iterdir()) == []


def test_compile_cache_command_runs_an_experiment_twice_per_cache(benchmark, monkeypatch):
    """Each threshold gets a new cache folder (XDG_CACHE_HOME), shared by its two runs of the
    same experiment into two new workdirs, with JAX's threshold variable set; the seconds are
    each run's wall time."""
    runs = []

    def fake_main(command, cwd, env, capture_output, text):
        assert "JAX_COMPILATION_CACHE_DIR" not in env  # it would override XDG_CACHE_HOME's
        runs.append((command, env["XDG_CACHE_HOME"],
                     env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
        time.sleep(0.05 * len(runs))
        return types.SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(benchmark.subprocess, "run", fake_main)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    records = benchmark.main(["compile-cache", "--overrides=--config.train.epochs=1"])
    assert [r["min_compile_time_s"] for r in records] == [0.0, 1.0]
    assert [threshold for *_, threshold in runs] == ["0", "0", "1", "1"]
    caches = [cache for _, cache, _ in runs]
    assert caches[0] == caches[1] != caches[2] == caches[3]
    workdirs = [next(a for a in command if a.startswith("--workdir=")) for command, *_ in runs]
    assert len(set(workdirs)) == 4
    assert all(command[1:4] == ["-m", "annotate.main", "--config=configs/smoke.py"]
               and command[-1] == "--config.train.epochs=1" for command, *_ in runs)
    for record, (first, second) in zip(records, [(0.05, 0.10), (0.15, 0.20)]):  # the sleeps
        assert first <= record["first_run_s"] < second <= record["second_run_s"]
