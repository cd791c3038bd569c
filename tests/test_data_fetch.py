"""annotate.data.fetch without the internet: local archives, and the whole download path (the
default GitHub sources' layout, $COREL5K_URL) against a local HTTP server on 127.0.0.1, with the
recorded SHA-256 of every Corel-5k file."""
from __future__ import annotations

import errno
import filecmp
import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from annotate import main as annotate_main
from annotate.data import DatasetError
from annotate.data import fetch as fetch_module
from conftest import write_dataset

TINY_COUNTS = {"train": 12, "test": 6, "labels": 5}


@pytest.fixture(scope="module")
def fetch():
    return fetch_module


def pack(source: Path, archive: Path, top: str = "Corel-5k") -> Path:
    """Zip or tar.gz (by suffix) every file of `source` under the folder `top` ("": at the top)."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as bundle:
            for path in files:
                bundle.write(path, f"{top}/{path.relative_to(source)}".lstrip("/"))
    else:
        with tarfile.open(archive, "w:gz") as bundle:
            for path in files:
                bundle.add(path, f"{top}/{path.relative_to(source)}".lstrip("/"))
    return archive


def same_tree(left: Path, right: Path) -> bool:
    files = sorted(str(p.relative_to(left)) for p in left.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(right)) for p in right.rglob("*") if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(left, right, files, shallow=False)
    return not mismatch and not errors


@pytest.mark.parametrize("archive_name", ["corel5k.zip", "corel5k.tar.gz"])
def test_install_extracts_validates_and_moves_into_place(fetch, tiny_dataset, tmp_path,
                                                         archive_name):
    archive = pack(tiny_dataset, tmp_path / archive_name)
    destination = tmp_path / "data" / "corel5k"
    assert fetch.install_dataset(archive, destination, expected=TINY_COUNTS) == destination
    assert same_tree(tiny_dataset, destination)
    assert sorted(p.name for p in destination.parent.iterdir()) == ["corel5k"]  # no leftovers


def test_download_streams_a_url_to_disk_once(fetch, tiny_dataset, tmp_path):
    """The file, kept: a second call finds it without downloading; a failure before any byte
    leaves nothing."""
    archive = pack(tiny_dataset, tmp_path / "source.zip")
    content = archive.read_bytes()
    downloaded = fetch.download(archive.as_uri(), tmp_path / "downloads")
    assert downloaded.read_bytes() == content
    archive.unlink()
    assert fetch.download(archive.as_uri(), tmp_path / "downloads").read_bytes() == content
    with pytest.raises(DatasetError, match="--archive"):
        fetch.download((tmp_path / "absent.zip").as_uri(), tmp_path / "downloads")
    assert list((tmp_path / "downloads").iterdir()) == [downloaded]


def test_main_installs_from_a_local_archive(fetch, tiny_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fetch, "install_dataset", functools.partial(fetch.install_dataset,
                                                                    expected=TINY_COUNTS))
    archive = pack(tiny_dataset, tmp_path / "corel5k.zip")
    destination = tmp_path / "data" / "corel5k"
    args = ["--archive", str(archive), "--dest", str(destination)]
    assert fetch.main(args) == 2  # the tiny dataset is not the recorded Corel-5k
    assert f"{archive}: 4994 of the 5002 Corel-5k files are missing" in capsys.readouterr().err
    assert fetch.main(args + ["--skip-checksums"]) == 0
    assert "ready" in capsys.readouterr().out
    assert fetch.main(args + ["--skip-checksums"]) == 2
    assert "--force" in capsys.readouterr().err
    assert fetch.main(args + ["--skip-checksums", "--force"]) == 0


def not_an_archive(source: Path, tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "corel5k.zip"
    path.write_bytes(b"<html>Please sign in</html>")
    return path, "corel5k.zip: an HTML page, not a zip or tar archive"


def no_dataset_folder(source: Path, tmp_path: Path) -> tuple[Path, str]:
    (source / "test.json").unlink()
    return pack(source, tmp_path / "corel5k.zip"), "exactly one folder"


def wrong_counts(source: Path, tmp_path: Path) -> tuple[Path, str]:
    write_dataset(source, n_train=13)
    return pack(source, tmp_path / "corel5k.tar.gz"), "'train': 13"


def corrupt_image(source: Path, tmp_path: Path) -> tuple[Path, str]:
    image = source / "images" / "1003.jpeg"
    image.write_bytes(image.read_bytes()[:150])
    return pack(source, tmp_path / "corel5k.zip"), "1003.jpeg"


def unsafe_member(source: Path, tmp_path: Path) -> tuple[Path, str]:
    archive = pack(source, tmp_path / "corel5k.zip")
    with zipfile.ZipFile(archive, "a") as bundle:
        bundle.writestr("../escape.txt", "outside")
    return archive, "unsafe member path"


def truncated_tar(source: Path, tmp_path: Path) -> tuple[Path, str]:
    archive = pack(source, tmp_path / "corel5k.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    return archive, "damaged tar archive|not a zip or tar"


def damaged_central_directory(source: Path, tmp_path: Path) -> tuple[Path, str]:
    """The end record is intact (is_zipfile says yes), a central directory entry is not."""
    archive = pack(source, tmp_path / "corel5k.zip")
    data = archive.read_bytes()
    entry = data.rfind(b"PK\x01\x02")
    archive.write_bytes(data[:entry] + b"XXXX" + data[entry + 4:])
    return archive, "corel5k.zip: damaged zip archive \\(Bad magic number for central directory\\)"


def truncated_zip(source: Path, tmp_path: Path) -> tuple[Path, str]:
    """A download cut short: the local headers are there, the end record is not."""
    archive = pack(source, tmp_path / "corel5k.zip")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    return archive, "corel5k.zip: a damaged or truncated zip archive"


@pytest.mark.parametrize("spoil", [not_an_archive, no_dataset_folder, wrong_counts, corrupt_image,
                                   unsafe_member, truncated_tar, truncated_zip,
                                   damaged_central_directory])
def test_bad_archive_gives_a_clear_error_and_installs_nothing(fetch, tiny_dataset, tmp_path, spoil):
    archive, reason = spoil(tiny_dataset, tmp_path)
    destination = tmp_path / "data" / "corel5k"
    with pytest.raises(DatasetError, match=reason) as caught:
        fetch.install_dataset(archive, destination, expected=TINY_COUNTS)
    assert "corel5k" in str(caught.value)  # names the archive or the file inside it
    assert not destination.exists()
    assert list(destination.parent.iterdir()) == []
    assert not (tmp_path / "escape.txt").exists()


def test_real_corel5k_passes_the_fetch_validation(fetch, corel5k_dir):
    fetch.check_counts(corel5k_dir, fetch.COREL5K_COUNTS)


# --------------------------------------------------------------------------- downloads


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A local HTTP server on 127.0.0.1 serving a folder (its URL prefix and the folder)."""
    folder = tmp_path_factory.mktemp("served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    httpd.shutdown()


@pytest.fixture(scope="module")
def corel5k_archive(server, corel5k_dir) -> str:
    """The real Corel-5k as one zip in the seed's layout, served locally; its URL."""
    url, folder = server
    with zipfile.ZipFile(folder / "corel5k.zip", "w", zipfile.ZIP_STORED) as bundle:
        for path in sorted(corel5k_dir.rglob("*")):
            if path.is_file():
                bundle.write(path, f"Corel-5k/{path.relative_to(corel5k_dir)}")
    return f"{url}/corel5k.zip"


PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes


class CutOffHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD; a request from the start is cut off after 5,000 bytes. A Range request
    "bytes=N-" gets the rest (206 Partial Content), or, where `honour_range` is False, the whole
    file from the start (200), as a server without range support does. Records the ranges."""

    honour_range = True
    ranges: list = []

    def do_GET(self):
        asked = self.headers.get("Range")
        self.ranges.append(asked)
        if asked and self.honour_range:
            start = int(asked.removeprefix("bytes=").removesuffix("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
            self.send_header("Content-Length", str(len(PAYLOAD) - start))
            self.end_headers()
            self.wfile.write(PAYLOAD[start:])
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD if asked else PAYLOAD[:5000])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("honour_range", [True, False])
def test_a_download_cut_off_midway_is_kept_and_resumed(tmp_path, honour_range):
    """The error names the bytes kept; the next download asks for the rest (Range) and joins
    it, or starts again where the server sends the whole file."""
    handler = type("Handler", (CutOffHandler,), {"honour_range": honour_range, "ranges": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/corel5k.zip"
    try:
        with pytest.raises(DatasetError, match=f"download of {url} failed .*after 5,000 of "
                                               f"102,400 bytes.*its 5,000 bytes are kept and a "
                                               f"rerun resumes it"):
            fetch_module.download(url, tmp_path)
        (partial,) = tmp_path.iterdir()
        assert partial.suffix == ".part" and partial.read_bytes() == PAYLOAD[:5000]
        downloaded = fetch_module.download(url, tmp_path)
    finally:
        httpd.shutdown()
    assert downloaded.read_bytes() == PAYLOAD
    assert list(tmp_path.iterdir()) == [downloaded]
    assert handler.ranges == [None, "bytes=5000-"]


class OddRangeHandler(CutOffHandler):
    """CutOffHandler whose first request from the start is cut off and later ones are whole, and
    whose answer to a Range request is 206 from another start (4,096) or, for a range at the
    end, 416 with the file's length."""

    requests_from_start = 0

    def do_GET(self):
        asked = self.headers.get("Range")
        self.ranges.append(asked)
        if asked is None:
            type(self).requests_from_start += 1
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:5000] if self.requests_from_start == 1 else PAYLOAD)
            self.close_connection = True
        elif int(asked.removeprefix("bytes=").removesuffix("-")) >= len(PAYLOAD):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 4096-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
            self.send_header("Content-Length", str(len(PAYLOAD) - 4096))
            self.end_headers()
            self.wfile.write(PAYLOAD[4096:])


