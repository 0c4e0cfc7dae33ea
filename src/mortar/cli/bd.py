"""`mortar bd ...`: thin pools for block-device bricks, and the images (thin volumes) in them.

    mortar bd pool create HOST:/POOL [--backing FILE|DEVICE] [--size SIZE] [--block-size 64K]
    mortar bd pool info HOST:/POOL
    mortar bd create VOL:/POOL/LV SIZE          new thin volume (nothing allocated)
    mortar bd clone VOL:/POOL/LV NEW            full copy       (a hard link on the volume)
    mortar bd snapshot VOL:/POOL/LV NEW         linked clone    (a symlink on the volume)
    mortar bd delete VOL:/POOL/LV
    mortar bd info VOL:/POOL/LV                 size, allocation, origin of a snapshot

Pool commands work on this host's pools directly (the node daemon route comes with
`--remote-host`); image commands go through the volume with the native client, so they work on
any bd volume the client can reach, by `--volfile FILE` or through the node daemon. The image is
`/LV` on the volume; POOL names the brick it lives on, as in GlusterFS's `VOL:/POOL/LV` syntax.
The operations themselves are library functions in `mortar.thinpool.bdpool`.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from typing import Any

from mortar.cli.command import CliError, Context, Result, command
from mortar.cli.nbd import ArgumentParser, daemon_uri
from mortar.client import Volume
from mortar.core.errors import FopError
from mortar.core.options import OptionError, parse_size
from mortar.thinpool import bdpool
from mortar.thinpool.lvm import Lvm, create_volume_group

POOL_CREATE = (
    "bd pool create HOST:/POOL [--backing FILE|DEVICE] [--size SIZE] [--block-size SIZE] "
    "[--backend thin|lvm] [--vg VG] [--thinpool NAME]"
)
POOL_INFO = "bd pool info HOST:/POOL [--backend thin|lvm] [--vg VG] [--thinpool NAME]"
CREATE = "bd create VOL:/POOL/LV SIZE [--volfile FILE]"
CLONE = "bd clone VOL:/POOL/LV NEW [--volfile FILE]"
SNAPSHOT = "bd snapshot VOL:/POOL/LV NEW [--volfile FILE]"
DELETE = "bd delete VOL:/POOL/LV [--volfile FILE]"
INFO = "bd info VOL:/POOL/LV [--volfile FILE]"


def human(size: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.4g} {unit}"
    return f"{size} B"


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except OptionError as exc:
        raise CliError(str(exc), status=2) from None


def is_local(host: str) -> bool:
    """Whether `host` names this machine: one of its addresses can be bound."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        if ipaddress.ip_address(addr[0]).is_loopback:
            return True
        with socket.socket(family, socket.SOCK_STREAM) as s, contextlib.suppress(OSError):
            s.bind((addr[0], 0))
            return True
    return False


def pool_location(ref: str, ctx: Context, backend: str, vg: str, thinpool: str) -> bdpool.Location:
    host, sep, path = ref.partition(":")
    if not sep or not host or not path.startswith("/"):
        raise CliError(f"{ref!r}: expected HOST:/POOL", status=2)
    if ctx.remote_host:
        raise CliError("pool commands run on the pool's own host for now (--remote-host is not supported)")
    if not is_local(host):
        raise CliError(f"{host} is not this host: run the command there")
    if backend == "lvm" and not vg:
        raise CliError("--backend lvm needs --vg", status=2)
    return bdpool.Location(os.path.normpath(path), backend, vg=vg, thinpool=thinpool)


def _pool_parser(synopsis: str) -> ArgumentParser:
    parser = ArgumentParser(synopsis)
    parser.add_argument("pool")
    parser.add_argument("--backend", choices=bdpool.BACKENDS, default="thin")
    parser.add_argument("--vg", default="")
    parser.add_argument("--thinpool", default="mortar-pool")
    return parser


