"""FOPS-driven codec: every fop's arguments and every reply type survive the wire; hostile meta does not."""

from __future__ import annotations

import array
import contextlib
import dataclasses
import errno
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mortar.core.context import CallContext
from mortar.core.errors import FopError
from mortar.core.fops import FOPS, AttrSet, DirEntry, Fd, Flock, FopSpec, Loc
from mortar.core.gfid import Gfid
from mortar.core.iatt import Iatt, StatVfs
from mortar.rpc import codec
from mortar.rpc.frame import MAX_PAYLOAD, ProtocolError
from mortar.rpc.messages import Handshake, HandshakeReply, decode_upcall, encode_upcall

INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
UINT63 = st.integers(0, (1 << 63) - 1)
gfids = st.binary(min_size=16, max_size=16).map(Gfid)
names = st.text(max_size=30).filter(lambda s: "/" not in s and "\0" not in s)
locs = st.builds(
    Loc, path=st.text(max_size=40), gfid=st.none() | gfids, pargfid=st.none() | gfids, name=names
).filter(lambda loc: loc.gfid is not None or loc.pargfid is not None)
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | INT64
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
xdatas = st.none() | st.dictionaries(st.text(max_size=10), msgpack_values, max_size=4)
contexts = st.builds(
    CallContext, uid=INT64, gid=INT64, groups=st.lists(INT64, max_size=5).map(tuple), pid=INT64,
    lk_owner=st.binary(max_size=16),
)  # fmt: skip
xattr_maps = st.dictionaries(st.text(max_size=20), st.binary(max_size=40), max_size=5)
iatts = st.builds(Iatt, gfids, *([INT64] * 13))
statvfses = st.builds(StatVfs, *([INT64] * 11))
flocks = st.builds(Flock, INT64, INT64, INT64, INT64, st.binary(max_size=16), INT64)


def arg_strategy(name: str, kind: str) -> st.SearchStrategy[Any]:
    if kind == "int":
        if name == "size":
            return st.integers(0, MAX_PAYLOAD)
        return UINT63 if name in ("offset", "length", "off_in", "off_out") else INT64
    return {
        "loc": locs,
        "fd": st.builds(Fd, gfids, INT64, st.booleans()),
        "newfd": st.builds(Fd, gfids, INT64, st.booleans()),
        "str": st.text(max_size=30),
        "optstr": st.none() | st.text(max_size=30),
        "payload": st.binary(max_size=300),
        "xattrs": xattr_maps,
        "attrset": st.builds(AttrSet, *([INT64] * 6)),
        "flock": flocks,
    }[kind]


FIELD_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "Iatt": iatts,
    "Iatt | None": st.none() | iatts,
    "Buffer": st.binary(max_size=300),
    "str": st.text(max_size=30),
    "int": INT64,
    "bytes": st.binary(max_size=30),
    "list[DirEntry]": st.lists(
        st.builds(DirEntry, st.text(max_size=20), INT64, st.none() | iatts), max_size=4
    ),
    "StatVfs": statvfses,
    "dict[str, bytes]": xattr_maps,
    "Flock": flocks,
    "Xdata": xdatas,
}


def reply_strategy(spec: FopSpec) -> st.SearchStrategy[Any]:
    fields = {f.name: FIELD_STRATEGIES[str(f.type)] for f in dataclasses.fields(spec.reply)}
    return st.builds(spec.reply, **fields)


