"""A training workdir's bookkeeping: one run at a time (a lock), the config it was trained with,
and the checkpoints' fit to a config.

A run takes `<workdir>/.lock` (process id, host, start time) for its whole length; a second run on
the same workdir stops with one line, and a lock left by a dead process on this host is taken
over (the run holds the file's flock, which the kernel drops when the process dies, so a killed
run restarted in a container under its old pid is not mistaken for a live one); taking it also
deletes the hidden files of writes that a killed run left half done (write_atomically,
remove_abandoned_writes). config.json is
written once training starts and never by an evaluation; a resume or an evaluation whose config
differs from it where the checkpoints' shapes or meaning depend on it (SHAPE_KEYS, state_layout)
is refused.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import ml_collections

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
ATOMIC_WRITE = re.compile(r"\..+\.\d+-\d+\.tmp")  # the hidden file of write_atomically
ABANDONED_SECONDS = 3600.0  # without flock: a temporary file untouched this long was abandoned
FRESH_SECONDS = 60.0  # an empty temporary file this young may be a writer's between open and flock
TORN_LOCK_SECONDS = 10.0  # an unreadable lock older than this was left by a run that died
# what a checkpoint of the workdir only fits: the network, its head, the input size
SHAPE_KEYS = ("model.name", "model.head", "data.image_size")
# what an evaluation of the workdir must keep too: the protocol that chose its checkpoint and the
# images its thresholds are chosen on, the inputs' normalisation and the linear head's pooling
EVALUATION_KEYS = ("eval.protocol", "data.augmentation", "data.mean", "data.std")
LINEAR_HEAD_KEYS = ("model.global_pool",)  # read by the linear head alone
# and, under protocol "validation", which training images were held out
VALIDATION_KEYS = ("seed", "eval.validation_size")
# what a resumed training run must keep too: the steps per epoch; and a scheduled one's length in
# steps (a longer or shorter OneCycle would jump mid-run; a constant learning rate has no length)
RESUME_KEYS = ("train.batch_size",)
SCHEDULE_KEYS = ("train.schedule_epochs",)


def state_layout(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """What a checkpoint holds besides the model's variables, under the config key that decides
    it: the optimizer's state (AdamW; Adam with or without its coupled weight-decay step; a
    scheduled learning rate and a cycled beta1 each keep a step count) and whether EMA averages
    are kept. A change of these keys' values within one layout is allowed."""
    optimizer = _value(config, "train.optimizer")
    scheduled = _value(config, "train.schedule") != "constant"
    return {"train.optimizer": optimizer,
            "train.weight_decay": optimizer == "adam" and bool(_value(config, "train.weight_decay")),
            "train.schedule": scheduled,
            "train.cycle_momentum": scheduled and bool(_value(config, "train.cycle_momentum")),
            "train.ema_decay": (_value(config, "train.ema_decay") or 0) > 0}


class WorkdirError(Exception):
    """A workdir that cannot be used as asked: busy, trained with another config, or its
    checkpoints do not fit."""


class CheckpointSaveError(WorkdirError):
    """A checkpoint could not be written (a full disk, a read-only folder)."""


class CheckpointMismatchError(WorkdirError):
    """A checkpoint holds other arrays or shapes than the model it is restored into."""


def require_folder(workdir: Path) -> None:
    """Refuse a workdir path that names an existing file."""
    if Path(workdir).exists() and not Path(workdir).is_dir():
        raise WorkdirError(f"workdir {workdir} is a file, not a folder")


