"""Mount options (`-o a,b=c`): parsed and checked before anything starts, so a typo fails the mount
with one clear line instead of being ignored.

Besides mortar's own options, the generic mount flags (`nosuid`, `noatime`...) go to the kernel
as they are, and the words mount(8) and fstab put in every option string (`defaults`, `_netdev`,
`x-systemd.*`...) are accepted and ignored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

#: mount flags libfuse hands to mount(2)
KERNEL_FLAGS = frozenset(
    {
        "suid",
        "nosuid",
        "dev",
        "nodev",
        "exec",
        "noexec",
        "async",
        "sync",
        "dirsync",
        "atime",
        "noatime",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
    }
)
#: words of fstab and mount(8) that mean nothing to the mount itself
IGNORED = frozenset({"rw", "defaults", "auto", "noauto", "_netdev", "nofail", "default_permissions"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = {"on", "yes", "true", "enable", "1"}
_FALSE = {"off", "no", "false", "disable", "0"}
KNOWN = (
    "ro",
    "attr-timeout=SECONDS",
    "entry-timeout=SECONDS",
    "negative-timeout=SECONDS",
    "allow_other[=on|off]",
    "direct-io-mode=auto|on|off",
    "log-file=PATH",
    "log-level=LEVEL",
    "fsname=NAME",
    "read-ahead-kb=KIB",
)


class MountOptionError(ValueError):
    """An option the mount does not know, or a value it cannot take."""


@dataclass(slots=True)
class MountOptions:
    read_only: bool = False
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    negative_timeout: float = 0.0
    allow_other: bool = True
    #: FOPEN_DIRECT_IO: True for every open, False for none, None ("auto") for opens with O_DIRECT,
    #: whose requests then reach the volume as the application sent them (see ops.py `_opened`)
    direct_io: bool | None = None
    log_file: str | None = None
    log_level: str = "INFO"
    fsname: str | None = None
    #: the kernel's read-ahead for the mount (its default, 128 KiB, caps buffered reads at a third of
    #: what 1 MiB requests move); 0 leaves the kernel's value
    read_ahead_kb: int = 1024
    kernel_flags: list[str] = field(default_factory=list)

    def fuse_options(self, default_fsname: str) -> set[str]:
        """libfuse's option set. `default_permissions` is always on: the kernel checks mode bits
        before a request leaves it, and the brick checks again as the caller (see ops.py)."""
        opts = {"default_permissions", f"fsname={self.fsname or default_fsname}", "subtype=mortar"}
        if self.read_only:
            opts.add("ro")
        if self.allow_other:
            opts.add("allow_other")
        opts.update(self.kernel_flags)
        return opts


def _seconds(key: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise MountOptionError(f"option {key}: {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise MountOptionError(f"option {key}: {value!r} must be a number of seconds >= 0")
    return seconds


def _switch(key: str, value: str) -> bool:
    word = value.lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise MountOptionError(f"option {key}: {value!r} is not on or off")


def parse_options(groups: Iterable[str], uid: int | None = None) -> MountOptions:
    """Options from every `-o` argument (each comma separated). `allow_other` defaults to on for
    root, off for others (a user mount needs `user_allow_other` in /etc/fuse.conf for it)."""
    uid = os.geteuid() if uid is None else uid
    opts = MountOptions(allow_other=uid == 0)
    for group in groups:
        for item in group.split(","):
            item = item.strip()
            if not item:
                continue
            key, has_value, value = item.partition("=")
            if not has_value and key in ("ro", "allow_other"):
                value = "on"
            elif key in KERNEL_FLAGS and not has_value:
                opts.kernel_flags.append(key)
                continue
            elif (key in IGNORED and not has_value) or key.startswith("x-"):
                continue
            elif not has_value or not value:
                raise MountOptionError(_unknown(item))
            _apply(opts, key, value, item)
    return opts


def _apply(opts: MountOptions, key: str, value: str, item: str) -> None:
    if key == "ro":
        opts.read_only = _switch(key, value)
    elif key == "allow_other":
        opts.allow_other = _switch(key, value)
    elif key == "attr-timeout":
        opts.attr_timeout = _seconds(key, value)
    elif key == "entry-timeout":
        opts.entry_timeout = _seconds(key, value)
    elif key == "negative-timeout":
        opts.negative_timeout = _seconds(key, value)
    elif key == "direct-io-mode":
        opts.direct_io = None if value.lower() == "auto" else _switch(key, value)
    elif key == "log-file":
        opts.log_file = value
    elif key == "log-level":
        level = value.upper()
        if level not in LOG_LEVELS:
            raise MountOptionError(f"option log-level: {value!r} is not one of {', '.join(LOG_LEVELS)}")
        opts.log_level = level
    elif key == "fsname":
        opts.fsname = value
    elif key == "read-ahead-kb":
        if not value.isdigit() or int(value) > 1 << 20:
            raise MountOptionError(f"option read-ahead-kb: {value!r} is not a size in KiB (0 to 1048576)")
        opts.read_ahead_kb = int(value)
    else:
        raise MountOptionError(_unknown(item))


def _unknown(item: str) -> str:
    return f"unknown mount option {item!r} (known: {', '.join(KNOWN)})"
