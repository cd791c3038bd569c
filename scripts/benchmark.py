"""Accelerator throughput of the training step and of the ML-WGAN, as JSON lines plus a table.

    python scripts/benchmark.py train [--models resnet101,tresnet_m] [--dtypes bfloat16,float32]
        [--res 448,224] [--steps-per-call 1,10] [--heads linear,ml_decoder,csra] [--batch 32]
        [--depthwise taps,grouped] [--warmup 3] [--steps 20] [--repeats 3]
    python scripts/benchmark.py flops [--models tresnet_m] [--res 448,224] [--memory]   # no timing
    python scripts/benchmark.py wgan [--pairs 32,96] [--dtypes bfloat16,float32] [--iterations 5]
    python scripts/benchmark.py wgan-bound [--width 64]   # reads, bytes, FLOPs: no timing
    python scripts/benchmark.py stream --data DIR [--res 448,224] [--threads 2,16]
    python scripts/benchmark.py checkpoint [--models tresnet_m] [--variants packed,leaves+zstd]
    python scripts/benchmark.py compile-cache [--config FILE] [--overrides="--config.x=1 ..."]
    python scripts/benchmark.py report FILE...   # our lines + torch_reference.py's lines

`train` times the FULL jitted train step of annotate.train (gather, flips, normalisation, forward,
ASL, backward, Adam) on synthetic uint8 images already on the device, K steps per dispatch as the
training loop runs them (`annotate.train.train_steps`, a lax.scan; K = 1 is one step per call).
Variants are backbone x head x dtype x resolution x K (x the depthwise convolutions' implementation,
for a backbone that has them: Xception). All variants are lowered
one after another and compiled concurrently (XLA compiles release the GIL), then timed one at a
time: median of `repeats` timings of `steps` steps after `warmup` steps. FLOPs come from XLA's
cost analysis of the lowered step (the compiled one leaves out cuDNN's convolutions), memory from
the compiled step's memory analysis and the device's counters.
`wgan` times `wgan_throughput` (wgan.train's jitted chunk) at each K and extrapolates to the
1001-iteration recipe.
Every measurement is one JSON line on stdout; a markdown table comes last.
"""
from __future__ import annotations

