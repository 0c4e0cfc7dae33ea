"""The parts of the mount that need no kernel: options, the inode table, caller identities, arguments."""

from __future__ import annotations

import os

import pytest

from mortar.core.fops import Fd
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.iatt import Iatt
from mortar.core.translator import Translator
from mortar.frontends.fuse.identity import Identities, read_groups
from mortar.frontends.fuse.inodes import ROOT_INO, InodeMap
from mortar.frontends.fuse.mount import MountError, default_path, parse_request
from mortar.frontends.fuse.ops import MortarOperations
from mortar.frontends.fuse.options import MountOptionError, parse_options


def test_option_defaults_for_root_and_users() -> None:
    root = parse_options([], uid=0)
    assert (root.attr_timeout, root.entry_timeout, root.negative_timeout) == (1.0, 1.0, 0.0)
    assert root.allow_other and not root.read_only and not root.direct_io
    assert not parse_options([], uid=1000).allow_other
    assert root.fuse_options("h:/v") == {
        "default_permissions",
        "fsname=h:/v",
        "subtype=mortar",
        "allow_other",
    }


def test_option_values() -> None:
    opts = parse_options(
        [
            "ro,attr-timeout=2.5,entry-timeout=0",
            "negative-timeout=3,direct-io-mode=on,allow_other=off",
            "log-level=debug,log-file=/x.log,fsname=data,read-ahead-kb=0,noatime,_netdev,x-systemd.a=b",
        ],
        uid=0,
    )
    assert opts.read_only and opts.direct_io and not opts.allow_other
    assert (opts.attr_timeout, opts.entry_timeout, opts.negative_timeout) == (2.5, 0.0, 3.0)
    assert (opts.log_level, opts.log_file, opts.fsname, opts.read_ahead_kb) == ("DEBUG", "/x.log", "data", 0)
    expect = {"default_permissions", "fsname=data", "subtype=mortar", "ro", "noatime"}
    assert opts.fuse_options("ignored") == expect


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ("bogus", "unknown mount option 'bogus'"),
        ("attr-timeout=-1", "attr-timeout"),
        ("entry-timeout=soon", "not a number"),
        ("negative-timeout=nan", "negative-timeout"),
        ("direct-io-mode=maybe", "not on or off"),
        ("direct-io-mode=", "unknown mount option"),
        ("log-level=LOUD", "log-level"),
        ("fsname=", "unknown mount option"),
        ("read-ahead-kb=-4", "read-ahead-kb"),
    ],
)
def test_bad_options_are_refused(option: str, words: str) -> None:
    with pytest.raises(MountOptionError, match=words):
        parse_options([option], uid=0)


@pytest.mark.parametrize(
    ("mode", "plain", "o_direct"),
    [("auto", False, True), ("on", True, True), ("off", False, False), (None, False, True)],
)
def test_direct_io_mode_decides_per_open(mode: str | None, plain: bool, o_direct: bool) -> None:
    """FOPEN_DIRECT_IO per open: for O_DIRECT opens by default (auto), for all (on), or none (off)."""
    opts = parse_options([f"direct-io-mode={mode}"] if mode else [], uid=0)
    ops = MortarOperations(Translator("unused"), opts)
    rec = ops.inodes.remember(_iatt(Gfid.random()))
    for flags, expect in ((os.O_RDWR, plain), (os.O_RDWR | os.O_DIRECT, o_direct)):
        info = ops._opened(rec, Fd(rec.gfid, flags))
        assert info.direct_io is expect and not info.keep_cache
        assert info.fh in rec.handles


def test_arguments() -> None:
    req = parse_request(["-o", "ro", "server:/data", "/mnt/x/"])
    assert (req.source, req.volfile, req.mountpoint) == ("server:/data", None, "/mnt/x")
    assert req.options.read_only
    assert req.log_file == "/var/log/mortar/mnt-mnt-x.log"
    assert req.pid_file == "/run/mortar/mnt-mnt-x.pid"
    req = parse_request(["--volfile", "c.vol", "-f", "m"])
    assert req.volfile == os.path.abspath("c.vol") and req.foreground and req.log_file is None
    assert default_path("/l", "/", ".log") == "/l/mnt-root.log"
    for argv, words in [
        (["/mnt"], "HOST:/VOLUME or --volfile"),
        (["nohost", "/mnt"], "is not HOST:/VOLUME"),
        (["a:/v", "b", "/mnt"], "too many"),
        (["-o", "bad", "a:/v", "/mnt"], "unknown mount option"),
        (["--timeout", "0", "a:/v", "/mnt"], "--timeout"),
        (["--nope", "a:/v", "/mnt"], "unrecognized"),
    ]:
        with pytest.raises(MountError, match=words):
            parse_request(argv)


def _iatt(gfid: Gfid, mode: int = 0o100644) -> Iatt:
    return Iatt.from_stat(gfid, os.stat_result((mode, 0, 0, 1, 0, 0, 0, 0, 0, 0)))


def test_inode_numbers_follow_gfids_and_lookup_counts() -> None:
    table = InodeMap()
    assert table.get(ROOT_INO).gfid == ROOT_GFID
    gfid = Gfid.random()
    rec = table.remember(_iatt(gfid))
    assert rec.ino == int.from_bytes(gfid[8:], "big")
    table.counted(rec)
    table.counted(table.remember(_iatt(gfid)))  # a hard link: same object, same number
    assert len(table) == 2
    table.forget(rec.ino, 1)
    assert table.get(rec.ino) is rec
    table.forget(rec.ino, 1)
    with pytest.raises(Exception, match="not known"):
        table.get(rec.ino)
    table.forget(ROOT_INO, 5)
    assert table.get(ROOT_INO).nlookup == 1


def test_colliding_inode_numbers_get_another() -> None:
    table = InodeMap()
    low = os.urandom(8)
    first = table.remember(_iatt(Gfid(os.urandom(8) + low)))
    second = table.remember(_iatt(Gfid(os.urandom(8) + low)))
    assert first.ino != second.ino and second.ino > ROOT_INO
    one = table.remember(_iatt(Gfid(os.urandom(8) + (1).to_bytes(8, "big"))))  # would be the root's
    assert one.ino not in (ROOT_INO, first.ino, second.ino)


def test_refused_readdir_entries_are_discarded() -> None:
    table = InodeMap()
    rec = table.remember(_iatt(Gfid.random(), 0o040755), parent=ROOT_INO)
    table.discard(rec)
    assert len(table) == 1


def test_identities_read_supplementary_groups() -> None:
    me = os.getpid()
    assert set(read_groups(me)) == set(os.getgroups())
    assert read_groups(2**22 + 12345) == ()  # no such process
    ids = Identities(ttl=60)
    ctx = ids.context(65534, 65534, me)
    assert (ctx.uid, ctx.gid, ctx.pid, set(ctx.groups)) == (65534, 65534, me, set(os.getgroups()))
    assert ids.context(65534, 65534, me) is ctx  # cached
    assert ids.context(0, 0, 0).uid == 0
