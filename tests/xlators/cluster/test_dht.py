"""cluster/distribute over four real posix bricks: placement, directories, listing, removal, statfs."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
from collections import Counter
from pathlib import Path

import pytest

from mortar.core.context import CallContext, call_context
from mortar.core.errors import FopError
from mortar.core.fops import FOPS, GFID_REQ, AttrSet, Fd, Loc, SetAttrValid
from mortar.core.gfid import Gfid
from mortar.core.options import OptionError
from mortar.core.translator import Event
from mortar.graph import from_text
from mortar.graph.registry import translator_class
from mortar.xlators.cluster.dht import DistributeTranslator
from mortar.xlators.cluster.dht_base import DhtBase
from mortar.xlators.cluster.dht_layout import (
    HASH_SPACE,
    LAYOUT_XATTR,
    LINKTO_XATTR,
    Layout,
    LayoutRange,
    compute_layout,
    encode_range,
    hashed_subvol,
)

from .conftest import (
    ROOT,
    VOLUME_ID,
    MakeBricks,
    MakeDht,
    brick_dir,
    create,
    disk_layout,
    listdir,
    loc,
    mkdir,
    read_all,
    where,
)


def test_every_fop_is_distributed() -> None:
    """No fop may fall through to the base class, which would send it to subvolume 0 only."""
    mine = {name for cls in (DistributeTranslator, DhtBase) for name in vars(cls)}
    assert set(FOPS) <= mine
    assert translator_class("cluster/distribute") is DistributeTranslator


async def test_root_layout_created_at_first_lookup(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    bricks = await make_bricks(4)
    dht = await make_dht(bricks)
    rep = await dht.lookup(Loc("/", ROOT))
    assert rep.iatt.is_dir
    layouts = [disk_layout(b) for b in bricks]
    assert all(lay is not None for lay in layouts)
    ranges = sorted((lay[1], lay[2]) for lay in layouts if lay)
    assert ranges[0][0] == 0 and ranges[-1][1] == HASH_SPACE - 1
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(ranges))
    # a second client reads the same layout instead of making another
    again = await make_dht(bricks)
    await again.lookup(Loc("/", ROOT))
    assert [disk_layout(b) for b in bricks] == layouts


async def test_mkdir_everywhere_with_one_gfid_and_rotating_layouts(
    make_bricks: MakeBricks, make_dht: MakeDht
) -> None:
    bricks = await make_bricks(4)
    dht = await make_dht(bricks)
    firsts: Counter[str] = Counter()
    for i in range(12):
        d = await mkdir(dht, ROOT, f"dir{i}", 0o750)
        for b in bricks:
            p = brick_dir(b) / f"dir{i}"
            assert os.getxattr(p, "trusted.mortar.gfid") == bytes(d.gfid)
            assert os.stat(p).st_mode & 0o7777 == 0o750
        starts = {b.name: disk_layout(b, f"dir{i}") for b in bricks}
        firsts[next(name for name, lay in starts.items() if lay and lay[1] == 0)] += 1
    assert len(firsts) > 1  # not every directory's range starts on the same subvolume
    with pytest.raises(FopError) as exc:
        await mkdir(dht, ROOT, "dir0")
    assert exc.value.errno == errno.EEXIST


async def test_files_spread_and_sit_on_their_hashed_subvolume(
    make_bricks: MakeBricks, make_dht: MakeDht
) -> None:
    """2,000 real files through DHT over 4 bricks: each on the subvolume its name hashes to, and each
    subvolume holds 25 % +- 15 % of them."""
    bricks = await make_bricks(4)
    dht = await make_dht(bricks)
    d = await mkdir(dht, ROOT, "spread")
    ranges = [LayoutRange(b.name, lay[1], lay[2]) for b in bricks if (lay := disk_layout(b, "spread"))]
    layout = Layout(ranges)
    names = [f"img-{i:05d}.qcow2" for i in range(2000)]
    for name in names:
        await create(dht, d.gfid, name)
    counts = {b.name: len(os.listdir(brick_dir(b) / "spread")) for b in bricks}
    assert sum(counts.values()) == 2000
    for n in counts.values():
        assert 2000 * 0.25 * 0.85 <= n <= 2000 * 0.25 * 1.15, counts
    for name in names[:200]:
        assert where(bricks, f"spread/{name}") == {hashed_subvol(layout, name): "data"}


async def test_data_round_trip_and_fd_fops(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    bricks = await make_bricks(3)
    dht = await make_dht(bricks)
    await create(dht, ROOT, "disk.img", b"hello distribute")
    assert await read_all(dht, ROOT, "disk.img") == b"hello distribute"
    rep = await dht.lookup(loc(ROOT, "disk.img"))
    fd = Fd(rep.iatt.gfid)
    await dht.open(Loc("/disk.img", rep.iatt.gfid), os.O_RDWR, fd)
    await dht.ftruncate(fd, 5)
    await dht.fsync(fd, 0)
    assert (await dht.fstat(fd)).iatt.size == 5
    await dht.flush(fd)
    await dht.release(fd)
    assert (await dht.stat(Loc("/disk.img", rep.iatt.gfid))).iatt.size == 5
    # a fresh client (empty caches) resolves by gfid alone
    other = await make_dht(bricks)
    assert (await other.stat(Loc("", rep.iatt.gfid))).iatt.size == 5


async def test_copy_between_subvolumes(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    bricks = await make_bricks(4)
    dht = await make_dht(bricks)
    payload = os.urandom(3 << 20)
    names = [f"c{i}" for i in range(40)]
    for n in names:
        await create(dht, ROOT, n)
    homes = {n: next(iter(where(bricks, n))) for n in names}
    src = names[0]
    dst = next(n for n in names if homes[n] != homes[src])
    fds = []
    for n in (src, dst):
        rep = await dht.lookup(loc(ROOT, n))
        fd = Fd(rep.iatt.gfid)
        await dht.open(Loc(n, rep.iatt.gfid), os.O_RDWR, fd)
        fds.append(fd)
    await dht.writev(fds[0], payload, 0, 0)
    copied = await dht.copy_file_range(fds[0], 0, fds[1], 0, len(payload), 0)
    assert copied.length == len(payload)
    for fd in fds:
        await dht.release(fd)
    assert await read_all(dht, ROOT, dst) == payload[: 1 << 20]  # read_all reads one MiB


async def test_symlink_mknod_link_and_unlink(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    bricks = await make_bricks(4)
    dht = await make_dht(bricks)
    await dht.symlink("../target", loc(ROOT, "sl"), 0, {GFID_REQ: bytes(Gfid.random())})
    assert (await dht.readlink(loc(ROOT, "sl"))).target == "../target"
    await dht.mknod(loc(ROOT, "fifo"), 0o010644, 0, 0, {GFID_REQ: bytes(Gfid.random())})
    assert (await dht.lookup(loc(ROOT, "fifo"))).iatt.type_bits == 0o010000
    data = await create(dht, ROOT, "orig", b"shared")
    # hard links to names that hash elsewhere leave link files, and both names reach the data
    names = [f"hl{i}" for i in range(12)]
    for n in names:
        await dht.link(Loc("/orig", data.gfid), loc(ROOT, n))
        assert await read_all(dht, ROOT, n) == b"shared"
    home = next(iter(where(bricks, "orig")))
    linked = [n for n in names if where(bricks, n) != {home: "data"}]
    assert linked, "some name should hash away from the data"
    for n in linked:
        assert where(bricks, n) == {
            home: "data",
            **{k: f"link->{home}" for k in where(bricks, n) if k != home},
        }
    for n in [*names, "orig"]:
        await dht.unlink(loc(ROOT, n), 0)
    assert all(where(bricks, n) == {} for n in [*names, "orig"])


async def test_readdir_lists_each_name_once(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    """Directories exist on every brick and renames leave link files: the merged listing still has
    every name exactly once, also when paging with tiny pages."""
    bricks = await make_bricks(4)
    dht = await make_dht(bricks)
    d = await mkdir(dht, ROOT, "mixed")
    files = [f"f{i:03d}" for i in range(150)]
    for n in files:
        await create(dht, d.gfid, n)
    for i in range(5):
        await mkdir(dht, d.gfid, f"sub{i}")
    for i in range(0, 150, 3):  # a third of the files get new names, many with link files
        await dht.rename(loc(d.gfid, files[i]), loc(d.gfid, f"r{i:03d}"))
        files[i] = f"r{i:03d}"
    links = sum(
        1
        for b in bricks
        for n in os.listdir(brick_dir(b) / "mixed")
        if where([b], f"mixed/{n}")[b.name][:4] == "link"
    )
    assert links > 10
    expected = sorted([*files, *(f"sub{i}" for i in range(5))])
    assert sorted(await listdir(dht, d.gfid)) == expected
    assert sorted(await listdir(dht, d.gfid, size=64)) == expected  # a few entries per page


async def test_rmdir_refuses_real_entries_and_clears_stale_link_files(
    make_bricks: MakeBricks, make_dht: MakeDht
) -> None:
    bricks = await make_bricks(4)
    dht = await make_dht(bricks)
    d = await mkdir(dht, ROOT, "busy")
    await create(dht, d.gfid, "keep")
    await mkdir(dht, d.gfid, "sub")
    for victim in ("keep", "sub"):
        with pytest.raises(FopError) as exc:
            await dht.rmdir(loc(ROOT, "busy"), 0)
        assert exc.value.errno == errno.ENOTEMPTY
        assert len(where(bricks, "busy")) == 4
        if victim == "keep":
            await dht.unlink(loc(d.gfid, victim), 0)
        else:
            await dht.rmdir(loc(d.gfid, victim), 0)
    # what is left are link files whose data is gone (a crash between steps leaves such things)
    for i, b in enumerate(bricks):
        await dht.make_linkfile(b, loc(d.gfid, f"ghost{i}"), Gfid.random(), bricks[(i + 1) % 4])
    assert sum(len(os.listdir(brick_dir(b) / "busy")) for b in bricks) == 4
    assert await listdir(dht, d.gfid) == []
    await dht.rmdir(loc(ROOT, "busy"), 0)
    assert where(bricks, "busy") == {}
    with pytest.raises(FopError) as exc:
        await dht.lookup(loc(ROOT, "busy"))
    assert exc.value.errno == errno.ENOENT


async def test_directory_attributes_go_everywhere(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    bricks = await make_bricks(3)
    dht = await make_dht(bricks)
    d = await mkdir(dht, ROOT, "attrs")
    await dht.setattr(
        Loc("/attrs", d.gfid), AttrSet(SetAttrValid.MODE | SetAttrValid.UID, mode=0o711, uid=4242)
    )
    await dht.setxattr(Loc("/attrs", d.gfid), {"user.tag": b"blue"}, 0)
    for b in bricks:
        st = os.stat(brick_dir(b) / "attrs")
        assert (st.st_mode & 0o777, st.st_uid) == (0o711, 4242)
        assert os.getxattr(brick_dir(b) / "attrs", "user.tag") == b"blue"
    assert (await dht.getxattr(Loc("/attrs", d.gfid), "user.tag")).xattrs["user.tag"] == b"blue"
    await dht.removexattr(Loc("/attrs", d.gfid), "user.tag")
    assert all("user.tag" not in os.listxattr(brick_dir(b) / "attrs") for b in bricks)


async def test_statfs_sums_the_subvolumes(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    bricks = await make_bricks(3)
    dht = await make_dht(bricks)
    total = (await dht.statfs(Loc("/", ROOT))).statvfs
    each = [(await b.statfs(Loc("/", ROOT))).statvfs for b in bricks]
    assert total.frsize == max(s.frsize for s in each)
    assert total.blocks == sum(s.blocks * s.frsize // total.frsize for s in each)
    assert total.files == sum(s.files for s in each)


async def test_missing_and_broken_layouts_are_healed(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    bricks = await make_bricks(4)
    dht = await make_dht(bricks)
    await mkdir(dht, ROOT, "heal")
    good = [disk_layout(b, "heal") for b in bricks]
    os.removexattr(brick_dir(bricks[2]) / "heal", LAYOUT_XATTR)  # a hole
    fresh = await make_dht(bricks)
    await fresh.lookup(loc(ROOT, "heal"))
    healed = [disk_layout(b, "heal") for b in bricks]
    assert all(h is not None for h in healed)
    assert sorted((h[1], h[2]) for h in healed if h) == sorted((g[1], g[2]) for g in good if g)
    # an overlap: one brick claims everything
    everything = encode_range(LayoutRange(bricks[1].name, 0, HASH_SPACE - 1))
    os.setxattr(brick_dir(bricks[1]) / "heal", LAYOUT_XATTR, everything)
    again = await make_dht(bricks)
    await again.lookup(loc(ROOT, "heal"))
    spans = sorted((h[1], h[2]) for b in bricks if (h := disk_layout(b, "heal")))
    assert spans[0][0] == 0 and spans[-1][1] == HASH_SPACE - 1
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(spans))
    rewritten = [disk_layout(b, "heal") for b in bricks]
    assert all(lay is not None and lay[0] != 0 for lay in rewritten)  # no longer "fresh"


async def test_non_root_caller_sees_through_link_files(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    """Bricks show trusted.* xattrs to root only; DHT still finds layouts and link targets."""
    bricks = await make_bricks(4)
    dht = await make_dht(bricks)
    d = await mkdir(dht, ROOT, "shared", 0o777)
    token = call_context.set(CallContext(uid=1000, gid=1000))
    try:
        for i in range(10):
            await create(dht, d.gfid, f"u{i}", b"mine")
            await dht.rename(loc(d.gfid, f"u{i}"), loc(d.gfid, f"v{i}"))
        reader = await make_dht(bricks)
        for i in range(10):
            assert await read_all(reader, d.gfid, f"v{i}") == b"mine"
        assert sorted(await listdir(reader, d.gfid)) == sorted(f"v{i}" for i in range(10))
    finally:
        call_context.reset(token)
    assert any(v.startswith("link") for i in range(10) for v in where(bricks, f"shared/v{i}").values())
    owners = {
        os.stat(brick_dir(b) / "shared" / n).st_uid
        for b in bricks
        for n in os.listdir(brick_dir(b) / "shared")
    }
    assert 1000 in owners


class _Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def notify(self, event: Event, source: object, data: object = None) -> None:
        self.events.append(event)


async def test_child_events(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    bricks = await make_bricks(3)
    dht = await make_dht(bricks)
    top = _Recorder()
    dht.parents.append(top)
    dht.notify(Event.CHILD_UP, bricks[0])
    dht.notify(Event.CHILD_DOWN, bricks[1])
    assert top.events == []  # one subvolume has not spoken yet
    dht.notify(Event.CHILD_UP, bricks[2])
    assert top.events == [Event.CHILD_UP]
    assert [c.name for c in dht.up_children()] == ["vol-client-0", "vol-client-2"]
    # a new directory's layout skips the down subvolume
    await mkdir(dht, ROOT, "two")
    assert disk_layout(bricks[1], "two") is None and not (brick_dir(bricks[1]) / "two").exists()
    dht.notify(Event.CHILD_DOWN, bricks[0])
    dht.notify(Event.CHILD_DOWN, bricks[2])
    assert top.events == [Event.CHILD_UP, Event.CHILD_DOWN]
    dht.notify(Event.CHILD_UP, bricks[1])
    assert top.events == [Event.CHILD_UP, Event.CHILD_DOWN, Event.CHILD_UP]


async def test_child_up_after_timeout_with_some_up(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    bricks = await make_bricks(2)
    dht = await make_dht(bricks)
    dht.child_wait = 0.05
    top = _Recorder()
    dht.parents.append(top)
    dht.notify(Event.CHILD_UP, bricks[0])
    assert top.events == []
    for _ in range(100):
        if top.events:
            break
        await asyncio.sleep(0.01)
    assert top.events == [Event.CHILD_UP]
    await dht.fini()


async def test_unlink_of_a_file_that_looks_like_a_link_file(
    make_bricks: MakeBricks, make_dht: MakeDht
) -> None:
    """A user's empty file with mode 01000 is data, not a link file: listed and removable."""
    bricks = await make_bricks(2)
    dht = await make_dht(bricks)
    iatt = await create(dht, ROOT, "sticky")
    await dht.setattr(Loc("/sticky", iatt.gfid), AttrSet(SetAttrValid.MODE, mode=0o1000))
    assert "sticky" in await listdir(dht, ROOT)
    other = await make_dht(bricks)
    assert (await other.lookup(loc(ROOT, "sticky"))).iatt.gfid == iatt.gfid
    assert all(
        LINKTO_XATTR not in os.listxattr(brick_dir(b) / "sticky")
        for b in bricks
        if (brick_dir(b) / "sticky").exists()
    )
    await dht.unlink(loc(ROOT, "sticky"), 0)
    assert where(bricks, "sticky") == {}