@pytest.mark.parametrize("kept, ranges", [
    (5000, ["bytes=5000-", None]),  # a 206 from 4,096 cannot continue 5,000 bytes: again
    (len(PAYLOAD), ["bytes=102400-"])])  # 416, the file's length: the part is whole
def test_a_range_the_server_answers_otherwise(tmp_path, kept, ranges):
    handler = type("Handler", (OddRangeHandler,), {"ranges": [], "requests_from_start": 0})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/corel5k.zip"
    try:
        with pytest.raises(DatasetError, match="its 5,000 bytes are kept"):
            fetch_module.download(url, tmp_path)  # cut off
        (partial,) = tmp_path.iterdir()
        partial.write_bytes(PAYLOAD[:kept])
        handler.ranges.clear()
        downloaded = fetch_module.download(url, tmp_path)
    finally:
        httpd.shutdown()
    assert downloaded.read_bytes() == PAYLOAD and handler.ranges == ranges
    assert list(tmp_path.iterdir()) == [downloaded]


def test_a_full_disk_while_unpacking_a_download_keeps_it(server, tiny_dataset, tmp_path,
                                                        monkeypatch):
    """The download was whole; the disk filled up while it was unpacked: it is kept for the
    rerun (only bad content discards it)."""
    url, folder = server
    pack(tiny_dataset, folder / "tiny.zip")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fetch_module, "extract_archive", disk_full)
    destination = tmp_path / "data" / "corel5k"
    with pytest.raises(DatasetError, match="No space left on device"):
        fetch_module.fetch_corel5k(destination, url=f"{url}/tiny.zip", checksums=False)
    (kept,) = (tmp_path / "data" / ".corel5k-downloads").iterdir()
    assert kept.read_bytes() == (folder / "tiny.zip").read_bytes()