SPECS = sorted(FOPS.values(), key=lambda s: s.op)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_request_round_trip(spec: FopSpec, data: st.DataObject) -> None:
    args = [data.draw(arg_strategy(name, kind), label=name) for name, kind in spec.args]
    xdata = data.draw(xdatas, label="xdata")
    ctx = data.draw(contexts, label="ctx")
    numbers: dict[int, int] = {}
    table: dict[int, Fd] = {}
    for (_, kind), value in zip(spec.args, args, strict=True):
        if kind == "fd":
            numbers[id(value)] = len(table) + 1
            table[len(table) + 1] = value

    meta, payload = codec.encode_request(spec, args, xdata, ctx, lambda fd: numbers[id(fd)])
    req = codec.decode_request(spec, meta, payload, table.__getitem__)
    assert req.ctx == ctx and req.xdata == xdata
    for (_, kind), sent, got in zip(spec.args, args, req.args, strict=True):
        if kind == "fd":
            assert got is sent
        elif kind == "newfd":
            assert (got.gfid, got.flags, got.is_dir) == (sent.gfid, sent.flags, sent.is_dir)
        elif kind == "payload":
            assert bytes(got) == sent
        else:
            assert got == sent


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_reply_round_trip(spec: FopSpec, data: st.DataObject) -> None:
    reply = data.draw(reply_strategy(spec))
    opens = codec.newfd_index(spec) is not None
    new_fd = data.draw(UINT63) if opens else None
    meta, payload = codec.encode_reply(spec, reply, new_fd)
    got, got_fd = codec.decode_reply(spec, meta, payload)
    assert got == reply and got_fd == new_fd


def no_fds(n: int) -> Fd:
    raise FopError(errno.EBADF, "no fds here")


def decodes_or_refuses(spec: FopSpec, meta: bytes) -> None:
    """Decoding hostile meta may succeed or raise ProtocolError (EBADF for fd numbers), nothing else."""
    try:
        codec.decode_request(spec, meta, None, no_fds)
    except FopError as exc:
        assert exc.errno == errno.EBADF
    except ProtocolError:
        pass
    with contextlib.suppress(ProtocolError):
        codec.decode_reply(spec, meta, None)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta=st.one_of(msgpack_values.map(codec.pack), st.binary(max_size=60)))
def test_hostile_meta_is_refused_cleanly(spec: FopSpec, meta: bytes) -> None:
    decodes_or_refuses(spec, meta)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_valid_meta_with_one_part_replaced(spec: FopSpec, data: st.DataObject) -> None:
    """Mutation fuzzing: a well-formed request with one value anywhere in it swapped for junk."""
    meta = valid_request(spec, Fd(Gfid.random()))
    node: Any = meta
    while True:
        index = data.draw(st.integers(0, len(node) - 1))
        child = node[index]
        if not (isinstance(child, list) and child) or data.draw(st.booleans()):
            node[index] = data.draw(msgpack_values)
            break
        node = child
    decodes_or_refuses(spec, codec.pack(meta))


def valid_request(spec: FopSpec, fd: Fd) -> list[Any]:
    """A well-formed request meta for `spec`, as Python values, for targeted corruption."""
    values = {
        "loc": Loc("/a", Gfid.random()),
        "fd": fd,
        "newfd": Fd(Gfid.random()),
        "int": 0,
        "str": "s",
        "optstr": None,
        "payload": b"",
        "xattrs": {},
        "attrset": AttrSet(0),
        "flock": Flock(0),
    }
    args = [values[kind] for _, kind in spec.args]
    meta, _ = codec.encode_request(spec, args, None, CallContext(), lambda _: 1)
    return codec.unpack(meta)