async def test_options_and_reconfigure(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    bricks = await make_bricks(2)
    with pytest.raises(OptionError):
        DistributeTranslator("bad", {"lookup-unhashed": "sometimes"}, bricks)
    with pytest.raises(ValueError, match="unique"):
        DistributeTranslator("dup", {}, [bricks[0], bricks[0]])
    dht = await make_dht(bricks)
    layout = compute_layout([b.name for b in bricks])
    names = [f"video{i}.mkv.part" for i in range(40)]
    before = [dht.hashed_for(layout, n) for n in names]
    dht.reconfigure({"extra-hash-regex": r"^(.+)\.part$"})
    after = [dht.hashed_for(layout, n) for n in names]
    assert after == [dht.hashed_for(layout, n[: -len(".part")]) for n in names]
    assert after != before


async def test_built_from_a_volfile(tmp_path: Path) -> None:
    """The graph builder makes a distribute volume from GlusterFS-grammar text, options included."""
    text = "".join(
        f"volume v-client-{i}\n    type storage/posix\n    option directory {tmp_path / f'b{i}'}\n"
        f"    option volume-id {VOLUME_ID}\n    option brick-create on\n"
        "    option health-check-interval 0\nend-volume\n\n"
        for i in range(3)
    )
    text += (
        "volume v-dht\n    type cluster/distribute\n    option lookup-unhashed auto\n"
        "    option min-free-disk 5%\n    subvolumes v-client-0 v-client-1 v-client-2\nend-volume\n"
    )
    graph = from_text(text)
    await graph.start()
    try:
        assert await graph.wait_up(5)
        dht = graph.top
        assert isinstance(dht, DistributeTranslator)
        assert dht.opts["lookup-unhashed"] == "auto" and dht.opts["min-free-disk"] == 5.0
        for i in range(30):
            await create(dht, ROOT, f"f{i}", b"v")
        assert sorted(await listdir(dht, ROOT)) == sorted(f"f{i}" for i in range(30))
        assert all(os.listdir(tmp_path / f"b{i}") for i in range(3))
    finally:
        await graph.stop()


async def test_concurrent_creates_and_renames_from_a_cold_client(
    make_bricks: MakeBricks, make_dht: MakeDht
) -> None:
    bricks = await make_bricks(4)
    await (await make_dht(bricks)).lookup(Loc("/", ROOT))
    dht = await make_dht(bricks)  # knows no layout yet: every call below races to read it
    names = [f"c{i}" for i in range(200)]
    await asyncio.gather(*(create(dht, ROOT, n, n.encode()) for n in names))
    await asyncio.gather(*(dht.rename(loc(ROOT, n), loc(ROOT, n + "-renamed")) for n in names[::2]))
    final = sorted(n + "-renamed" if i % 2 == 0 else n for i, n in enumerate(names))
    assert sorted(await listdir(dht, ROOT)) == final
    reader = await make_dht(bricks)
    got = await asyncio.gather(*(read_all(reader, ROOT, n) for n in final))
    assert got == [n.removesuffix("-renamed").encode() for n in final]
