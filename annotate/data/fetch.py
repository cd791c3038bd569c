"""Get Corel-5k (images + train/test JSON in the seed's folder format) into data/corel5k.

    python -m annotate.data.fetch                        # GitHub, no account needed (default)
    python -m annotate.data.fetch --source kaggle        # the Kaggle dataset the seed links
    python -m annotate.data.fetch --url URL              # a zip/tar of Corel-5k, seed's layout
    python -m annotate.data.fetch --archive corel5k.zip  # an archive already on disk

The default source needs no account: the seed's train.json, test.json and vocabulary from
parham1998/CNN_Image_Annotaion (Corel-5k/) and the 4,999 images from ParkByungYoon/corel-5k
(db/train, db/test), both at pinned commits; the images come in one archive of that repository
(about 121 MB, of which 31 MB are kept). `$COREL5K_URL` (or --url) points the fetch at another
copy: an archive holding one folder with images/, train.json, test.json and corel5k_vocabulary.txt
(the vocabulary file is only needed for the checksums: --skip-checksums accepts a folder without
it, and files that differ from the recorded ones). Every file is checked against the SHA-256
list `corel5k.sha256` beside this module (files byte-identical to the sources above), the folder is validated as the loader validates it (JSON structure, labels in
the vocabulary, every image decodes) with the Corel-5k counts (4,500 train / 499 test images, 260
labels), and only then moved into place (an existing copy, with --force, is moved aside first and
deleted last). `python -m annotate.main` calls this on its first run.

The command line and `python -m annotate.main` fetch holding a lock file beside the folder
(`.corel5k.lock`), so fetches into one folder take turns, and the scratch folders
(`.corel5k-fetch-*`) of a fetch that was killed are deleted by the next one. A download that
fails or is interrupted keeps what it received (`.corel5k-downloads/`), and the next fetch resumes
it; a fetch that installs the dataset deletes that folder.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import http.client
import lzma
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from annotate.data.folder import (DEFAULT_DATASET_FOLDER, DatasetError, is_disk_full,
                                  validate_dataset)

KAGGLE_PAGE = "https://www.kaggle.com/datasets/parhamsalar/corel5k"
KAGGLE_URL = "https://www.kaggle.com/api/v1/datasets/download/parhamsalar/corel5k"
INDEX_URL = ("https://raw.githubusercontent.com/parham1998/CNN_Image_Annotaion/"
             "25ceea79fbb8995cab67ba1dc398ec556d97584b/Corel-5k/{name}")
INDEX_FILES = ("train.json", "test.json", "corel5k_vocabulary.txt")
IMAGES_URL = ("https://codeload.github.com/ParkByungYoon/corel-5k/zip/"
              "6fc96e09b1922bf08a53ca44831a958337205d2b")
IMAGE_FOLDERS = ("db/train", "db/test")  # inside the repository archive's top folder
DOWNLOAD_MB = 121  # what the default source downloads: the images' archive and the JSON files
MANIFEST = Path(__file__).with_name("corel5k.sha256")
COREL5K_COUNTS = {"train": 4500, "test": 499, "labels": 260}
# What reading a damaged or truncated zip/tar(.gz/.bz2/.xz) can raise.
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error,
                  lzma.LZMAError)


def download(url: str, folder: Path) -> Path:
    """The file at `url`, downloaded into `folder` (named by the URL's hash) with a progress bar,
    or found there from an earlier call. It is received into a part file, renamed when complete;
    a download that fails or is interrupted keeps its part file, and the next call resumes it (an
    HTTP Range request; from the start where the server ignores the range). DatasetError when
    the connection fails or ends before the announced Content-Length."""
    folder.mkdir(parents=True, exist_ok=True)
    complete = folder / hashlib.sha256(url.encode()).hexdigest()[:16]
    partial = complete.with_suffix(".part")
    if complete.is_file():
        return complete
    offset = partial.stat().st_size if partial.is_file() else 0
    headers = {"User-Agent": "annotate-fetch-corel5k"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        request = urllib.request.Request(url, headers=headers)
    except ValueError as error:  # "unknown url type": no scheme, e.g. a typed github.com/...
        raise DatasetError(f"{url!r} is not a URL ({error}); give it with its scheme "
                           f"(https://..., or file:///... for a local file), or a local "
                           f"archive with --archive PATH") from None
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            content_range = response.headers.get("Content-Range")
            if content_range and not content_range.startswith(f"bytes {offset}-"):
                partial.unlink(missing_ok=True)  # a part from elsewhere cannot continue ours
                return download(url, folder)
            if not content_range:  # the whole file (a server that ignores ranges): from the start
                offset = 0
            length = int(response.headers.get("Content-Length") or 0) or None
            total = offset + length if length is not None else None
            received = offset
            with open(partial, "ab" if offset else "wb") as out, \
                    tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                         desc=f"downloading {url}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received < total:
                raise ConnectionError(f"the connection ended after {received:,} of {total:,} bytes")
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the range starts at or past the end of the file
            if error.headers.get("Content-Range") == f"bytes */{offset}":  # the part is whole
                partial.replace(complete)
                return complete
            partial.unlink()
            return download(url, folder)
        raise _download_failed(url, error, partial) from error
    except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, resets, cut-offs
        if is_disk_full(error):
            raise  # named with its folder by _work_dir
        raise _download_failed(url, error, partial) from error
    partial.replace(complete)
    return complete


@contextlib.contextmanager
def _discarded_if_bad(downloaded: Path) -> Iterator[None]:
    """Delete `downloaded` when the block finds its content bad (a DatasetError: an HTML page, a
    damaged archive, other files): a rerun downloads it again instead of reusing it. Any other
    failure (Ctrl-C, a full disk) keeps it for the rerun."""
    try:
        yield
    except DatasetError as error:
        if isinstance(error.__cause__, OSError) and is_disk_full(error.__cause__):
            raise  # _work_dir's name for a full disk: the download is not at fault
        downloaded.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the downloads folder, when nothing else is kept
            downloaded.parent.rmdir()
        raise


def _download_failed(url: str, error: BaseException, partial: Path) -> DatasetError:
    """The error of a failed download: what failed, what is kept, the ways around it."""
    kept = partial.stat().st_size if partial.is_file() else 0
    if not kept:
        partial.unlink(missing_ok=True)
    resume = f"; its {kept:,} bytes are kept and a rerun resumes it" if kept else ""
    return DatasetError(f"download of {url} failed ({type(error).__name__}: {error}){resume}; "
                        f"or get a Corel-5k archive by hand (e.g. from {KAGGLE_PAGE}) and run "
                        f"`python -m annotate.data.fetch --archive PATH`, or point $COREL5K_DIR "
                        f"at a copy")


def _check_member_name(archive: str | Path, name: str) -> None:
    """Refuse archive members that would land outside the extraction folder."""
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts:
        raise DatasetError(f"{archive}: unsafe member path '{name}' (absolute or containing '..')")


def _starts_with(path: Path, prefix: bytes) -> bool:
    """Whether the file `path` begins with `prefix`, leading white space aside."""
    with open(path, "rb") as file:
        return file.read(64).lstrip().startswith(prefix)


def _is_html(path: Path) -> bool:
    """An HTML page (<!DOCTYPE html>, <html>, ...): what a server sends instead of the file asked
    for when it wants a sign-in, or for an error."""
    return _starts_with(path, b"<")


def _archive_kind(archive: Path, url: str | None) -> str:
    """"zip" or "tar"; DatasetError naming `url` (else `archive`) for anything else: an HTML page,
    a zip cut short (its local header without the end record: an interrupted download)."""
    if zipfile.is_zipfile(archive):
        return "zip"
    if tarfile.is_tarfile(archive):
        return "tar"
    if _starts_with(archive, b"PK\x03\x04"):
        raise DatasetError(f"{url or archive}: a damaged or truncated zip archive (its end is "
                           f"missing: an interrupted download?); download it again")
    html = _is_html(archive)
    if html and url is not None:
        raise DatasetError(f"{url}: the server sent an HTML page, not an archive (a sign-in or "
                           f"error page?); download the archive in a browser and run `python -m "
                           f"annotate.data.fetch --archive PATH`")
    raise DatasetError(f"{url or archive}: {'an HTML page, ' if html else ''}not a zip or tar "
                       f"archive")


def extract_archive(archive: Path, work_dir: Path, *, url: str | None = None) -> None:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into `work_dir`, refusing unsafe member paths.
    Errors name `url` (where the archive was downloaded from) when given, else `archive`; a full
    disk is raised as the OSError it is."""
    name = url or archive
    if not archive.is_file():
        raise DatasetError(f"{archive}: archive file does not exist")
    kind = _archive_kind(archive, url)
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as bundle:  # a damaged central directory raises here
                for member_name in bundle.namelist():
                    _check_member_name(name, member_name)
                bundle.extractall(work_dir)
        else:
            with tarfile.open(archive) as bundle:
                for member in bundle.getmembers():
                    _check_member_name(name, member.name)
                bundle.extractall(work_dir, filter="data")
    except ARCHIVE_ERRORS as error:
        if is_disk_full(error):
            raise  # named with its folder by _work_dir
        raise DatasetError(f"{name}: damaged {kind} archive ({error})") from error


def find_dataset_root(extracted: Path, archive: str | Path) -> Path:
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


def read_manifest(path: Path = MANIFEST) -> dict[str, str]:
    """A `sha256sum` list ("<hex>  <relative path>" per line) as {relative path: hex digest}."""
    entries = {}
    for line in path.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        entries[name.strip()] = digest
    return entries


def sha256(path: Path) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_manifest(root: Path, manifest: dict[str, str], source: str | Path | None = None) -> None:
    """Every file of `manifest` exists under `root` with its SHA-256; DatasetError naming the
    source (default `root`), the first missing or different file and how many there are."""
    source = source or root
    missing = [name for name in manifest if not (root / name).is_file()]
    if missing:
        raise DatasetError(f"{source}: {len(missing)} of the {len(manifest)} Corel-5k files are "
                           f"missing, first {missing[0]}")
    different = [name for name, digest in manifest.items() if sha256(root / name) != digest]
    if different:
        raise DatasetError(f"{source}: {len(different)} files differ from the SHA-256 recorded in "
                           f"{MANIFEST.name}, first {different[0]}; the download is damaged or "
                           f"not the recorded Corel-5k (`python -m annotate.data.fetch "
                           f"--skip-checksums` with the same source accepts another copy)")


def replaced_path(destination: Path, state: str = "replaced") -> Path:
    """Where --force keeps the copy it replaces: `.<name>.replaced` beside `destination` while the
    new one moves in (put back by the next fetch if the replacement was killed then), renamed
    `.<name>.deleting` once the new one is in place (a half-deleted copy is never put back)."""
    return destination.with_name(f".{destination.name}.{state}")


def _remove(path: Path) -> None:
    """Delete `path`: a folder with what it holds, a link (not what it points to) or a file."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _delete_aside_copies(destination: Path) -> None:
    """Delete what a --force replacement killed after its renames left beside `destination`."""
    for state in ("replaced", "deleting"):
        _remove(replaced_path(destination, state))


def _refuse_existing(destination: Path, force: bool) -> None:
    if destination.exists() and not force:
        raise DatasetError(f"{destination} already exists; pass --force to replace it")


def _install(root: Path, destination: Path, *, expected: dict[str, int],
             manifest: dict[str, str] | None, force: bool, source: str | Path) -> Path:
    """Check the assembled folder `root` (checksums, the loader's validation, the counts), then
    move it to `destination` (replacing an existing one only with `force`: the old copy is
    moved aside and deleted only once the new one is in place)."""
    if manifest is not None:
        verify_manifest(root, manifest, source)
    try:
        check_counts(root, expected)
    except DatasetError as error:  # named by its source: `root` is deleted before it is read
        message = str(error).replace(f"{root}/", "").replace(str(root), "its dataset folder")
        raise DatasetError(f"{source}: {message}") from error
    _refuse_existing(destination, force)
    if not destination.exists():
        root.rename(destination)
    else:
        replaced, deleting = replaced_path(destination), replaced_path(destination, "deleting")
        _delete_aside_copies(destination)  # of a replacement killed after its renames
        destination.rename(replaced)  # moved aside, not deleted, until the new copy is in place
        try:
            root.rename(destination)
        except BaseException:
            replaced.rename(destination)  # the old copy back
            raise
        replaced.rename(deleting)
        _remove(deleting)  # a link to a copy elsewhere is replaced, the copy left alone
    shutil.rmtree(downloads_folder(destination), ignore_errors=True)  # nothing left to resume
    return destination


def downloads_folder(destination: Path) -> Path:
    """`.<name>-downloads` beside `destination`: the part files of failed or interrupted
    downloads, kept (the scratch folders are not) until a fetch installs the dataset, so that a
    rerun resumes them."""
    return destination.parent / f".{destination.name}-downloads"


def _make_parent(destination: Path) -> None:
    """Create the folder that holds `destination`; DatasetError naming what is in the way."""
    parent = destination.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file where a folder should be, no permission, a read-only disk
        files = [path for path in (*reversed(parent.parents), parent) if path.is_file()]
        reason = (f"{files[0]} is a file, not a folder" if files
                  else f"{error.strerror}: {error.filename}")
        raise DatasetError(f"cannot create the folder {parent} for {destination.name}: "
                           f"{reason}") from error


@contextlib.contextmanager
def fetch_lock(destination: Path) -> Iterator[None]:
    """Hold the lock file `.<name>.lock` beside `destination`, as the command line and
    annotate.main do for their whole fetch: fetches into one folder take turns, and what a killed
    fetch left is cleaned up on taking the lock: its scratch folders `.<name>-fetch-*` are
    deleted, and the copy a killed --force had moved aside (`replaced_path`) is put back when no
    dataset is in place, else deleted. DatasetError when the folder or the lock file cannot be
    created."""
    _make_parent(destination)
    lock_path = destination.parent / f".{destination.name}.lock"
    try:
        lock = open(lock_path, "w")
    except OSError as error:
        raise DatasetError(f"cannot create the lock file {lock_path}: {error.strerror}") from error
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        replaced = replaced_path(destination)
        if replaced.is_dir() and not destination.exists():  # killed between --force's renames
            replaced.rename(destination)
        _delete_aside_copies(destination)  # killed after them
        for abandoned in destination.parent.glob(f".{destination.name}-fetch-*"):
            shutil.rmtree(abandoned, ignore_errors=True)
        yield


@contextlib.contextmanager
def _full_disk_named(destination: Path) -> Iterator[None]:
    """A full disk in the block is a DatasetError naming the folder being filled."""
    try:
        yield
    except OSError as error:
        if not is_disk_full(error):
            raise
        raise DatasetError(f"{error.strerror} in {destination.parent} (fetching Corel-5k into "
                           f"{destination})") from error


@contextlib.contextmanager
def _work_dir(destination: Path) -> Iterator[Path]:
    """A scratch folder beside `destination` (same file system: the final move is a rename),
    deleted on exit; a full disk meanwhile is a DatasetError naming the folder."""
    _make_parent(destination)
    work_dir = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}-fetch-"))
    try:
        with _full_disk_named(destination):
            yield work_dir
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def install_dataset(archive: Path, destination: Path, *, expected: dict[str, int] = COREL5K_COUNTS,
                    manifest: dict[str, str] | None = None, force: bool = False,
                    url: str | None = None) -> Path:
    """Extract `archive` (one folder with images/, train.json, test.json), check it and move it
    to `destination`. Nothing is written at `destination` unless every check passes. Errors name
    `url` (where the archive was downloaded from) when given, else `archive`."""
    _refuse_existing(destination, force)
    with _work_dir(destination) as work_dir:
        extracted = work_dir / "extracted"  # made with the umask's mode (mkdtemp's is private),
        extracted.mkdir()  # which is the dataset's own when the archive holds its files at the top
        extract_archive(archive, extracted, url=url)
        return _install(find_dataset_root(extracted, url or archive), destination,
                        expected=expected, manifest=manifest, force=force, source=url or archive)


def fetch_github(destination: Path, *, index_url: str = INDEX_URL, images_url: str = IMAGES_URL,
                 expected: dict[str, int] = COREL5K_COUNTS,
                 manifest: dict[str, str] | None = None, force: bool = False) -> Path:
    """The default source: the seed's JSON files from `index_url` (a pattern with {name}) and
    the images under IMAGE_FOLDERS of the repository archive at `images_url`, assembled in the
    seed's folder layout, checked, and moved to `destination`."""
    _refuse_existing(destination, force)
    with _work_dir(destination) as work_dir:
        root = work_dir / "corel5k"
        (root / "images").mkdir(parents=True)
        for name in INDEX_FILES:  # each checked before the images, named by its own URL
            url = index_url.format(name=name)
            downloaded = download(url, downloads_folder(destination))
            with _discarded_if_bad(downloaded):
                shutil.copyfile(downloaded, root / name)
                if _is_html(root / name):
                    raise DatasetError(f"{url}: the server sent an HTML page, not {name} (a "
                                       f"sign-in or error page?)")
                if manifest is not None and name in manifest:
                    verify_manifest(root, {name: manifest[name]}, url)
        archive = download(images_url, downloads_folder(destination))
        with _discarded_if_bad(archive):
            if _archive_kind(archive, images_url) != "zip":
                raise DatasetError(f"{images_url}: a tar archive, not the zip of the repository")
            try:
                with zipfile.ZipFile(archive) as bundle:
                    for member in bundle.infolist():
                        parent, _, name = member.filename.rpartition("/")
                        if name and any(parent.endswith("/" + folder) for folder in IMAGE_FOLDERS):
                            _check_member_name(images_url, name)
                            (root / "images" / name).write_bytes(bundle.read(member))
            except ARCHIVE_ERRORS as error:
                if is_disk_full(error):
                    raise  # named with its folder by _work_dir
                raise DatasetError(f"{images_url}: damaged zip archive ({error})") from error
            return _install(root, destination, expected=expected, manifest=manifest,
                            force=force, source=images_url)


def fetch_corel5k(destination: Path = DEFAULT_DATASET_FOLDER, *, url: str | None = None,
                  source: str = "github", archive: Path | None = None, checksums: bool = True,
                  force: bool = False) -> Path:
    """Corel-5k into `destination` from a local `archive`, else an archive `url` (default
    $COREL5K_URL), else Kaggle (`source="kaggle"`) or the default GitHub sources; every file is
    checked against corel5k.sha256 unless `checksums` is False."""
    manifest = read_manifest() if checksums else None
    url = url or os.environ.get("COREL5K_URL")
    if archive is not None:
        return install_dataset(archive, destination, manifest=manifest, force=force)
    if url is None and source == "github":
        return fetch_github(destination, manifest=manifest, force=force)
    _refuse_existing(destination, force)
    url = url or KAGGLE_URL
    _make_parent(destination)
    with _full_disk_named(destination):
        downloaded = download(url, downloads_folder(destination))
    with _discarded_if_bad(downloaded):
        return install_dataset(downloaded, destination, manifest=manifest, force=force, url=url)


def ensure_corel5k(destination: Path = DEFAULT_DATASET_FOLDER) -> None:
    """The main job's first run (no dataset configured): download Corel-5k into `destination`
    unless it is there (fetch_corel5k: $COREL5K_URL if set, else the default GitHub sources,
    every file checked). Runs started together (the processes of one machine) take turns on
    fetch_lock: one downloads, the others wait and then find the data in place. A `destination`
    without train.json (an incomplete copy) is a DatasetError saying how to replace it."""
    if (destination / "train.json").is_file():
        return
    with fetch_lock(destination):
        if (destination / "train.json").is_file():  # another run fetched it meanwhile
            return
        if destination.exists():
            raise DatasetError(
                f"{destination} exists but holds no train.json (an incomplete copy?); delete it "
                f"(`rm -r {destination}`) and run again to download Corel-5k, or replace it with "
                f"`python -m annotate.data.fetch --force`")
        source = os.environ.get("COREL5K_URL") or f"GitHub, about {DOWNLOAD_MB} MB"
        print(f"Corel-5k is not in {destination} and neither --config.data.root nor "
              f"$COREL5K_DIR is set: downloading it into {destination} ({source}; 31 MB kept)",
              file=sys.stderr)
        fetch_corel5k(destination)


def main(argv: list[str] | None = None) -> int:
    """Command line: fetch (or take --archive), check, install; exit status 2 and one line
    `error: ...` on a dataset or file error, as the other apps."""
    parser = argparse.ArgumentParser(prog="python -m annotate.data.fetch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("github", "kaggle"), default="github",
                        help="where to download from when no --url/$COREL5K_URL is given")
    parser.add_argument("--url", help="an archive in the seed's layout (default: $COREL5K_URL)")
    parser.add_argument("--archive", type=Path, help="use this local zip/tar instead of downloading")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DATASET_FOLDER,
                        help=f"dataset folder to create (default: {DEFAULT_DATASET_FOLDER})")
    parser.add_argument("--force", action="store_true", help="replace an existing --dest")
    parser.add_argument("--skip-checksums", action="store_true",
                        help=f"accept files that differ from {MANIFEST.name}")
    args = parser.parse_args(argv)
    try:
        with fetch_lock(args.dest):
            installed = fetch_corel5k(args.dest, url=args.url, source=args.source,
                                      archive=args.archive, checksums=not args.skip_checksums,
                                      force=args.force)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the part file of the download stays (downloads_folder)
        print("interrupted; a rerun resumes the download", file=sys.stderr)
        return 130
    except OSError as error:  # the file system's (a read-only folder): the path, in one line
        cause = f"{error.strerror}: {error.filename}" if error.filename else error
        print(f"error: {cause}", file=sys.stderr)
        return 2
    print(f"Corel-5k ready in {installed}; train with --config.data.root={installed} "
          f"or COREL5K_DIR={installed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
