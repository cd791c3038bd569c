"""annotate.cli through the three apps: a broken flag or config override is one line,
`error: ...`, exit status 2, never a traceback; the README's commands parse and validate."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys

import pytest
from absl import flags

from annotate import main
from annotate.config import validate_config
from modules import REPO


def run_app(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.mark.parametrize("module,args,message", [
    ("annotate.main", ["--config=configs/smoke.py", "--config.train.epoch=3"],
     '--config.train.epoch=3: the config has no key \'epoch\'; Did you mean "epochs" instead of '
     '"epoch"?'),
    ("annotate.main", ["--config=configs/smoke.py", "--config.eval.x=1"],
     "--config.eval.x=1: the config has no key 'x'"),
    ("annotate.main", ["--config=configs/smoke.py", "--config.train.epochs.x=1"],
     "--config.train.epochs.x=1: the config has no key 'train.epochs.x' (train.epochs is a value "
     "of type int, not a section)"),
    ("annotate.main", ["--config=configs/smoke.py", "--config.train.epochs=abc"],
     "flag --config.train.epochs=abc: invalid literal for int() with base 10: 'abc'"),
    ("annotate.main", ["--config=configs/nope.py"], "config file configs/nope.py not found"),
    ("annotate.main", ["--config=configs/smoke.py", "--config.train.learning_rate=-0.1"],
     "config.train.learning_rate = -0.1: must be positive"),
    ("wgan.run", ["--config.pairz=4"], "--config.pairz=4: the config has no key 'pairz'"),
    ("annotate.predict", ["--workdirr=x", "a.jpg"], "Unknown command line flag 'workdirr'"),
    ("annotate.main", ["--workdir=x", "--evaluate"],
     "--config is required: the experiment's config file, e.g. --config=configs/smoke.py"),
    ("annotate.main", ["--config=configs/smoke.py", "--evaluate", "true"],
     "unexpected argument 'true': a flag takes its value after '='"),
    ("annotate.predict", ["--workdir=x"], "give image files or folders to annotate"),
    # wgan's own flags named (folders that do not exist: nothing is written if it ran)
    ("wgan.run", ["--config=configs/wgan.py", "--config.data.root=/nonexistent-annotate-test",
                  "--config.out_dir=/nonexistent-annotate-test", "yes"],
     "unexpected argument 'yes': a flag takes its value after '=' (--config.pairs=32; a boolean "
     "one as --config.force=True)"),
])
def test_user_errors_are_one_line_with_status_2(module, args, message):
    done = run_app(module, *args)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("module", ["annotate.main", "wgan.run"])
@pytest.mark.parametrize("source,message", [
    ("import ml_collections\ndef get_config():\n    config = ml_collections.ConfigDict()\n"
     "    config.seed = undefined_name\n    return config\n",
     "the config file failed to load (CONFIG, line 4): NameError: name 'undefined_name' is not "
     "defined"),
    ("def get_config(:\n", "the config file failed to load (CONFIG, line 1): SyntaxError: "
                          "invalid syntax"),
    ("CONFIG = {}\n", "CONFIG has no get_config() function (one that returns the "
                     "ml_collections.ConfigDict)"),
    ("def get_config():\n    pass\n",
     "get_config() of CONFIG returned None; it must return the config"),
    # a misspelt key on base's locked config (it was ignored, the run trained 60 epochs)
    ("from configs import base\ndef get_config():\n    config = base.get_config()\n"
     "    config.train.epoch = 5\n    return config\n",
     'the config file failed to load (CONFIG, line 4): AttributeError: Key "epoch" does not '
     "exist and cannot be added since the config is locked (the configs of configs/ are locked "
     "against misspelt keys; a new section is added inside `with config.unlocked():`); did you "
     'mean "epochs" instead of "epoch"?'),
])
def test_a_config_file_that_fails_is_one_line_naming_the_cause(tmp_path, module, source, message):
    config = tmp_path / "broken_config.py"
    config.write_text(source)
    done = run_app(module, f"--config={config}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == "error: " + message.replace("CONFIG",
                                                                               str(config))
    assert "Traceback" not in done.stderr


def test_a_run_that_cannot_start_is_refused_before_any_decoding(tmp_path, corel5k_dir):
    """A workdir that is a file, an evaluation of a workdir without checkpoints, a batch that
    the devices cannot share or larger than the training split, a validation subset that leaves
    nothing to train on, a pretrained file that does not exist: one line, and no decoded cache
    (Corel-5k at 448 px is minutes of decoding); an evaluation leaves no new workdir either."""
    (tmp_path / "file").write_text("not a folder")
    two_devices = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    # an evaluation with nothing to evaluate says so before it would download Corel-5k
    no_dataset = {key: value for key, value in os.environ.items() if key != "COREL5K_DIR"}
    for args, env, message in [
            ([f"--workdir={tmp_path / 'file'}"], None,
             f"workdir {tmp_path / 'file'} is a file, not a folder"),
            ([f"--workdir={tmp_path / 'new'}", "--evaluate"], no_dataset,
             f"no checkpoint in {tmp_path / 'new' / 'checkpoints'}; train first"),
            ([f"--workdir={tmp_path / 'batch'}", "--config.train.batch_size=3"],
             two_devices, "config.train.batch_size = 3 must be a multiple of the device count 2"),
            ([f"--workdir={tmp_path / 'big'}", "--config.train.batch_size=4001",
              "--config.eval.protocol=validation"], None,
             "config.train.batch_size = 4001 exceeds the 4000 training images"),
            ([f"--workdir={tmp_path / 'held'}", "--config.eval.protocol=validation",
              "--config.eval.validation_size=4500"], None,
             "config.eval.validation_size = 4500: must be less than the 4500 training images of "
             f"{corel5k_dir.absolute() / 'train.json'} (at least one is left to train on)"),
            ([f"--workdir={tmp_path / 'weights'}",
              f"--config.model.pretrained={tmp_path / 'missing.pth'}"], None,
             f"pretrained checkpoint {tmp_path / 'missing.pth'} does not exist (expected a "
             f".pth/.pt/.bin/.safetensors file, an orbax directory or timm:<name>)")]:
        done = run_app("annotate.main", "--config=configs/smoke.py",
                       f"--config.data.cache_dir={tmp_path / 'cache'}", *args, env=env)
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "new").exists()


def test_a_pretrained_checkpoint_without_its_reader_is_one_line(tmp_path):
    """`make train` installs no torch or timm: asking for timm weights without them says so."""
    (tmp_path / "timm.py").write_text("raise ImportError('No module named timm')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = run_app("annotate.main", "--config=configs/smoke.py", f"--workdir={tmp_path / 'run'}",
                   "--config.model.pretrained=timm:resnet18",
                   f"--config.data.cache_dir={tmp_path / 'cache'}", env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: pretrained 'timm:resnet18' needs timm and torch installed (pip install timm torch)")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists()  # said before any decoding


def test_a_workdir_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    done = run_app("annotate.main", "--config=configs/smoke.py",
                   f"--workdir={tmp_path / 'file' / 'run'}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: Not a directory: {tmp_path / 'file' / 'run'}")


def _readme_commands() -> list[list[str]]:
    """Every `python -m annotate.main ...` and `make train ...` command of the README's code
    blocks, as argument lists without the optional [..] parts."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\[[^\]]*\]", "", line.split("#")[0]).strip()
            if line.startswith("python -m annotate.main"):
                commands.append(shlex.split(line)[3:])
            elif line.startswith("make train"):
                make = dict(part.split("=", 1) for part in shlex.split(line)[2:] if "=" in part)
                commands.append([f"--config={make.get('CONFIG', 'configs/tresnet_asl.py')}",
                                 *shlex.split(make.get("ARGS", ""))])
    for sentence in re.findall(r"`(make train[^`]*)`", text):  # inline examples
        make = dict(part.split("=", 1) for part in shlex.split(sentence)[2:] if "=" in part)
        commands.append([f"--config={make.get('CONFIG', 'configs/tresnet_asl.py')}",
                         *shlex.split(make.get("ARGS", ""))])
    return commands


