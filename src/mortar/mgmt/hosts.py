"""Facts about this host that management decisions need: its addresses, where a brick path lives
(mount point, file system, free space) and whether a directory may become a brick."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import posixpath
import socket
from dataclasses import dataclass
from typing import Any

VOLUME_ID_XATTR = "trusted.mortar.volume-id"  # what storage/posix stamps on a brick root


def parse_brick(text: str) -> tuple[str, str]:
    """`HOST:/PATH` -> (host, normalised path); refuses relative paths and `..`."""
    host, sep, path = text.rpartition(":")
    if not sep or not host or not path:
        raise ValueError(f"brick {text!r} is not HOST:/PATH")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not path.startswith("/"):
        raise ValueError(f"brick {text!r}: the path must be absolute")
    if ".." in path.split("/"):
        raise ValueError(f"brick {text!r}: the path must not contain '..'")
    norm = posixpath.normpath(path)
    if norm == "/":
        raise ValueError(f"brick {text!r}: the root directory cannot be a brick")
    return host, norm


def nested(a: str, b: str) -> bool:
    """One path is the other or inside it."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def existing_ancestor(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def mount_point(path: str) -> str:
    """The mount point of the file system that holds `path` (or would hold it, if it is created)."""
    path = os.path.realpath(existing_ancestor(path))
    dev = os.stat(path).st_dev
    while path != "/":
        parent = os.path.dirname(path)
        if os.stat(parent).st_dev != dev:
            return path
        path = parent
    return "/"


@dataclass(frozen=True, slots=True)
class Mount:
    point: str
    device: str
    fstype: str
    options: str


def mount_of(path: str) -> Mount:
    """The /proc/self/mountinfo entry of the file system holding `path`."""
    point = mount_point(path)
    found = Mount(point, "", "", "")
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts, rparts = left.split(), right.split()
            if len(parts) >= 6 and len(rparts) >= 2 and _unescape(parts[4]) == point:
                found = Mount(point, rparts[1], rparts[0], parts[5])  # the last mount there wins
    return found


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def check_brick_path(path: str, force: bool) -> list[str]:
    """Why `path` cannot become a new brick here (empty when it can)."""
    errors: list[str] = []
    if os.path.lexists(path) and not os.path.isdir(path):
        return [f"{path} exists and is not a directory"]
    try:
        marker = os.getxattr(path, VOLUME_ID_XATTR) if os.path.isdir(path) else None
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
            return [f"{path}: {exc.strerror}"]
        marker = None
    if marker is not None:
        errors.append(f"{path} is already part of a volume (it carries {VOLUME_ID_XATTR})")
    ancestor = existing_ancestor(os.path.dirname(path))
    for parent in _ancestors(ancestor):
        try:
            os.getxattr(parent, VOLUME_ID_XATTR)
        except OSError:
            continue
        errors.append(f"{path} is inside {parent}, which is already part of a volume")
        break
    if not force:
        point = mount_point(path)
        if point == "/":
            errors.append(
                f"{path} is on the root file system: bricks belong on their own file system "
                "(use 'force' to create it there anyway)"
            )
    return errors


def _ancestors(path: str) -> list[str]:
    out = []
    while True:
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            return out
        path = parent


def disk_detail(path: str) -> dict[str, Any]:
    """What `volume status detail` shows for a brick: file system, space and inodes."""
    try:
        st = os.statvfs(path)
    except OSError as exc:
        return {"error": exc.strerror}
    mount = mount_of(path)
    return {
        "file_system": mount.fstype,
        "device": mount.device,
        "mount_point": mount.point,
        "mount_options": mount.options,
        "block_size": st.f_frsize,
        "total_bytes": st.f_blocks * st.f_frsize,
        "free_bytes": st.f_bavail * st.f_frsize,
        "inode_count": st.f_files,
        "free_inodes": st.f_favail,
    }


# ---- addresses -----------------------------------------------------------------------------------


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve(host: str) -> set[str]:
    """Every address `host` resolves to (empty when it does not)."""
    if is_ip(host):
        return {str(ipaddress.ip_address(host))}
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return set()
    return {str(info[4][0]) for info in infos}


def default_hostnames(listen: str) -> list[str]:
    """Names this node goes by: its listen address when specific, else its host name and addresses."""
    if listen not in ("0.0.0.0", "::", ""):
        return [listen]
    name = socket.gethostname()
    found = [name]
    for addr in sorted(resolve(name)):
        if not ipaddress.ip_address(addr).is_loopback and addr not in found:
            found.append(addr)
    return found


def outward_address(host: str, port: int) -> str:
    """The local address this host uses to reach `host` (what a peer there would see)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        addr: str = s.getsockname()[0]
        return addr


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """`HOST`, `HOST:PORT`, `[V6]:PORT` -> (host, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            raise ValueError(f"bad port in {text!r}")
        return host, int(port)
    return text, default_port
