"""Extended attribute policy and xattrop arithmetic of the brick.

Policy: the brick's own xattrs (`trusted.mortar.gfid`, `trusted.mortar.volume-id`) are never set
or removed by a fop and never listed; an unprivileged caller sees no `trusted.*` (as the kernel would
show it) and may not write `trusted.*` or `security.*` (the brick process keeps CAP_SYS_ADMIN whatever
its fsuid, so the kernel would not refuse on its own).

xattrop arithmetic follows GlusterFS: values are arrays of big-endian integers; an absent value counts
as zeros; additions wrap around like the C integers they imitate.
"""

from __future__ import annotations

import errno
import os
import struct

from mortar.core.errors import FopError
from mortar.core.fops import XattropFlag
from mortar.xlators.storage.posix_handles import PROTECTED_XATTRS, xget, xlist, xremove, xset

_NAMESPACES = ("user.", "trusted.", "security.", "system.")


def check_settable(name: str, uid: int) -> None:
    """Refuse (EPERM) a set/remove of a brick-owned xattr, or of a privileged one by a non-root caller."""
    if not name or "\0" in name:
        raise FopError(errno.EINVAL, f"invalid xattr name {name!r}")
    if name in PROTECTED_XATTRS:
        raise FopError(errno.EPERM, f"{name} is maintained by the brick")
    if not name.startswith(_NAMESPACES):
        raise FopError(errno.EOPNOTSUPP, f"xattr {name} has no known namespace")
    if uid != 0 and name.startswith(("trusted.", "security.")):
        raise FopError(errno.EPERM, f"{name} needs a privileged caller")


def readable(name: str, uid: int) -> bool:
    """Whether a caller may read `name` when asking for it explicitly."""
    return uid == 0 or not name.startswith("trusted.")


def listable(name: str, uid: int) -> bool:
    """Whether `name` appears in a listing (getxattr with no name)."""
    return name not in PROTECTED_XATTRS and readable(name, uid)


def _ints(raw: bytes, width: int, count: int) -> list[int]:
    fmt = ">" + ("i" if width == 4 else "q") * (len(raw) // width)
    values = list(struct.unpack(fmt, raw))
    return values + [0] * (count - len(values))


def _pack(values: list[int], width: int) -> bytes:
    bits = width * 8
    half, full = 1 << (bits - 1), 1 << bits
    wrapped = [((v + half) % full) - half for v in values]
    return struct.pack(">" + ("i" if width == 4 else "q") * len(wrapped), *wrapped)


def _check_width(name: str, raw: bytes, width: int) -> None:
    if len(raw) % width:
        raise FopError(
            errno.EINVAL, f"xattrop on {name}: {len(raw)} bytes is not an array of {width}-byte ints"
        )


def xattrop_apply(optype: int, name: str, old: bytes | None, arg: bytes) -> tuple[bytes, bytes]:
    """(value to store, value to return) for one xattr: the new value, or the old one for GET_AND_SET.

    ADD_ARRAY_WITH_DEFAULT takes two halves, increments then defaults: an element still zero becomes
    increment + default, any other element gets the increment (how EC seeds its version counters).
    """
    if optype == XattropFlag.GET_AND_SET:
        return arg, old if old is not None else bytes(len(arg))
    if optype in (XattropFlag.ADD_ARRAY, XattropFlag.ADD_ARRAY64):
        width = 4 if optype == XattropFlag.ADD_ARRAY else 8
        _check_width(name, arg, width)
        cur = old or b""
        _check_width(name, cur, width)
        count = max(len(arg), len(cur)) // width
        sums = [a + b for a, b in zip(_ints(cur, width, count), _ints(arg, width, count), strict=True)]
        new = _pack(sums, width)
        return new, new
    if optype == XattropFlag.ADD_ARRAY_WITH_DEFAULT:
        _check_width(name, arg, 8)
        count = len(arg) // 8
        incr = _ints(arg[: count * 4], 4, count)
        default = _ints(arg[count * 4 :], 4, count)
        cur = old or b""
        _check_width(name, cur, 4)
        now = _ints(cur, 4, max(count, len(cur) // 4))
        for i in range(count):
            now[i] = now[i] + incr[i] + (default[i] if now[i] == 0 else 0)
        new = _pack(now, 4)
        return new, new
    if optype in (XattropFlag.OR_ARRAY, XattropFlag.AND_ARRAY):
        cur = (old or b"").ljust(len(arg), b"\0")
        argp = arg.ljust(len(cur), b"\0")
        a, b = int.from_bytes(cur, "big"), int.from_bytes(argp, "big")
        value = a | b if optype == XattropFlag.OR_ARRAY else a & b
        new = value.to_bytes(len(cur), "big")
        return new, new
    raise FopError(errno.EINVAL, f"unknown xattrop type {optype}")


def get_xattrs(ref: int | str, name: str | None, uid: int) -> dict[str, bytes]:
    """One named xattr (ENODATA when absent or hidden from this caller) or, with no name, all visible."""
    if name is not None:
        if not readable(name, uid):
            raise FopError(errno.ENODATA, name)
        return {name: xget(ref, name)}
    found: dict[str, bytes] = {}
    for key in xlist(ref):
        if listable(key, uid):
            try:
                found[key] = xget(ref, key)
            except OSError as exc:
                if exc.errno != errno.ENODATA:  # removed since the listing
                    raise
    return found


def set_xattrs(ref: int | str, xattrs: dict[str, bytes], flags: int, uid: int) -> None:
    if flags & ~(os.XATTR_CREATE | os.XATTR_REPLACE):
        raise FopError(errno.EINVAL, f"setxattr flags {flags:#x}")
    for name in xattrs:
        check_settable(name, uid)
    for name, value in xattrs.items():
        xset(ref, name, bytes(value), flags)


def remove_xattr(ref: int | str, name: str, uid: int) -> None:
    check_settable(name, uid)
    xremove(ref, name)


def xattrop(ref: int | str, optype: int, xattrs: dict[str, bytes]) -> dict[str, bytes]:
    """Read-modify-write of each xattr; the caller holds the object's gfid lock across all of it."""
    for name in xattrs:
        if name in PROTECTED_XATTRS:
            raise FopError(errno.EPERM, f"{name} is maintained by the brick")
    out: dict[str, bytes] = {}
    for name, arg in xattrs.items():
        try:
            old: bytes | None = xget(ref, name)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
            old = None
        store, reply = xattrop_apply(optype, name, old, bytes(arg))
        xset(ref, name, store)
        out[name] = reply
    return out
