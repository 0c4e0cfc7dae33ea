"""storage/posix namespace fops: identity, the handle index, confinement and POSIX error cases."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest

from mortar.core.errors import FopError
from mortar.core.fops import AttrSet, Fd, Loc, SetAttrValid
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.xlators.storage.posix import PosixTranslator
from mortar.xlators.storage.posix_handles import GFID_XATTR

from .conftest import at, by_gfid, create, mkdir, open_, req


def brick_of(xl: PosixTranslator) -> Path:
    return Path(xl.brick.root)


def handle(xl: PosixTranslator, gfid: Gfid) -> Path:
    h = gfid.hex()
    return brick_of(xl) / ".mortar/handles" / h[:2] / h[2:4] / gfid.canonical


async def errno_of(aw: object) -> int:
    with pytest.raises(FopError) as exc:
        await aw  # type: ignore[misc]
    return exc.value.errno


async def test_mkdir_create_lookup_and_handles(posix: PosixTranslator) -> None:
    d = await mkdir(posix, "dir")
    reply, fd = await create(posix, "file", b"hello", parent=d)
    f = reply.iatt.gfid
    assert reply.iatt.nlink == 1 and reply.iatt.size == 0
    assert reply.parent_pre is not None and reply.parent_post is not None
    assert reply.parent_post.mtime_ns >= reply.parent_pre.mtime_ns
    # on disk: gfid xattrs, a hard-link handle for the file, a relative symlink for the directory
    root = brick_of(posix)
    assert os.getxattr(root / "dir/file", GFID_XATTR) == f
    assert os.path.samefile(handle(posix, f), root / "dir/file")
    assert os.readlink(handle(posix, d)) == f"../../00/00/{ROOT_GFID.canonical}/dir"
    assert os.path.samefile(handle(posix, d), root / "dir")
    # lookup by name gives the entry and its parent; by gfid it revalidates
    named = await posix.lookup(at(d, "file"))
    assert named.iatt.gfid == f and named.iatt.size == 5 and named.iatt.nlink == 1
    assert named.parent_post is not None and named.parent_post.gfid == d
    again = await posix.lookup(by_gfid(f))
    assert again.iatt.gfid == f and again.iatt.ino == named.iatt.ino
    assert (await posix.stat(by_gfid(d))).iatt.is_dir
    assert (await posix.stat(by_gfid(d))).iatt.nlink == 2
    await posix.release(fd)


async def test_entry_creation_needs_gfid_req(posix: PosixTranslator) -> None:
    loc = at(ROOT_GFID, "x")
    assert await errno_of(posix.mkdir(loc, 0o755, 0)) == errno.EINVAL
    assert await errno_of(posix.mknod(loc, stat.S_IFREG | 0o644, 0, 0)) == errno.EINVAL
    assert await errno_of(posix.symlink("t", loc, 0)) == errno.EINVAL
    assert await errno_of(
        posix.create(loc, os.O_RDWR, 0o644, 0, Fd(Gfid.random()), {"gfid-req": b"short"})
    ) == (errno.EINVAL)
    assert await errno_of(posix.mkdir(loc, 0o755, 0, {"gfid-req": bytes(ROOT_GFID)})) == errno.EINVAL
    assert not os.path.lexists(brick_of(posix) / "x")


async def test_duplicate_gfid_and_name_refused(posix: PosixTranslator) -> None:
    reply, fd = await create(posix, "a")
    g = reply.iatt.gfid
    # the same gfid under another name: only link may do that
    assert await errno_of(posix.mkdir(at(ROOT_GFID, "b"), 0o755, 0, req(g))) == errno.EEXIST
    assert await errno_of(posix.symlink("t", at(ROOT_GFID, "c"), 0, req(g))) == errno.EEXIST
    assert (
        await errno_of(posix.create(at(ROOT_GFID, "d"), os.O_RDWR, 0o644, 0, Fd(g), req(g))) == errno.EEXIST
    )
    assert not any(os.path.lexists(brick_of(posix) / n) for n in "bcd")
    # the same name again
    assert await errno_of(posix.mkdir(at(ROOT_GFID, "a"), 0o755, 0, req())) == errno.EEXIST
    excl = Fd(Gfid.random())
    assert await errno_of(posix.create(at(ROOT_GFID, "a"), os.O_RDWR | os.O_EXCL, 0o644, 0, excl, req())) == (
        errno.EEXIST
    )
    # without O_EXCL, create opens the existing file and reports its real gfid
    other = Fd(Gfid.random())
    existing = await posix.create(at(ROOT_GFID, "a"), os.O_RDWR, 0o644, 0, other, req())
    assert existing.iatt.gfid == g and other.gfid == g
    await posix.release(other)
    await posix.release(fd)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../escape", "nul\0byte", "\ud800"])
async def test_bad_names_refused(posix: PosixTranslator, name: str) -> None:
    loc = Loc(name, pargfid=ROOT_GFID, name=name)
    assert await errno_of(posix.mkdir(loc, 0o755, 0, req())) == errno.EINVAL
    assert await errno_of(posix.create(loc, os.O_RDWR, 0o644, 0, Fd(Gfid.random()), req())) == errno.EINVAL
    if name:
        assert await errno_of(posix.lookup(loc)) == errno.EINVAL
    assert sorted(os.listdir(brick_of(posix))) == [".mortar"]


async def test_private_directory_is_invisible(posix: PosixTranslator) -> None:
    loc = at(ROOT_GFID, ".mortar")
    assert await errno_of(posix.lookup(loc)) == errno.ENOENT
    assert await errno_of(posix.mkdir(loc, 0o755, 0, req())) == errno.EPERM
    assert await errno_of(posix.create(loc, os.O_RDWR, 0o644, 0, Fd(Gfid.random()), req())) == errno.EPERM
    assert await errno_of(posix.rmdir(loc, 0)) == errno.ENOENT
    d = await mkdir(posix, "d")
    assert await errno_of(posix.rename(at(ROOT_GFID, "d"), loc)) == errno.EPERM
    dfd = Fd(ROOT_GFID, is_dir=True)
    await posix.opendir(by_gfid(ROOT_GFID), dfd)
    names = [e.name for e in (await posix.readdirp(dfd, 65536, 0)).entries]
    assert names == ["d"]
    await posix.releasedir(dfd)
    # a directory called .mortar below the root is an ordinary name
    assert (await posix.mkdir(at(d, ".mortar"), 0o755, 0, req())).iatt.is_dir


async def test_mknod_types(posix: PosixTranslator) -> None:
    fifo = await posix.mknod(at(ROOT_GFID, "fifo"), stat.S_IFIFO | 0o640, 0, 0o022, req())
    assert stat.S_ISFIFO(fifo.iatt.mode) and stat.S_IMODE(fifo.iatt.mode) == 0o640
    assert fifo.iatt.nlink == 1
    reg = await posix.mknod(at(ROOT_GFID, "reg"), 0o600, 0, 0, req())
    assert stat.S_ISREG(reg.iatt.mode)
    assert os.path.samefile(handle(posix, fifo.iatt.gfid), brick_of(posix) / "fifo")
    # the brick never opens a fifo or device for a client
    assert await errno_of(open_(posix, fifo.iatt.gfid)) == errno.EPERM
    assert await errno_of(posix.mknod(at(ROOT_GFID, "d"), stat.S_IFDIR | 0o755, 0, 0, req())) == errno.EINVAL
    try:
        null = await posix.mknod(at(ROOT_GFID, "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3), 0, req())
    except FopError as exc:
        assert exc.errno == errno.EPERM  # no CAP_MKNOD in this container
    else:
        assert stat.S_ISCHR(null.iatt.mode) and null.iatt.rdev == os.makedev(1, 3)


async def test_unlink_rmdir_errors(posix: PosixTranslator) -> None:
    d = await mkdir(posix, "d")
    _, fd = await create(posix, "f", parent=d)
    await posix.release(fd)
    assert await errno_of(posix.unlink(at(ROOT_GFID, "missing"), 0)) == errno.ENOENT
    assert await errno_of(posix.lookup(at(ROOT_GFID, "missing"))) == errno.ENOENT
    assert await errno_of(posix.rmdir(at(ROOT_GFID, "d"), 0)) == errno.ENOTEMPTY
    assert await errno_of(posix.unlink(at(ROOT_GFID, "d"), 0)) == errno.EISDIR
    assert await errno_of(posix.rmdir(at(d, "f"), 0)) == errno.ENOTDIR
    assert await errno_of(posix.mkdir(at(Gfid.random(), "x"), 0o755, 0, req())) == errno.ESTALE
    f = (await posix.lookup(at(d, "f"))).iatt.gfid
    assert await errno_of(posix.mkdir(at(f, "x"), 0o755, 0, req())) == errno.ENOTDIR
    change = await posix.unlink(at(d, "f"), 0)
    assert change.pre is not None and change.post is not None and change.post.gfid == d
    assert not os.path.lexists(handle(posix, f))
    await posix.rmdir(at(ROOT_GFID, "d"), 0)
    assert not os.path.lexists(handle(posix, d))
    assert await errno_of(posix.stat(by_gfid(d))) == errno.ESTALE


async def test_estale_when_removed_behind_the_bricks_back(posix: PosixTranslator) -> None:
    d = await mkdir(posix, "d")
    reply, fd = await create(posix, "f", b"x")
    await posix.release(fd)
    f = reply.iatt.gfid
    os.unlink(brick_of(posix) / "f")
    os.unlink(handle(posix, f))
    shutil.rmtree(brick_of(posix) / "d")  # the directory handle now dangles
    for g in (f, d):
        assert await errno_of(posix.lookup(by_gfid(g))) == errno.ESTALE
        assert await errno_of(posix.stat(by_gfid(g))) == errno.ESTALE
    assert await errno_of(posix.mkdir(at(d, "x"), 0o755, 0, req())) == errno.ESTALE
    # the dangling handle does not block reuse of the gfid
    assert (await posix.mkdir(at(ROOT_GFID, "again"), 0o755, 0, req(d))).iatt.gfid == d


async def test_rename_files_and_directories(posix: PosixTranslator) -> None:
    a = await mkdir(posix, "a")
    b = await mkdir(posix, "b", parent=a)
    reply, fd = await create(posix, "deep", b"data", parent=b)
    deep = reply.iatt.gfid
    await posix.release(fd)
    # move the subtree: every descendant still resolves by gfid, the handle symlink follows
    moved = await posix.rename(at(a, "b"), at(ROOT_GFID, "b2"))
    assert moved.iatt.gfid == b and moved.newparent_post is not None
    assert os.readlink(handle(posix, b)) == f"../../00/00/{ROOT_GFID.canonical}/b2"
    assert (await posix.stat(by_gfid(deep))).iatt.size == 4
    assert (await posix.lookup(at(b, "deep"))).iatt.gfid == deep
    fd2 = Fd(b, is_dir=True)
    await posix.opendir(by_gfid(b), fd2)
    assert [e.name for e in (await posix.readdirp(fd2, 4096, 0)).entries] == ["deep"]
    await posix.releasedir(fd2)
    # file over file: the replaced file loses its handle with its last name
    r1, f1 = await create(posix, "one", b"1")
    r2, f2 = await create(posix, "two", b"22")
    await posix.release(f1)
    await posix.release(f2)
    await posix.rename(at(ROOT_GFID, "one"), at(ROOT_GFID, "two"))
    assert not os.path.lexists(handle(posix, r2.iatt.gfid))
    assert (await posix.lookup(at(ROOT_GFID, "two"))).iatt.gfid == r1.iatt.gfid
    assert await errno_of(posix.stat(by_gfid(r2.iatt.gfid))) == errno.ESTALE
    # POSIX refusals
    empty = await mkdir(posix, "empty")
    assert await errno_of(posix.rename(at(ROOT_GFID, "two"), at(ROOT_GFID, "empty"))) == errno.EISDIR
    assert await errno_of(posix.rename(at(ROOT_GFID, "empty"), at(ROOT_GFID, "two"))) == errno.ENOTDIR
    assert await errno_of(posix.rename(at(ROOT_GFID, "empty"), at(ROOT_GFID, "b2"))) == errno.ENOTEMPTY
    assert await errno_of(posix.rename(at(ROOT_GFID, "a"), at(a, "inside"))) == errno.EINVAL
    assert await errno_of(posix.rename(at(ROOT_GFID, "nope"), at(ROOT_GFID, "x"))) == errno.ENOENT
    # directory over an empty directory: the replaced one's handle goes
    await posix.rename(at(ROOT_GFID, "a"), at(ROOT_GFID, "empty"))
    assert not os.path.lexists(handle(posix, empty))
    assert os.readlink(handle(posix, a)).endswith("/empty")


async def test_link_counts_and_handle_lifetime(posix: PosixTranslator) -> None:
    reply, fd = await create(posix, "orig", b"abc")
    await posix.release(fd)
    g = reply.iatt.gfid
    d = await mkdir(posix, "d")
    linked = await posix.link(by_gfid(g), at(d, "alias"))
    assert linked.iatt.gfid == g and linked.iatt.nlink == 2
    assert linked.parent_post is not None and linked.parent_post.gfid == d
    assert await errno_of(posix.link(by_gfid(d), at(ROOT_GFID, "dirlink"))) == errno.EPERM
    assert await errno_of(posix.link(by_gfid(g), at(d, "alias"))) == errno.EEXIST
    await posix.unlink(at(ROOT_GFID, "orig"), 0)
    assert os.path.exists(handle(posix, g))  # a name is left
    assert (await posix.stat(by_gfid(g))).iatt.nlink == 1
    await posix.unlink(at(d, "alias"), 0)
    assert not os.path.lexists(handle(posix, g))


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd", "../../../../../../../../etc/passwd"])
async def test_symlinks_are_never_followed(posix: PosixTranslator, target: str) -> None:
    reply = await posix.symlink(target, at(ROOT_GFID, "evil"), 0, req())
    g = reply.iatt.gfid
    assert reply.iatt.is_lnk and reply.iatt.size == len(target) and reply.iatt.nlink == 1
    assert os.readlink(brick_of(posix) / "evil") == target
    assert (await posix.readlink(by_gfid(g))).target == target
    assert (await posix.lookup(at(ROOT_GFID, "evil"))).iatt.is_lnk
    assert (await posix.stat(by_gfid(g))).iatt.is_lnk
    # opening or truncating the link never reaches what it points to
    assert await errno_of(open_(posix, g, os.O_RDONLY)) == errno.ELOOP
    by_name = Fd(g)
    assert await errno_of(posix.open(at(ROOT_GFID, "evil"), os.O_RDONLY, by_name)) == errno.ELOOP
    assert await errno_of(posix.truncate(by_gfid(g), 0)) == errno.ELOOP
    # nor does using it as a directory
    assert await errno_of(posix.lookup(at(g, "passwd"))) == errno.ENOTDIR
    assert await errno_of(posix.create(at(g, "x"), os.O_RDWR, 0o644, 0, Fd(Gfid.random()), req())) == (
        errno.ENOTDIR
    )
    # xattrs and times go to the link itself
    passwd_mtime = os.stat("/etc/passwd").st_mtime_ns
    await posix.setattr(
        by_gfid(g), AttrSet(SetAttrValid.MTIME | SetAttrValid.MODE, mode=0o600, mtime_ns=10**18)
    )
    assert os.lstat(brick_of(posix) / "evil").st_mtime_ns == 10**18
    assert os.stat("/etc/passwd").st_mtime_ns == passwd_mtime
    await posix.setxattr(by_gfid(g), {"trusted.test": b"on-link"}, 0)
    assert os.getxattr(brick_of(posix) / "evil", "trusted.test", follow_symlinks=False) == b"on-link"
    assert await errno_of(posix.readlink(by_gfid(ROOT_GFID))) == errno.EINVAL


async def test_readdirp_pages_with_cookies(posix: PosixTranslator) -> None:
    d = await mkdir(posix, "many")
    names = {f"entry-{i:05d}" for i in range(1100)}
    base = brick_of(posix) / "many"
    for n in names:  # made behind the brick: lookup would heal them, readdirp shows them without attrs
        (base / n).touch()
    reply, fd = await create(posix, "tracked", b"x", parent=d)
    await posix.release(fd)
    dfd = Fd(d, is_dir=True)
    await posix.opendir(by_gfid(d), dfd)
    seen: list[str] = []
    offset, pages = 0, 0
    while True:
        page = (await posix.readdirp(dfd, 8192, offset)).entries
        if not page:
            break
        pages += 1
        seen.extend(e.name for e in page)
        assert [e.offset for e in page] == list(range(offset + 1, offset + 1 + len(page)))
        offset = page[-1].offset
    assert pages > 10
    assert sorted(seen) == sorted(names | {"tracked"})
    tracked = next(e for e in (await posix.readdirp(dfd, 10**9, 0)).entries if e.name == "tracked")
    assert tracked.iatt is not None and tracked.iatt.gfid == reply.iatt.gfid and tracked.iatt.size == 1
    # resuming from a cookie continues exactly after it
    resumed = (await posix.readdirp(dfd, 1, 500)).entries
    assert len(resumed) == 1 and resumed[0].offset == 501
    assert (await posix.readdirp(dfd, 4096, 10**6)).entries == []
    await posix.fsyncdir(dfd, 0)
    await posix.releasedir(dfd)
    assert await errno_of(posix.opendir(by_gfid(reply.iatt.gfid), Fd(reply.iatt.gfid))) == errno.ENOTDIR


async def test_lookup_heals_gfid_and_handle(posix: PosixTranslator) -> None:
    root = brick_of(posix)
    (root / "stray").write_bytes(b"made by hand")
    (root / "straydir").mkdir()
    plain = await posix.lookup(at(ROOT_GFID, "stray"))
    assert plain.iatt.gfid == Gfid(bytes(16))  # no gfid and none offered: reported as null
    g = Gfid.random()
    healed = await posix.lookup(at(ROOT_GFID, "stray"), req(g))
    assert healed.iatt.gfid == g and os.path.samefile(handle(posix, g), root / "stray")
    assert healed.iatt.nlink == 1
    gd = Gfid.random()
    assert (await posix.lookup(at(ROOT_GFID, "straydir"), req(gd))).iatt.gfid == gd
    assert (await posix.lookup(by_gfid(gd))).iatt.is_dir
    # a lost handle comes back on the next named lookup
    os.unlink(handle(posix, g))
    assert await errno_of(posix.stat(by_gfid(g))) == errno.ESTALE
    await posix.lookup(at(ROOT_GFID, "stray"))
    assert (await posix.stat(by_gfid(g))).iatt.size == len(b"made by hand")
    # lookup also returns requested xattrs
    os.setxattr(root / "stray", "user.color", b"blue")
    got = await posix.lookup(at(ROOT_GFID, "stray"), {"xattrs": ["user.color", "user.none"]})
    assert got.xdata == {"xattrs": {"user.color": b"blue"}}
    got = await posix.lookup(by_gfid(g), {"xattrs": ["user.color"]})
    assert got.xdata == {"xattrs": {"user.color": b"blue"}}


async def test_deep_directories_resolve_past_the_symlink_limit(posix: PosixTranslator) -> None:
    parent = ROOT_GFID
    chain = []
    for i in range(50):  # the kernel follows at most 40 symlinks in one path walk
        parent = await mkdir(posix, f"d{i}", parent=parent)
        chain.append(parent)
    reply, fd = await create(posix, "leaf", b"deep", parent=parent)
    await posix.release(fd)
    with pytest.raises(OSError) as too_deep:
        os.stat(handle(posix, chain[-1]))
    assert too_deep.value.errno == errno.ELOOP
    assert (await posix.stat(by_gfid(chain[-1]))).iatt.is_dir
    assert (await posix.lookup(at(chain[-1], "leaf"))).iatt.gfid == reply.iatt.gfid
    sub = await mkdir(posix, "sub", parent=chain[-1])
    assert (await posix.stat(by_gfid(sub))).iatt.gfid == sub


async def test_fops_by_parent_and_name(posix: PosixTranslator) -> None:
    """Without a gfid a Loc names its object by parent and name; the same fops work."""
    reply, fd = await create(posix, "f", b"by name")
    await posix.release(fd)
    loc = at(ROOT_GFID, "f")
    assert (await posix.stat(loc)).iatt.gfid == reply.iatt.gfid
    nfd = Fd(reply.iatt.gfid)
    await posix.open(loc, os.O_RDONLY, nfd)
    assert (await posix.readv(nfd, 100, 0, 0)).data == b"by name"
    await posix.release(nfd)
    await posix.setxattr(loc, {"user.k": b"v"}, 0)
    assert (await posix.getxattr(loc, "user.k")).xattrs == {"user.k": b"v"}
    assert (await posix.truncate(loc, 2)).post is not None
    post = (await posix.setattr(loc, AttrSet(SetAttrValid.MODE, mode=0o640))).post
    assert post is not None and post.mode & 0o777 == 0o640 and post.size == 2
    await posix.access(loc, os.R_OK)
    link = await posix.link(loc, at(ROOT_GFID, "g"))
    assert link.iatt.gfid == reply.iatt.gfid and link.iatt.nlink == 2
