"""Summarise several runs: mean +- sd over seeds for each configuration, in the seed's tables.

    python -m annotate.summarize runs/tresnet_asl_seed0 runs/tresnet_asl_seed1 ... [--json out.json]

Each workdir needs the config.json and results.json that `annotate.main` writes. Runs whose
configs differ only in `seed` (and in where their data and caches live, or in the option
sections of losses and heads they do not use) form one group; every
group gets the seed's precision / recall / F1 table and N+ table, each cell the mean +- sample
standard deviation over its runs. The markdown goes to stdout, the numbers (with every run's
value) optionally to a JSON file. Each run counts once: a workdir given twice, or two runs of one
group with the same seed (one run, not two samples), is refused, and so is a run resumed with
other settings (its config.until-epoch-N.json), which belongs to no one configuration.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from annotate import cli, reports
from annotate.config import LINEAR_HEAD_OPTIONS
from annotate.workdir import WorkdirError, changed_keys, flat_config, trained_configs

# config keys that do not make two runs different experiments
RUN_ONLY_KEYS = ("seed", "data.root", "data.cache_dir", "data.augmentation_dir",
                 # how the same images reach the same steps (tested to give the same results)
                 "data.source", "data.pipeline", "distributed", "train.eval_batch_size",
                 "train.log_every")
METRICS = ("per_image_precision", "per_image_recall", "per_image_f1", "per_class_precision",
           "per_class_recall", "per_class_f1", "n_plus")


def _experiment(config: dict[str, Any]) -> dict[str, Any]:
    """What makes runs one experiment: `config` without RUN_ONLY_KEYS and without the option
    sections of the losses and heads it does not use (config.loss.<other>, config.model.<other
    head>: a section added to the configs since an older run, or left at its defaults, does not
    make that run another experiment), nor the linear head's options under another head."""
    config = copy.deepcopy(config)
    for key in RUN_ONLY_KEYS:
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    for section, choice, default in (("loss", "name", None), ("model", "head", "linear")):
        options = config.get(section)
        if isinstance(options, dict):
            chosen = options.get(choice, default)
            for key in [key for key, value in options.items()
                        if isinstance(value, dict) and key != chosen]:
                del options[key]
    model = config.get("model")
    if isinstance(model, dict) and model.get("head", "linear") != "linear":
        for key in LINEAR_HEAD_OPTIONS:  # read by the linear head alone
            model.pop(key, None)
    return config


# what the summary reads from each file: config.json's to label a run, results.json's numbers
CONFIG_KEYS = (("model", "name"), ("loss", "name"), ("data", "image_size"), ("train", "epochs"))
RESULT_KEYS = tuple((kind, metric) for kind in ("fixed_0.5", "mcc") for metric in METRICS)


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; ValueError naming the file when it is not JSON or not an object."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def _check_keys(path: Path, content: dict[str, Any], keys: Sequence[tuple[str, ...]],
                numbers: bool) -> None:
    """ValueError naming `path` and the first of the nested `keys` it lacks (or, with `numbers`,
    whose value is not a number)."""
    for key in keys:
        node: Any = content
        for depth, part in enumerate(key, 1):
            if not isinstance(node, dict) or part not in node:
                where = "".join(f"[{k!r}]" for k in key[:depth])
                raise ValueError(f"{path} lacks {where}")
            node = node[part]
        if numbers and (isinstance(node, bool) or not isinstance(node, (int, float))):
            where = "".join(f"[{k!r}]" for k in key)
            raise ValueError(f"{path}: {where} is {node!r}, not a number")


def read_run(workdir: Path | str) -> dict[str, Any]:
    """A run's config.json and results.json: FileNotFoundError naming a missing file, ValueError
    naming a file that is not a JSON object or lacks what the summary reads, or a run resumed
    with settings other than those it started with (beyond RUN_ONLY_KEYS)."""
    workdir = Path(workdir)
    paths = {name: workdir / name for name in ("config.json", "results.json")}
    for name, path in paths.items():
        if not path.is_file():
            hint = "evaluate it first (annotate.main --evaluate)" if name == "results.json" else \
                "not a training workdir"
            raise FileNotFoundError(f"{path} not found: {hint}")
    config, results = (_json_object(path) for path in paths.values())
    _check_keys(paths["config.json"], config, CONFIG_KEYS, numbers=False)
    _check_keys(paths["results.json"], results, RESULT_KEYS, numbers=True)
    for epoch, earlier in trained_configs(workdir).items():  # a resume with other settings
        changed = changed_keys(_experiment(earlier), _experiment(config))
        if changed:
            raise ValueError(f"{workdir} was resumed after epoch {epoch} with other settings "
                             f"({', '.join(changed)}; config.until-epoch-{epoch}.json holds the "
                             f"earlier ones): not one configuration, so not a sample of one")
    return {"workdir": str(workdir), "config": config, "results": results}


def run_record(run: dict[str, Any]) -> dict[str, Any]:
    """One run as a JSON line: what it trained (model, loss, head, size, epochs, protocol, seed)
    and its test metrics at 0.5 and with MCC thresholds, with their intervals when recorded."""
    config, results = run["config"], run["results"]
    return {"what": "annotate_run", "workdir": run["workdir"], "label": _label(config),
            "seed": config.get("seed"), "model": config["model"]["name"],
            "head": config["model"].get("head", "linear"), "loss": config["loss"]["name"],
            "image_size": config["data"]["image_size"], "epochs": config["train"]["epochs"],
            "protocol": config.get("eval", {}).get("protocol", "seed"),
            **{key: results[key] for key in ("fixed_0.5", "mcc", "ci95", "best_epoch")
               if key in results}}