def _pool_text(info: dict[str, Any]) -> str:
    pool = info["pool"]
    lines = [
        f"pool: {pool['path']} ({pool['backend']})",
        f"size: {human(pool['data_bytes'])}, block size {human(pool['block_size'])}",
        f"used: {human(pool['used_bytes'])}, free: {human(pool['free_bytes'])}",
        f"volumes: {pool['volumes']}, virtual size {human(pool['virtual_bytes'])} "
        f"(overcommit {pool['overcommit']:.2f})",
    ]
    if info["volumes"]:
        lines.append(f"\n{'image':<32} {'size':>12} {'allocated':>12}  origin")
        lines += [
            f"{v['name']:<32} {human(v['size']):>12} {human(v['allocated_bytes']):>12}  {v['origin'] or '-'}"
            for v in info["volumes"]
        ]
    return "\n".join(lines)


@command(
    "bd pool create",
    POOL_CREATE,
    "make a thin pool for a block-device brick (a pool directory on this host)",
    details="""
POOL becomes a pool directory. Its data is --backing (a file, created or grown to --size, or a
block device) or, without it, POOL/data of --size. --block-size is the allocation unit (default
64K). With --backend lvm the pool is an LVM2 thin pool VG/--thinpool of --size; given --backing
DEVICE, the volume group --vg is first made on that device. LVM thin pools need a kernel with
device-mapper. Serve the pool with `mortar volume create NAME device lv HOST:/POOL`.
""",
)
def pool_create(args: list[str], ctx: Context) -> Result:
    parser = _pool_parser(POOL_CREATE)
    parser.add_argument("--backing", default="")
    parser.add_argument("--size")
    parser.add_argument("--block-size", default="64K")
    opts = parser.parse_args(args)
    loc = pool_location(opts.pool, ctx, opts.backend, opts.vg, opts.thinpool)
    size = _size(opts.size) if opts.size else None
    block = _size(opts.block_size)
    if os.path.lexists(loc.path) and (not os.path.isdir(loc.path) or os.listdir(loc.path)):
        raise CliError(f"{loc.path} exists and is not an empty directory")
    try:
        if opts.backend == "lvm" and opts.backing:
            lvm = Lvm()
            try:
                lvm.vgs(opts.vg)
            except FopError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                create_volume_group(lvm, opts.vg, [opts.backing])
        pool = bdpool.create_pool(
            loc, size=size, block_size=block, backing="" if opts.backend == "lvm" else opts.backing
        )
        with contextlib.closing(pool):
            info = bdpool.describe(loc, pool)
    except FopError as exc:
        raise CliError(f"{opts.pool}: {exc.message}") from None
    except OSError as exc:
        raise CliError(f"{opts.pool}: {exc.strerror or exc}") from None
    st = info["pool"]
    text = f"created pool {opts.pool}: {human(st['data_bytes'])} in blocks of {human(st['block_size'])}"
    return Result(text, info)


@command("bd pool info", POOL_INFO, "show a pool's size, use and images")
def pool_info(args: list[str], ctx: Context) -> Result:
    opts = _pool_parser(POOL_INFO).parse_args(args)
    loc = pool_location(opts.pool, ctx, opts.backend, opts.vg, opts.thinpool)
    try:
        pool = bdpool.open_pool(loc, read_only=True, commit_interval=0)
        with contextlib.closing(pool):
            info = bdpool.describe(loc, pool)
    except FopError as exc:
        if exc.errno == errno.EBUSY:
            raise CliError(
                f"{opts.pool} is in use by its brick: ask through the volume (mortar bd info)"
            ) from None
        raise CliError(f"{opts.pool}: {exc.message}") from None
    return Result(_pool_text(info), info)


# ---- images through the volume ------------------------------------------------------------------


def split_image(ref: str) -> tuple[str, str, str]:
    """`VOL:/POOL/LV` (or `VOL:/LV`, `VOL:LV`) -> (volume, pool path or "", image name)."""
    volume, sep, path = ref.partition(":")
    if not sep or not volume or "/" in volume:
        raise CliError(f"{ref!r}: expected VOL:/POOL/LV", status=2)
    pool, _, name = path.rpartition("/")
    if not name or name in (".", "..") or ".." in pool.split("/"):
        raise CliError(f"{ref!r}: expected VOL:/POOL/LV", status=2)
    return volume, pool, name


