"""Fop arguments and replies in frame meta, driven by `mortar.core.fops.FOPS` (no per-fop code).

Request meta is `[call context, [arguments...], xdata]`; the one payload argument (writev's data)
travels as the frame payload and holds `None` in the list. Reply meta is the reply dataclass's
fields in order (readv's data again as the payload), plus the server's fd number for fops that
open one (`newfd`). An error reply has `status` = errno and meta `[message]`.

Decoding trusts nothing: a hostile peer can send any msgpack, so every value is checked for type,
shape and range, and anything wrong raises ProtocolError, never some other exception.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from mortar.core.context import CallContext
from mortar.core.errors import FopError
from mortar.core.fops import (
    FOPS,
    AttrSet,
    Buffer,
    DirEntry,
    Fd,
    Flock,
    FopSpec,
    Loc,
    Xdata,
)
from mortar.core.gfid import Gfid
from mortar.core.iatt import Iatt, StatVfs
from mortar.rpc.frame import MAX_META, MAX_PAYLOAD, ProtocolError

_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 63) - 1
#: integer arguments that are sizes or offsets: negative values are refused before any translator
_NONNEG = frozenset({"size", "offset", "length", "off_in", "off_out"})
_MAX_MESSAGE = 1024


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(meta: Buffer) -> Any:
    """msgpack to Python; anything malformed (or trailing bytes) becomes ProtocolError."""
    try:
        return msgpack.unpackb(meta, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"malformed meta: {exc.__class__.__name__}") from None


# ---- validators ------------------------------------------------------------------------------


def check_int(v: Any, what: str = "integer") -> int:
    if type(v) is not int or not _INT_MIN <= v <= _INT_MAX:
        raise ProtocolError(f"{what}: expected a 64-bit integer")
    return v


def check_str(v: Any, what: str = "string") -> str:
    if type(v) is not str:
        raise ProtocolError(f"{what}: expected a string")
    return v


def check_list(v: Any, n: int, what: str) -> list[Any]:
    if type(v) is not list or len(v) != n:
        raise ProtocolError(f"{what}: expected a list of {n}")
    return v


def _opt_gfid(v: Any) -> Gfid | None:
    if v is None:
        return None
    if type(v) is not bytes or len(v) != 16:
        raise ProtocolError("gfid: expected 16 bytes")
    return Gfid(v)


def check_xdata(v: Any) -> Xdata:
    if v is None:
        return None
    if type(v) is not dict or not all(type(k) is str for k in v):
        raise ProtocolError("xdata: expected a map with string keys")
    return v


def _dec_loc(v: Any) -> Loc:
    gfid, pargfid, name, path = check_list(v, 4, "loc")
    loc = Loc(check_str(path, "loc path"), _opt_gfid(gfid), _opt_gfid(pargfid), check_str(name, "loc name"))
    if "/" in loc.name or "\0" in loc.name:
        raise ProtocolError("loc name: not a single path component")
    if loc.gfid is None and loc.pargfid is None:
        raise ProtocolError("loc: neither gfid nor parent gfid")
    return loc


def _enc_loc(loc: Loc) -> list[Any]:
    return [loc.gfid, loc.pargfid, loc.name, loc.path]


def _dec_newfd(v: Any) -> Fd:
    gfid, flags, is_dir = check_list(v, 3, "fd")
    if type(is_dir) is not bool:
        raise ProtocolError("fd: is_dir must be a boolean")
    g = _opt_gfid(gfid)
    if g is None:
        raise ProtocolError("fd: missing gfid")
    return Fd(g, check_int(flags, "fd flags"), is_dir)


def _dec_xattrs(v: Any) -> dict[str, bytes]:
    if type(v) is not dict or not all(type(k) is str and type(b) is bytes for k, b in v.items()):
        raise ProtocolError("xattrs: expected a map of string to bytes")
    return v


def _dec_attrset(v: Any) -> AttrSet:
    return AttrSet(*(check_int(x, "attrset") for x in check_list(v, 6, "attrset")))


def _enc_attrset(a: AttrSet) -> list[int]:
    return [a.valid, a.mode, a.uid, a.gid, a.atime_ns, a.mtime_ns]


def _dec_flock(v: Any) -> Flock:
    typ, start, length, pid, owner, whence = check_list(v, 6, "flock")
    if type(owner) is not bytes:
        raise ProtocolError("flock owner: expected bytes")
    ints = [check_int(x, "flock") for x in (typ, start, length, pid, whence)]
    return Flock(ints[0], ints[1], ints[2], ints[3], owner, ints[4])


def _enc_flock(f: Flock) -> list[Any]:
    return [f.type, f.start, f.length, f.pid, f.owner, f.whence]


def _opt_str(v: Any) -> str | None:
    return None if v is None else check_str(v)


_IATT_INT_TYPES = frozenset({int, bool})  # what Iatt.from_tuple's isinstance(v, int) accepts


def _dec_iatt(v: Any) -> Iatt:
    # The common case checked inline: Iatt.from_tuple and Gfid's own checks cost ~2 µs per iatt,
    # a tenth of a small read's client-side cost. Anything unusual takes the checked way.
    if type(v) is list and len(v) == 14:
        raw = v[0]
        rest = v[1:]
        if type(raw) is bytes and len(raw) == 16 and set(map(type, rest)) <= _IATT_INT_TYPES:
            return Iatt(bytes.__new__(Gfid, raw), *rest)
    try:
        return Iatt.from_tuple(check_list(v, 14, "iatt"))
    except ValueError as exc:
        raise ProtocolError(f"iatt: {exc}") from None


def _enc_iatt(i: Iatt) -> tuple[object, ...]:
    return i.to_tuple()


def _dec_optiatt(v: Any) -> Iatt | None:
    return None if v is None else _dec_iatt(v)


def _enc_optiatt(i: Iatt | None) -> tuple[object, ...] | None:
    return None if i is None else i.to_tuple()


def _dec_statvfs(v: Any) -> StatVfs:
    return StatVfs(*(check_int(x, "statvfs") for x in check_list(v, 11, "statvfs")))


def _dec_entries(v: Any) -> list[DirEntry]:
    if type(v) is not list:
        raise ProtocolError("entries: expected a list")
    out = []
    for e in v:
        name, offset, iatt = check_list(e, 3, "entry")
        entry = DirEntry(check_str(name, "entry name"), check_int(offset, "entry offset"), _dec_optiatt(iatt))
        out.append(entry)
    return out


def _enc_entries(entries: list[DirEntry]) -> list[list[Any]]:
    return [[e.name, e.offset, _enc_optiatt(e.iatt)] for e in entries]


def _dec_bytes(v: Any) -> bytes:
    if type(v) is not bytes:
        raise ProtocolError("expected bytes")
    return v


def _same(v: Any) -> Any:
    return v


# argument kind -> (encode, decode); fd, newfd and payload are handled by the callers
_ARG_CODECS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "loc": (_enc_loc, _dec_loc),
    "int": (_same, check_int),
    "str": (_same, check_str),
    "optstr": (_same, _opt_str),
    "xattrs": (_same, _dec_xattrs),
    "attrset": (_enc_attrset, _dec_attrset),
    "flock": (_enc_flock, _dec_flock),
}

# reply field annotation -> (encode, decode); "payload" travels outside meta
_FIELD_CODECS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "Iatt": (_enc_iatt, _dec_iatt),
    "Iatt | None": (_enc_optiatt, _dec_optiatt),
    "str": (_same, check_str),
    "int": (_same, check_int),
    "bytes": (_same, _dec_bytes),
    "list[DirEntry]": (_enc_entries, _dec_entries),
    "StatVfs": (lambda s: s.to_tuple(), _dec_statvfs),
    "dict[str, bytes]": (_same, _dec_xattrs),
    "Flock": (_enc_flock, _dec_flock),
    "Xdata": (_same, check_xdata),
}


@dataclass(frozen=True, slots=True)
class _ReplyLayout:
    fields: tuple[tuple[str, Callable[[Any], Any], Callable[[Any], Any]], ...]  # meta fields in order
    payload_field: str | None


def _reply_layout(reply: type) -> _ReplyLayout:
    fields = []
    payload_field = None
    for f in dataclasses.fields(reply):
        if f.type == "Buffer":
            payload_field = f.name
            continue
        codec = _FIELD_CODECS.get(str(f.type))
        if codec is None:  # a reply type the codec does not know yet: fail at import, not on the wire
            raise TypeError(f"codec: no encoding for {reply.__name__}.{f.name}: {f.type}")
        fields.append((f.name, *codec))
    return _ReplyLayout(tuple(fields), payload_field)


_LAYOUTS: dict[type, _ReplyLayout] = {spec.reply: _reply_layout(spec.reply) for spec in FOPS.values()}
_NEWFD_INDEX: dict[str, int | None] = {
    spec.name: next((i for i, (_, k) in enumerate(spec.args) if k == "newfd"), None) for spec in FOPS.values()
}


def newfd_index(spec: FopSpec) -> int | None:
    """Position of the argument that opens a new fd, or None."""
    return _NEWFD_INDEX[spec.name]


# ---- requests ------------------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    """A decoded request: arguments in the order of the Translator method's parameters."""

    ctx: CallContext
    args: list[Any]
    xdata: Xdata


