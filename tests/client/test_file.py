"""The file object against `io` semantics: the same operations on the built-in `open()` of a local
file and on `Volume.open()` must give the same results, errors and final content."""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mortar.client import RawFile, Volume

from .conftest import counter_of

_names = itertools.count()

_op = st.one_of(
    st.tuples(st.just("write"), st.binary(max_size=200)),
    st.tuples(st.just("read"), st.integers(-1, 300)),
    st.tuples(st.just("readinto"), st.integers(0, 64)),
    st.tuples(st.just("readline"), st.just(0)),
    st.tuples(st.just("seek"), st.tuples(st.integers(-50, 400), st.sampled_from([0, 1, 2]))),
    st.tuples(st.just("tell"), st.just(0)),
    st.tuples(st.just("truncate"), st.one_of(st.none(), st.integers(0, 300))),
    st.tuples(st.just("flush"), st.just(0)),
)


def _apply(f: Any, op: str, arg: Any) -> Any:
    try:
        if op == "write":
            return f.write(arg)
        if op == "read":
            return f.read(arg)
        if op == "readinto":
            buf = bytearray(arg)
            n = f.readinto(buf)
            return n, bytes(buf)
        if op == "readline":
            return f.readline()
        if op == "seek":
            return f.seek(*arg)
        if op == "tell":
            return f.tell()
        if op == "truncate":
            return f.truncate(arg)
        f.flush()
        return None
    except (OSError, ValueError) as exc:
        return type(exc).__name__, getattr(exc, "errno", None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mode=st.sampled_from(["rb", "r+b", "wb", "w+b", "ab", "a+b", "xb", "x+b"]),
    buffering=st.sampled_from([0, -1, 16]),
    initial=st.binary(max_size=300),
    ops=st.lists(_op, max_size=12),
)
def test_file_object_matches_builtin_open(
    vol: Volume, tmp_path: Path, mode: str, buffering: int, initial: bytes, ops: list[tuple[str, Any]]
) -> None:
    name = f"f{next(_names)}"
    local = tmp_path / name
    if "x" not in mode:
        local.write_bytes(initial)
        with vol.open(f"/{name}", "wb") as w:
            w.write(initial)
    with (
        open(local, mode, buffering=buffering) as ref,
        vol.open(f"/{name}", mode, buffering=buffering) as got,
    ):
        kind = type(ref).__name__
        assert type(got).__name__ == ("RawFile" if kind == "FileIO" else kind)
        for op, arg in ops:
            assert _apply(got, op, arg) == _apply(ref, op, arg), (op, arg)
    with vol.open(f"/{name}", "rb") as check:
        assert check.read() == local.read_bytes()


def test_raw_file_and_closed_state(vol: Volume) -> None:
    raw = vol.open("/raw", "w+b", buffering=0)
    assert isinstance(raw, RawFile) and raw.name == "/raw" and raw.mode == "w+b"
    assert raw.readable() and raw.writable() and raw.seekable() and not raw.isatty()
    with pytest.raises(io.UnsupportedOperation):
        raw.fileno()
    assert raw.write(b"abcdef") == 6 and raw.tell() == 6
    assert raw.seek(2) == 2 and raw.read(2) == b"cd" and raw.readall() == b"ef"
    raw.close()
    raw.close()
    assert raw.closed
    with pytest.raises(ValueError):
        raw.read()
    with vol.open("/raw", "rb") as f:
        with pytest.raises(io.UnsupportedOperation):
            f.write(b"no")
        assert f.read() == b"abcdef"


def test_readall_uses_few_large_reads(vol: Volume) -> None:
    data = os.urandom(3 << 20)
    with vol.open("/large", "wb") as f:
        f.write(data)
    counter = counter_of(vol)
    before = counter.calls["readv"]
    with vol.open("/large", "rb") as f:
        assert f.read() == data
    assert counter.calls["readv"] - before <= 6  # 3 MiB in 1 MiB pieces, plus the EOF probe


def test_text_mode(vol: Volume) -> None:
    with vol.open("/t.txt", "w", encoding="utf-8") as f:
        f.write("première ligne\nsecond\n")
        assert f.mode == "w"
    with vol.open("/t.txt", "r", encoding="utf-8") as f:
        assert f.readline() == "première ligne\n"
        assert list(f) == ["second\n"]
    with vol.open("/t.txt", "rb") as f:
        assert f.read() == "première ligne\nsecond\n".encode()
    with pytest.raises(ValueError):
        vol.open("/t.txt", "r", buffering=0)
    with pytest.raises(ValueError):
        vol.open("/t.txt", "rw")
    with pytest.raises(ValueError):
        vol.open("/t.txt", "rb", encoding="utf-8")
    with pytest.raises(FileExistsError):
        vol.open("/t.txt", "x")


def test_seek_data_and_hole_through_the_file_object(vol: Volume) -> None:
    with vol.open("/holes", "w+b") as f:
        f.write(b"data" * 1024)
        assert f.seek(0, os.SEEK_DATA) == 0
        assert f.seek(0, os.SEEK_HOLE) == 4096