def test_every_readme_training_command_parses_and_validates(monkeypatch):
    commands = _readme_commands()
    assert len(commands) >= 4
    for argv in commands:
        argv = [arg.replace("$seed", "0") for arg in argv]
        full_argv = ["main", *[arg.replace("configs/", f"{REPO}/configs/", 1) for arg in argv]]
        monkeypatch.setattr(sys, "argv", full_argv)  # config_flags reads overrides from sys.argv
        values = flags.FlagValues()
        main.define_flags(values)  # the app's own flags
        values(full_argv)
        config = validate_config(values.config)
        for arg in argv:  # each override took effect
            if arg.startswith("--config.") and "=" in arg:
                path, value = arg[len("--config."):].split("=", 1)
                node = config
                for part in path.split("."):
                    node = node[part]
                expected = ({"true": True, "false": False}[value.lower()]
                            if isinstance(node, bool) else type(node)(value))
                assert str(node) == value or node == expected, (arg, node)
        if "--config.train.epochs=5" in argv:
            assert (config.train.epochs, config.train.schedule_epochs) == (5, 6)


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    """Ctrl-C during a run: one line saying the completed work is kept, status 130, and the
    process ends at once (os._exit: no interpreter teardown under XLA's compiling threads)."""
    from annotate import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    def exit_at_once(code):
        raise SystemExit(code)

    monkeypatch.setattr(sys, "argv", ["app"])
    monkeypatch.setattr(cli.os, "_exit", exit_at_once)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    previous_term = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(SystemExit) as stopped:
            cli.run(interrupted, lambda: None)
        assert stopped.value.code == 130
        assert sys.unraisablehook.__qualname__ == "redeliver_interrupts.<locals>.unraisable"
        assert capsys.readouterr().err.strip() == (
            "interrupted; what was completed is kept (a rerun of the same command resumes)")
        assert signal.getsignal(signal.SIGTERM) is cli.terminate_as_interrupt  # SIGTERM: the same
        with pytest.raises(SystemExit):  # an app that keeps something else says what
            cli.run(interrupted, lambda: None, interrupted="the lines printed above are complete")
        assert capsys.readouterr().err.strip() == "interrupted; the lines printed above are complete"
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a parent's choice to ignore it is kept
        with pytest.raises(SystemExit):
            cli.run(interrupted, lambda: None)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous_term)