@pytest.mark.parametrize(
    ("fop", "corrupt", "why"),
    [
        ("readv", lambda m: m[1].__setitem__(1, -1), "negative"),
        ("readv", lambda m: m[1].__setitem__(1, MAX_PAYLOAD + 1), "exceeds"),
        ("readv", lambda m: m[1].__setitem__(2, True), "integer"),
        ("readv", lambda m: m[1].__setitem__(2, 1.5), "integer"),
        ("readv", lambda m: m[1].pop(), "arguments"),
        ("readv", lambda m: m.__setitem__(0, [0, 0, [], 0]), "call context"),
        ("readv", lambda m: m.__setitem__(0, [0, 0, ["x"], 0, b""]), "call context"),
        ("readv", lambda m: m.__setitem__(2, [1, 2]), "xdata"),
        ("stat", lambda m: m[1][0].__setitem__(0, b"short"), "gfid"),
        ("stat", lambda m: m[1][0].__setitem__(0, None), "neither"),
        ("lookup", lambda m: m[1][0].__setitem__(2, "a/b"), "component"),
        ("lookup", lambda m: m[1].__setitem__(0, "loc"), "loc"),
        ("writev", lambda m: m[1].__setitem__(1, b"inline data"), "payload"),
        ("setxattr", lambda m: m[1].__setitem__(1, {"k": "not bytes"}), "xattrs"),
        ("create", lambda m: m[1].__setitem__(4, [b"x" * 16, 0, 1]), "is_dir"),
        ("lk", lambda m: m[1].__setitem__(2, [0, 0, 0, 0, "owner", 0]), "owner"),
    ],
)
def test_targeted_corruptions(fop: str, corrupt: Any, why: str) -> None:
    spec = FOPS[fop]
    fd = Fd(Gfid.random())
    meta = valid_request(spec, fd)
    codec.decode_request(spec, codec.pack(meta), None, lambda _: fd)  # sane before corruption
    corrupt(meta)
    with pytest.raises(ProtocolError, match=why):
        codec.decode_request(spec, codec.pack(meta), None, lambda _: fd)


def test_unknown_fd_number_is_ebadf() -> None:
    spec = FOPS["fstat"]
    meta, _ = codec.encode_request(spec, [Fd(Gfid.random())], None, CallContext(), lambda _: 77)

    def lookup(n: int) -> Fd:
        raise FopError(errno.EBADF, f"fd {n}")

    with pytest.raises(FopError) as exc:
        codec.decode_request(spec, meta, None, lookup)
    assert exc.value.errno == errno.EBADF


def test_reply_type_is_checked_on_encode() -> None:
    with pytest.raises(TypeError):
        codec.encode_reply(FOPS["stat"], Iatt(Gfid.random(), 0))


def test_error_messages() -> None:
    assert codec.decode_error(codec.encode_error("no such file")) == "no such file"
    assert len(codec.decode_error(codec.encode_error("x" * 10_000))) == 1024
    assert codec.decode_error(b"\xc1garbage") == ""
    assert codec.decode_error(codec.pack({"not": "a list"})) == ""


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40), st.none() | st.text(max_size=10), st.none() | st.text())
def test_handshake_round_trip(sub: str, uid: str, user: str | None, password: str | None) -> None:
    hs = Handshake(sub, uid, username=user, password=password)
    assert Handshake.decode(hs.encode()) == hs
    assert HandshakeReply.decode(HandshakeReply(sub).encode()) == HandshakeReply(sub)


@pytest.mark.parametrize(
    "meta",
    [
        codec.pack([1, 2, 3]),
        codec.pack({"subvolume": 5, "client-uid": "u", "version": 1}),
        codec.pack({"subvolume": "b", "client-uid": "u", "version": "1"}),
        codec.pack({"subvolume": "b", "version": 1}),
        codec.pack({"subvolume": "b", "client-uid": "u", "version": 1, "password": b"bytes"}),
        b"\x81",
    ],
)
def test_hostile_handshakes(meta: bytes) -> None:
    with pytest.raises(ProtocolError):
        Handshake.decode(meta)


def test_upcall_messages() -> None:
    assert decode_upcall(encode_upcall({"invalidate": b"g" * 16})) == {"invalidate": b"g" * 16}
    for bad in (codec.pack(None), codec.pack([1]), codec.pack({1: 2})):
        with pytest.raises(ProtocolError):
            decode_upcall(bad)


def test_payload_buffers_of_any_shape() -> None:
    spec = FOPS["writev"]
    fd = Fd(Gfid.random())
    words = memoryview(array.array("I", range(1000)))
    _, payload = codec.encode_request(spec, [fd, words, 0, 0], None, CallContext(), lambda _: 1)
    assert payload is not None and len(payload) == 4000 and bytes(payload) == words.tobytes()
    with pytest.raises(FopError) as exc:  # a strided view cannot go to the socket as one piece
        codec.encode_request(spec, [fd, memoryview(bytes(100))[::2], 0, 0], None, CallContext(), lambda _: 1)
    assert exc.value.errno == errno.EINVAL