def _checked(spec: FopSpec, meta: bytes, payload: Buffer | None) -> tuple[bytes, Buffer | None]:
    """The frame's parts, the payload as plain bytes-like (a memoryview of wider items counts its
    bytes). Refuses a frame over the limits here: the peer would drop the whole connection."""
    if len(meta) > MAX_META:
        raise FopError(errno.EINVAL, f"{spec.name}: {len(meta)} bytes of metadata exceed {MAX_META}")
    if isinstance(payload, memoryview):
        if not payload.c_contiguous:
            raise FopError(errno.EINVAL, f"{spec.name}: payload buffer is not contiguous")
        if payload.itemsize != 1 or payload.ndim != 1:
            payload = payload.cast("B")
    if payload is not None and len(payload) > MAX_PAYLOAD:
        raise FopError(errno.EINVAL, f"{spec.name}: {len(payload)} bytes exceed {MAX_PAYLOAD}")
    return meta, payload


def encode_request(
    spec: FopSpec, args: Sequence[Any], xdata: Xdata, ctx: CallContext, fd_number: Callable[[Fd], int]
) -> tuple[bytes, Buffer | None]:
    """Client side: meta bytes and the payload (or None). `fd_number` maps an Fd to the server's.

    Raises FopError(EINVAL) for a request too big for one frame."""
    if len(args) != len(spec.args):
        raise TypeError(f"{spec.name}() takes {len(spec.args)} arguments, got {len(args)}")
    out: list[Any] = []
    payload: Buffer | None = None
    for (_, kind), value in zip(spec.args, args, strict=True):
        if kind == "fd":
            out.append(fd_number(value))
        elif kind == "newfd":
            out.append([value.gfid, value.flags, value.is_dir])
        elif kind == "payload":
            payload = value
            out.append(None)
        else:
            out.append(_ARG_CODECS[kind][0](value))
    return _checked(spec, pack([ctx.to_tuple(), out, xdata]), payload)


