"""POSIX behaviour through the kernel mount, as Linux's own file systems have it: permissions checked
for an unprivileged caller (with supplementary groups), xattr namespaces, rename flags, open-unlinked
files, set-user-ID clearing, times, special files, directory offsets and inode forgetting."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
from pathlib import Path

import pytest

from .conftest import NOBODY, Mount, as_nobody, run

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(src: Path, dst: Path, flags: int) -> None:
    if libc.renameat2(AT_FDCWD, bytes(src), AT_FDCWD, bytes(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def denied(done: object) -> bool:
    text = getattr(done, "stderr", "")
    return getattr(done, "returncode", 0) != 0 and ("Permission denied" in text or "not permitted" in text)


def test_permissions_of_an_unprivileged_caller(work: Path) -> None:
    secret = work / "secret"
    secret.mkdir(mode=0o700)
    (secret / "inside").write_text("x")
    assert denied(as_nobody("ls", secret))
    assert denied(as_nobody("cat", secret / "inside"))
    assert as_nobody("touch", work / "mine").returncode == 0
    assert (work / "mine").stat().st_uid == 65534 and (work / "mine").stat().st_gid == 65534
    rootfile = work / "rootfile"
    rootfile.write_text("root's")
    assert denied(as_nobody("sh", "-c", f"echo more >> {rootfile}"))
    assert denied(as_nobody("chmod", "666", rootfile))
    assert denied(as_nobody("chown", "65534", rootfile))
    assert denied(as_nobody("rm", "-f", secret / "inside"))
    assert rootfile.read_text() == "root's" and (secret / "inside").exists()


def test_supplementary_groups_reach_the_brick(work: Path) -> None:
    shared = work / "shared"
    shared.mkdir()
    os.chown(shared, 0, 4242)
    shared.chmod(0o770)
    member = ["setpriv", "--reuid=65534", "--regid=65534", "--groups=4242"]
    # the kernel allows the creation from the process's groups; the brick, acting as the caller,
    # allows it only if the groups came along with the request
    assert run(*member, "touch", shared / "by-member", check=False).returncode == 0
    assert run(*member, "ls", shared).stdout.split() == ["by-member"]
    assert denied(as_nobody("touch", shared / "by-outsider"))


def test_xattr_namespaces(work: Path) -> None:
    f = work / "attrs"
    f.write_text("x")
    run("setfattr", "-n", "user.colour", "-v", "blue", f)
    run("setfattr", "-n", "trusted.secret", "-v", "42", f)
    assert os.getxattr(f, "user.colour") == b"blue" and os.getxattr(f, "trusted.secret") == b"42"
    mine = run("getfattr", "-d", "-m", "-", f).stdout
    assert 'user.colour="blue"' in mine and 'trusted.secret="42"' in mine
    theirs = as_nobody("getfattr", "-d", "-m", "-", f)
    assert 'user.colour="blue"' in theirs.stdout and "trusted" not in theirs.stdout
    assert "No such attribute" in as_nobody("getfattr", "-n", "trusted.secret", f).stderr
    assert denied(as_nobody("setfattr", "-n", "trusted.mine", "-v", "1", f))
    assert denied(as_nobody("setfattr", "-n", "user.mine", "-v", "1", f))  # not the owner's file
    with pytest.raises(FileExistsError):
        os.setxattr(f, "user.colour", b"red", os.XATTR_CREATE)
    with pytest.raises(OSError) as info:
        os.setxattr(f, "user.absent", b"red", os.XATTR_REPLACE)
    assert info.value.errno == errno.ENODATA
    os.setxattr(f, "user.colour", b"red", os.XATTR_REPLACE)
    big = os.urandom(3000)
    os.setxattr(f, "user.big", big)
    assert os.getxattr(f, "user.big") == big
    os.removexattr(f, "user.colour")
    assert set(os.listxattr(f)) == {"user.big", "trusted.secret"}
    with pytest.raises(OSError) as info:
        os.getxattr(f, "user.colour")
    assert info.value.errno == errno.ENODATA


def test_rename_semantics(work: Path) -> None:
    a, b = work / "a", work / "b"
    a.write_text("A")
    b.write_text("B")
    with pytest.raises(FileExistsError):
        renameat2(a, b, RENAME_NOREPLACE)
    with pytest.raises(OSError) as info:
        renameat2(a, b, RENAME_EXCHANGE)
    assert info.value.errno == errno.EINVAL
    renameat2(a, work / "c", RENAME_NOREPLACE)
    os.rename(work / "c", b)  # replaces
    assert b.read_text() == "A" and not a.exists()
    full, empty = work / "full", work / "empty"
    full.mkdir()
    (full / "x").write_text("")
    empty.mkdir()
    with pytest.raises(OSError) as info:
        os.rename(empty, full)
    assert info.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    with pytest.raises(IsADirectoryError):
        os.rename(b, empty)
    os.rename(full, empty)  # a directory over an empty one
    assert (empty / "x").exists() and not full.exists()


def test_open_unlinked_file(work: Path) -> None:
    path = work / "ghost"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"boo" * 1000)
        os.unlink(path)
        assert not path.exists()
        assert os.fstat(fd).st_nlink == 0 and os.fstat(fd).st_size == 3000
        assert os.pread(fd, 6, 0) == b"booboo"
        os.pwrite(fd, b"more", 3000)
        assert os.fstat(fd).st_size == 3004
    finally:
        os.close(fd)


def test_times(work: Path) -> None:
    f = work / "timed"
    f.write_text("t")
    f.chmod(0o666)
    os.utime(f, ns=(1_000_000_001, 2_000_000_002))
    st = f.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    assert as_nobody("touch", f).returncode == 0  # UTIME_NOW: write access is enough
    assert f.stat().st_mtime_ns > 2_000_000_002
    assert denied(as_nobody("touch", "-d", "2000-01-01", f))  # explicit times: the owner only
    before = f.stat().st_mtime_ns
    with open(f, "a") as w:
        w.write("more")
    assert f.stat().st_mtime_ns >= before and f.stat().st_size == 5


@pytest.mark.parametrize(("mode", "after"), [(0o4777, 0o777), (0o6777, 0o777), (0o2767, 0o767)])
def test_unprivileged_write_clears_set_id_bits(work: Path, mode: int, after: int) -> None:
    for how in (["sh", "-c", 'echo x >> "$0"'], ["truncate", "-s", "100"]):
        f = work / f"setid-{mode:o}-{how[0]}"
        f.write_text("")
        f.chmod(mode)
        assert stat.S_IMODE(f.stat().st_mode) == mode
        done = run(*NOBODY, *how, f, check=False)
        assert done.returncode == 0, done.stderr
        assert stat.S_IMODE(f.stat().st_mode) == after, (how, oct(f.stat().st_mode))
    kept = work / f"setid-{mode:o}-root"
    kept.write_text("")
    kept.chmod(mode)
    with open(kept, "a") as w:
        w.write("root may")
    assert stat.S_IMODE(kept.stat().st_mode) == mode


def test_special_files(work: Path) -> None:
    os.mkfifo(work / "fifo", 0o640)
    assert (work / "fifo").stat().st_mode == stat.S_IFIFO | 0o640
    os.mknod(work / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    st = (work / "null").stat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(work / "sock"))
    assert stat.S_ISSOCK((work / "sock").lstat().st_mode)
    os.symlink("a/../b" * 30, work / "long-link")
    assert os.readlink(work / "long-link") == "a/../b" * 30


def test_links_and_counts(work: Path) -> None:
    d = work / "d"
    d.mkdir()
    assert d.stat().st_nlink == 2
    (d / "sub").mkdir()
    assert d.stat().st_nlink == 3
    f = d / "f"
    f.write_text("linked")
    os.link(f, d / "g")
    os.link(f, work / "h")
    assert f.stat().st_nlink == 3 and (work / "h").stat().st_ino == f.stat().st_ino
    os.unlink(d / "g")
    assert (work / "h").stat().st_nlink == 2
    with pytest.raises(PermissionError):
        os.link(d / "sub", work / "dirlink")


def test_append_and_sizes(work: Path) -> None:
    f = work / "log"
    one = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    two = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(20):
            os.write(one if i % 2 else two, b"%02d" % i)
            assert f.stat().st_size == 2 * (i + 1)
    finally:
        os.close(one)
        os.close(two)
    assert f.read_bytes() == b"".join(b"%02d" % i for i in range(20))
    g = work / "sparse"
    fd = os.open(g, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"end", 10 << 20)
        assert os.fstat(fd).st_size == (10 << 20) + 3 and g.stat().st_size == (10 << 20) + 3
        os.ftruncate(fd, 5)
        assert g.stat().st_size == 5 and os.pread(fd, 10, 0) == b"\0" * 5
    finally:
        os.close(fd)


class Dirent(ctypes.Structure):
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


def list_with_offsets(path: Path) -> list[tuple[bytes, int]]:
    """(name, telldir after it) for every entry, with libc's readdir."""
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.restype = ctypes.POINTER(Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.closedir.argtypes = [ctypes.c_void_p]
    handle = libc.opendir(bytes(path))
    assert handle
    out = []
    try:
        while True:
            entry = libc.readdir(handle)
            if not entry:
                break
            out.append((entry.contents.d_name, libc.telldir(handle)))
    finally:
        libc.closedir(handle)
    return out


def test_big_directory_offsets_and_forget(work: Path, mnt: Mount) -> None:
    big = work / "big"
    big.mkdir()
    names = {f"entry-with-a-longish-name-{i:05d}" for i in range(1500)}
    for name in names:
        os.close(os.open(big / name, os.O_CREAT | os.O_WRONLY, 0o644))
    listed = list_with_offsets(big)
    assert [n for n, _ in listed[:2]] == [b".", b".."]
    assert {n.decode() for n, _ in listed[2:]} == names and len(listed) == len(names) + 2
    # seekdir to any offset the listing handed out continues right after that entry
    libc.opendir.restype = ctypes.c_void_p
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    for k in (1, 2, 700, len(listed) - 2):
        handle = libc.opendir(bytes(big))
        try:
            libc.seekdir(handle, listed[k][1])
            assert libc.readdir(handle).contents.d_name == listed[k + 1][0]
        finally:
            libc.closedir(handle)
    # the kernel drops its dentries and inodes (FORGET); everything is found again by name
    Path("/proc/sys/vm/drop_caches").write_text("2\n")
    assert set(os.listdir(big)) == names
    assert all((big / n).stat().st_size == 0 for n in sorted(names)[:50])
    run("rm", "-rf", big)
    assert "forgotten more often" not in mnt.log_text()


def test_missing_names_and_creation(work: Path) -> None:
    f = work / "later"
    assert not f.exists()  # negative-timeout 0: nothing remembered
    f.write_text("now")
    assert f.exists() and f.read_text() == "now"
    with pytest.raises(FileNotFoundError):
        os.stat(work / "nowhere" / "x")
    with pytest.raises(NotADirectoryError):
        os.stat(f / "x")
    with pytest.raises(OSError) as info:
        os.mkdir(work / ("n" * 256))
    assert info.value.errno == errno.ENAMETOOLONG
