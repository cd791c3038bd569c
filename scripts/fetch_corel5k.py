"""Download Corel-5k (images + train/test JSON in the seed's format) into data/corel5k; validate it.

    python scripts/fetch_corel5k.py                      # download from Kaggle (the seed's source)
    python scripts/fetch_corel5k.py --archive corel5k.zip  # use an archive you downloaded yourself

The archive (zip or tar) must contain a folder with images/, train.json and test.json, as the
Kaggle dataset parhamsalar/corel5k linked from the seed's README does. It is extracted next to the
destination, checked with the same validation as the loader (JSON structure, labels in the
vocabulary, equal train/test vocabularies, every image decodes) plus the Corel-5k counts
(4,500 train / 499 test images, 260 labels), and only then moved into place.
"""
from __future__ import annotations

import argparse
import lzma
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from annotate.data.folder import DatasetError, validate_dataset

KAGGLE_PAGE = "https://www.kaggle.com/datasets/parhamsalar/corel5k"
DEFAULT_URL = "https://www.kaggle.com/api/v1/datasets/download/parhamsalar/corel5k"
DEFAULT_DESTINATION = Path(__file__).resolve().parents[1] / "data" / "corel5k"
COREL5K_COUNTS = {"train": 4500, "test": 499, "labels": 260}
# What reading a damaged or truncated zip/tar(.gz/.bz2/.xz) can raise.
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error,
                  lzma.LZMAError)


def download(url: str, destination: Path) -> Path:
    """Stream `url` to `destination` (via a .part file renamed when complete), with progress bar."""
    partial = destination.with_name(destination.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": "annotate-fetch-corel5k"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {url}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError) as error:
        partial.unlink(missing_ok=True)
        raise DatasetError(f"download of {url} failed ({error}); download the archive by hand from "
                           f"{KAGGLE_PAGE} and run this script with --archive PATH") from error
    partial.replace(destination)
    return destination


def _check_member_name(archive: Path, name: str) -> None:
    """Refuse archive members that would land outside the extraction folder."""
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts:
        raise DatasetError(f"{archive}: unsafe member path '{name}' (absolute or containing '..')")


def extract_archive(archive: Path, work_dir: Path) -> None:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into `work_dir`, refusing unsafe member paths."""
    if not archive.is_file():
        raise DatasetError(f"{archive}: archive file does not exist")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            for name in bundle.namelist():
                _check_member_name(archive, name)
            try:
                bundle.extractall(work_dir)
            except ARCHIVE_ERRORS as error:
                raise DatasetError(f"{archive}: damaged zip archive ({error})") from error
    elif tarfile.is_tarfile(archive):
        try:
            with tarfile.open(archive) as bundle:
                for member in bundle.getmembers():
                    _check_member_name(archive, member.name)
                bundle.extractall(work_dir, filter="data")
        except ARCHIVE_ERRORS as error:
            raise DatasetError(f"{archive}: damaged tar archive ({error})") from error
    else:
        raise DatasetError(f"{archive}: not a zip or tar archive")


def find_dataset_root(extracted: Path, archive: Path) -> Path:
    """The single folder under `extracted` holding images/, train.json and test.json."""
    candidates = sorted({path.parent for path in extracted.rglob("train.json")
                         if (path.parent / "test.json").is_file()
                         and (path.parent / "images").is_dir()})
    if len(candidates) != 1:
        found = [str(path.relative_to(extracted)) for path in candidates]
        raise DatasetError(f"{archive}: expected exactly one folder with images/, train.json and "
                           f"test.json, found {len(candidates)} {found}")
    return candidates[0]


def check_counts(root: Path, expected: dict[str, int]) -> None:
    """Validate the folder like the loader does and compare its sizes with `expected`."""
    indices = validate_dataset(root)
    found = {"train": len(indices["train"].image_names), "test": len(indices["test"].image_names),
             "labels": len(indices["train"].vocabulary)}
    if found != expected:
        raise DatasetError(f"{root}: expected {expected} (train images, test images, labels), "
                           f"found {found}")


def install_dataset(archive: Path, destination: Path, *, expected: dict[str, int] = COREL5K_COUNTS,
                    force: bool = False) -> Path:
    """Extract `archive`, validate it and move its dataset folder to `destination`.

    Nothing is written at `destination` unless validation passes; an existing destination is
    replaced only with `force`.
    """
    if destination.exists() and not force:
        raise DatasetError(f"{destination} already exists; pass --force to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}-extract-"))
    try:
        extract_archive(archive, work_dir)
        root = find_dataset_root(work_dir, archive)
        check_counts(root, expected)
        if destination.exists():
            shutil.rmtree(destination)
        root.rename(destination)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return destination


def main(argv: list[str] | None = None) -> int:
    """Command line: download (or take --archive), extract, validate, install; 1 on dataset error."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_URL, help=f"archive URL (default: {DEFAULT_URL})")
    parser.add_argument("--archive", type=Path, help="use this local zip/tar instead of downloading")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DESTINATION,
                        help=f"dataset folder to create (default: {DEFAULT_DESTINATION})")
    parser.add_argument("--force", action="store_true", help="replace an existing --dest")
    args = parser.parse_args(argv)
    try:
        if args.archive is not None:
            installed = install_dataset(args.archive, args.dest, expected=COREL5K_COUNTS,
                                        force=args.force)
        else:
            if args.dest.exists() and not args.force:
                raise DatasetError(f"{args.dest} already exists; pass --force to replace it")
            args.dest.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=args.dest.parent,
                                             prefix=".corel5k-download-") as tmp:
                archive = download(args.url, Path(tmp) / "corel5k.zip")
                installed = install_dataset(archive, args.dest, expected=COREL5K_COUNTS,
                                            force=args.force)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Corel-5k ready in {installed}; train with --config.data.root={installed} "
          f"or COREL5K_DIR={installed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