def test_a_connection_reset_keeps_what_was_received(tmp_path, monkeypatch):
    class ResetResponse(io.BytesIO):
        headers = {"Content-Length": "100000"}

        def read(self, size=-1):
            if self.tell():
                raise ConnectionResetError(104, "Connection reset by peer")
            return super().read(size)

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: ResetResponse(b"x" * 5000))
    with pytest.raises(DatasetError, match="download of http://corel5k.example/a.zip failed "
                                           r"\(ConnectionResetError: .*reset by peer"):
        fetch_module.download("http://corel5k.example/a.zip", tmp_path)
    assert [path.read_bytes() for path in tmp_path.iterdir()] == [b"x" * 5000]


def tiny_manifest(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): fetch_module.sha256(path)
            for path in sorted(root.rglob("*")) if path.is_file()}


def github_layout(source: Path, folder: Path, *, spoil: str | None = None) -> None:
    """Serve `source` as the default source does: index files under index/, the images in a
    repository archive (top folder, db/train + db/test and other folders that are ignored)."""
    (folder / "index").mkdir(exist_ok=True)
    for name in ("train.json", "test.json"):
        (folder / "index" / name).write_bytes((source / name).read_bytes())
    (folder / "index" / "corel5k_vocabulary.txt").write_text("sky\n")
    test_names = {s["image_name"] for s in json.loads(
        (source / "test.json").read_text())["samples"]}
    with zipfile.ZipFile(folder / "repo.zip", "w") as bundle:
        bundle.writestr("corel-5k-6fc96e0/README.md", "readme")
        for path in sorted((source / "images").iterdir()):
            data = path.read_bytes()
            if path.name == spoil:
                data = data[:-10] + bytes(10)
            split = "test" if path.name in test_names else "train"
            bundle.writestr(f"corel-5k-6fc96e0/db/{split}/{path.name}", data)
            bundle.writestr(f"corel-5k-6fc96e0/db/train3/{path.name}", b"not used")


