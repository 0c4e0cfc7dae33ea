"""Two mounts of one volume (two clients): what one does, the other sees once its kernel's caches
expire (entry-timeout for names, attr-timeout for attributes, reopening for data).

Waits are bounded polls, never fixed sleeps, and their length is not what is asserted."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import mounted

TIMEOUTS = "attr-timeout=0.5,entry-timeout=0.5"


def eventually(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def exists(path: Path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def pair(volume: Path, base: Path) -> Iterator[tuple[Path, Path]]:
    with mounted(volume, base / "co-a", TIMEOUTS) as a, mounted(volume, base / "co-b", TIMEOUTS) as b:
        top = a.path / "coherence"
        top.mkdir()
        assert eventually(lambda: exists(b.path / "coherence"))
        yield top, b.path / "coherence"


def test_names_appear_and_vanish(pair: tuple[Path, Path]) -> None:
    a, b = pair
    assert not exists(b / "born")  # negative-timeout 0: B's kernel remembers no missing name
    (a / "born").write_text("hello")
    assert eventually(lambda: exists(b / "born"))
    assert (b / "born").read_text() == "hello"
    os.rename(a / "born", a / "renamed")
    assert eventually(lambda: exists(b / "renamed") and not exists(b / "born"))
    os.unlink(a / "renamed")
    assert eventually(lambda: not exists(b / "renamed"))
    (a / "dir").mkdir()
    (a / "dir" / "f").write_text("in a dir")
    assert eventually(lambda: os.listdir(b / "dir") == ["f"] if exists(b / "dir") else False)


def test_sizes_and_modes_follow(pair: tuple[Path, Path]) -> None:
    a, b = pair
    (a / "grow").write_bytes(b"x" * 100)
    assert eventually(lambda: exists(b / "grow"))
    assert (b / "grow").stat().st_size == 100
    with open(a / "grow", "ab") as f:
        f.write(b"y" * 5000)
    assert eventually(lambda: (b / "grow").stat().st_size == 5100)
    os.chmod(a / "grow", 0o600)
    assert eventually(lambda: (b / "grow").stat().st_mode & 0o777 == 0o600)
    os.truncate(b / "grow", 10)  # and the other way round
    assert eventually(lambda: (a / "grow").stat().st_size == 10)


def test_data_written_on_one_is_read_on_the_other(pair: tuple[Path, Path]) -> None:
    a, b = pair
    (a / "data").write_bytes(b"a" * 8192)
    assert eventually(lambda: exists(b / "data"))
    assert (b / "data").read_bytes() == b"a" * 8192  # B's page cache now holds the file
    with open(a / "data", "r+b") as f:
        f.write(b"b" * 4096)  # same size: only the data changed
    assert eventually(lambda: (b / "data").read_bytes() == b"b" * 4096 + b"a" * 4096)
    with open(b / "data", "rb", buffering=0) as f:  # a file open on B, its pages cached there,
        assert f.read() == b"b" * 4096 + b"a" * 4096  # sees A's write once attributes expire
        with open(a / "data", "r+b") as w:
            w.seek(4096)
            w.write(b"c" * 4096)
        assert eventually(lambda: (f.seek(4096), f.read())[1] == b"c" * 4096)


def test_open_file_survives_removal_elsewhere(pair: tuple[Path, Path]) -> None:
    a, b = pair
    (a / "doomed").write_bytes(b"still readable")
    assert eventually(lambda: exists(b / "doomed"))
    with open(b / "doomed", "rb") as f:
        os.unlink(a / "doomed")
        assert f.read() == b"still readable"
    assert eventually(lambda: not exists(b / "doomed"))