def is_abandoned(temporary: Path) -> bool:
    """Whether the file `temporary`, written under its writer's flock, was left by a process that
    was killed: it exists and no process holds its flock (the kernel drops it when its holder
    dies, whatever the pid namespace), unless it is empty and younger than FRESH_SECONDS (its
    writer, which takes the flock before it writes, may be between its open and its flock);
    without flock, untouched for ABANDONED_SECONDS."""
    try:
        with open(temporary, "rb") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its writer is running
                return False
            except OSError:  # no flock on this file system: its age tells
                return time.time() - os.fstat(file.fileno()).st_mtime > ABANDONED_SECONDS
            stat = os.fstat(file.fileno())  # closing the file releases the probe's flock
            return stat.st_size > 0 or time.time() - stat.st_mtime > FRESH_SECONDS
    except FileNotFoundError:  # renamed or deleted meanwhile
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class WorkdirLock:
    """Exclusive use of a workdir for the length of a `with` block (process 0 of a run only).

    The lock file holds the run's record (pid, host, start) and the run holds the file's flock,
    which the kernel drops when the process dies. A lock file whose flock is free was left by a
    run that died: it is taken over in place, under its flock, never deleted and created again
    (two runs taking over one dead run's lock at once cannot both win). Where the file system
    has no flock, the process id tells whether a holder on this host runs (and two runs taking
    over at once could both win). `flag` is the option that picks another folder, for the
    refusals. A thread that holds the lock may take it again (a nested block, as the app's around
    train_and_evaluate's own, held through the reports); it is released when the outer one ends.
    """

    _held: dict[tuple[str, int], int] = {}  # (lock file, thread) -> blocks holding it

    def __init__(self, workdir: Path, flag: str = "--workdir"):
        self.path, self.flag = Path(workdir) / LOCK_NAME, flag
        self.record = {"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def __enter__(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.holder_key = (os.path.realpath(self.path), threading.get_ident())
        if self.holder_key in self._held:  # this thread holds it: a nested block
            self._held[self.holder_key] += 1
            return self
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
                created = True
            except FileExistsError:
                try:
                    descriptor = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:  # released meanwhile: create it
                    continue
                created = False
            self.file = os.fdopen(descriptor, "r+")
            try:
                if self._hold(created):
                    break
            except BaseException:
                self.file.close()
                raise
            self.file.close()  # the file was released and unlinked meanwhile: again
        else:
            raise WorkdirError(f"{self.path.parent}: could not take its lock {self.path}")
        self.file.seek(0)
        self.file.truncate()
        json.dump(self.record, self.file)
        self.file.flush()
        for abandoned in remove_abandoned_writes(self.path.parent):
            log.info("deleted %s, left by a run killed while writing it", abandoned)
        self._held[self.holder_key] = 1
        return self

    def _hold(self, created: bool) -> bool:
        """Take the open lock file's flock (a file this run created: waiting out another run's
        probe of it; an existing one: only if no live run holds it, else WorkdirError naming the
        holder). False when the file was unlinked meanwhile (its holder released it)."""
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX if created else fcntl.LOCK_EX | fcntl.LOCK_NB)
            has_flock = True
        except BlockingIOError:  # a live run holds it
            self._refuse(self._holder())
        except OSError:  # no flock on this file system: the process id tells
            has_flock = False
        try:
            if os.fstat(self.file.fileno()).st_ino != os.stat(self.path).st_ino:
                return False
        except FileNotFoundError:
            return False
        if created:
            return True
        holder = self._holder()
        if holder is None:  # empty or torn: a run that started a moment ago is still writing
            age = time.time() - os.fstat(self.file.fileno()).st_mtime  # it, or its writer died
            if age < TORN_LOCK_SECONDS:
                self._refuse(None)
            log.warning("taking over %s, a lock file its run died while writing", self.path)
            return True
        same_host = holder.get("host") == self.record["host"]
        if same_host and (has_flock or not _alive(int(holder.get("pid", -1)))):
            log.warning("taking over %s, left by process %s, which is no longer running",
                        self.path, holder.get("pid"))
            return True
        self._refuse(holder)

    def _holder(self) -> dict[str, Any] | None:
        """The lock file's record, or None while it is empty or torn."""
        try:
            self.file.seek(0)
            holder = json.loads(self.file.read())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _refuse(self, holder: dict[str, Any] | None) -> NoReturn:
        if holder is None:
            raise WorkdirError(f"{self.path.parent} is being locked by another run that started "
                               f"a moment ago; wait for it to end or use another {self.flag}")
        raise WorkdirError(
            f"{self.path.parent} is in use by process {holder.get('pid')} on {holder.get('host')} "
            f"since {holder.get('started')}; wait for it to end or use another {self.flag} (a lock "
            f"left by a run that died on another machine: delete {self.path})")

    def __exit__(self, *exc: object) -> None:
        self._held[self.holder_key] -= 1
        if self._held[self.holder_key]:  # a nested block ended; the outer one still holds it
            return
        del self._held[self.holder_key]
        try:
            if os.fstat(self.file.fileno()).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()  # still ours (held under flock): released for the next run
        except OSError:
            pass
        finally:
            self.file.close()


def _comparable(value: Any) -> Any:
    """Tuples as lists: config.json stores a tuple (data.mean) as a JSON list."""
    return list(value) if isinstance(value, tuple) else value


def _value(config: ml_collections.ConfigDict | dict, dotted_key: str) -> Any:
    node: Any = config
    for part in dotted_key.split("."):
        node = node.get(part) if hasattr(node, "get") else None
    return node


def read_saved_config(path: Path) -> dict[str, Any]:
    """A workdir's config.json as a dict; WorkdirError naming it when it is not a JSON object
    (edited by hand, or damaged)."""
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        detail = f"{type(error).__name__}: {error}"
    else:
        if isinstance(saved, dict):
            return saved
        detail = f"a JSON {type(saved).__name__}, not an object"
    raise WorkdirError(f"{path} is damaged ({detail}); it records the config the workdir's "
                       f"checkpoints were trained with: restore it, or use another --workdir")