def decode_request(
    spec: FopSpec, meta: Buffer, payload: Buffer | None, fds: Callable[[int], Fd], client: str | None = None
) -> Request:
    """Server side. `fds` maps an fd number to the open Fd (raising FopError(EBADF) when unknown);
    `client` is the connection's id, which the call context gets (the wire cannot set it).

    A `newfd` argument becomes a fresh Fd that the caller registers when the fop succeeds.
    """
    raw_ctx, raw_args, raw_xdata = check_list(unpack(meta), 3, "request")
    try:
        c = CallContext.from_tuple(check_list(raw_ctx, 5, "call context"))
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    ctx = CallContext(c.uid, c.gid, c.groups, c.pid, c.lk_owner, client) if client else c
    if type(raw_args) is not list or len(raw_args) != len(spec.args):
        raise ProtocolError(f"{spec.name}: expected {len(spec.args)} arguments")
    args: list[Any] = []
    for (name, kind), value in zip(spec.args, raw_args, strict=True):
        if kind == "fd":
            args.append(fds(check_int(value, name)))
        elif kind == "newfd":
            args.append(_dec_newfd(value))
        elif kind == "payload":
            if value is not None:
                raise ProtocolError(f"{name}: payload goes outside meta")
            args.append(payload if payload is not None else b"")
        elif kind == "int":
            v = check_int(value, name)
            if name in _NONNEG and v < 0:
                raise ProtocolError(f"{name}: negative")
            if name == "size" and v > MAX_PAYLOAD:
                raise ProtocolError(f"{name}: {v} exceeds the limit of {MAX_PAYLOAD}")
            args.append(v)
        else:
            args.append(_ARG_CODECS[kind][1](value))
    return Request(ctx, args, check_xdata(raw_xdata))


# ---- replies -------------------------------------------------------------------------------


def encode_reply(spec: FopSpec, reply: Any, new_fd: int | None = None) -> tuple[bytes, Buffer | None]:
    """Server side: meta bytes and the payload (readv's data) or None; FopError(EINVAL) for a reply
    too big for one frame (a listing or xattr set beyond 1 MiB)."""
    layout = _LAYOUTS[spec.reply]
    if type(reply) is not spec.reply:
        raise TypeError(f"{spec.name} must return {spec.reply.__name__}, not {type(reply).__name__}")
    out = [enc(getattr(reply, name)) for name, enc, _ in layout.fields]
    if new_fd is not None:
        out.append(new_fd)
    payload = getattr(reply, layout.payload_field) if layout.payload_field else None
    return _checked(spec, pack(out), payload)


def decode_reply(spec: FopSpec, meta: Buffer, payload: Buffer | None) -> tuple[Any, int | None]:
    """Client side: the reply dataclass and, for fops that open an fd, the server's fd number."""
    layout = _LAYOUTS[spec.reply]
    opens = _NEWFD_INDEX[spec.name] is not None
    raw = check_list(unpack(meta), len(layout.fields) + opens, f"{spec.name} reply")
    kwargs = {name: dec(v) for (name, _, dec), v in zip(layout.fields, raw, strict=False)}
    if layout.payload_field:
        kwargs[layout.payload_field] = payload if payload is not None else b""
    new_fd = check_int(raw[-1], "fd number") if opens else None
    return spec.reply(**kwargs), new_fd


def encode_error(message: str) -> bytes:
    return pack([message[:_MAX_MESSAGE]])


def decode_error(meta: Buffer) -> str:
    """The message of an error reply; a peer that sent none (or nonsense) gets an empty one."""
    try:
        raw = unpack(meta)
    except ProtocolError:
        return ""
    if type(raw) is list and len(raw) == 1 and type(raw[0]) is str:
        return raw[0][:_MAX_MESSAGE]
    return ""
