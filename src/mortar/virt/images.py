"""Disk images on mortar volumes: create, inspect, resize and delete raw and qcow2 images.

An image is a plain file on the volume. Raw images are made and resized with the native client
alone (ftruncate, fallocate). Everything that must understand qcow2 is left to `qemu-img`, the
reference implementation, which reaches the file the way QEMU will: over NBD, from a server this
process runs on a private unix socket (a fresh 0700 directory) for the duration of the operation.

qcow2 over NBD needs a fixed-size container, since an NBD export cannot grow: qcow2 allocates
clusters by scanning its refcounts from the start of the file, so data lands inside the container
as long as the container can hold every cluster the image may ever need. The container is
therefore created (sparse) at `qemu-img measure`'s fully-allocated size for the virtual size, and
`qemu-img create -f qcow2` formats it in place over NBD (QEMU's nbd driver accepts creation on an
existing export and any non-growing truncate). The sparse tail costs nothing until used. The
alternative, formatting a local temporary file and copying its bytes in, would write the image
through a path QEMU never uses and need local space for metadata preallocation; this way the
format is written by the same driver, through the same server, that will later run the VM.

Resizing a qcow2 image first grows the container by ftruncate to the new measured size, plus room
for the old L1 and refcount tables, which qcow2 keeps while it writes their larger copies, then
runs `qemu-img resize` over NBD (a new connection sees the larger export). Shrinking needs
`shrink=True`, as with qemu-img; the container keeps its size then. Internal qcow2 snapshots are
not mortar's way (snapshots are file operations on the volume); their room is kept on resize but
not planned for at creation.

The format is recorded in the xattr `user.mortar.image.format` at creation and trusted over
probing, so a raw image whose guest wrote a qcow2 header is never taken for a qcow2 image.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import posixpath
import re
import shutil
import stat
import struct
import tempfile
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import Any
from urllib.parse import quote

from mortar.client import AsyncVolume, FileHandle, StatResult
from mortar.frontends.nbd.server import NbdServer
from mortar.frontends.nbd.volume import VolumeExportProvider

FORMATS = ("raw", "qcow2")
PREALLOCATIONS = ("off", "metadata", "full")
FORMAT_XATTR = "user.mortar.image.format"
QEMU_IMG_TIMEOUT = 600.0  # metadata preallocation of a large qcow2 writes its L2 tables: minutes
_EXPORT_VOLUME = "volume"  # the private server's one volume
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV})

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTPE]?)(?:I?B)?\s*", re.IGNORECASE)


class ImageError(Exception):
    """An image operation refused or failed; the message is meant for the operator."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int  # what the guest sees
    file_size: int  # the file on the volume (the qcow2 container)
    allocated: int  # bytes the volume has allocated to the file
    cluster_size: int | None = None
    backing_file: str | None = None
    dirty: bool = False
    corrupt: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_size(text: str) -> int:
    """`10G`, `512MiB`, `1.5T`, `4096`: bytes (binary units, as qemu-img reads them)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ImageError(f"bad size {text!r}: expected a number with an optional K, M, G, T, P or E")
    try:
        value = Decimal(match.group(1)) * _UNITS[match.group(2).upper()]
    except InvalidOperation:
        raise ImageError(f"bad size {text!r}") from None
    if value != int(value):
        raise ImageError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def format_size(size: int) -> str:
    """1073741824 -> `1 GiB`; 1536 -> `1.5 KiB`."""
    for unit in ("EiB", "PiB", "TiB", "GiB", "MiB", "KiB"):
        scale = _UNITS[unit[0]]
        if size >= scale:
            return f"{size / scale:.4g} {unit}"
    return f"{size} B"


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ImageError(f"unknown {what} {value!r} (one of {', '.join(choices)})")


# ---- qemu-img and the private NBD export ------------------------------------------------------


async def qemu_img(*args: str, timeout: float = QEMU_IMG_TIMEOUT) -> str:
    """Run qemu-img; its stdout, or ImageError with what it said on failure."""
    exe = shutil.which("qemu-img")
    if exe is None:
        raise ImageError("qemu-img is not installed (Debian: apt-get install qemu-utils)")
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        exe, *args, stdin=asyncio.subprocess.DEVNULL, stdout=pipe, stderr=pipe
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException as exc:  # a timeout, or the caller gave up: qemu-img must not outlive us
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(exc, TimeoutError):
            raise ImageError(f"qemu-img {args[0]} did not finish within {timeout:g}s") from None
        raise
    if proc.returncode != 0:
        said = err.decode(errors="replace").strip().replace("\n", "; ")
        raise ImageError(f"qemu-img {args[0]} failed: {said or f'exit status {proc.returncode}'}")
    return out.decode(errors="replace")


class PrivateExport:
    """The volume's images over NBD on a unix socket only this user can reach, while in use.

    `async with PrivateExport(volume) as export: await qemu_img("info", export.uri(path))`
    """

    def __init__(self, volume: AsyncVolume, *, read_only: bool = False) -> None:
        self.provider = VolumeExportProvider({_EXPORT_VOLUME: volume})
        self.server = NbdServer(self.provider, read_only=read_only)
        self._dir: str | None = None
        self.socket = ""

    async def __aenter__(self) -> PrivateExport:
        self._dir = tempfile.mkdtemp(prefix="mortar-image-")  # mode 0700: nobody else connects
        self.socket = os.path.join(self._dir, "nbd.sock")
        try:
            await self.server.listen_unix(self.socket)
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.server.close()
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)

    def uri(self, path: str) -> str:
        """The NBD URI of the image at `path` (percent-encoded, as QEMU decodes it)."""
        name = quote(f"{_EXPORT_VOLUME}/{path.lstrip('/')}", safe="/")
        return f"nbd+unix:///{name}?socket={quote(self.socket, safe='/')}"


# ---- helpers on the volume ---------------------------------------------------------------------


async def _measure_qcow2(size: int, preallocation: str) -> int:
    """Bytes a qcow2 image of `size` can ever take with every cluster allocated."""
    out = await qemu_img(
        "measure", "--output=json", "-O", "qcow2", "-o", f"preallocation={preallocation}", "--size", str(size)
    )
    return int(json.loads(out)["fully-allocated"])


async def _allocate(volume: AsyncVolume, handle: FileHandle, offset: int, length: int) -> None:
    """Reserve real blocks for the range on every brick, keeping what it holds (preallocation=full).

    fallocate reserves blocks without writing them; where a brick cannot, zerofill only the holes
    (zerofill overwrites, and data or qcow2 metadata may already be there).
    """
    if length <= 0:
        return
    try:
        await volume.fallocate(handle, 0, offset, length)
        return
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    pos, end = offset, offset + length
    while pos < end:
        try:
            hole = min(await volume.seek_hole(handle, pos), end)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            hole = end
        if hole >= end:
            return
        try:
            data = min(await volume.seek_data(handle, hole), end)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = end
        await volume.zerofill(handle, hole, data - hole)
        pos = data


async def _recorded_format(volume: AsyncVolume, path: str) -> str | None:
    try:
        value = (await volume.getxattr(path, FORMAT_XATTR)).decode()
    except OSError as exc:
        if exc.errno in (errno.ENODATA, *_UNSUPPORTED):
            return None
        raise
    return value if value in FORMATS else None


async def _regular_file(volume: AsyncVolume, path: str) -> StatResult:
    st = await volume.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path} is not an image file")
    return st


def _qcow2_header_room(path: str, header: bytes) -> int:
    """Bytes of the L1 and refcount tables a qcow2 header names (both are rewritten when they grow)."""
    if len(header) < 64 or header[:4] != b"QFI\xfb":
        raise ImageError(f"{path}: not a qcow2 image (bad magic)")
    (cluster_bits,) = struct.unpack_from(">I", header, 20)
    (l1_size,) = struct.unpack_from(">I", header, 36)
    (refcount_clusters,) = struct.unpack_from(">I", header, 56)
    if not 9 <= cluster_bits <= 21:
        raise ImageError(f"{path}: qcow2 header names clusters of 2^{cluster_bits} bytes")
    cluster = 1 << cluster_bits
    l1_bytes = -(-l1_size * 8 // cluster) * cluster
    return l1_bytes + refcount_clusters * cluster


# ---- operations ----------------------------------------------------------------------------


async def create_image(
    volume: AsyncVolume, path: str, size: int, fmt: str = "raw", preallocation: str = "off", mode: int = 0o644
) -> ImageInfo:
    """A new image at `path` (which must not exist; missing parent directories are made) of
    virtual size `size`.

    preallocation: `off` (sparse), `metadata` (qcow2: every L2 table written now), `full` (blocks
    reserved for the whole image on every brick, with fallocate; for qcow2 after its metadata).
    """
    _check_choice(fmt, FORMATS, "format")
    _check_choice(preallocation, PREALLOCATIONS, "preallocation")
    if size <= 0:
        raise ImageError(f"image size must be positive, not {size}")
    if fmt == "raw" and preallocation == "metadata":
        raise ImageError("a raw image has no metadata to preallocate: use off or full")
    if fmt == "qcow2" and size % 512:
        raise ImageError("a qcow2 image size must be a multiple of 512 bytes")
    container = size
    if fmt == "qcow2":
        container = await _measure_qcow2(size, "off" if preallocation == "off" else "metadata")
    parent = posixpath.dirname(path.rstrip("/"))
    if parent not in ("", "/"):
        await volume.makedirs(parent, exist_ok=True)
    handle = await volume.open_fd(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            await volume.ftruncate(handle, container)
            await volume.setxattr(path, FORMAT_XATTR, fmt.encode())
            if fmt == "raw" and preallocation == "full":
                await _allocate(volume, handle, 0, size)
            await volume.fsync(handle)
        finally:
            await volume.close(handle)
        async with PrivateExport(volume) as export:
            if fmt == "qcow2":
                options = f"preallocation={'off' if preallocation == 'off' else 'metadata'}"
                await qemu_img("create", "-q", "-f", "qcow2", "-o", options, export.uri(path), str(size))
                if preallocation == "full":
                    await _allocate_file(volume, path)
            return await _info(volume, path, fmt, export)
    except BaseException:
        with contextlib.suppress(OSError):
            await volume.unlink(path)
        raise


async def _allocate_file(volume: AsyncVolume, path: str) -> None:
    handle = await volume.open_fd(path, os.O_RDWR)
    try:
        size = (await volume.fstat(handle)).st_size
        await _allocate(volume, handle, 0, size)
        await volume.fsync(handle)
    finally:
        await volume.close(handle)


async def _info(volume: AsyncVolume, path: str, fmt: str | None, export: PrivateExport) -> ImageInfo:
    st = await _regular_file(volume, path)
    args = ["info", "--output=json"]
    if fmt is not None:
        args += ["-f", fmt]
    report = json.loads(await qemu_img(*args, export.uri(path), timeout=60))
    specific = report.get("format-specific", {}).get("data", {})
    return ImageInfo(
        path=path,
        format=str(report["format"]),
        virtual_size=int(report["virtual-size"]),
        file_size=st.st_size,
        allocated=st.st_blocks * 512,
        cluster_size=report.get("cluster-size"),
        backing_file=report.get("backing-filename"),
        dirty=bool(report.get("dirty-flag", False)),
        corrupt=bool(specific.get("corrupt", False)),
    )


async def image_info(volume: AsyncVolume, path: str, fmt: str | None = None) -> ImageInfo:
    """What qemu-img says of the image (format as recorded at creation, else probed) and what
    the volume says of the file (size, allocated bytes)."""
    if fmt is not None:
        _check_choice(fmt, FORMATS, "format")
    await _regular_file(volume, path)
    fmt = fmt or await _recorded_format(volume, path)
    async with PrivateExport(volume, read_only=True) as export:
        return await _info(volume, path, fmt, export)


async def writable_format(volume: AsyncVolume, path: str, fmt: str | None = None) -> str:
    """The format to write the image as: the one recorded at creation, else `fmt`; a probe is never
    trusted to write (a guest can make its raw disk look like a qcow2 image)."""
    await _regular_file(volume, path)
    recorded = await _recorded_format(volume, path)
    if fmt is not None and recorded is not None and fmt != recorded:
        raise ImageError(f"{path} is a {recorded} image, not {fmt}")
    fmt = fmt or recorded
    if fmt is None:
        raise ImageError(
            f"{path}: its format is not recorded (not made by mortar): say which it is (--format)"
        )
    _check_choice(fmt, FORMATS, "format")
    return fmt


async def resize_image(
    volume: AsyncVolume,
    path: str,
    size: int,
    *,
    fmt: str | None = None,
    shrink: bool = False,
    preallocation: str = "off",
) -> ImageInfo:
    """Give the image virtual size `size`; the new part is preallocated as `preallocation` says.

    The format is the one recorded at creation; an image mortar did not make needs `fmt`, as
    resizing a raw image taken for qcow2 would write qcow2 tables into the guest's data.
    Do not resize an image a running VM uses: grow it through the VM (QMP block_resize).
    """
    _check_choice(preallocation, PREALLOCATIONS, "preallocation")
    if size <= 0:
        raise ImageError(f"image size must be positive, not {size}")
    fmt = await writable_format(volume, path, fmt)
    before = await image_info(volume, path, fmt)
    if size < before.virtual_size and not shrink:
        raise ImageError(
            f"{path}: {size} bytes is smaller than the image ({before.virtual_size}): shrinking loses "
            "the data past the new end and must be asked for (--shrink)"
        )
    if size == before.virtual_size:
        return before
    if before.format == "raw":
        if preallocation == "metadata":
            raise ImageError("a raw image has no metadata to preallocate: use off or full")
        handle = await volume.open_fd(path, os.O_RDWR)
        try:
            await volume.ftruncate(handle, size)
            if preallocation == "full":
                await _allocate(volume, handle, before.virtual_size, size - before.virtual_size)
            await volume.fsync(handle)
        finally:
            await volume.close(handle)
        return await image_info(volume, path, "raw")
    if size % 512:
        raise ImageError("a qcow2 image size must be a multiple of 512 bytes")
    grow = size > before.virtual_size
    if grow:
        await _grow_container(volume, path, before, size, preallocation)
    args = ["resize", "-q", "-f", "qcow2"]
    if not grow:
        args.append("--shrink")
    elif preallocation != "off":
        args.append("--preallocation=metadata")
    async with PrivateExport(volume) as export:
        await qemu_img(*args, export.uri(path), str(size))
    if grow and preallocation == "full":
        await _allocate_file(volume, path)
    return await image_info(volume, path, "qcow2")


async def _grow_container(
    volume: AsyncVolume, path: str, before: ImageInfo, size: int, preallocation: str
) -> None:
    """Make the container big enough for `size` before qemu-img writes the larger tables."""
    prealloc = "off" if preallocation == "off" else "metadata"
    handle = await volume.open_fd(path, os.O_RDWR)
    try:
        header = await volume.pread(handle, 4096, 0)
        room = _qcow2_header_room(path, header)
        new = await _measure_qcow2(size, prealloc)
        old = await _measure_qcow2(before.virtual_size, prealloc)
        # what the image holds beyond a plain one of its size (snapshots) stays held
        need = max(new, before.file_size + new - old) + room
        if need > before.file_size:
            await volume.ftruncate(handle, need)
            await volume.fsync(handle)
    finally:
        await volume.close(handle)


async def delete_image(volume: AsyncVolume, path: str) -> None:
    """Remove the image file (a VM still using it keeps its open file until it closes it)."""
    st = await volume.stat(path, follow_symlinks=False)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise ImageError(f"{path} is not an image file")
    await volume.unlink(path)