def check_config(workdir: Path, config: ml_collections.ConfigDict, *,
                 training: bool = False) -> None:
    """Refuse to resume or evaluate `workdir` with a config (resolved: annotate.config.
    resolved_config) that differs from its config.json in SHAPE_KEYS, EVALUATION_KEYS (and
    VALIDATION_KEYS under protocol "validation"), the options of its head (LINEAR_HEAD_KEYS, or
    those under config.model.<head> but dropout) or in what its checkpoints
    hold (state_layout), and to resume its training (`training`) with other RESUME_KEYS (and
    SCHEDULE_KEYS unless its learning rate is constant); nothing to check before the first run."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        return
    saved = read_saved_config(path)
    keys = list(SHAPE_KEYS) + list(EVALUATION_KEYS)
    if training:
        keys += list(RESUME_KEYS)
    if training and _value(saved, "train.schedule") != "constant":  # (its kind: state_layout)
        keys += list(SCHEDULE_KEYS)
    if _value(saved, "eval.protocol") == "validation":
        keys += list(VALIDATION_KEYS)
    head = _value(config, "model.head")
    if head in (None, "linear"):
        keys += list(LINEAR_HEAD_KEYS)
    else:
        # a head may have no config.model.<head> section (annotate.config.head_options: none)
        options = (set(_value(saved, f"model.{head}") or {})
                   | set(_value(config, f"model.{head}") or {}))
        # dropout is a training setting like model.drop_rate and the learning rate: it may
        # change on a resume (write_config records it) and means nothing to an evaluation
        keys += [f"model.{head}.{option}" for option in sorted(options)
                 if "dropout" not in option]
    changed = [key for key in keys if _comparable(_value(saved, key)) != _comparable(
        _value(config, key))]
    saved_layout, layout = state_layout(saved), state_layout(config)
    changed += [key for key in layout if saved_layout[key] != layout[key] and key not in changed
                and _value(saved, key) != _value(config, key)]
    if changed:
        raise WorkdirError(
            f"{workdir} was trained with " + ", ".join(f"{key}={_value(saved, key)!r}"
                                                      for key in changed)
            + ", not " + ", ".join(f"{key}={_value(config, key)!r}" for key in changed)
            + "; use another --workdir, or the same values to resume or evaluate it")


def write_config(workdir: Path, config: ml_collections.ConfigDict,
                 start_epoch: int = 0) -> None:
    """Write config.json atomically when training starts. A run resumed after `start_epoch`
    epochs with other settings (check_config allowed them) logs the changed keys and keeps the
    config that trained those epochs as config.until-epoch-<start_epoch>.json."""
    path = Path(workdir) / "config.json"
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if path.exists():  # a damaged one (no checkpoint yet, or check_config would have refused)
        try:  # is replaced too
            saved = read_saved_config(path)
        except WorkdirError:
            saved = None
        new = json.loads(text)
        if saved != new:
            changes = (", ".join(f"{key}: {_value(saved, key)!r} -> {_value(new, key)!r}"
                                 for key in changed_keys(saved, new))
                       if saved is not None else "unreadable before")
            log.warning("config differs from the one in %s (%s); the run continues with the new "
                        "one", path, changes)
            trained = path.with_name(f"config.until-epoch-{start_epoch}.json")
            # the first config resumed from this epoch trained it; a later one trained nothing kept
            if saved is not None and start_epoch and not trained.exists():
                write_atomically(trained, path.read_text())
    write_atomically(path, text)


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train.learning_rate": 0.001, ...}: the leaves of a nested config by dotted key."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two nested configs (held by either)."""
    old, new = flat_config(old), flat_config(new)
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


def trained_configs(workdir: Path) -> dict[int, dict[str, Any]]:
    """The configs a resumed run left behind (write_config), by the epoch they trained up to."""
    found = {}
    for path in Path(workdir).glob("config.until-epoch-*.json"):
        epoch = path.name.removeprefix("config.until-epoch-").removesuffix(".json")
        if epoch.isdigit():
            found[int(epoch)] = read_saved_config(path)
    return dict(sorted(found.items()))


def write_atomically(path: Path, content: str | bytes | Callable[[BinaryIO], Any]) -> None:
    """Write `content` (a text, bytes, or a function that writes into the binary file it is given)
    to a hidden file beside `path`, synced to disk, then rename it onto `path`: readers, a run
    killed mid-write, and a machine that crashes never see a partial file. The hidden file is
    written through the handle that holds its flock (closing another handle would drop an NFS-
    emulated flock), so that `remove_abandoned_writes` tells a killed writer's file from a
    running one's."""
    # one name per process and thread: concurrent writers of `path` never share a half file
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        with open(temporary, "wb") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX)
            except OSError:  # no flock on this file system: the file's age tells
                pass
            if isinstance(content, str):
                file.write(content.encode())
            elif isinstance(content, bytes):
                file.write(content)
            else:
                content(file)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename: a crash leaves old or new
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # a failed write leaves `path` as it was, and no debris


def remove_abandoned_writes(folder: Path) -> list[Path]:
    """Delete the hidden files that writes of `write_atomically` into `folder` left when their
    process was killed mid-write (no flock held; without flock, untouched for an hour); returns
    them. Called when a run takes its folder, so a kill leaves no lasting debris."""
    abandoned = []
    for temporary in Path(folder).glob(".*.tmp"):
        if not ATOMIC_WRITE.fullmatch(temporary.name):
            continue
        if is_abandoned(temporary):
            temporary.unlink(missing_ok=True)
            abandoned.append(temporary)
    return abandoned