def new_name(ref: str, volume: str) -> str:
    """NEW is a bare image name or VOL:/POOL/NEW on the same volume."""
    if ":" in ref:
        other, _, name = split_image(ref)
        if other != volume:
            raise CliError(f"{ref}: clones and snapshots stay on volume {volume}", status=2)
        return name
    if "/" in ref or ref in ("", ".", ".."):
        raise CliError(f"{ref!r} is not an image name", status=2)
    return ref


def open_client(volume: str, volfile: str | None, ctx: Context) -> Volume:
    try:
        if volfile:
            return Volume.from_volfile(volfile, timeout=30)
        return Volume.connect(daemon_uri(ctx, volume), timeout=30)
    except (OSError, ValueError, LookupError, TimeoutError) as exc:
        raise CliError(f"cannot open volume {volume}: {exc}") from None


def _image_parser(synopsis: str, *extra: str) -> ArgumentParser:
    parser = ArgumentParser(synopsis)
    parser.add_argument("image")
    for name in extra:
        parser.add_argument(name)
    parser.add_argument("--volfile")
    return parser


def _on_image(ref: str, volfile: str | None, ctx: Context, work: Any) -> Any:
    volume, _, name = split_image(ref)
    client = open_client(volume, volfile, ctx)
    try:
        return work(client, volume, name)
    except FopError as exc:
        raise CliError(f"{ref}: {exc.message}") from None
    except OSError as exc:
        raise CliError(f"{ref}: {exc.strerror or exc}") from None
    finally:
        client.close()


def _info_text(ref: str, info: dict[str, Any]) -> str:
    lines = [f"image: {ref}", f"size: {human(info['size'])} ({info['size']} bytes)"]
    lines.append(f"allocated: {human(info['allocated_bytes'])} ({info['allocated_bytes']} bytes)")
    if info.get("shared_bytes") is not None:
        lines.append(f"shared with snapshots/origin: {human(info['shared_bytes'])}")
    lines.append(f"origin: {info['origin'] or '-'}")
    return "\n".join(lines)


@command("bd create", CREATE, "create a thin volume (image) of SIZE on a bd volume")
def bd_create(args: list[str], ctx: Context) -> Result:
    opts = _image_parser(CREATE, "size").parse_args(args)
    size = _size(opts.size)
    info = _on_image(opts.image, opts.volfile, ctx, lambda c, v, n: bdpool.image_create(c, n, size))
    return Result(f"created {opts.image}: {human(size)}", info)


@command("bd clone", CLONE, "make NEW a full, independent copy of an image (a hard link on the volume)")
def bd_clone(args: list[str], ctx: Context) -> Result:
    opts = _image_parser(CLONE, "new").parse_args(args)
    info = _on_image(
        opts.image, opts.volfile, ctx, lambda c, v, n: bdpool.image_clone(c, n, new_name(opts.new, v))
    )
    return Result(f"cloned {opts.image} to {info['name']}", info)


@command("bd snapshot", SNAPSHOT, "make NEW a snapshot (linked clone) of an image (a symlink on the volume)")
def bd_snapshot(args: list[str], ctx: Context) -> Result:
    opts = _image_parser(SNAPSHOT, "new").parse_args(args)
    info = _on_image(
        opts.image, opts.volfile, ctx, lambda c, v, n: bdpool.image_snapshot(c, n, new_name(opts.new, v))
    )
    return Result(f"snapshot {info['name']} of {opts.image}", info)


@command("bd delete", DELETE, "delete an image; its blocks return to the pool once nothing shares them")
def bd_delete(args: list[str], ctx: Context) -> Result:
    opts = _image_parser(DELETE).parse_args(args)
    _on_image(opts.image, opts.volfile, ctx, lambda c, v, n: bdpool.image_delete(c, n))
    return Result(f"deleted {opts.image}", {"image": opts.image, "deleted": True})


@command("bd info", INFO, "show an image's size, allocation and, for a snapshot, its origin")
def bd_info(args: list[str], ctx: Context) -> Result:
    opts = _image_parser(INFO).parse_args(args)
    info = _on_image(opts.image, opts.volfile, ctx, lambda c, v, n: bdpool.image_info(c, n))
    return Result(_info_text(opts.image, info), {"image": opts.image, **info})
