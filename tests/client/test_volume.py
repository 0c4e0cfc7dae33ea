"""The synchronous native API against a real brick: every call, and the errno each refusal gives."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from mortar.client import IO_CHUNK, Volume
from mortar.core.fops import FALLOC_FL_KEEP_SIZE
from mortar.graph import load

from .conftest import counter_of


def test_root_and_statvfs(vol: Volume) -> None:
    st = vol.stat("/")
    assert stat.S_ISDIR(st.st_mode) and st.st_nlink >= 2
    assert isinstance(st.st_mtime, float) and st.st_mtime_ns // 1_000_000_000 == int(st.st_mtime)
    assert vol.stat("") == vol.stat("/..") == vol.stat("/./") == st
    sv = vol.statvfs("/")
    assert sv.f_bsize > 0 and sv.f_blocks >= sv.f_bfree >= sv.f_bavail and sv.f_namemax >= 255
    assert vol.listdir("/") == []


def test_create_write_read_close(vol: Volume) -> None:
    h = vol.create("/f", 0o640)
    assert vol.pwrite(h, b"hello world", 0) == 11
    assert vol.pwrite(h, memoryview(b"WORLD"), 6) == 5
    assert vol.pread(h, 100, 0) == b"hello WORLD"
    assert vol.pread(h, 5, 6) == b"WORLD"
    assert vol.pread(h, 10, 100) == b""
    buf = bytearray(8)
    assert vol.preadinto(h, buf, 3) == 8 and bytes(buf) == b"lo WORLD"
    st = vol.fstat(h)
    assert st.st_size == 11 and stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    vol.fsync(h)
    vol.fsync(h, datasync=True)
    vol.close(h)
    with pytest.raises(OSError) as info:
        vol.pread(h, 1, 0)
    assert info.value.errno == errno.EBADF
    with pytest.raises(FileExistsError) as exists:
        vol.create("/f")
    assert exists.value.filename == "/f"
    h = vol.open_fd("/f", os.O_RDWR | os.O_CREAT)  # exists, no O_EXCL: opened
    assert vol.pread(h, 5, 0) == b"hello"
    vol.close(h)
    h = vol.open_fd("f", os.O_WRONLY | os.O_TRUNC)  # relative to the root
    assert vol.fstat(h).st_size == 0
    vol.close(h)
    assert vol.stat("/f").st_size == 0
    counter = counter_of(vol)
    assert counter.calls["flush"] == counter.calls["release"] == 3


def test_default_identity_is_this_process(vol: Volume) -> None:
    vol.stat("/")
    ids = counter_of(vol).identities
    assert {(c.uid, c.gid, c.pid) for c in ids} == {(os.getuid(), os.getgid(), os.getpid())}
    assert all(set(c.groups) == set(os.getgroups()) for c in ids)


def test_large_io_split_into_concurrent_pieces(vol: Volume) -> None:
    size = 5 * IO_CHUNK + 12345
    data = os.urandom(size)
    h = vol.create("/big")
    counter = counter_of(vol)
    assert vol.pwrite(h, data, 0) == size
    assert counter.calls["writev"] == 6 and counter.max_io["writev"] == IO_CHUNK
    assert vol.pread(h, size + 100, 0) == data
    assert counter.calls["readv"] == 6 and counter.max_io["readv"] <= IO_CHUNK
    buf = bytearray(size + IO_CHUNK)  # runs past the end: short count, rest untouched
    assert vol.preadinto(h, buf, 0) == size
    assert buf[:size] == data and not any(buf[size:])
    middle = memoryview(bytearray(2 * IO_CHUNK + 1))
    assert vol.preadinto(h, middle, 100) == len(middle) and middle == data[100 : 100 + len(middle)]
    vol.close(h)


def test_append_handles_write_at_the_end(vol: Volume) -> None:
    h = vol.create("/log")
    vol.pwrite(h, b"0123456789", 0)
    vol.close(h)
    a = vol.open_fd("/log", os.O_WRONLY | os.O_APPEND)
    vol.pwrite(a, b"abc", 0)
    big = os.urandom(2 * IO_CHUNK + 7)
    vol.pwrite(a, big, 0)  # pieces in order, each at the end
    vol.close(a)
    h = vol.open_fd("/log")
    assert vol.pread(h, 20_000_000, 0) == b"0123456789abc" + big
    vol.close(h)


def test_namespace_calls(vol: Volume) -> None:
    vol.mkdir("/d", 0o750)
    assert stat.S_IMODE(vol.stat("/d").st_mode) == 0o750
    vol.makedirs("/d/e/f/g")
    vol.makedirs("/d/e/f/g", exist_ok=True)
    with pytest.raises(FileExistsError):
        vol.makedirs("/d/e/f/g")
    h = vol.create("/d/e/file")
    vol.pwrite(h, b"x" * 10, 0)
    vol.close(h)
    assert sorted(vol.listdir("/d/e")) == ["f", "file"]
    vol.rename("/d/e/file", "/d/moved")
    assert not vol.exists("/d/e/file") and vol.stat("/d/moved").st_size == 10
    vol.rename("/d/e", "/d/e2")  # a directory: descendants follow
    assert vol.exists("/d/e2/f/g") and not vol.exists("/d/e/f")
    vol.link("/d/moved", "/d/hard")
    assert vol.stat("/d/hard").st_ino == vol.stat("/d/moved").st_ino and vol.stat("/d/moved").st_nlink == 2
    vol.unlink("/d/hard")
    assert vol.stat("/d/moved").st_nlink == 1
    vol.symlink("e2/f", "/d/link")
    assert vol.readlink("/d/link") == "e2/f"
    assert stat.S_ISLNK(vol.lstat("/d/link").st_mode) and stat.S_ISDIR(vol.stat("/d/link").st_mode)
    assert vol.listdir("/d/link") == ["g"]  # through the symlink
    vol.symlink("/d/moved", "/abs")
    assert vol.stat("/abs").st_size == 10  # absolute targets start at the volume root
    vol.rmdir("/d/e2/f/g")
    vol.rmdir("/d/e2/f")
    vol.remove("/d/link")
    assert sorted(vol.listdir("/d")) == ["e2", "moved"]
    # rename replaces files, and empty directories by directories
    h = vol.create("/d/other")
    vol.close(h)
    vol.rename("/d/other", "/d/moved")
    assert vol.stat("/d/moved").st_size == 0
    vol.mkdir("/d/empty")
    vol.rename("/d/e2", "/d/empty")
    assert sorted(vol.listdir("/d")) == ["empty", "moved"]


def test_attribute_calls(vol: Volume) -> None:
    h = vol.create("/a")
    vol.pwrite(h, b"abcdef", 0)
    vol.close(h)
    vol.chmod("/a", 0o600)
    assert stat.S_IMODE(vol.stat("/a").st_mode) == 0o600
    vol.chown("/a", 1234, 5678)
    st = vol.stat("/a")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    vol.chown("/a", -1, 42)
    assert (vol.stat("/a").st_uid, vol.stat("/a").st_gid) == (1234, 42)
    vol.utime("/a", ns=(1_000_000_123, 2_000_000_456))
    st = vol.stat("/a")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    vol.utime("/a", (10.5, 20.25))
    assert vol.stat("/a").st_mtime == 20.25
    vol.utime("/a")
    assert vol.stat("/a").st_mtime > 1_000_000
    with pytest.raises(ValueError):
        vol.utime("/a", (1, 2), ns=(1, 2))
    vol.truncate("/a", 3)
    assert vol.stat("/a").st_size == 3
    vol.truncate("/a", 4096)
    h = vol.open_fd("/a")
    assert vol.pread(h, 10, 0) == b"abc" + bytes(7)
    vol.close(h)
    assert vol.access("/a", os.R_OK | os.W_OK) and not vol.access("/missing", os.F_OK)


def test_xattr_calls(vol: Volume) -> None:
    vol.mkdir("/x")
    vol.setxattr("/x", "user.colour", b"blue")
    vol.setxattr("/x", "user.size", memoryview(b"\x00\x01"))
    assert vol.getxattr("/x", "user.colour") == b"blue"
    assert {"user.colour", "user.size"} <= set(vol.listxattr("/x"))
    with pytest.raises(FileExistsError):
        vol.setxattr("/x", "user.colour", b"red", os.XATTR_CREATE)
    with pytest.raises(OSError) as info:
        vol.setxattr("/x", "user.none", b"v", os.XATTR_REPLACE)
    assert info.value.errno == errno.ENODATA
    vol.setxattr("/x", "user.colour", b"red", os.XATTR_REPLACE)
    assert vol.getxattr("/x", "user.colour") == b"red"
    vol.removexattr("/x", "user.colour")
    with pytest.raises(OSError) as info:
        vol.getxattr("/x", "user.colour")
    assert info.value.errno == errno.ENODATA and info.value.filename == "/x"
    with pytest.raises(OSError):
        vol.removexattr("/x", "user.colour")


def test_space_calls(vol: Volume) -> None:
    h = vol.create("/sparse")
    vol.pwrite(h, b"\xff" * 65536, 0)
    vol.discard(h, 4096, 8192)
    assert vol.fstat(h).st_size == 65536
    data = vol.pread(h, 65536, 0)
    assert (
        data[:4096] == b"\xff" * 4096 and data[4096:12288] == bytes(8192) and data[12288:] == b"\xff" * 53248
    )
    vol.zerofill(h, 60000, 10000)
    assert vol.fstat(h).st_size == 70000 and vol.pread(h, 10000, 60000) == bytes(10000)
    vol.fallocate(h, 0, 0, 100_000)
    assert vol.fstat(h).st_size == 100_000
    vol.fallocate(h, FALLOC_FL_KEEP_SIZE, 0, 200_000)
    assert vol.fstat(h).st_size == 100_000
    vol.ftruncate(h, 50)
    assert vol.fstat(h).st_size == 50
    assert vol.seek_data(h, 0) == 0
    assert vol.seek_hole(h, 0) == 50
    with pytest.raises(OSError) as info:
        vol.seek_data(h, 50)
    assert info.value.errno == errno.ENXIO
    vol.close(h)


@pytest.mark.parametrize(
    ("call", "exc_type", "code"),
    [
        (lambda v: v.stat("/nope"), FileNotFoundError, errno.ENOENT),
        (lambda v: v.stat("/nope/deeper"), FileNotFoundError, errno.ENOENT),
        (lambda v: v.open_fd("/nope"), FileNotFoundError, errno.ENOENT),
        (lambda v: v.create("/nope/file"), FileNotFoundError, errno.ENOENT),
        (lambda v: v.unlink("/nope"), FileNotFoundError, errno.ENOENT),
        (lambda v: v.rename("/nope", "/other"), FileNotFoundError, errno.ENOENT),
        (lambda v: v.mkdir("/dir"), FileExistsError, errno.EEXIST),
        (lambda v: v.mkdir("/"), FileExistsError, errno.EEXIST),
        (lambda v: v.symlink("x", "/file"), FileExistsError, errno.EEXIST),
        (lambda v: v.link("/file", "/dir"), FileExistsError, errno.EEXIST),
        (lambda v: v.rmdir("/dir"), OSError, errno.ENOTEMPTY),
        (lambda v: v.rename("/dir/sub", "/full"), OSError, errno.ENOTEMPTY),
        (lambda v: v.open_fd("/dir", os.O_WRONLY), IsADirectoryError, errno.EISDIR),
        (lambda v: v.unlink("/dir"), IsADirectoryError, errno.EISDIR),
        (lambda v: v.rename("/file", "/dir"), IsADirectoryError, errno.EISDIR),
        (lambda v: v.stat("/file/x"), NotADirectoryError, errno.ENOTDIR),
        (lambda v: v.stat("/file/"), NotADirectoryError, errno.ENOTDIR),
        (lambda v: v.listdir("/file"), NotADirectoryError, errno.ENOTDIR),
        (lambda v: v.rmdir("/file"), NotADirectoryError, errno.ENOTDIR),
        (lambda v: v.mkdir("/file/sub"), NotADirectoryError, errno.ENOTDIR),
        (lambda v: v.rename("/dir/sub", "/file"), NotADirectoryError, errno.ENOTDIR),
        (lambda v: v.readlink("/file"), OSError, errno.EINVAL),
        (lambda v: v.stat("/bad\0name"), OSError, errno.EINVAL),
        (lambda v: v.rename("/dir", "/dir/sub/inside"), OSError, errno.EINVAL),
        (lambda v: v.stat("/loop"), OSError, errno.ELOOP),
        (lambda v: v.open_fd("/link", os.O_RDONLY | os.O_NOFOLLOW), OSError, errno.ELOOP),
        (lambda v: v.link("/dir", "/dirlink"), PermissionError, errno.EPERM),
    ],
)
def test_errors_surface_as_oserror(vol: Volume, call, exc_type: type[OSError], code: int) -> None:  # type: ignore[no-untyped-def]
    vol.mkdir("/dir")
    vol.mkdir("/dir/sub")
    vol.mkdir("/full")
    vol.mkdir("/full/child")
    vol.close(vol.create("/file"))
    vol.symlink("loop", "/loop")
    vol.symlink("file", "/link")
    with pytest.raises(exc_type) as info:
        call(vol)
    assert info.value.errno == code
    assert info.value.filename is not None and str(info.value.filename).startswith("/")


def test_closed_volume_refuses_calls(volfile) -> None:  # type: ignore[no-untyped-def]
    vol = Volume.from_volfile(volfile)
    h = vol.create("/left-open")
    counter = counter_of(vol)
    vol.close()
    assert counter.calls["release"] == 1  # open files released at volume close
    assert h.closed and vol.closed and not vol._loop.thread.is_alive()
    with pytest.raises(ValueError):
        vol.stat("/")
    vol.close()  # idempotent


def test_rename_onto_another_link_of_the_same_file(vol: Volume) -> None:
    vol.close(vol.create("/one"))
    vol.link("/one", "/two")
    vol.rename("/one", "/two")  # POSIX: nothing happens
    assert vol.exists("/one") and vol.exists("/two") and vol.stat("/two").st_nlink == 2


def test_sync_scandir_and_walk(vol: Volume) -> None:
    vol.makedirs("/w/x")
    vol.close(vol.create("/w/f"))
    counter = counter_of(vol)
    with vol.scandir("/w") as it:
        assert next(it).name in ("f", "x")  # closed early: the directory is released anyway
    assert counter.calls["releasedir"] == 1
    assert sorted(e.name for e in vol.scandir("/w")) == ["f", "x"]
    assert counter.calls["releasedir"] == 2  # released at the end of the listing
    with pytest.raises(FileNotFoundError):
        vol.scandir("/nope")
    assert [(p, sorted(d), f) for p, d, f in vol.walk("/w")] == [("/w", ["x"], ["f"]), ("/w/x", [], [])]
    assert [p for p, _, _ in vol.walk("/w", topdown=False)] == ["/w/x", "/w"]


def test_from_graph_starts_and_stops_it(volfile) -> None:  # type: ignore[no-untyped-def]
    graph = load(volfile)
    with Volume.from_graph(graph, timeout=10) as v:
        assert graph.started and graph.up
        v.mkdir("/made")
        assert v.listdir() == ["made"]
    assert not graph.started
