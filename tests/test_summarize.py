"""annotate.summarize: runs grouped by configuration (seed aside), mean ± sd against numpy."""
from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from annotate import summarize
from configs import base

METRICS = summarize.METRICS


def _write_run(workdir, *, loss: str, seed: int, scale: float, **train) -> dict:
    config = base.get_config(model="tresnet_m", loss=loss)
    config.seed = seed
    config.train.update(train)
    # where the data, its cache and the WGAN images live does not split a group
    config.data.root = f"/data/copy{seed}"
    config.data.cache_dir = f"/cache/{seed}"
    config.data.augmentation_dir = f"/wgan/{seed}"
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json_best_effort())
    results = {kind: {metric: (100 + seed if metric == "n_plus" else scale * (seed + 1) / 10)
                      for metric in METRICS} for kind in ("fixed_0.5", "mcc")}
    (workdir / "results.json").write_text(json.dumps(results))
    return results


def test_groups_by_config_and_averages_over_seeds(tmp_path, capsys):
    asl = [_write_run(tmp_path / f"asl{seed}", loss="asl", seed=seed, scale=1.0)
           for seed in (0, 1, 2)]
    _write_run(tmp_path / "bce0", loss="bce", seed=0, scale=0.5)
    out = tmp_path / "summary.json"
    workdirs = [str(tmp_path / name) for name in ("asl0", "bce0", "asl1", "asl2")]
    runs_file = tmp_path / "runs.jsonl"
    assert summarize.main(workdirs + ["--json", str(out), "--runs-jsonl", str(runs_file)]) == 0
    runs = [json.loads(line) for line in runs_file.read_text().splitlines()]
    assert [(r["loss"], r["seed"], r["protocol"]) for r in runs] == [
        ("asl", 0, "seed"), ("bce", 0, "seed"), ("asl", 1, "seed"), ("asl", 2, "seed")]
    assert runs[2]["mcc"] == asl[1]["mcc"]
    summary = json.loads(out.read_text())
    assert [group["seeds"] for group in summary] == [[0, 1, 2], [0]]
    assert summary[0]["label"].startswith("tresnet_m + asl (linear head, 448 px, 60 epochs")
    values = [run["mcc"]["per_class_f1"] for run in asl]
    stats = summary[0]["mcc"]["per_class_f1"]
    assert stats["values"] == values
    assert stats["mean"] == pytest.approx(np.mean(values))
    assert stats["sd"] == pytest.approx(np.std(values, ddof=1))
    assert summary[1]["fixed_0.5"]["n_plus"] == {"mean": 100.0, "sd": None, "values": [100.0]}
    text = capsys.readouterr().out
    assert ("| *testset* per-class metrics + MCC | 0.200 ± 0.100 | 0.200 ± 0.100 | "
            "0.200 ± 0.100 |") in text
    assert "| *testset* + MCC | 101.0 ± 1.0 |" in text
    assert "| *testset* + MCC | 100 |" in text  # one run's N+, a count


def test_groups_with_one_label_name_what_sets_them_apart(tmp_path):
    """Runs that differ only in how the data reaches the steps (pipeline, source) are one group;
    groups whose labels coincide say which config values differ."""
    _write_run(tmp_path / "a0", loss="asl", seed=0, scale=1.0, learning_rate=1e-3)
    _write_run(tmp_path / "a1", loss="asl", seed=1, scale=1.0, learning_rate=1e-3)
    config = json.loads((tmp_path / "a1" / "config.json").read_text())
    config["data"].update(pipeline="stream", source="tfds")
    (tmp_path / "a1" / "config.json").write_text(json.dumps(config))
    _write_run(tmp_path / "b0", loss="asl", seed=0, scale=1.0, learning_rate=2e-3, beta2=0.99)
    summary = summarize.summarise([tmp_path / name for name in ("a0", "a1", "b0")])
    assert [group["seeds"] for group in summary] == [[0, 1], [0]]
    assert summary[0]["label"].endswith(
        "protocol seed) [train.beta2=0.999, train.learning_rate=0.001]")
    assert summary[1]["label"].endswith(
        "protocol seed) [train.beta2=0.99, train.learning_rate=0.002]")


