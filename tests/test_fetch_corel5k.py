"""scripts/fetch_corel5k.py offline: extraction, validation and installation from local archives."""
from __future__ import annotations

import filecmp
import tarfile
import zipfile
from pathlib import Path

import pytest

from annotate.data import DatasetError
from conftest import write_dataset
from modules import load_module

TINY_COUNTS = {"train": 12, "test": 6, "labels": 5}


@pytest.fixture(scope="module")
def fetch():
    """The script loaded as a module (scripts/ is not a package)."""
    return load_module("scripts/fetch_corel5k.py")


def pack(source: Path, archive: Path, top: str = "Corel-5k") -> Path:
    """Zip or tar.gz (by suffix) every file of `source` under the folder name `top`."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as bundle:
            for path in files:
                bundle.write(path, f"{top}/{path.relative_to(source)}")
    else:
        with tarfile.open(archive, "w:gz") as bundle:
            for path in files:
                bundle.add(path, f"{top}/{path.relative_to(source)}")
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


def test_download_streams_a_url_to_disk(fetch, tiny_dataset, tmp_path):
    archive = pack(tiny_dataset, tmp_path / "source.zip")
    downloaded = fetch.download(archive.as_uri(), tmp_path / "downloaded.zip")
    assert downloaded.read_bytes() == archive.read_bytes()
    with pytest.raises(DatasetError, match="--archive"):
        fetch.download((tmp_path / "absent.zip").as_uri(), tmp_path / "other.zip")
    assert not (tmp_path / "other.zip.part").exists()


def test_main_installs_from_a_local_archive(fetch, tiny_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fetch, "COREL5K_COUNTS", TINY_COUNTS)
    archive = pack(tiny_dataset, tmp_path / "corel5k.zip")
    destination = tmp_path / "data" / "corel5k"
    assert fetch.main(["--archive", str(archive), "--dest", str(destination)]) == 0
    assert "ready" in capsys.readouterr().out
    assert fetch.main(["--archive", str(archive), "--dest", str(destination)]) == 1
    assert "--force" in capsys.readouterr().err
    assert fetch.main(["--archive", str(archive), "--dest", str(destination), "--force"]) == 0


def not_an_archive(source: Path, tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "corel5k.zip"
    path.write_bytes(b"<html>Please sign in</html>")
    return path, "not a zip or tar archive"


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


@pytest.mark.parametrize("spoil", [not_an_archive, no_dataset_folder, wrong_counts, corrupt_image,
                                   unsafe_member, truncated_tar])
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