@pytest.mark.parametrize("sigint, raised", [
    ("signal.default_int_handler", "raise KeyboardInterrupt"),  # Ctrl-C, as in a terminal
    ("signal.SIG_IGN", "cli.terminate_as_interrupt(signal.SIGTERM, None)")])  # SIGTERM, nohup
def test_a_ctrl_c_dropped_inside_the_garbage_collector_is_delivered_again(sigint, raised):
    """JAX runs Python code in a gc callback; a KeyboardInterrupt raised there is printed and
    dropped by Python, and the run went on. cli's unraisable hook signals it again, so that it
    reaches the main code: the same signal, so a SIGTERM is not lost where SIGINT is ignored."""
    script = (
        "import gc, signal, sys, time\n"
        "from annotate import cli\n"
        f"signal.signal(signal.SIGINT, {sigint})\n"
        "signal.signal(signal.SIGTERM, cli.terminate_as_interrupt)\n"
        "sys.unraisablehook = cli.redeliver_interrupts(sys.unraisablehook)\n"
        "fired = []\n"
        "def callback(phase, info):\n"
        "    if not fired:\n"
        "        fired.append(phase)\n"
        f"        {raised}\n"
        "gc.callbacks.append(callback)\n"
        "try:\n"
        "    gc.collect()\n"
        "    time.sleep(10)\n"
        "    print('not interrupted')\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "interrupted", done.stderr[-2000:]
    assert "Exception ignored" not in done.stderr


@pytest.mark.parametrize("module,args,message", [
    ("annotate.main", ["--config=configs/smoke.py:resnet50"],
     "error: flag --config=configs/smoke.py:resnet50: the config file failed to load: "
     "TypeError: get_config() takes 0 positional arguments but 1 was given; the text after ':' "
     "in --config is passed to get_config() as its arguments"),
    ("wgan.run", ["--config=configs/wgan.py:4"],
     "error: flag --config=configs/wgan.py:4: the config file failed to load: TypeError: "
     "get_config() takes 0 positional arguments but 1 was given"),
    ("annotate.main", ["--config=configs/base.py:vgg16"],
     "error: flag --config=configs/base.py:vgg16: the config file failed to load "
     "(configs/base.py, line "),
])
def test_a_get_config_argument_that_fails_is_one_line_without_the_traceback(module, args,
                                                                             message):
    """The text after ':' in --config goes to get_config(); when that call raises, ml_collections
    puts the whole traceback into its flag error: the line keeps the flag, the config file's
    frame and the exception only."""
    done = run_app(module, *args)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "site-packages" not in done.stderr
