"""What the command-line apps (annotate.main, annotate.predict, wgan.run) share: flags and config
overrides parsed into one-line errors, and Ctrl-C as one line and status 130.

A user error ends the app with `error: <cause>` on stderr and exit status 2, never a traceback:
an unknown config key (with ml_collections' did-you-mean hint), a value of the wrong type, a
missing config file, a config file that fails to run (its file and line named), a bad flag.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

USER_ERROR = 2
INTERRUPTED = 130
REDELIVERY_SECONDS = 0.05


def describe(error: object) -> str:
    """The text of an error line: an operating-system error as its cause and path ("Permission
    denied: runs/x", without errno and quotes), anything else as str()."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return str(error)


def fail(message: object) -> None:
    """End the app with `error: <message>` on one line (`describe`) and exit status 2. In a
    multi-process run the process ends at once (os._exit): the interpreter's teardown would
    wait at jax.distributed's shutdown barrier while the other processes wait in the next
    collective, all of them aborting minutes later; ended at once, the others fail within
    seconds."""
    text = " ".join(describe(message).split())
    print(f"error: {text}", file=sys.stderr)
    jax = sys.modules.get("jax")  # cli stays jax-free: only a run that imported jax can be joined
    if jax is not None and jax.distributed.is_initialized():
        _exit_at_once(USER_ERROR)
    sys.exit(USER_ERROR)


def _override_named(argv: Sequence[str], key: str) -> str | None:
    """The --config.* argument whose dotted path contains `key` (the one an error is about)."""
    for argument in argv:
        path = argument.split("=", 1)[0]
        if path.startswith("--config.") and key in path[len("--config."):].split("."):
            return argument
    return None


def unexpected_arguments(arguments: Sequence[str],
                         examples: str = "--config.train.epochs=5; a boolean flag none: "
                                         "--evaluate, --noevaluate") -> str:
    """The one-line error for words on the command line that are not flags (a flag's value
    given after a space, such as `--evaluate true`); `examples` are the app's own flags."""
    return (f"unexpected argument{'s' * (len(arguments) > 1)} {' '.join(arguments)!r}: a flag "
            f"takes its value after '=' ({examples})")


def _innermost(error: BaseException) -> object:
    """The text an error wraps, unwrapped from ml_collections' AttributeError(KeyError(text))."""
    cause: object = error
    while isinstance(cause, BaseException) and cause.args:
        cause = cause.args[0]
    return cause


def _config_file(argv: Sequence[str]) -> str:
    """The --config file of the command line (what a config-file error is about)."""
    files = [argument.split("=", 1)[1] for argument in argv if argument.startswith("--config=")]
    return files[-1].split(":")[0] if files else "the config file"


def explain(error: BaseException, argv: Sequence[str]) -> str:
    """One readable line for a config or flag error."""
    if isinstance(error, AttributeError) and "has no attribute 'get_config'" in str(error):
        return (f"{_config_file(argv)} has no get_config() function (one that returns the "
                f"ml_collections.ConfigDict)")
    if isinstance(error, (AttributeError, KeyError)) and LOCKED_KEY in str(error):
        return _config_file_failure(error)  # the config file set a key base's config has not
    if isinstance(error, (AttributeError, KeyError)):
        lines = [line.strip() for line in str(_innermost(error)).splitlines() if line.strip()]
        # ml_collections' override of a key below a value: --config.train.epochs.x=1
        below_value = re.search(r"Attribute <class '(\w+)'>\.\S* does not exist.*Attempting to "
                                r"lookup: (\S+)", " ".join(lines))
        if below_value:
            kind, path = below_value.groups()
            flag = next((argument for argument in argv
                         if argument.split("=", 1)[0] == f"--config.{path}"), None)
            return (f"{flag + ': ' if flag else ''}the config has no key '{path}' "
                    f"({path.rsplit('.', 1)[0]} is a value of type {kind}, not a section)")
        key = lines[0].strip("'\"") if lines else "?"
        hint = f"; {lines[1]}" if len(lines) > 1 else ""
        flag = _override_named(argv, key)
        return f"{flag + ': ' if flag else ''}the config has no key '{key}'{hint}"
    text = str(error)
    missing = re.search(r"Attempted \[[^]]*\]:\s*(\S+)", text)
    if missing and "No such file" in text:
        return f"config file {missing.group(1)} not found"
    return text


def _config_file_failure(error: BaseException) -> str:
    """One line for a config file that raised while it ran: the error, and the file and line in
    the config file (the innermost frame outside the libraries that run it)."""
    if isinstance(error, SyntaxError):
        where = f"{error.filename}, line {error.lineno}"
    else:
        frames = [frame for frame in traceback.extract_tb(error.__traceback__)
                  if "site-packages" not in frame.filename and "<frozen" not in frame.filename
                  and not frame.filename.endswith("annotate/cli.py")]
        where = f"{frames[-1].filename}, line {frames[-1].lineno}" if frames else "?"
    message = error.msg if isinstance(error, SyntaxError) else str(error)
    if LOCKED_KEY in message:  # a misspelt key set on configs/base.py's locked config
        message = _locked_key_message(error)
    return f"the config file failed to load ({where}): {type(error).__name__}: {message}"


LOCKED_KEY = "cannot be added since the config is locked"  # ml_collections' error text


def _locked_key_message(error: BaseException) -> str:
    """ml_collections' error for a key set on a locked config, without its dump of the section's
    fields: the key, why, and its did-you-mean hint."""
    lines = [line.strip() for line in str(_innermost(error)).splitlines() if line.strip()]
    first = lines[0].split(" Other fields present")[0].rstrip(".")
    hint = next((line for line in lines if line.startswith("Did you mean")), "")
    return (f"{first} (the configs of configs/ are locked against misspelt keys; a new section "
            f"is added inside `with config.unlocked():`)" + (f"; {hint[0].lower()}{hint[1:]}"
                                                              if hint else ""))


PARSE_FAILURE = ": Error whilst parsing config file:"  # ml_collections' flag error


def _parse_failure(text: str) -> str | None:
    """One line for ml_collections' flag error for a get_config() that raised (a --config with
    arguments after ':', e.g. configs/base.py:resnet18): it carries the traceback as text; the
    line names the flag, the innermost frame outside the libraries and annotate (the config
    file's) and the exception."""
    if PARSE_FAILURE not in text or "Traceback" not in text:
        return None
    flag = text.split(PARSE_FAILURE, 1)[0]
    cause = [line.strip() for line in text.splitlines() if line.strip()][-1]
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep  # the checks it called
    frames = [(file, line) for file, line in re.findall(r'File "([^"]+)", line (\d+)', text)
              if "site-packages" not in file and "<frozen" not in file
              and not os.path.abspath(file).startswith(package)]
    where = f" ({frames[-1][0]}, line {frames[-1][1]})" if frames else ""
    hint = ("; the text after ':' in --config is passed to get_config() as its arguments"
            if cause.startswith("TypeError: get_config()") else "")
    return f"{flag}: the config file failed to load{where}: {cause}{hint}"


def _returned_none(argv: Sequence[str]) -> str:
    return f"get_config() of {_config_file(argv)} returned None; it must return the config"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with every flag or config error as one line and exit status 2."""
    try:
        remaining = flags.FLAGS(argv)
        if "config" in flags.FLAGS:
            if flags.FLAGS.config is None:
                fail(_returned_none(argv))
            flags.FLAGS.config.get  # a config file that failed to load raises here, not mid-run
        return remaining
    except flags.Error as error:
        if "--config must have a value other than None" in str(error):
            given = any(argument.split("=")[0] == "--config" for argument in argv[1:])
            fail(_returned_none(argv) if given else
                 "--config is required: the experiment's config file, e.g. "
                 "--config=configs/smoke.py")
        fail(_parse_failure(str(error)) or error)
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as error:
        fail(explain(error, argv))
    except Exception as error:  # whatever the config file's own code raised
        fail(_config_file_failure(error))


RESUMES = "what was completed is kept (a rerun of the same command resumes)"


def run(main: Callable[[list[str]], None], define_flags: Callable[[], None], *,
        interrupted: str = RESUMES) -> None:
    """Define the app's flags and `app.run(main)`, with one-line flag and config errors (a config
    flag with a default file applies the command line's overrides while being defined) and
    Ctrl-C, or SIGTERM, as one line: "interrupted; <interrupted>", what the app keeps."""
    try:
        define_flags()
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as error:
        fail(explain(error, sys.argv))
    except Exception as error:
        fail(_config_file_failure(error))
    sys.unraisablehook = redeliver_interrupts(sys.unraisablehook)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # not one a parent chose to ignore
        signal.signal(signal.SIGTERM, terminate_as_interrupt)
    try:
        app.run(main, flags_parser=parse_flags)
    except KeyboardInterrupt:  # the apps have already waited for their checkpoint or image saves
        print(f"interrupted; {interrupted}", file=sys.stderr)
        # no interpreter teardown: a Ctrl-C during the first compilation leaves XLA compiling in
        # its own threads, and tearing Python down under them segfaults (status 139)
        _exit_at_once(INTERRUPTED)


_TERMINATED: list[int] = []  # SIGTERM once it arrived: what redeliver_interrupts signals again


def terminate_as_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM (`timeout`, `docker stop`, a cluster's preemption) taken as a Ctrl-C: the apps
    complete the checkpoint or images being saved and keep what a Ctrl-C keeps."""
    _TERMINATED[:] = [signum]
    raise KeyboardInterrupt


def redeliver_interrupts(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """`hook` (a sys.unraisablehook), except that a Ctrl-C or SIGTERM which landed where Python
    cannot raise it is signalled again (the same signal: a background job ignores SIGINT): JAX
    runs Python code inside the garbage collector (its gc callback), and a KeyboardInterrupt
    raised there is printed and dropped, the run going on."""
    def unraisable(info: Any) -> None:
        if isinstance(info.exc_value, KeyboardInterrupt):  # signalled again a moment later from
            # another thread: raised in the main thread once it runs ordinary code again
            signum = _TERMINATED[0] if _TERMINATED else signal.SIGINT
            threading.Timer(REDELIVERY_SECONDS, os.kill, (os.getpid(), signum)).start()
            return
        hook(info)

    return unraisable


def _exit_at_once(status: int) -> None:
    """Flush the output and exit with `status` without the interpreter's teardown (os._exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
