"""Train and evaluate from the command line.

    python -m annotate.main --config=configs/tresnet_asl.py [--workdir=runs/tresnet_asl]
        [--config.train.epochs=5 ...] [--evaluate]

The default workdir is runs/<config file name>. Rerunning a command resumes from the workdir's
latest checkpoint; --evaluate only evaluates the workdir's best checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import jax
import ml_collections
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from annotate import checkpoints, cli, data, reports, train
from annotate.config import dataset_to_fetch, validate_config
from annotate.data import fetch
from annotate.devices import (enable_compilation_cache, initialize_distributed,
                              is_out_of_memory)
from annotate.workdir import WorkdirError, WorkdirLock, require_folder

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Register the flags; done only when run as a program, so importing this module is harmless."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tresnet_asl.py.",
                                    lock_config=True, flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "Output folder (default: runs/<config file name>).",
                        flag_values=flag_values)
    flags.DEFINE_bool("evaluate", False, "Evaluate the best checkpoint of --workdir, do not train.",
                      flag_values=flag_values)
    # a multi-process run (--config.distributed=True); unset: detected (SLURM, Open MPI, ...)
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "Number of processes of the run.",
                         flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).",
                         flag_values=flag_values)
    flags.DEFINE_integer("initialization_timeout", 300, "Seconds a process waits for the "
                         "coordinator and the other processes.", flag_values=flag_values)
    flags.mark_flags_as_required(["config"], flag_values=flag_values)


def default_workdir(config_path: str) -> Path:
    """runs/<config file stem>: configs/tresnet_asl.py -> runs/tresnet_asl."""
    return Path("runs") / Path(config_path.split(":")[0]).stem


def ensure_dataset(config: ml_collections.ConfigDict) -> None:
    """Fetch Corel-5k into data/corel5k on the first run of a config that names no dataset."""
    if (destination := dataset_to_fetch(config)) is not None:
        fetch.ensure_corel5k(destination)


def out_of_device_memory(error: BaseException, config: ml_collections.ConfigDict) -> str:
    """The error line of a run that ran out of device memory: the settings that use less,
    leaving out those already in effect, and which of them a rerun resumes with."""
    less = ["a smaller --config.train.eval_batch_size"]
    if config.model.dtype != "bfloat16":
        less.append("--config.model.dtype=bfloat16")
    if config.data.pipeline != "stream":
        less.append("--config.data.pipeline=stream (the dataset off the device)")
    process = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
    return (f"{process}out of device memory ({str(error).splitlines()[0][:200]}); use less with "
            f"{', '.join(less)}, and a rerun resumes from the last checkpoint; or with a smaller "
            f"--config.train.batch_size, in a new --workdir once this one holds checkpoints")


def write_reports(workdir: Path, evaluation: train.Evaluation) -> None:
    """results.json, results.md, thresholds.json and the pictures of `evaluation`
    (annotate.reports); the prediction picture shows the original test image files."""
    test = evaluation.test
    files = [Path(evaluation.config.data.root) / "images" / name for name in test.image_names]
    images = files if all(path.is_file() for path in files[:16]) else test.images  # originals
    reports.write_reports(workdir, evaluation.results, evaluation.config, images, test.targets,
                          evaluation.test_probs, test.vocabulary, evaluation.num_train_images)


def main(argv: list[str]) -> None:
    """Parse flags, then train and evaluate (or only evaluate) into the workdir."""
    if len(argv) > 1:
        cli.fail(cli.unexpected_arguments(argv[1:]))
    absl_logging.set_verbosity(absl_logging.WARNING)  # libraries (orbax, jax) stay quiet
    logging.getLogger("annotate").setLevel(logging.INFO)  # epoch records
    config = FLAGS.config
    try:
        validate_config(config)
    except (ValueError, KeyError, AttributeError, TypeError) as error:  # a broken config: one line
        cli.fail(cli.explain(error, sys.argv))
    config_file = config_flags.get_config_filename(FLAGS["config"])
    workdir = Path(FLAGS.workdir) if FLAGS.workdir else default_workdir(config_file)
    try:
        require_folder(workdir)
        if FLAGS.evaluate:  # nothing to evaluate: said before any download
            checkpoints.require_checkpoint(workdir)
        ensure_dataset(config)
    except (data.DatasetError, OSError, WorkdirError) as error:  # OSError: a missing or
        cli.fail(error)  # unwritable data folder
    if config.distributed:
        try:
            initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id, FLAGS.initialization_timeout)
        except OSError as error:  # the coordinator's port taken, or no coordinator answering
            cli.fail(f"--config.distributed=True: {error}")
        except ValueError as error:  # no cluster detected, or flags that do not fit together
            cli.fail(f"--config.distributed=True: {error} (outside SLURM, Open MPI and the other "
                     f"clusters jax detects, give --coordinator_address=HOST:PORT, "
                     f"--num_processes and --process_id in [0, num_processes))")
    enable_compilation_cache()
    run = train.evaluate if FLAGS.evaluate else train.train_and_evaluate
    is_writer = jax.process_index() == 0  # one set of reports in a multi-process run
    with contextlib.ExitStack() as held:
        if is_writer:  # the run's own lock (train's, nested), held through the reports too
            try:
                held.enter_context(WorkdirLock(workdir))
            except (OSError, WorkdirError) as error:  # another run holds it
                cli.fail(error)
        try:
            evaluation = run(config, workdir)
        except (data.DatasetError, FloatingPointError, ImportError, OSError, ValueError,
                WorkdirError) as error:
            # the cause, named, without a traceback (an ImportError: a pretrained checkpoint's
            # optional reader, torch or timm, is missing; an OSError: a missing file, a
            # read-only workdir, a workdir under a file); checkpoints already written stay put
            cli.fail(error)
        except MemoryError as error:  # numpy's: a huge bootstrap or image size
            cli.fail(f"out of host memory ({type(error).__name__}: {str(error)[:200]}); "
                     f"checkpoints already written are kept: free memory or lower what the "
                     f"message names, then rerun (with --evaluate if the training finished)")
        except jax.errors.JaxRuntimeError as error:
            if is_out_of_memory(error):  # the checkpoints already written are kept
                cli.fail(out_of_device_memory(error, config))
            if jax.process_count() == 1:
                raise
            cli.fail(f"process {jax.process_index()}: a step shared with the other processes "
                     f"failed, most likely because another process stopped (its error names "
                     f"the cause): {str(error).splitlines()[0][:300]}")
        if is_writer:
            try:
                write_reports(workdir, evaluation)
            except OSError as error:  # a full disk, a folder in a report's place
                cli.fail(f"writing the reports into {workdir} failed ({cli.describe(error)}); "
                         f"its checkpoints are kept: make room and rerun the command with "
                         f"--evaluate to write them")
    if is_writer:
        mcc = evaluation.results["mcc"]
        print(f"{workdir}: per-class F1 {mcc['per_class_f1']:.3f}, per-image F1 "
              f"{mcc['per_image_f1']:.3f}, N+ {mcc['n_plus']} (MCC thresholds); see "
              f"{workdir}/results.md")


if __name__ == "__main__":
    cli.run(main, define_flags)
