"""storage/posix checks each fop with the caller's identity (per-thread fsuid), and root bypasses."""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mortar.core.context import CallContext
from mortar.core.errors import FopError
from mortar.core.fops import AttrSet, Fd, SetAttrValid
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.xlators.storage.posix import PosixTranslator
from mortar.xlators.storage.posix_sys import caller_identity

from .conftest import NOBODY, as_user, at, by_gfid, create, mkdir, open_, req


async def errno_of(aw: object) -> int:
    with pytest.raises(FopError) as exc:
        await aw  # type: ignore[misc]
    return exc.value.errno


async def test_private_directory_refuses_nobody(posix: PosixTranslator) -> None:
    secret = await mkdir(posix, "secret", mode=0o700)
    # the caller may not create, look up or list inside a 0700 directory of root's
    assert await as_user(NOBODY, errno_of(posix.mkdir(at(secret, "x"), 0o755, 0, req()))) == errno.EACCES
    fd = Fd(Gfid.random())
    assert (
        await as_user(NOBODY, errno_of(posix.create(at(secret, "f"), os.O_RDWR, 0o644, 0, fd, req())))
        == errno.EACCES
    )
    assert await as_user(NOBODY, errno_of(posix.lookup(at(secret, "x")))) == errno.EACCES
    dfd = Fd(secret, is_dir=True)
    assert await as_user(NOBODY, errno_of(posix.opendir(by_gfid(secret), dfd))) == errno.EACCES
    assert await as_user(NOBODY, errno_of(posix.access(by_gfid(secret), os.R_OK))) == errno.EACCES
    assert await as_user(NOBODY, errno_of(posix.rmdir(at(ROOT_GFID, "secret"), 0))) == errno.EACCES
    assert not os.listdir(os.path.join(posix.brick.root, "secret"))
    # root passes every one of those checks
    await posix.mkdir(at(secret, "x"), 0o755, 0, req())
    await posix.opendir(by_gfid(secret), dfd)
    await posix.releasedir(dfd)
    await posix.access(by_gfid(secret), os.R_OK | os.W_OK | os.X_OK)


async def test_files_get_the_callers_ids_and_permissions(posix: PosixTranslator) -> None:
    shared = await mkdir(posix, "shared", mode=0o777)
    await posix.setattr(by_gfid(shared), AttrSet(SetAttrValid.MODE, mode=0o777))
    who = CallContext(uid=65534, gid=65533, groups=(65533, 4242))
    reply, fd = await as_user(who, create(posix, "mine", b"nobody's data", parent=shared))
    assert (reply.iatt.uid, reply.iatt.gid) == (65534, 65533)
    st = os.stat(os.path.join(posix.brick.root, "shared", "mine"))
    assert (st.st_uid, st.st_gid) == (65534, 65533)
    d = (await as_user(who, posix.mkdir(at(shared, "sub"), 0o755, 0, req()))).iatt
    assert (d.uid, d.gid) == (65534, 65533)
    await posix.release(fd)
    # root's 0600 file: nobody may not open, read its xattrs or chmod it; root may
    root_file, rfd = await create(posix, "roots", b"secret", parent=shared)
    await posix.release(rfd)
    g = root_file.iatt.gfid
    await posix.setattr(by_gfid(g), AttrSet(SetAttrValid.MODE, mode=0o600))
    await posix.setxattr(by_gfid(g), {"user.k": b"v"}, 0)
    assert await as_user(NOBODY, errno_of(open_(posix, g, os.O_RDONLY))) == errno.EACCES
    assert await as_user(NOBODY, errno_of(posix.truncate(by_gfid(g), 0))) == errno.EACCES
    assert await as_user(NOBODY, errno_of(posix.getxattr(by_gfid(g), "user.k"))) == errno.EACCES
    chmod = AttrSet(SetAttrValid.MODE, mode=0o666)
    assert await as_user(NOBODY, errno_of(posix.setattr(by_gfid(g), chmod))) == errno.EPERM
    # supplementary groups count: a 0060 file of group 4242 is readable by `who`
    await posix.setattr(by_gfid(g), AttrSet(SetAttrValid.MODE | SetAttrValid.GID, mode=0o060, gid=4242))
    gfd = await as_user(who, open_(posix, g, os.O_RDONLY))
    assert (await posix.readv(gfd, 10, 0, 0)).data == b"secret"
    await posix.release(gfd)
    # in a sticky world-writable directory only a file's owner may remove it
    await posix.setattr(by_gfid(shared), AttrSet(SetAttrValid.MODE, mode=0o1777))
    assert await as_user(NOBODY, errno_of(posix.unlink(at(shared, "roots"), 0))) == errno.EPERM
    # privileged xattrs are root's alone, whatever the brick process may do
    assert (
        await as_user(who, errno_of(posix.setxattr(by_gfid(d.gfid), {"trusted.x": b"1"}, 0))) == errno.EPERM
    )
    await posix.setxattr(by_gfid(d.gfid), {"trusted.x": b"1"}, 0)
    assert "trusted.x" not in (await as_user(who, posix.getxattr(by_gfid(d.gfid), None))).xattrs
    assert "trusted.x" in (await posix.getxattr(by_gfid(d.gfid), None)).xattrs
    mknod_dev = posix.mknod(at(shared, "dev"), 0o20666, os.makedev(1, 3), 0, req())
    assert await as_user(who, errno_of(mknod_dev)) == errno.EPERM


def test_identity_switch_is_per_thread_and_restored(tmp_path: Path) -> None:
    """The raw syscalls change only the calling thread; the thread is root again afterwards."""
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    (tmp_path / "closed").mkdir(mode=0o700)
    open_dir = os.open(tmp_path / "open", os.O_RDONLY | os.O_DIRECTORY)
    closed_dir = os.open(tmp_path / "closed", os.O_RDONLY | os.O_DIRECTORY)
    inside = threading.Event()
    release = threading.Event()

    def touch(name: str, dir_fd: int) -> None:
        os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=dir_fd))

    def as_nobody() -> None:
        try:
            with caller_identity(NOBODY):
                touch("made", open_dir)
                with pytest.raises(PermissionError):
                    touch("refused", closed_dir)
                inside.set()
                release.wait(10)
        finally:
            inside.set()
        touch("after", closed_dir)  # root again

    try:
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(as_nobody)
            assert inside.wait(10)
            touch("main", closed_dir)  # meanwhile this thread is still root
            release.set()
            fut.result(10)
    finally:
        os.close(open_dir)
        os.close(closed_dir)
    assert os.stat(tmp_path / "open/made").st_uid == 65534
    assert os.stat(tmp_path / "closed/main").st_uid == 0
    assert os.stat(tmp_path / "closed/after").st_uid == 0