def _label(config: dict[str, Any]) -> str:
    model, train, data = config["model"], config["train"], config["data"]
    protocol = config.get("eval", {}).get("protocol", "seed")
    return (f"{model['name']} + {config['loss']['name']} ({model.get('head', 'linear')} head, "
            f"{data['image_size']} px, {train['epochs']} epochs, protocol {protocol})")


def _distinguished(labels: list[str], configs: list[dict[str, Any]]) -> list[str]:
    """`labels`, where several groups share one, followed by the config values that set those
    groups apart ("[train.learning_rate=0.001]")."""
    flats = [flat_config(config) for config in configs]
    result = []
    for label, flat in zip(labels, flats):
        peers = [other for other_label, other in zip(labels, flats) if other_label == label]
        differing = sorted(key for key in set().union(*peers)
                           if len({json.dumps(peer.get(key), sort_keys=True) for peer in peers}) > 1)
        result.append(label + (" [" + ", ".join(f"{key}={flat.get(key)!r}" for key in differing)
                               + "]" if len(peers) > 1 else ""))
    return result


def _stats(values: list[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=np.float64)
    sd = float(array.std(ddof=1)) if len(array) > 1 else None
    return {"mean": float(array.mean()), "sd": sd, "values": [float(v) for v in values]}


def _check_distinct(workdirs: Sequence[Path | str]) -> None:
    """ValueError when two of `workdirs` are one folder: a run counted twice would shrink the sd."""
    seen: dict[Path, int] = {}
    for position, workdir in enumerate(workdirs):
        first = seen.setdefault(Path(workdir).resolve(), position)
        if first != position:
            also = f" (also as {workdirs[first]})" if str(workdirs[first]) != str(workdir) else ""
            raise ValueError(f"workdir {workdir} is given twice{also}; each run counts once")


def summarise(workdirs: Sequence[Path | str]) -> list[dict[str, Any]]:
    """The runs of `workdirs` grouped by configuration (seed aside), with mean/sd/values of every
    metric at threshold 0.5 ("fixed_0.5") and with MCC thresholds ("mcc"). ValueError when a
    workdir is given twice or two runs of one group have the same seed (the same run, not another
    sample)."""
    return summarise_runs(read_runs(workdirs))


def read_runs(workdirs: Sequence[Path | str]) -> list[dict[str, Any]]:
    """`read_run` of each workdir; ValueError when one is given twice."""
    _check_distinct(workdirs)
    return [read_run(workdir) for workdir in workdirs]


def summarise_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`summarise` of runs already read (`read_runs`)."""
    groups: dict[str, dict[str, Any]] = {}
    for run in runs:
        shared = _experiment(run["config"])
        key = json.dumps(shared, sort_keys=True)
        group = groups.setdefault(key, {"label": _label(run["config"]), "config": shared,
                                        "runs": []})
        seed = run["config"].get("seed")
        twin = next((other for other in group["runs"] if other["config"].get("seed") == seed), None)
        if twin is not None:
            raise ValueError(f"{twin['workdir']} and {run['workdir']} are both seed {seed} of one "
                             f"configuration: the same run, not two samples; give each seed once")
        group["runs"].append(run)
    labels = _distinguished([group["label"] for group in groups.values()],
                            [group["config"] for group in groups.values()])
    summary = []
    for label, group in zip(labels, groups.values()):
        runs = group["runs"]
        summary.append({
            "label": label, "workdirs": [run["workdir"] for run in runs],
            "seeds": [run["config"].get("seed") for run in runs],
            **{kind: {metric: _stats([run["results"][kind][metric] for run in runs])
                      for metric in METRICS} for kind in ("fixed_0.5", "mcc")}})
    return summary


def markdown(summary: Sequence[dict[str, Any]]) -> str:
    """One section per group: the seed's P/R/F1 table and N+ table, cells mean ± sd."""
    lines = []
    for group in summary:
        seeds = ", ".join(str(seed) for seed in group["seeds"])
        lines += [f"### {group['label']}", "",
                  f"{len(group['seeds'])} run(s), seeds {seeds}; mean ± sd over runs.", "",
                  *reports.seed_tables(group["fixed_0.5"], group["mcc"],
                                       lambda stats, metric: reports.metric_cell(stats["values"],
                                                                                 metric)), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the markdown summary of the workdirs on the command line; 2 and one `error:` line
    for a missing, unreadable or repeated run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", help="training workdirs (config.json, results.json)")
    parser.add_argument("--json", help="also write the summary (with every run's value) here")
    parser.add_argument("--runs-jsonl",
                        help="also write one JSON line per run here: its config essentials and "
                             "the test metrics (for docs/measurements/)")
    args = parser.parse_args(argv)
    try:
        runs = read_runs(args.workdirs)
        summary = summarise_runs(runs)
    except (OSError, ValueError, WorkdirError) as error:  # unreadable, damaged, repeated
        print(f"error: {cli.describe(error)}", file=sys.stderr)
        return 2
    print(markdown(summary))
    try:
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        if args.runs_jsonl:
            Path(args.runs_jsonl).write_text("".join(json.dumps(run_record(run)) + "\n"
                                                     for run in runs))
    except OSError as error:  # a missing folder, a folder in the file's place, a full disk
        print(f"error: cannot write {error.filename or args.json or args.runs_jsonl}: "
              f"{error.strerror or error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