def test_default_source_layout_is_assembled_and_verified(server, tiny_dataset, tmp_path):
    url, folder = server
    (tiny_dataset / "corel5k_vocabulary.txt").write_text("sky\n")
    manifest = tiny_manifest(tiny_dataset)
    github_layout(tiny_dataset, folder)
    destination = tmp_path / "data" / "corel5k"
    options = dict(index_url=f"{url}/index/{{name}}", images_url=f"{url}/repo.zip",
                   expected=TINY_COUNTS, manifest=manifest)
    assert fetch_module.fetch_github(destination, **options) == destination
    assert same_tree(tiny_dataset, destination)
    assert sorted(p.name for p in destination.parent.iterdir()) == ["corel5k"]

    github_layout(tiny_dataset, folder, spoil="1004.jpeg")  # one image damaged in transit
    with pytest.raises(DatasetError, match="1 files differ .*first images/1004.jpeg; .* "
                                           r"\(`python -m annotate.data.fetch --skip-checksums` "
                                           r"with the same source accepts another copy\)"):
        fetch_module.fetch_github(tmp_path / "other", **options)
    assert not (tmp_path / "other").exists()
    with pytest.raises(DatasetError, match="download of .*/absent.zip failed"):
        fetch_module.fetch_github(tmp_path / "other", **dict(options,
                                                             images_url=f"{url}/absent.zip"))
    # the three index files, kept for the rerun (downloaded files are deleted only when bad)
    assert len(list((tmp_path / ".other-downloads").iterdir())) == 3
    # an index file is named by its own URL, before the images are downloaded
    github_layout(tiny_dataset, folder)
    (folder / "index" / "test.json").write_text("<html>Sign in</html>")
    with pytest.raises(DatasetError, match=f"^{url}/index/test.json: the server sent an HTML "
                                           f"page, not test.json"):
        fetch_module.fetch_github(tmp_path / "third", **dict(options,
                                                             images_url=f"{url}/absent.zip"))
    (folder / "index" / "test.json").write_text('{"samples": [], "labels": []}')
    with pytest.raises(DatasetError, match=f"^{url}/index/test.json: 1 files differ"):
        fetch_module.fetch_github(tmp_path / "third", **dict(options,
                                                             images_url=f"{url}/absent.zip"))
    # a good fetch installs and deletes what earlier ones kept
    github_layout(tiny_dataset, folder)
    assert fetch_module.fetch_github(tmp_path / "other", **options) == tmp_path / "other"
    assert not (tmp_path / ".other-downloads").exists()


def test_corel5k_url_downloads_checks_every_file_and_installs(corel5k_archive, corel5k_dir,
                                                            tmp_path, monkeypatch):
    monkeypatch.setenv("COREL5K_URL", corel5k_archive)
    destination = fetch_module.fetch_corel5k(tmp_path / "corel5k")
    fetch_module.verify_manifest(destination, fetch_module.read_manifest())
    assert len(list((destination / "images").iterdir())) == 4999


def test_the_main_job_fetches_corel5k_on_its_first_run(corel5k_archive, tmp_path, monkeypatch,
                                                       capsys):
    """No --config.data.root, no $COREL5K_DIR, no data/corel5k: the data arrive in
    data/corel5k of the working folder; once there, or with a root configured, nothing is
    fetched."""
    from configs import smoke

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COREL5K_DIR", raising=False)
    monkeypatch.setenv("COREL5K_URL", corel5k_archive)
    config = smoke.get_config()
    annotate_main.ensure_dataset(config)
    assert "downloading" in capsys.readouterr().err
    assert (tmp_path / "data" / "corel5k" / "train.json").is_file()
    monkeypatch.setenv("COREL5K_URL", "http://127.0.0.1:9/unreachable.zip")
    annotate_main.ensure_dataset(config)  # present: no download (it would fail)
    config.data.root = str(tmp_path / "elsewhere")
    annotate_main.ensure_dataset(config)  # a configured root is never fetched into
    assert not (tmp_path / "elsewhere").exists()


