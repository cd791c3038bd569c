"""On-disk cache of decoded uint8 image arrays, keyed by a fingerprint of the dataset's files.

One `.npy` file per (dataset folder, split, image size, source); it is written atomically (a temp
file in the cache folder, then `os.replace`), so an interrupted or failed decode never leaves a
half-written cache behind (a killed one's temp file is deleted by the next write, such as the
rerun's: the writer holds its flock, which the kernel drops when the process dies; a full disk is
a DatasetError naming the cache folder), and it is re-decoded whenever the JSON or any image file
changes.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from annotate.data.folder import DatasetError, SplitIndex, check_images_exist, is_disk_full
from annotate.workdir import is_abandoned

# Bump when the decoding or the file layout changes, so old caches are not reused.
# 2: 16-bit greys scaled to 8 bits, not clipped (folder.as_rgb); 3: transparency composited onto
# white, EXIF orientation applied (folder.decode_image)
CACHE_FORMAT_VERSION = 3


def default_cache_dir() -> Path:
    """The cache folder: $ANNOTATE_CACHE when set, else ~/.cache/annotate."""
    return Path(os.environ.get("ANNOTATE_CACHE") or Path.home() / ".cache" / "annotate").expanduser()


def short_hash(text: str, length: int = 8) -> str:
    """A short hex digest of `text`, used to tell apart cache entries of different folders."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def hash_parts(parts: Iterable[str | bytes]) -> str:
    """SHA-256 hex digest of a sequence of strings/bytes (each length-prefixed, so unambiguous)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def index_fingerprint_parts(index: SplitIndex) -> list[str | bytes]:
    """What identifies an index's content: its JSON path and bytes, and each image's name/size/mtime.

    Raises DatasetError when an image is missing, before any decoding starts.
    """
    parts: list[str | bytes] = [str(index.json_path), index.json_path.read_bytes()]
    for name, stat in zip(index.image_names, check_images_exist(index)):
        parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return parts


def directory_fingerprint_parts(directory: Path) -> list[str]:
    """What identifies a folder of files (a TFDS build): its path, each file's name/size/mtime."""
    parts = [str(directory.absolute())]
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = path.stat()
        parts.append(f"{path.relative_to(directory)}:{stat.st_size}:{stat.st_mtime_ns}")
    return parts


def _reserve_space(path: str) -> None:
    """Allocate the disk blocks of the (sparse) file at `path` now, so that a full disk is an
    OSError here: a write into a memory map past the free space kills the process (SIGBUS)."""
    fallocate = getattr(os, "posix_fallocate", None)  # absent on macOS: no reservation there
    if fallocate is None:
        return
    with open(path, "r+b") as file:
        try:
            fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # unsupported: go on
                raise


def cached_uint8_array(cache_dir: Path, prefix: str, key: str, shape: Sequence[int],
                       fill: Callable[[np.ndarray], None]) -> np.ndarray:
    """Return the cached array `<cache_dir>/<prefix>-<key>.npy`, creating it with `fill` on a miss.

    `fill` writes into a memory-mapped temp file in `cache_dir` (so large splits need not fit in
    RAM twice), whose space is reserved first (DatasetError naming `cache_dir` when the disk is
    full); only after `fill` returns is the file moved into place. On any error the temp file is
    removed. Older entries with the same prefix (stale versions of this split) are deleted before
    it is written, and so are temp files of this prefix left by a decode that was killed
    (workdir.is_abandoned), so that a disk they filled has room again.
    """
    final_path = cache_dir / f"{prefix}-{key[:24]}.npy"
    if final_path.is_file():
        try:
            return np.load(final_path)
        except (ValueError, OSError, EOFError):  # truncated or damaged: build it again
            final_path.unlink(missing_ok=True)
    if cache_dir.exists() and not cache_dir.is_dir():  # mkdir would say 'File exists'
        raise NotADirectoryError(f"the cache folder {cache_dir} (config.data.cache_dir, else "
                                 f"$ANNOTATE_CACHE) is a file")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # first, so that their space is free for this entry (a killed decode's temp file is a split)
    for stale in cache_dir.iterdir():
        is_same_entry = (stale.name.startswith(f"{prefix}-") and stale.suffix == ".npy"
                         and len(stale.name) == len(final_path.name))
        # the temp file of a decode that was killed (no exception ran)
        is_abandoned_temp = (stale.name.startswith(f".{prefix}-") and stale.suffix == ".tmp"
                             and is_abandoned(stale))
        if (is_same_entry and stale != final_path) or is_abandoned_temp:
            stale.unlink(missing_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{final_path.name}.", suffix=".tmp")
    try:  # held until the handle closes, or the process dies (waits only for another
        fcntl.flock(handle, fcntl.LOCK_EX)  # write's probe of this temp file)
    except OSError:  # no flock on this file system: its age tells
        pass
    os.chmod(temp_name, 0o644)  # mkstemp makes it private; a cache is as readable as the dataset
    try:
        array = np.lib.format.open_memmap(temp_name, mode="w+", dtype=np.uint8, shape=tuple(shape))
        _reserve_space(temp_name)
        fill(array)
        array.flush()
        del array
        os.replace(temp_name, final_path)
    except BaseException as error:
        Path(temp_name).unlink(missing_ok=True)
        if is_disk_full(error):
            raise DatasetError(
                f"no space left on device for the {np.prod(shape) / 1e6:,.0f} MB image cache in "
                f"{cache_dir}; free space there, or put the cache elsewhere with $ANNOTATE_CACHE "
                f"or --config.data.cache_dir") from error
        raise
    finally:
        os.close(handle)
    return np.load(final_path)
