"""System calls the os module lacks: per-thread filesystem identity and fallocate(2) with modes.

The identity switch is the GlusterFS/Samba technique: the raw setfsuid/setfsgid/setgroups system calls
change only the calling thread's credentials (glibc's wrappers broadcast to every thread), so a worker
thread can check one fop with the caller's identity while its neighbours serve other callers.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

from mortar.core.context import CallContext

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# (setfsuid, setfsgid, setgroups) system call numbers
_SYSCALLS = {"x86_64": (122, 123, 116), "aarch64": (151, 152, 159)}
_NR_SETFSUID, _NR_SETFSGID, _NR_SETGROUPS = _SYSCALLS.get(platform.machine(), (-1, -1, -1))
#: the supplementary groups worker threads return to after serving a caller
_PROCESS_GROUPS: tuple[int, ...] = tuple(os.getgroups())

try:
    _fallocate = _libc.fallocate64
except AttributeError:  # pragma: no cover - every glibc has fallocate64
    _fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

_MAX_GROUPS = 65536


def _set_groups(groups: tuple[int, ...]) -> None:
    arr = (ctypes.c_uint32 * max(len(groups), 1))(*groups)
    if _libc.syscall(ctypes.c_long(_NR_SETGROUPS), ctypes.c_long(len(groups)), arr) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setgroups: {os.strerror(err)}")


def _set_fsid(nr: int, value: int) -> None:
    _libc.syscall(ctypes.c_long(nr), ctypes.c_long(value))
    # the call returns the previous id and cannot report failure; asking with an invalid id reads it
    now = _libc.syscall(ctypes.c_long(nr), ctypes.c_long(0xFFFFFFFF))
    if now != value:
        raise OSError(errno.EPERM, f"could not switch the thread's filesystem id to {value}")


@contextmanager
def caller_identity(who: CallContext) -> Iterator[None]:
    """Run the body with this thread's filesystem uid/gid/groups set to the caller's; root needs no switch."""
    if who.uid == 0:
        yield
        return
    if _NR_SETFSUID < 0:  # pragma: no cover - only x86_64 and aarch64 are supported
        raise OSError(errno.ENOSYS, f"per-thread identity switch unsupported on {platform.machine()}")
    if len(who.groups) > _MAX_GROUPS or who.uid < 0 or who.gid < 0:
        raise OSError(errno.EINVAL, "malformed caller identity")
    try:
        _set_groups(who.groups)
        _set_fsid(_NR_SETFSGID, who.gid)
        _set_fsid(_NR_SETFSUID, who.uid)
        yield
    finally:
        # back to root in the reverse order: fsuid 0 restores the filesystem capabilities first
        _set_fsid(_NR_SETFSUID, 0)
        _set_fsid(_NR_SETFSGID, 0)
        _set_groups(_PROCESS_GROUPS)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode bits (os.posix_fallocate takes none)."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