def test_first_runs_started_together_fetch_corel5k_once(tmp_path, monkeypatch):
    """Two runs starting at once on a machine without the data (the processes of one host):
    one downloads while the other waits on the lock, then finds data/corel5k in place."""
    from configs import smoke

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COREL5K_DIR", raising=False)
    downloads, finished = [], []

    def slow_fetch(destination):
        downloads.append(destination)
        time.sleep(0.5)  # the second run arrives while this one downloads
        destination.mkdir(parents=True)
        (destination / "train.json").write_text("[]")

    def first_run():
        annotate_main.ensure_dataset(smoke.get_config())
        finished.append((destination / "train.json").is_file())

    destination = tmp_path / "data" / "corel5k"
    monkeypatch.setattr(fetch_module, "fetch_corel5k", slow_fetch)
    runs = [threading.Thread(target=first_run) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert len(downloads) == 1
    assert finished == [True, True]  # each run returned only with the data in place


# --------------------------------------------------------------------------- errors named


def test_a_downloaded_archive_is_named_by_its_url_not_the_scratch_file(server, tiny_dataset,
                                                                      tmp_path):
    """An HTML page served instead of the archive (a sign-in page) is called one; any other
    error about a downloaded archive names the URL, never the deleted scratch file."""
    url, folder = server
    (folder / "login.zip").write_text("\n<!DOCTYPE html><html>Please sign in</html>")
    with pytest.raises(DatasetError) as caught:
        fetch_module.fetch_corel5k(tmp_path / "data" / "corel5k", url=f"{url}/login.zip")
    assert str(caught.value) == (
        f"{url}/login.zip: the server sent an HTML page, not an archive (a sign-in or error "
        f"page?); download the archive in a browser and run `python -m annotate.data.fetch "
        f"--archive PATH`")
    pack(tiny_dataset, folder / "tiny.zip")
    with pytest.raises(DatasetError, match=rf"^{url}/tiny.zip: 4994 of the 5002 Corel-5k files "
                                           r"are missing"):
        fetch_module.fetch_corel5k(tmp_path / "data" / "corel5k", url=f"{url}/tiny.zip")
    with pytest.raises(DatasetError, match=rf"^{url}/tiny.zip: its dataset folder: expected "
                                           r"\{'train': 4500"):  # the counts, checked after
        fetch_module.fetch_corel5k(tmp_path / "data" / "corel5k", url=f"{url}/tiny.zip",
                                   checksums=False)
    assert list((tmp_path / "data").iterdir()) == []  # no scratch folder left


def test_a_full_disk_while_extracting_is_named_as_such(tiny_dataset, tmp_path, monkeypatch):
    def disk_full(self, path=None, members=None, pwd=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(zipfile.ZipFile, "extractall", disk_full)
    archive = pack(tiny_dataset, tmp_path / "corel5k.zip")
    destination = tmp_path / "data" / "corel5k"
    with pytest.raises(DatasetError) as caught:  # it was "damaged zip archive"
        fetch_module.install_dataset(archive, destination, expected=TINY_COUNTS)
    assert str(caught.value) == (f"No space left on device in {destination.parent} (fetching "
                                 f"Corel-5k into {destination})")
    assert list(destination.parent.iterdir()) == []


def test_a_file_in_the_way_of_the_data_folder_is_one_error_line(tiny_dataset, tmp_path, capsys,
                                                                monkeypatch):
    (tmp_path / "data").write_text("not a folder")
    archive = pack(tiny_dataset, tmp_path / "corel5k.zip")
    assert fetch_module.main(["--archive", str(archive), "--dest",
                              str(tmp_path / "data" / "corel5k")]) == 2
    assert capsys.readouterr().err == (f"error: cannot create the folder {tmp_path / 'data'} for "
                                       f"corel5k: {tmp_path / 'data'} is a file, not a folder\n")

    from configs import smoke

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COREL5K_DIR", raising=False)
    with pytest.raises(DatasetError, match="^cannot create the folder data for corel5k: data is a "
                                           "file, not a folder$"):
        annotate_main.ensure_dataset(smoke.get_config())


def test_a_file_system_error_of_the_fetch_is_one_error_line(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "data/corel5k")

    monkeypatch.setattr(fetch_module, "fetch_corel5k", read_only)
    assert fetch_module.main(["--dest", str(tmp_path / "corel5k")]) == 2
    assert capsys.readouterr().err == "error: Permission denied: data/corel5k\n"


def test_ctrl_c_during_a_download_keeps_it_for_the_rerun(tmp_path, capsys, monkeypatch):
    """Ctrl-C midway (here as the first 5,000 bytes are counted): one line, status 130, and the
    part file stays for the rerun to resume."""
    class InterruptedBar(fetch_module.tqdm):
        def update(self, n=1):
            raise KeyboardInterrupt

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            type("Handler", (CutOffHandler,), {"ranges": []}))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/corel5k.zip"
    monkeypatch.setattr(fetch_module, "tqdm", InterruptedBar)
    try:
        assert fetch_module.main(["--dest", str(tmp_path / "corel5k"), "--url", url]) == 130
    finally:
        httpd.shutdown()
    assert capsys.readouterr().err.endswith("interrupted; a rerun resumes the download\n")
    (partial,) = (tmp_path / ".corel5k-downloads").iterdir()
    assert partial.read_bytes() == PAYLOAD[:5000]


def test_the_main_job_names_its_own_way_out_of_an_incomplete_data_folder(tmp_path, monkeypatch):
    """annotate.main has no --force: a data/corel5k without train.json names the commands that
    replace it."""
    from configs import smoke

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COREL5K_DIR", raising=False)
    (tmp_path / "data" / "corel5k" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError) as caught:
        annotate_main.ensure_dataset(smoke.get_config())
    assert str(caught.value) == (
        "data/corel5k exists but holds no train.json (an incomplete copy?); delete it "
        "(`rm -r data/corel5k`) and run again to download Corel-5k, or replace it with "
        "`python -m annotate.data.fetch --force`")


# --------------------------------------------------------------------------- killed fetches


def test_the_next_fetch_deletes_the_scratch_folders_of_killed_ones(tiny_dataset, tmp_path):
    """A fetch killed by SIGTERM/SIGKILL cannot delete its scratch folder; the next fetch, once
    it holds the lock that every fetch of the command line and annotate.main holds, deletes what
    such fetches left."""
    destination = tmp_path / "data" / "corel5k"
    for name in (".corel5k-fetch-1a2b3c4d", ".corel5k-fetch-5e6f7a8b"):
        (destination.parent / name / "Corel-5k").mkdir(parents=True)
        (destination.parent / name / "corel5k.archive").write_bytes(b"x" * 1000)
    (destination.parent / ".other-fetch-1").mkdir()  # another folder's: kept
    archive = pack(tiny_dataset, tmp_path / "corel5k.zip")
    assert fetch_module.main(["--archive", str(archive), "--dest", str(destination),
                              "--skip-checksums"]) == 2  # the tiny dataset's counts
    assert sorted(path.name for path in destination.parent.iterdir()) == [
        ".corel5k.lock", ".other-fetch-1"]


@pytest.mark.parametrize("top", ["", "Corel-5k", "corel-archive/Corel-5k"])
def test_a_force_fetch_killed_between_its_renames_loses_no_copy(tiny_dataset, tmp_path, top):
    """A --force replacement killed (SIGKILL: nothing runs) after it moved the old copy aside and
    before the new one moved in: the next fetch puts the old copy back, wherever the dataset
    lies in the archive (at its top, one or two folders down); one killed after the new copy
    moved in, before or while the old one is deleted, leaves the new copy, and the next fetch
    deletes the old one (a copy being deleted is never put back, even with no dataset in place).
    The installed folder has the umask's mode, whatever the archive's layout."""
    destination = tmp_path / "data" / "corel5k"
    archive = pack(tiny_dataset, tmp_path / "corel5k.zip", top=top)
    fetch_module.install_dataset(archive, destination, expected=TINY_COUNTS)
    umask = os.umask(0o022)
    os.umask(umask)
    assert destination.stat().st_mode & 0o777 == 0o777 & ~umask
    (destination / "old.txt").write_text("the copy being replaced")
    # killed at --force's second rename (the new copy moving in), at its third (the old copy
    # renamed for deletion), or as it deletes the old copy
    for killed_in, killed_when, kept in (
            ("Path.rename", "len(calls) == 2", "old.txt"),
            ("Path.rename", "len(calls) == 3", "train.json"),
            ("fetch.shutil.rmtree",
             "str(args[0]).endswith('.deleting') and os.path.exists(args[0])", None)):
        killed = subprocess.run([sys.executable, "-c", f"""
import os, shutil
from pathlib import Path
from annotate.data import fetch
calls, original = [], {killed_in}
def killed_at_this_call(*args, **kwargs):
    calls.append(args)
    if {killed_when}:
        os._exit(9)
    return original(*args, **kwargs)
{killed_in} = killed_at_this_call
fetch.install_dataset(Path({str(archive)!r}), Path({str(destination)!r}),
                      expected={TINY_COUNTS!r}, force=True)
"""], capture_output=True, text=True)
        assert killed.returncode == 9, killed.stderr
        assert not (destination / "old.txt").exists()  # the copy being replaced was moved aside
        if kept is None:  # the user deletes the new copy before the next fetch
            shutil.rmtree(destination)
        with fetch_module.fetch_lock(destination):
            assert kept is None or (destination / kept).is_file()
        assert sorted(path.name for path in destination.parent.iterdir()) == [".corel5k.lock"] + (
            ["corel5k"] if kept else [])
        if kept == "train.json":
            (destination / "old.txt").write_text("the copy being replaced")


def test_force_moves_the_old_copy_aside_until_the_new_one_is_in_place(tiny_dataset, tmp_path,
                                                                      monkeypatch):
    """A --force replacement killed while it deletes the old copy leaves the new one in place
    (the old one was deleted first: killed then, no copy was left)."""
    destination = tmp_path / "data" / "corel5k"
    archive = pack(tiny_dataset, tmp_path / "corel5k.zip")
    fetch_module.install_dataset(archive, destination, expected=TINY_COUNTS)
    (destination / "old.txt").write_text("the copy being replaced")
    deletions = []

    def killed_after_the_first_deletion(path, *args, **kwargs):
        existed = Path(path).exists()
        shutil_rmtree(path, *args, **kwargs)
        if existed:
            deletions.append(path)
        if len(deletions) == 1:
            raise KeyboardInterrupt

    shutil_rmtree = fetch_module.shutil.rmtree
    monkeypatch.setattr(fetch_module.shutil, "rmtree", killed_after_the_first_deletion)
    with pytest.raises(KeyboardInterrupt):
        fetch_module.install_dataset(archive, destination, expected=TINY_COUNTS, force=True)
    assert (destination / "train.json").is_file() and not (destination / "old.txt").exists()


def test_force_replaces_a_linked_data_folder_and_can_do_it_again(tiny_dataset, tmp_path):
    """data/corel5k as a link to a copy elsewhere: --force puts the new copy in the link's place
    and deletes the link, not the copy it points to (the link was left aside for good, and every
    later --force failed on it)."""
    archive = pack(tiny_dataset, tmp_path / "corel5k.zip")
    elsewhere = fetch_module.install_dataset(archive, tmp_path / "big" / "corel5k",
                                             expected=TINY_COUNTS)
    destination = tmp_path / "data" / "corel5k"
    destination.parent.mkdir()
    destination.symlink_to(elsewhere)
    for _ in range(2):
        fetch_module.install_dataset(archive, destination, expected=TINY_COUNTS, force=True)
        assert destination.is_dir() and not destination.is_symlink()
        assert sorted(p.name for p in destination.parent.iterdir()) == ["corel5k"]
    assert same_tree(tiny_dataset, elsewhere)


@pytest.mark.parametrize("url", ["github.com/owner/corel5k.zip", "corel5k.zip"])
def test_a_url_without_its_scheme_is_one_error_line(tmp_path, capsys, url):
    """A URL typed without https:// is a DatasetError (one `error:` line), not urllib's
    ValueError traceback, and leaves nothing behind."""
    destination = tmp_path / "corel5k"
    assert fetch_module.main(["--url", url, "--dest", str(destination)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: {url!r} is not a URL (unknown url type")
    assert "https://" in line and not destination.exists()


def test_the_readme_gives_the_download_size_the_fetch_announces():
    """The README's first-run paragraph and ensure_corel5k's message give one figure."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"downloads about {fetch_module.DOWNLOAD_MB} MB from GitHub" in readme