import argparse
import collections
import gc
import gzip
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python scripts/benchmark.py` from anywhere: import configs/
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT_MODELS = "tresnet_m,resnet101,resnext50_32x4d,xception"
NUM_CLASSES = 260  # Corel-5k's vocabulary
LABEL_DENSITY = 0.013  # Corel-5k: 3.4 labels of 260 per image, as torch_reference.py draws them
SEED_WGAN_S_PER_ITERATION = 0.077  # the seed's loop on one H100 (issue #5), one image at a time
WGAN_RECIPE_ITERATIONS = 1001


def emit(record: dict[str, Any]) -> None:
    """Print one measurement as a JSON line, flushed at once so a killed run keeps what it has."""
    print(json.dumps(record), flush=True)


def device_info() -> dict[str, Any]:
    """Which accelerator and software measured a record: device kind, count, jax version."""
    device = jax.devices()[0]
    return {"device": device.device_kind, "platform": device.platform,
            "device_count": jax.device_count(), "jax": jax.__version__}


def csv(text: str) -> list[str]:
    """'a,b,,c' -> ['a', 'b', 'c']."""
    return [part.strip() for part in text.split(",") if part.strip()]


def first_cost(analysis: Any) -> dict[str, float]:
    """The cost-analysis dictionary of a compiled computation (older jax returns a 1-list)."""
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


def memory_fields(compiled: Any) -> dict[str, int | None]:
    """Temp/argument/output/alias bytes of a compiled executable (None where unavailable)."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        analysis = None
    names = ("temp", "argument", "output", "alias")
    return {f"{name}_bytes": (int(getattr(analysis, f"{name}_size_in_bytes"))
                              if analysis is not None else None) for name in names}


def device_memory() -> dict[str, int | None]:
    """The first device's allocator counters: bytes in use now and the process-wide peak."""
    stats = jax.devices()[0].memory_stats() or {}
    return {"device_bytes_in_use": stats.get("bytes_in_use"),
            "device_peak_bytes": stats.get("peak_bytes_in_use"),
            "device_bytes_limit": stats.get("bytes_limit")}


# --------------------------------------------------------------------------- profiles

def _kernel_family(name: str) -> str:
    """A kernel or op name without its instance number: 'loop_add_fusion.12' -> 'loop_add_fusion'.
    """
    return re.sub(r"([._]\d+)+$", "", name)


def _covered_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) spans: a thread's busy time with nested events (an op
    inside its executor's event) counted once."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def trace_summary(trace_file: str | Path, calls: int, top: int = 15,
                  wall_ms: float | None = None) -> dict[str, Any]:
    """What a jax.profiler trace (its perfetto JSON) says about `calls` calls of one function:
    per device thread (CUDA stream, "XLA Ops", ...) the busy milliseconds per call and the `top`
    kernels and kernel families by time (on the CPU backend the executing host threads stand in
    for the device); for the Python thread, the dispatch time of jitted calls. Busy time far
    below the wall time means launches or the host bound the step, not the kernels. With
    `wall_ms` (the timed loop's length) the busy time counts only the `wall_ms` after the first
    dispatch, not the profiler's own work while the trace starts and stops."""
    with gzip.open(trace_file, "rt") as handle:
        trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    by_name: dict[tuple[str, str], collections.Counter] = collections.defaultdict(
        collections.Counter)
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(
        collections.Counter)
    spans: dict[tuple[str, str], list[tuple[float, float]]] = collections.defaultdict(list)
    dispatch_starts = []
    for event in events:
        if event.get("ph") != "X":
            continue
        where = (processes.get(event["pid"], str(event["pid"])),
                 threads.get((event["pid"], event["tid"]), str(event["tid"])))
        duration = event.get("dur", 0.0)
        by_name[where][event["name"]] += duration / 1000.0  # microseconds -> ms
        counts[where][event["name"]] += 1
        spans[where].append((event["ts"], event["ts"] + duration))
        if where[1].startswith("python") and event["name"].startswith("PjitFunction"):
            dispatch_starts.append(event["ts"])
    if wall_ms is not None and dispatch_starts:
        first, last = min(dispatch_starts), min(dispatch_starts) + 1000.0 * wall_ms
        spans = {where: [(max(start, first), min(end, last)) for start, end in thread_spans
                         if end > first and start < last]
                 for where, thread_spans in spans.items()}
    summary: dict[str, Any] = {"calls": calls, "device_threads": {},
                               "host_dispatch_ms_per_call": None}
    for (process, thread), durations in by_name.items():
        if thread.startswith("python"):  # the host's Python thread ("python3" on the GPU
            # machine): dispatch, not execution
            dispatch = sum(ms for name, ms in durations.items() if name.startswith("PjitFunction"))
            if dispatch:
                summary["host_dispatch_ms_per_call"] = dispatch / calls
            continue
        families: collections.Counter = collections.Counter()
        for name, ms in durations.items():
            families[_kernel_family(name)] += ms
        summary["device_threads"][f"{process}: {thread}"] = {
            "busy_ms_per_call": _covered_us(spans[(process, thread)]) / 1000.0 / calls,
            "top": [[name, ms / calls, counts[(process, thread)][name] // max(calls, 1)]
                    for name, ms in durations.most_common(top)],
            "top_families": [[name, ms / calls] for name, ms in families.most_common(top)]}
    return summary


def profile_calls(call: Callable[[], Any], calls: int, directory: Path) -> dict[str, Any]:
    """Trace `calls` calls of `call()` (it blocks on its result) with jax.profiler into
    `directory` (xplane for TensorBoard/XProf, perfetto JSON) and summarise them (trace_summary)."""
    directory.mkdir(parents=True, exist_ok=True)
    before = set(directory.rglob("perfetto_trace.json.gz"))
    jax.profiler.start_trace(str(directory), create_perfetto_trace=True)
    start = time.perf_counter()
    try:
        for _ in range(calls):
            call()
    finally:
        wall_s = time.perf_counter() - start
        jax.profiler.stop_trace()
    trace_file, = set(directory.rglob("perfetto_trace.json.gz")) - before
    return {"wall_ms_per_call": 1000 * wall_s / calls, "trace": str(trace_file),
            **trace_summary(trace_file, calls, wall_ms=1000 * wall_s)}


# --------------------------------------------------------------------------- train step

@dataclass
class TrainVariant:
    """One backbone x dtype x resolution x steps per call: its experiment, state, synthetic
    on-device data and compiled step."""

    model: str
    dtype: str
    batch: int
    res: int
    steps_per_call: int
    head: str
    experiment: Any
    state: Any
    images: jax.Array
    targets: jax.Array
    batches: list[jax.Array]
    key: jax.Array
    lower_s: float
    flops_per_step: float | None
    lowered: Any = None  # jax.stages.Lowered until compiled, then dropped
    compiled: Any = None
    compile_s: float | None = None
    compile_window: tuple[float, float] | None = None  # start, end (s since the first lowering)
    error: str | None = None
    steps_done: int = 0
    depthwise: str | None = None  # DepthwiseConv2d.implementation; None: the backbone has none


def depthwise_field(depthwise: str | None) -> dict[str, str]:
    """The records' `depthwise` field: present only for a backbone with depthwise convolutions."""
    return {"depthwise": depthwise} if depthwise else {}


def depthwise_variants(models: Sequence[str],
                       implementations: str) -> dict[str, list[str | None]]:
    """Per backbone, the depthwise implementations to build it with (the comma-separated
    `implementations`), or [None] for a backbone without depthwise convolutions."""
    return {model: csv(implementations) if has_depthwise_convs(model) else [None]
            for model in models}


def has_depthwise_convs(model: str) -> bool:
    """Whether backbone `model` has DepthwiseConv2d layers (built abstractly; False for a name
    the registry does not know, which build_variant then reports)."""
    from flax import nnx

    from annotate.models import create_model
    from annotate.models.layers import DepthwiseConv2d

    try:
        abstract = nnx.eval_shape(lambda: create_model(model, NUM_CLASSES))
    except ValueError:
        return False
    return any(isinstance(node, DepthwiseConv2d) for _, node in nnx.iter_graph(abstract))


def train_config(model: str, dtype: str, res: int, batch: int, head: str = "linear") -> Any:
    """The seed's recipe (configs/base.py) with ASL and Adam at this backbone, head, dtype, size
    and batch."""
    from configs import base

    config = base.get_config(model=model, loss="asl")
    config.model.head = head
    config.model.dtype = dtype
    config.data.image_size = res
    config.train.batch_size = batch
    return config


def build_variant(model: str, dtype: str, res: int, batch: int, steps_per_call: int,
                  batches_on_device: int, mesh: Any, head: str = "linear",
                  depthwise: str | None = None) -> TrainVariant:
    """Create the experiment and state, put `batches_on_device` batches of random uint8 images
    and multi-hot targets on the devices, and lower the train steps (K = `steps_per_call` per
    call, depthwise convolutions as `depthwise`) for them."""
    from annotate import devices, train as training
    from annotate.models.layers import depthwise_implementation

    config = train_config(model, dtype, res, batch, head)
    with depthwise_implementation(depthwise):  # a fresh jit of a fresh partial: traced below
        experiment, state = training.create_experiment(config, NUM_CLASSES, 10_000, mesh)
    rng = np.random.default_rng(0)
    count = batch * batches_on_device
    images = devices.put(rng.integers(0, 256, (count, res, res, 3), dtype=np.uint8),
                         experiment.replicated)
    targets = devices.put((rng.random((count, NUM_CLASSES)) < LABEL_DENSITY).astype(np.float32),
                          experiment.replicated)
    order = rng.permutation(count).astype(np.int32)
    # call i takes batches i*K .. i*K+K-1 (cycling), so K=1 and K=10 see the same batches
    batches = [devices.put(np.stack([order[(j % batches_on_device) * batch:][:batch]
                                     for j in range(i * steps_per_call,
                                                    (i + 1) * steps_per_call)]),
                           experiment.steps_sharding)
               for i in range(batches_on_device)]
    key_data = devices.put(np.asarray(jax.random.key_data(jax.random.key(0))),
                           experiment.replicated)
    key = jax.random.wrap_key_data(key_data)
    start = time.perf_counter()
    with depthwise_implementation(depthwise):
        lowered = experiment.train_steps.lower(state, images, targets, batches[0], key)
    return TrainVariant(model, dtype, batch, res, steps_per_call, head, experiment, state, images,
                        targets, batches, key, time.perf_counter() - start,
                        flops_per_step(lowered), lowered, depthwise=depthwise)


def compile_variant(variant: TrainVariant, origin: float) -> TrainVariant:
    """Compile the lowered step in place (run in a worker thread; XLA releases the GIL); record
    when it ran relative to `origin` (a perf_counter value) to show that compiles overlap."""
    start = time.perf_counter()
    try:
        variant.compiled = variant.lowered.compile()
    except Exception as error:  # one variant failing (e.g. out of memory) must not stop the rest
        variant.error = f"{type(error).__name__}: {error}"
    variant.lowered = None
    variant.compile_s = time.perf_counter() - start
    variant.compile_window = (start - origin, start - origin + variant.compile_s)
    return variant


def run_steps(variant: TrainVariant, calls: int) -> jax.Array:
    """`calls` calls of K train steps each, carrying the (donated) state as in training, cycling
    through the on-device batches; blocks until they finish and returns the last loss."""
    losses = None
    for _ in range(calls):
        batch = variant.batches[variant.steps_done // variant.steps_per_call
                                % len(variant.batches)]
        variant.state, losses = variant.compiled(variant.state, variant.images, variant.targets,
                                                 batch, variant.key)
        variant.steps_done += variant.steps_per_call
    return jax.block_until_ready((variant.state, losses))[1][-1]


def calls_for(steps: int, steps_per_call: int) -> int:
    """Calls of K steps that cover at least `steps` steps (at least one)."""
    return max(1, -(-steps // steps_per_call))


def time_variant(variant: TrainVariant, warmup: int, steps: int, repeats: int) -> list[float]:
    """Seconds per train step of each of `repeats` timings of about `steps` steps (rounded up to
    whole calls of K), after `warmup` steps."""
    run_steps(variant, calls_for(warmup, variant.steps_per_call))
    calls = calls_for(steps, variant.steps_per_call)
    times, loss = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        loss = run_steps(variant, calls)
        times.append((time.perf_counter() - start) / (calls * variant.steps_per_call))
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"{variant.model} {variant.dtype}: non-finite loss {float(loss)}")
    return times


def profile_variant(variant: TrainVariant, steps: int, directory: Path) -> dict[str, Any]:
    """A jax.profiler trace of `steps` calls of K train steps (each blocked on, so the per-call
    figures are one call's) and the compiled HLO beside it, summarised as a JSON record."""
    name = (f"{variant.model}{'' if variant.head == 'linear' else '_' + variant.head}"
            f"{'_dw-' + variant.depthwise if variant.depthwise else ''}_"
            f"{variant.dtype}_{variant.res}px_b{variant.batch}_k{variant.steps_per_call}")
    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(directory / f"{name}.hlo.txt.gz", "wt") as handle:
        handle.write(variant.compiled.as_text())
    profile = profile_calls(lambda: run_steps(variant, 1), steps, directory / name)
    return {"what": "train_profile", "model": variant.model, "head": variant.head,
            "dtype": variant.dtype, "batch": variant.batch, "res": variant.res,
            "steps_per_call": variant.steps_per_call, **depthwise_field(variant.depthwise),
            **profile, **device_info()}


def flops_per_step(lowered: Any) -> float | None:
    """FLOPs of one train step: XLA's cost analysis of the lowered (not yet compiled) call. Before
    compilation every convolution is still an HLO convolution, so the count is the same on every
    backend; the GPU's compiled module hides them in cuDNN custom calls, which its cost analysis
    does not count. The scan's loop body is counted once, i.e. one step whatever K."""
    flops = first_cost(lowered.cost_analysis()).get("flops")
    return float(flops) if flops else None


def train_record(variant: TrainVariant, step_times: list[float]) -> dict[str, Any]:
    """The JSON record of a timed variant (seconds per step of each repeat): throughput, FLOPs,
    memory, compile time."""
    step_s = float(np.median(step_times))
    flops = variant.flops_per_step
    params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variant.state.params))
    return {"what": "train_throughput", "model": variant.model, "head": variant.head,
            "dtype": variant.dtype, "batch": variant.batch, "res": variant.res,
            "steps_per_call": variant.steps_per_call, **depthwise_field(variant.depthwise),
            "params": params,
            "img_per_s": variant.batch / step_s, "step_ms": 1000 * step_s,
            "spread": [min(step_times) / step_s, max(step_times) / step_s],
            "lower_s": variant.lower_s, "compile_s": variant.compile_s,
            "compile_window_s": variant.compile_window,
            "train_flops_per_img": flops / variant.batch if flops else None,
            "achieved_tflop_per_s": flops / step_s / 1e12 if flops else None,
            **memory_fields(variant.compiled), **device_memory(), **device_info()}


def train_error_record(model: str, dtype: str, batch: int, res: int, steps_per_call: int,
                       error: str, head: str = "linear",
                       depthwise: str | None = None) -> dict[str, Any]:
    """The JSON record of a variant that could not be built, compiled or timed."""
    return {"what": "train_throughput", "model": model, "head": head, "dtype": dtype,
            "batch": batch, "res": res, "steps_per_call": steps_per_call,
            **depthwise_field(depthwise), "error": error, **device_info()}


def run_train(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Lower every model x dtype, compile them concurrently, then time them one at a time."""
    from annotate import devices

    mesh = devices.make_mesh()
    # dtype-major: every backbone's first dtype (bf16 by default) is timed before the second;
    # then K, so that K > 1 compiles after K = 1 and finds its convolutions already autotuned
    depthwise_by_model = depthwise_variants(csv(args.models), args.depthwise)
    variants_wanted = [(model, dtype, int(res), int(k), head, depthwise)
                       for dtype in csv(args.dtypes) for k in csv(args.steps_per_call)
                       for res in csv(args.res) for model in csv(args.models)
                       for head in csv(args.heads) for depthwise in depthwise_by_model[model]]
    workers = args.compile_workers or len(variants_wanted)
    profiled = set(csv(args.profile_models))
    records = []
    compile_start = time.perf_counter()
    futures: list[Future] = []
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        for model, dtype, res, k, head, depthwise in variants_wanted:  # tracing holds the GIL
            try:
                variant = build_variant(model, dtype, res, args.batch, k,
                                        args.batches_on_device, mesh, head, depthwise)
            except Exception as error:  # e.g. an unknown backbone: report it, build the rest
                record = train_error_record(model, dtype, args.batch, res, k,
                                            f"{type(error).__name__}: {error}", head, depthwise)
                emit(record)
                records.append(record)
                continue
            futures.append(pool.submit(compile_variant, variant, compile_start))
        variants = [future.result() for future in futures]
    futures.clear()  # the futures hold the variants too: drop them so each can be freed
    compile_wall_s = time.perf_counter() - compile_start
    emit({"what": "train_compile", "variants": len(variants), "workers": workers,
          "wall_s": compile_wall_s, "sum_compile_s": sum(v.compile_s for v in variants),
          "sum_lower_s": sum(v.lower_s for v in variants), **device_info()})
    while variants:
        variant = variants.pop(0)
        if variant.error is None:
            try:
                record = train_record(variant, time_variant(variant, args.warmup, args.steps,
                                                            args.repeats))
            except Exception as error:  # e.g. out of memory at run time: report, go on
                variant.error = f"{type(error).__name__}: {error}"
        if variant.error is not None:
            record = train_error_record(variant.model, variant.dtype, variant.batch, variant.res,
                                        variant.steps_per_call, variant.error, variant.head,
                                        variant.depthwise)
        emit(record)
        records.append(record)
        if args.profile_dir and variant.error is None and variant.model in profiled:
            try:
                record = profile_variant(variant, args.profile_steps, Path(args.profile_dir))
            except Exception as error:  # a profiler failure must not lose the timings
                record = {"what": "train_profile", "model": variant.model,
                          "dtype": variant.dtype, "error": f"{type(error).__name__}: {error}"}
            emit(record)
            records.append(record)
        del variant  # free this variant's state and data before timing the next
        gc.collect()
    return records


def run_flops(args: argparse.Namespace) -> list[dict[str, Any]]:
    """FLOPs per image of each backbone x dtype x size's train step, from the lowered step (no
    timing): the count for GPU records, whose compiled cost analysis omits the cuDNN
    convolutions. With --memory the step is also compiled for this backend's memory analysis."""
    from annotate import devices

    mesh = devices.make_mesh()
    depthwise_by_model = depthwise_variants(csv(args.models), args.depthwise)
    records = []
    for dtype in csv(args.dtypes):
        for res in csv(args.res):
            for model in csv(args.models):
                for head in csv(args.heads):
                    for depthwise in depthwise_by_model[model]:
                        variant = build_variant(model, dtype, int(res), args.batch, 1, 1, mesh,
                                                head, depthwise)
                        params = sum(int(np.prod(leaf.shape))
                                     for leaf in jax.tree.leaves(variant.state.params))
                        record = {"what": "train_flops", "model": model, "head": head,
                                  "dtype": dtype, "batch": args.batch, "res": int(res),
                                  **depthwise_field(depthwise), "params": params,
                                  "train_flops_per_img": variant.flops_per_step / args.batch,
                                  "lowered_on": device_info()["platform"], "jax": jax.__version__}
                        if args.memory:
                            record.update(memory_fields(variant.lowered.compile()),
                                          compiled_on=device_info()["platform"])
                        emit(record)
                        records.append(record)
    return records


def run_stream(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Images/s of the "stream" input pipeline (annotate.data.stream: grain threads decoding and
    resizing the encoded images) over `batches` batches of a random order, per thread count,
    start-up included."""
    from annotate import data
    from annotate.data import stream

    sources = data.split_sources(args.data, "train", source=args.source)
    order = np.random.default_rng(0).permutation(len(sources))
    rows = stream.local_rows(order, args.batch, [0], 1)[:args.batches * args.batch]
    records = []
    for res in csv(args.res):
        for threads in csv(args.threads):
            # timed from the iterator's creation: once the first batch is out, the prefetch
            # buffer (2 batches) already holds decoded images, so starting the clock there
            # would count work done before it; thread start-up is part of every epoch anyway
            start = time.perf_counter()
            batches = stream.decoded_batches(sources, rows, args.batch, int(res),
                                             num_threads=int(threads))
            count = sum(1 for _ in batches)
            seconds = time.perf_counter() - start
            record = {"what": "stream_throughput", "res": int(res), "batch": args.batch,
                      "threads": int(threads), "source": args.source,
                      "img_per_s": count * args.batch / seconds, "batches": count,
                      "cpu_count": os.cpu_count(), **device_info()}
            emit(record)
            records.append(record)
    return records


def run_compile_cache(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Wall seconds of one `python -m annotate.main` experiment run twice, in fresh processes that
    share one new persistent compilation cache (the second loads what the first compiled), once
    keeping every compilation (the apps' setting, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0)
    and once JAX's default (only those over 1 s); each run trains into a new workdir."""
    records = []
    for threshold in csv(args.thresholds):
        with tempfile.TemporaryDirectory(prefix="benchmark_compile_cache_") as scratch:
            env = dict(os.environ, XDG_CACHE_HOME=f"{scratch}/xdg",
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=threshold)
            env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the cache is XDG_CACHE_HOME's
            seconds = []
            for run in ("first", "second"):
                command = [sys.executable, "-m", "annotate.main", f"--config={args.config}",
                           f"--workdir={scratch}/{run}", *shlex.split(args.overrides)]
                start = time.perf_counter()
                done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True,
                                      text=True)
                seconds.append(time.perf_counter() - start)
                if done.returncode:
                    raise RuntimeError(f"{shlex.join(command)} failed: {done.stderr[-2000:]}")
        record = {"what": "compile_cache", "config": args.config, "overrides": args.overrides,
                  "min_compile_time_s": float(threshold), "first_run_s": seconds[0],
                  "second_run_s": seconds[1], "cpu_count": os.cpu_count(), **device_info()}
        emit(record)
        records.append(record)
    return records


def _random_like(tree: Any, seed: int = 0) -> Any:
    """`tree` with every floating leaf replaced by standard-normal draws of its shape, dtype and
    sharding: a stand-in for trained weights and Adam moments, whose float mantissas compress
    little (a fresh state's zero moments would compress to nothing)."""
    rng = np.random.default_rng(seed)  # numpy's draws: jax's threefry takes seconds on a CPU
    return jax.tree.map(
        lambda leaf: jax.device_put(rng.standard_normal(leaf.shape, np.float32).astype(leaf.dtype),
                                    leaf.sharding)
        if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf, tree)


def run_checkpoint(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Seconds per checkpoint save of the training loop's TrainState, as the loop saves it
    (annotate.checkpoints: packed, one array per dtype) and, for comparison, with orbax's zstd
    compression and as one orbax array per leaf (the format before): what blocks the loop (until
    the save returns), the whole save (until orbax has finished, the older checkpoint's deletion
    included), the process's CPU seconds over the whole save, and the checkpoint's bytes on
    disk. Medians over `saves` saves after an untimed one, each a new best (so each deletes the
    one before, as in an improving run); every save's whole time is kept (a shared disk's times
    vary by half)."""
    import orbax.checkpoint as ocp

    from annotate import checkpoints, train
    from annotate.devices import make_mesh

    def saver(folder: Path, variant: str, state: Any) -> tuple[Any, Callable[[int], None]]:
        """The manager and save(epoch) of a variant: "packed" (the loop's) or "leaves" (an
        orbax array per leaf, as before), "+zstd" for orbax's default compression."""
        compression = variant.endswith("+zstd")
        if variant.startswith("packed"):
            manager = checkpoints.checkpoint_manager(folder, compression=compression)
            return manager, lambda epoch: checkpoints.save_checkpoint(manager, epoch, state,
                                                                      float(epoch))
        manager = ocp.CheckpointManager(
            folder / "checkpoints", options=ocp.CheckpointManagerOptions(create=True,
                                                                         max_to_keep=1),
            item_handlers=ocp.PyTreeCheckpointHandler(use_compression=compression))
        return manager, lambda epoch: manager.save(epoch, args=ocp.args.PyTreeSave(state))

    mesh = make_mesh()
    records = []
    for model in csv(args.models):
        config = train_config(model, "bfloat16", 224, 32)
        _, state = train.create_experiment(config, NUM_CLASSES, 1000, mesh,
                                           load_pretrained=False)
        state = _random_like(state)
        leaves = jax.tree.leaves(state)
        state_bytes = sum(leaf.nbytes for leaf in leaves)
        for variant in csv(args.variants):
            blocking, whole, cpu, disk = [], [], [], []
            with tempfile.TemporaryDirectory(dir=args.dir or None) as folder:
                manager, save = saver(Path(folder), variant, state)
                save(0)  # untimed: compiles the packing, starts orbax's threads
                manager.wait_until_finished()
                for epoch in range(1, args.saves + 1):
                    cpu_start, start = time.process_time(), time.perf_counter()
                    save(epoch)
                    blocking.append(time.perf_counter() - start)
                    manager.wait_until_finished()
                    whole.append(time.perf_counter() - start)
                    cpu.append(time.process_time() - cpu_start)
                    disk.append(sum(path.stat().st_size for path in
                                    (Path(folder) / "checkpoints" / str(epoch)).rglob("*")
                                    if path.is_file()))
                manager.close()
            record = {"what": "checkpoint_save", "model": model,
                      "format": variant.split("+")[0],
                      "compression": "zstd" if variant.endswith("+zstd") else "none",
                      "arrays": len(leaves),  # packed: one per dtype
                      "arrays_saved": (len({leaf.dtype for leaf in leaves})
                                       if variant.startswith("packed") else len(leaves)),
                      "state_mb": state_bytes / 1e6,
                      "disk_mb": float(np.median(disk)) / 1e6, "saves": args.saves,
                      "save_blocking_s": float(np.median(blocking)),
                      "save_s": float(np.median(whole)), "save_s_each": whole,
                      "save_cpu_s": float(np.median(cpu)),
                      "cpu_count": os.cpu_count(), **device_info()}
            emit(record)
            records.append(record)
    return records


# --------------------------------------------------------------------------- WGAN

def random_chunk_inputs(pairs: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """wgan.train.chunk_inputs for K random images in [-1, 1]: the chunk `wgan_throughput`
    times (the precompile and the profile build the same one, so they hit the same cache)."""
    from wgan import train as wgan_train
    from wgan.models import IMAGE_HEIGHT, IMAGE_WIDTH

    images = np.asarray(jax.random.uniform(jax.random.key(1), (pairs, IMAGE_HEIGHT, IMAGE_WIDTH,
                                                               3), minval=-1.0, maxval=1.0))
    return wgan_train.chunk_inputs(wgan_train.image_keys(0, np.arange(pairs)), images)


def wgan_throughput(pairs: int, iterations: int = 5, *, width: int = 64,
                    compute_dtype: Any = jnp.float32, repeats: int = 2,
                    total_iterations: int = WGAN_RECIPE_ITERATIONS) -> dict[str, float]:
    """Time K=`pairs` pairs training `iterations` iterations on random images and extrapolate to
    the full recipe (init excluded, it is a one-off per chunk: reported as init_s).

    Returns pairs, compile_s, init_s, s_per_iteration, images_per_hour, hours_for_4500_images.
    """
    from wgan import train as wgan_train

    setup = wgan_train.WganSetup(width=width, compute_dtype=compute_dtype)
    init_keys, train_keys, images = random_chunk_inputs(pairs)
    init_times, train_times = [], []
    for _ in range(repeats + 1):  # the first round compiles
        start = time.perf_counter()
        state = jax.block_until_ready(wgan_train.init_pairs(setup, init_keys))
        init_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        jax.block_until_ready(wgan_train.train_pairs(setup, state, images, train_keys,
                                                     iterations))
        train_times.append(time.perf_counter() - start)
    s_per_iteration = float(np.median(train_times[1:])) / iterations
    images_per_hour = pairs * 3600.0 / (s_per_iteration * total_iterations)
    return {"pairs": pairs, "iterations": iterations,
            "compile_s": init_times[0] + train_times[0] - min(init_times[1:])
            - min(train_times[1:]),
            "init_s": float(np.median(init_times[1:])), "s_per_iteration": s_per_iteration,
            "images_per_hour": images_per_hour, "hours_for_4500_images": 4500 / images_per_hour}


# Operations that pass a tensor on unchanged in content (a view of the same weights).
_SAME_WEIGHTS = {"reshape", "transpose", "convert_element_type", "broadcast_in_dim", "copy",
                 "squeeze", "expand_dims", "rev"}
_READS = {"dot_general", "conv_general_dilated"}


def _sub_jaxprs(eqn: Any) -> list[Any]:
    """The jaxprs an equation calls (jit, custom_jvp/vjp, remat, cond branches...)."""
    subs = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else [value]:
            jaxpr = getattr(item, "jaxpr", item)
            if hasattr(jaxpr, "eqns") and hasattr(jaxpr, "invars"):
                subs.append(jaxpr)
    return subs


def count_weight_reads(jaxpr: Any, tracked: set[Any]) -> int:
    """How many matrix products of `jaxpr` read the weights `tracked` (jaxpr variables), through
    views of them (reshape, transpose, casts), into called jaxprs and scan bodies (times their
    length); a scan's carry that starts as the weights stays them (the updated weights)."""
    derived, reads = set(tracked), 0
    for eqn in jaxpr.eqns:
        uses = [not hasattr(v, "val") and v in derived for v in eqn.invars]
        name = eqn.primitive.name
        if name in _READS and any(uses):
            reads += 1
        elif name == "scan":
            body, consts = eqn.params["jaxpr"].jaxpr, eqn.params["num_consts"]
            reads += eqn.params["length"] * count_weight_reads(
                body, {body.invars[i] for i, used in enumerate(uses) if used})
            derived.update(eqn.outvars[i] for i in range(eqn.params["num_carry"])
                           if uses[consts + i])
        elif _sub_jaxprs(eqn):
            for sub in _sub_jaxprs(eqn):
                if len(sub.invars) == len(eqn.invars):
                    reads += count_weight_reads(
                        sub, {sub.invars[i] for i, used in enumerate(uses) if used})
        elif name in _SAME_WEIGHTS and any(uses):
            derived.update(eqn.outvars)
    return reads


def critic_loss_in_calls(setup: Any, calls: Sequence[int]) -> Callable[..., jax.Array]:
    """wgan.train.critic_loss with (fake, real, interpolate) split into consecutive critic calls
    of the sizes `calls` ((3,): the one batch-3 call it makes; (1, 1, 1): the seed's three
    batch-1 calls): (critic params, fake, real, mix weight) -> loss, for counting reads/FLOPs."""
    from flax import nnx

    from wgan import train as wgan_train

    def loss(params: Any, fake: jax.Array, real: jax.Array, mix_weight: jax.Array) -> jax.Array:
        critic = nnx.merge(setup.graphs[1], params)
        images = jnp.stack([fake, real, mix_weight * real + (1.0 - mix_weight) * fake])
        scores, penalty, first = [], 0.0, 0
        for size in calls:  # the call holding the interpolate also gives the penalty
            group = images[first:first + size]
            if first + size == 3:
                group_scores, penalty = wgan_train.scores_and_penalty(critic, group, size - 1)
            else:
                group_scores = critic(group)
            scores.append(group_scores)
            first += size
        scores = jnp.concatenate(scores)
        return scores[0] - scores[1] + setup.gradient_penalty_weight * penalty
    return loss


# Memory bandwidth by card (datasheet leads: H100 SXM 3.35 TB/s, H200 4.8 TB/s) for the bound.
CARD_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}
ADAM_BYTES_PER_PARAMETER = 24  # float32 parameter and both moments, each read and written


def wgan_bound(width: int = 64) -> dict[str, Any]:
    """What one pair-iteration of the recipe must do, from the traced program (jaxpr) of
    `pair_iteration`, whose operations the lowered StableHLO holds one for one (what XLA's
    optimisation then changes, only a device profile shows): reads of each network's weights (counted for a middle layer: per critic
    step, forward; the penalty's input-gradient pass; that pass's own derivative; the final
    backward; the generator step's critic, forward and input gradient; the generator, one
    batch-6 forward and its backward), the float32 bytes those reads and Adam's updates move,
    the FLOPs (XLA's count of the lowered step; the critic scan's body counted once per step),
    and the minutes for 4,500 images x 1,001 iterations at each card's bandwidth."""
    from flax import nnx

    from wgan import train as wgan_train

    setup = wgan_train.WganSetup(width=width)
    state = jax.eval_shape(lambda: wgan_train.init_pair(setup, jax.random.key(0)))
    image = jax.ShapeDtypeStruct((128, 192, 3), jnp.float32)
    iteration = lambda s, real, key: wgan_train.pair_iteration(setup, s, real, key)  # noqa: E731
    closed = jax.make_jaxpr(iteration)(state, image, jax.random.key(1))
    paths = [jax.tree_util.keystr(path)
             for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    invar = {path: closed.jaxpr.invars[i] for i, path in enumerate(paths)}

    def reads(path: str) -> int:
        return count_weight_reads(closed.jaxpr, {invar[path]})

    steps = setup.critic_steps
    critic_reads = reads(".critic['downs'][2]['kernel'].value")
    generator_reads = reads(".generator['ups'][1]['kernel'].value")
    count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))  # noqa: E731
    critic_params, generator_params = count(state.critic), count(state.generator)
    bytes_per_iteration = (critic_params * (ADAM_BYTES_PER_PARAMETER * steps + 4 * critic_reads)
                           + generator_params * (ADAM_BYTES_PER_PARAMETER + 4 * generator_reads))
    weight = jax.ShapeDtypeStruct((), jnp.float32)
    step_flops = first_cost(jax.jit(lambda c, f, r, w: jax.grad(wgan_train.critic_loss)(
        c, setup, f, r, w)).lower(state.critic, image, image, weight).cost_analysis())["flops"]
    seed_step_flops = first_cost(jax.jit(jax.grad(critic_loss_in_calls(setup, (1, 1, 1))))
                                 .lower(state.critic, image, image, weight)
                                 .cost_analysis())["flops"]
    flops = (first_cost(jax.jit(iteration).lower(state, image, jax.random.key(1))
                        .cost_analysis())["flops"] + (steps - 1) * step_flops)
    # the generator's share: the batch-6 forward whose vjp also runs the backward through the 5
    # critic steps' fakes (zero cotangents), against a batch-5 forward beside a batch-1 forward
    # and backward (one weight read more)
    flops_of = lambda function, *args: first_cost(  # noqa: E731
        jax.jit(function).lower(*args).cost_analysis())["flops"]
    generate = lambda params, noise: nnx.merge(setup.graphs[0], params)(noise)  # noqa: E731

    def generate_and_backward(params: Any, noise: jax.Array) -> Any:
        fakes, vjp = jax.vjp(lambda params: generate(params, noise), params)
        return vjp(jnp.zeros_like(fakes).at[-1].set(1.0))

    noise = lambda batch: jax.ShapeDtypeStruct((batch, setup.noise_dim), jnp.float32)  # noqa: E731
    generator_batched = flops_of(generate_and_backward, state.generator, noise(steps + 1))
    generator_split = (flops_of(generate, state.generator, noise(steps))
                       + flops_of(generate_and_backward, state.generator, noise(1)))
    total = WGAN_RECIPE_ITERATIONS * 4500
    return {"what": "wgan_bound", "width": width, "critic_params": critic_params,
            "generator_params": generator_params,
            "critic_reads_per_iteration": critic_reads,
            "critic_reads_per_critic_step": (critic_reads - 2) / steps,
            "generator_reads_per_iteration": generator_reads,
            "fewest": {"critic_reads_per_iteration": 4 * steps + 2,
                       "critic_reads_per_critic_step": 4, "generator_reads_per_iteration": 2},
            "bytes_per_pair_iteration": bytes_per_iteration,
            "flops_per_pair_iteration": float(flops),
            "flops_per_critic_step": float(step_flops),
            "flops_per_critic_step_seed_calls": float(seed_step_flops),
            "flops_generator_batched": float(generator_batched),
            "flops_generator_split": float(generator_split),
            "bound_minutes_4500_images": {card: bytes_per_iteration * total / bandwidth / 60
                                          for card, bandwidth in CARD_BANDWIDTH.items()}}


def precompile_wgan(variants: Sequence[tuple[int, str]], iterations: int,
                    width: int) -> dict[tuple[int, str], float]:
    """Compile the WGAN steps of all (K, dtype) concurrently into JAX's persistent compilation
    cache, lowered as wgan_throughput calls them, so that its own first call loads the executables
    instead of compiling the variants one after another. Returns compile seconds per variant."""
    from wgan import train as wgan_train

    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="benchmark_jax_cache_"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    def lower(pairs: int, dtype: str) -> list[Any]:
        setup = wgan_train.WganSetup(width=width, compute_dtype=jnp.dtype(dtype))
        init_keys, train_keys, images = random_chunk_inputs(pairs)
        init = wgan_train.init_pairs.lower(setup, init_keys)
        return [init, wgan_train.train_pairs.lower(setup, init.out_info, images, train_keys,
                                                   iterations=iterations)]

    def compile_all(lowered: list[Any]) -> float:
        start = time.perf_counter()
        for stage in lowered:
            stage.compile()
        return time.perf_counter() - start

    futures = {}
    with ThreadPoolExecutor(max_workers=max(len(variants), 1)) as pool:
        for pairs, dtype in variants:  # lowering holds the GIL; compiles overlap with it
            futures[(pairs, dtype)] = pool.submit(compile_all, lower(pairs, dtype))
    return {variant: future.result() for variant, future in futures.items()}


def profile_wgan(pairs: int, dtype: str, width: int, iterations: int,
                 directory: Path) -> dict[str, Any]:
    """A jax.profiler trace of one train_pairs call (K=`pairs`, `iterations` iterations) and its
    compiled HLO, summarised per iteration as a JSON record."""
    from wgan import train as wgan_train

    setup = wgan_train.WganSetup(width=width, compute_dtype=jnp.dtype(dtype))
    init_keys, train_keys, images = random_chunk_inputs(pairs)
    state = wgan_train.init_pairs(setup, init_keys)
    name = f"wgan_K{pairs}_{dtype}_w{width}"
    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(directory / f"{name}.hlo.txt.gz", "wt") as handle:
        handle.write(wgan_train.train_pairs.lower(setup, state, images, train_keys,
                                                  iterations=iterations).compile().as_text())
    holder = [state]

    def call() -> None:
        holder[0], saved = wgan_train.train_pairs(setup, holder[0], images, train_keys,
                                                  iterations)
        jax.block_until_ready(saved)

    call()  # compile (or load) outside the trace
    profile = profile_calls(call, 1, directory / name)
    profile["iterations_per_call"] = iterations
    return {"what": "wgan_profile", "pairs": pairs, "dtype": dtype, "width": width, **profile,
            **device_info()}


def run_wgan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """wgan_throughput at each K x compute dtype, extrapolated to the full 1001-iteration recipe
    (after compiling every variant concurrently, see precompile_wgan), then a profile of the first
    and the recipe's bound (wgan_bound: seconds of tracing, last so a timeout cuts it first).
    Variants run by ascending K, so that the process-wide peak of device memory each record
    carries is its own variant's."""
    seed_images_per_hour = 3600.0 / (SEED_WGAN_S_PER_ITERATION * WGAN_RECIPE_ITERATIONS)
    variants = sorted((int(pairs), dtype) for dtype in csv(args.dtypes) for pairs in csv(args.pairs))
    start = time.perf_counter()
    compile_record = {"what": "wgan_compile", "variants": len(variants)}
    try:
        compile_seconds = precompile_wgan(variants, args.iterations, args.width)
    except Exception as error:  # wgan/train.py's internals moved: each call compiles for itself
        compile_seconds = {}
        compile_record["error"] = f"precompile skipped: {type(error).__name__}: {error}"
    emit({**compile_record, "wall_s": time.perf_counter() - start, **device_info()})
    records = []
    for pairs, dtype in variants:
        record = {"what": "wgan_throughput", "pairs": pairs, "dtype": dtype,
                  "width": args.width, "timed_iterations": args.iterations,
                  "precompile_s": compile_seconds.get((pairs, dtype))}
        try:
            result = wgan_throughput(pairs, args.iterations, width=args.width,
                                     compute_dtype=jnp.dtype(dtype), repeats=args.repeats)
            record.update(result)
            record["speedup_vs_seed"] = result["images_per_hour"] / seed_images_per_hour
        except Exception as error:  # e.g. K too large for the device: report, go on
            record["error"] = f"{type(error).__name__}: {error}"
        record.update(device_memory())
        record.update(device_info())
        emit(record)
        records.append(record)
        gc.collect()
    if args.profile_dir and variants:
        pairs, dtype = variants[0]
        try:
            record = profile_wgan(pairs, dtype, args.width, args.iterations,
                                  Path(args.profile_dir))
        except Exception as error:  # a profiler failure must not lose the timings
            record = {"what": "wgan_profile", "pairs": pairs, "dtype": dtype,
                      "error": f"{type(error).__name__}: {error}"}
        emit(record)
        records.append(record)
    bound = wgan_bound(args.width)
    emit(bound)
    return records + [bound]


# --------------------------------------------------------------------------- report

def read_records(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """All JSON-object lines of the files (other lines, e.g. log output, are skipped)."""
    records = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    return records


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits if abs(value) >= 10 else max(digits, 2)}f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "-"


def report_table(records: Sequence[dict[str, Any]]) -> str:
    """A markdown table per backbone and resolution: JAX images/s per dtype (the best K, steps per
    call) beside PyTorch's (torch_reference.py "throughput" lines), the ratios, and the best WGAN
    throughput. Ratios are only meaningful when both lines come from the same run."""
    from annotate.reports import step_label

    jax_rate: dict[tuple[str, int, str], dict] = {}
    torch_rate: dict[tuple[str, int, str], float] = {}
    backbone = {}  # row label -> the backbone whose PyTorch lines it is compared with
    for record in records:
        if record.get("what") == "train_throughput" and record.get("img_per_s"):
            key = (step_label(record), record.get("res"), record["dtype"])
            # PyTorch runs the linear head only: another head is compared with nothing
            linear = record.get("head", "linear") == "linear"
            backbone[key[0]] = record["model"] if linear else key[0]
            if record["img_per_s"] > jax_rate.get(key, {}).get("img_per_s", 0):
                jax_rate[key] = record
        elif record.get("what") == "throughput" and record.get("img_per_s"):
            torch_rate[(record["model"], record.get("res"), record["mode"])] = record["img_per_s"]
    compared = {(backbone[label], res) for label, res, _ in jax_rate}
    rows = list(dict.fromkeys([k[:2] for k in jax_rate]
                              + [k[:2] for k in torch_rate if k[:2] not in compared]))
    lines = [] if not rows else [
        "| backbone | px | JAX bf16 img/s (K) | JAX fp32 img/s | torch bf16 | torch bf16+compile "
        "| torch fp32 | JAX bf16 / torch best bf16 | JAX fp32 / torch fp32 "
        "| JAX bf16 TFLOP/s | JAX bf16 GFLOP/img | JAX compile s (bf16) |",
        "| --- | ---: | " + " | ".join(["---:"] * 10) + " |"]
    for model, res in rows:
        bf16 = jax_rate.get((model, res, "bfloat16"), {})
        fp32 = jax_rate.get((model, res, "float32"), {})
        torch_model = backbone.get(model, model)
        torch_bf16 = torch_rate.get((torch_model, res, "bf16"))
        torch_compiled = torch_rate.get((torch_model, res, "bf16compile"))
        torch_fp32 = torch_rate.get((torch_model, res, "fp32"))
        flops = bf16.get("train_flops_per_img")
        steps = f" ({bf16.get('steps_per_call', 1)})" if bf16 else ""
        lines.append(
            f"| {model} | {res or '-'} | {_number(bf16.get('img_per_s'))}{steps} "
            f"| {_number(fp32.get('img_per_s'))} "
            f"| {_number(torch_bf16)} | {_number(torch_compiled)} | {_number(torch_fp32)} "
            f"| {_ratio(bf16.get('img_per_s'), torch_compiled or torch_bf16)}"
            f"{' (vs compile)' if torch_compiled and bf16.get('img_per_s') else ''} "
            f"| {_ratio(fp32.get('img_per_s'), torch_fp32)} "
            f"| {_number(bf16.get('achieved_tflop_per_s'), 1)} "
            f"| {_number(flops / 1e9 if flops else None, 1)} | {_number(bf16.get('compile_s'), 1)} |")
    wgan = [r for r in records if r.get("what") == "wgan_throughput" and r.get("images_per_hour")]
    seed = [r for r in records if r.get("what") == "wgan_seed_sequential"]
    if wgan:
        lines += ["", "| WGAN K | dtype | s/iteration | images/hour | hours for 4,500 "
                  "| vs seed 77 ms/it |" + (" vs seed measured |" if seed else ""),
                  "| ---: | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if seed else "")]
        for record in sorted(wgan, key=lambda r: -r["images_per_hour"]):
            measured = ""
            if seed:
                seed_per_hour = 3600.0 / seed[-1]["s_per_image_1001_its"]
                measured = f" {record['images_per_hour'] / seed_per_hour:,.0f}x |"
            lines.append(f"| {record['pairs']} | {record.get('dtype', '-')} "
                         f"| {record['s_per_iteration']:.4f} | {record['images_per_hour']:,.0f} "
                         f"| {record['hours_for_4500_images']:.2f} "
                         f"| {record.get('speedup_vs_seed', 0):,.0f}x |{measured}")
    for record in records:
        profiled = record.get("what") in ("train_profile", "wgan_profile")
        if profiled and record.get("device_threads") is not None:
            label = (f"{step_label(record)} {record.get('res')} px "
                     f"K={record.get('steps_per_call', 1)}"
                     if record.get("model") else f"WGAN K={record.get('pairs')}")
            lines += ["", f"Profile of {label} {record.get('dtype', '')}: "
                      f"{record['wall_ms_per_call']:.1f} ms wall per call, host dispatch "
                      f"{_number(record.get('host_dispatch_ms_per_call'), 2)} ms per call",
                      "| device thread | busy ms per call | top kernel families (ms per call) |",
                      "| --- | ---: | --- |"]
            for thread, busy in record["device_threads"].items():
                families = ", ".join(f"{name} {ms:.2f}" for name, ms in busy["top_families"][:5])
                lines.append(f"| {thread} | {busy['busy_ms_per_call']:.2f} | {families} |")
    errors = [r for r in records if r.get("error")]
    for record in errors:
        lines.append(f"\nERROR {record.get('what')} {record.get('model', record.get('pairs'))} "
                     f"{record.get('dtype', '')}: {record['error'][:300]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: `train`, `flops`, `stream`, `checkpoint`, `compile-cache`, `wgan`,
    `wgan-bound` or `report`, each with its options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="images/s of the full jitted train step")
    train.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated backbones")
    train.add_argument("--dtypes", default="bfloat16,float32", help="compute dtypes")
    train.add_argument("--res", default="448", help="comma-separated image sizes in pixels")
    train.add_argument("--heads", default="linear",
                       help="comma-separated heads (linear, ml_decoder, csra)")
    train.add_argument("--steps-per-call", default="1",
                       help="comma-separated K: train steps per dispatch (lax.scan)")
    train.add_argument("--batch", type=int, default=32, help="global batch size")
    train.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    train.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
    train.add_argument("--repeats", type=int, default=3, help="timed repeats (median taken)")
    train.add_argument("--batches-on-device", type=int, default=4,
                       help="distinct synthetic batches kept on the device")
    train.add_argument("--compile-workers", type=int, default=0,
                       help="concurrent compiles (0: one per variant)")
    train.add_argument("--profile-dir", default="",
                       help="after timing, trace --profile-steps steps with jax.profiler here "
                            "(plus the compiled HLO) and report the top device kernels")
    train.add_argument("--profile-models", default="tresnet_m",
                       help="comma-separated backbones to profile when --profile-dir is set")
    train.add_argument("--profile-steps", type=int, default=3, help="steps traced per profile")
    flops = commands.add_parser("flops", help="FLOPs per image of the train step (lowered HLO)")
    flops.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated backbones")
    flops.add_argument("--dtypes", default="bfloat16", help="compute dtypes")
    flops.add_argument("--res", default="448,224", help="comma-separated image sizes in pixels")
    flops.add_argument("--batch", type=int, default=32, help="global batch size")
    flops.add_argument("--heads", default="linear", help="comma-separated heads")
    for subcommand in (train, flops):
        subcommand.add_argument("--depthwise", default="taps",
                                help="comma-separated implementations of the depthwise "
                                     "convolutions (taps, grouped), each a variant of a backbone "
                                     "that has them")
    flops.add_argument("--memory", action="store_true",
                       help="also compile each step and add its memory analysis (temp, "
                            "argument, output bytes on this backend)")
    streaming = commands.add_parser("stream", help="images/s of the stream input pipeline")
    streaming.add_argument("--data", default="data/corel5k", help="dataset folder")
    streaming.add_argument("--source", default="folder", choices=("folder", "tfds"))
    streaming.add_argument("--res", default="448,224", help="comma-separated image sizes")
    streaming.add_argument("--batch", type=int, default=32, help="images per batch")
    streaming.add_argument("--batches", type=int, default=20, help="batches timed")
    streaming.add_argument("--threads", default="2,16", help="comma-separated decode threads")
    saving = commands.add_parser("checkpoint",
                                 help="seconds per checkpoint save of the training loop's state")
    saving.add_argument("--models", default="tresnet_m", help="comma-separated backbones")
    saving.add_argument("--variants", default="packed,leaves+zstd,packed+zstd,leaves",
                        help="comma-separated: packed (the loop's format) or leaves (an orbax "
                             "array per leaf, as before), +zstd for orbax's compression")
    saving.add_argument("--saves", type=int, default=7, help="saves timed (median taken)")
    saving.add_argument("--dir", default="", help="folder to save into (default: the temp dir)")
    cache = commands.add_parser("compile-cache",
                                help="seconds of an experiment's second run from the compilation "
                                     "cache, keeping every compilation or JAX's default")
    cache.add_argument("--config", default="configs/smoke.py", help="the experiment's config")
    cache.add_argument("--overrides", default="--config.data.image_size=16 "
                                              "--config.train.epochs=1",
                       help='its --config.* flags in one: --overrides="--config.a=1 ..."')
    cache.add_argument("--thresholds", default="0,1",
                       help="comma-separated JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS (the "
                            "apps' 0, JAX's default 1)")
    bound = commands.add_parser("wgan-bound",
                                help="the ML-WGAN recipe's weight reads, bytes, FLOPs, bound")
    bound.add_argument("--width", type=int, default=64, help="network width (seed: 64)")
    wgan = commands.add_parser("wgan", help="images/hour of the 1001-iteration ML-WGAN recipe")
    wgan.add_argument("--pairs", default="32,96", help="comma-separated K (pairs per chunk)")
    wgan.add_argument("--dtypes", default="bfloat16,float32",
                      help="compute dtypes of the convolutions")
    wgan.add_argument("--iterations", type=int, default=5, help="iterations per timed call")
    wgan.add_argument("--repeats", type=int, default=2, help="timed calls (median taken)")
    wgan.add_argument("--width", type=int, default=64, help="network width (seed: 64)")
    wgan.add_argument("--profile-dir", default="",
                      help="after timing, trace one call of the first K and dtype here "
                           "(plus its compiled HLO) and report the top device kernels")
    report = commands.add_parser("report", help="markdown table of JSON-line files")
    report.add_argument("files", nargs="+", help="files with our and torch_reference.py's lines")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the chosen command; print JSON lines, then the table; return the records."""
    args = parse_args(argv)
    if args.command == "report":
        records = read_records(args.files)
    elif args.command == "train":
        records = run_train(args)
    elif args.command == "flops":
        return run_flops(args)
    elif args.command == "stream":
        return run_stream(args)
    elif args.command == "checkpoint":
        return run_checkpoint(args)
    elif args.command == "compile-cache":
        return run_compile_cache(args)
    elif args.command == "wgan-bound":
        record = wgan_bound(args.width)
        emit(record)
        return [record]
    else:
        records = run_wgan(args)
    print("\n" + report_table(records), flush=True)
    return records


if __name__ == "__main__":
    main()