def test_missing_results_are_named(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    assert summarize.main([str(tmp_path / "run")]) == 2
    assert "results.json not found" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ('{"fixed_0.5": {}}', r"results.json lacks \['fixed_0.5'\]\['per_image_precision'\]$"),
    ("MCC", r"results.json lacks \['mcc'\]$"),
    ("{,}", r"results.json is not valid JSON: Expecting property name enclosed in double quotes: "
            r"line 1 column 2 \(char 1\)$"),
    ("[1, 2]", r"results.json holds a JSON list, not an object$"),
    ("\udcff garbage", r"results.json is not valid JSON: 'utf-8' codec can't decode byte 0xff"),
    ("N_PLUS", r"results.json: \['mcc'\]\['n_plus'\] is '101', not a number$")])
def test_malformed_results_are_one_line_naming_the_file(tmp_path, capsys, content, message):
    results = _write_run(tmp_path / "run", loss="asl", seed=0, scale=1.0)
    if content == "MCC":
        content = json.dumps({"fixed_0.5": results["fixed_0.5"]})
    elif content == "N_PLUS":
        content = json.dumps(dict(results, mcc=dict(results["mcc"], n_plus="101")))
    (tmp_path / "run" / "results.json").write_bytes(content.encode(errors="surrogateescape"))
    assert summarize.main([str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'run' / 'results.json'}")
    assert re.search(message, err.strip()), err


def test_a_workdir_given_twice_is_refused(tmp_path, capsys):
    for seed in (0, 1):
        _write_run(tmp_path / f"asl{seed}", loss="asl", seed=seed, scale=1.0)
    again = f"{tmp_path}/../{tmp_path.name}/asl0"  # the same folder, spelt otherwise
    assert summarize.main([str(tmp_path / "asl0"), str(tmp_path / "asl1"), again]) == 2
    assert capsys.readouterr().err == (f"error: workdir {again} is given twice (also as "
                                       f"{tmp_path / 'asl0'}); each run counts once\n")
    assert summarize.main([str(tmp_path / "asl1"), str(tmp_path / "asl1")]) == 2
    assert capsys.readouterr().err == (f"error: workdir {tmp_path / 'asl1'} is given twice; "
                                       f"each run counts once\n")
    same = tmp_path / "asl1"  # one object given twice, as a library call may
    with pytest.raises(ValueError, match="is given twice; each run counts once"):
        summarize.summarise([same, same])


def test_two_runs_of_one_seed_in_a_group_are_refused(tmp_path, capsys):
    """A copy of a run (or the same seed through another pipeline) is not another sample."""
    _write_run(tmp_path / "asl0", loss="asl", seed=0, scale=1.0)
    _write_run(tmp_path / "copy", loss="asl", seed=0, scale=1.0)
    _write_run(tmp_path / "bce0", loss="bce", seed=0, scale=1.0)  # another group: seed 0 is fine
    assert summarize.main([str(tmp_path / name) for name in ("asl0", "bce0", "copy")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'asl0'} and {tmp_path / 'copy'} are both seed 0 of one "
        f"configuration: the same run, not two samples; give each seed once\n")
    assert summarize.main([str(tmp_path / name) for name in ("asl0", "bce0")]) == 0


@pytest.mark.parametrize("option", ["--json", "--runs-jsonl"])
def test_an_output_file_that_cannot_be_written_is_one_line(tmp_path, capsys, option):
    _write_run(tmp_path / "run0", loss="asl", seed=0, scale=1.0)
    for target in (tmp_path / "missing" / "out.json", tmp_path):  # no folder; a folder
        assert summarize.main([str(tmp_path / "run0"), option, str(target)]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith(f"error: cannot write {target}: ")
        assert "Traceback" not in err


def test_a_damaged_earlier_config_or_an_unreadable_file_is_one_line(tmp_path, capsys,
                                                                    monkeypatch):
    """What read_run opens besides results.json (an earlier config.until-epoch-N.json) and an
    unreadable results.json end as one `error:` line naming the file, not a traceback."""
    _write_run(tmp_path / "run", loss="asl", seed=0, scale=1.0)
    (tmp_path / "run" / "config.until-epoch-1.json").write_text("{broken")
    assert summarize.main([str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path / 'run' / 'config.until-epoch-1.json'} is damaged")
    (tmp_path / "run" / "config.until-epoch-1.json").unlink()
    results, read_text = tmp_path / "run" / "results.json", Path.read_text

    def unreadable_results(path, *args, **kwargs):  # chmod 0 does not stop root, who runs CI
        if path == results:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable_results)
    assert summarize.main([str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"error: Permission denied: {results}\n"


def test_a_run_resumed_with_other_settings_is_refused_by_name(tmp_path, capsys):
    """A resume that changed the learning rate (write_config keeps the earlier config as
    config.until-epoch-N.json) trained two configurations: not a sample of either. A change of
    a run-only key (log_every) is not a change of experiment."""
    _write_run(tmp_path / "mixed", loss="asl", seed=0, scale=1.0)
    _write_run(tmp_path / "logged", loss="asl", seed=1, scale=1.0)
    for name, key, value in (("mixed", "learning_rate", 0.5), ("logged", "log_every", 3)):
        earlier = json.loads((tmp_path / name / "config.json").read_text())
        earlier["train"][key] = value
        (tmp_path / name / "config.until-epoch-2.json").write_text(json.dumps(earlier))
    assert summarize.main([str(tmp_path / "logged")]) == 0
    capsys.readouterr()
    assert summarize.main([str(tmp_path / "logged"), str(tmp_path / "mixed")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {tmp_path / 'mixed'} was resumed after epoch 2 with other "
                            f"settings (train.learning_rate; config.until-epoch-2.json")


def test_sections_of_unused_losses_and_heads_do_not_split_a_group(tmp_path):
    """An older run whose config.json lacks a head section added since (or holds other defaults
    for an unused loss) is the same experiment; the used loss's options still split groups."""
    _write_run(tmp_path / "old", loss="asl", seed=0, scale=1.0)
    _write_run(tmp_path / "new", loss="asl", seed=1, scale=1.0)
    _write_run(tmp_path / "clip", loss="asl", seed=2, scale=1.0)
    for name, edit in (("old", lambda c: c["model"].pop("csra")),
                       ("new", lambda c: c["loss"]["focal"].update(gamma=5.0)),
                       ("clip", lambda c: c["loss"]["asl"].update(clip=0.1))):
        config = json.loads((tmp_path / name / "config.json").read_text())
        edit(config)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    groups = summarize.summarise([tmp_path / name for name in ("old", "new", "clip")])
    assert [group["seeds"] for group in groups] == [[0, 1], [2]]
    assert groups[1]["label"].endswith("[loss.asl.clip=0.1]")


def test_the_linear_heads_options_split_only_linear_head_runs(tmp_path):
    """model.drop_rate and model.global_pool are read by the linear head alone: two ML-Decoder
    runs that differ in them are one experiment, two linear-head runs are two."""
    for head in ("ml_decoder", "linear"):
        for seed, drop_rate in ((0, 0.3), (1, 0.5)):
            workdir = tmp_path / f"{head}{seed}"
            _write_run(workdir, loss="asl", seed=seed, scale=1.0)
            config = json.loads((workdir / "config.json").read_text())
            config["model"].update(head=head, drop_rate=drop_rate)
            (workdir / "config.json").write_text(json.dumps(config))
    groups = summarize.summarise(sorted(tmp_path.iterdir()))
    assert [(group["workdirs"], group["label"].endswith("[model.drop_rate=0.5]"))
            for group in groups] == [([str(tmp_path / "linear0")], False),
                                     ([str(tmp_path / "linear1")], True),
                                     ([str(tmp_path / f"ml_decoder{seed}") for seed in (0, 1)],
                                      False)]
