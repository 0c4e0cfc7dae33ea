"""LvmPool: the pool interface on an LVM2 thin pool, for hosts whose kernel has device-mapper.

Everything goes through the `lvm` command with JSON reports (`--reportformat json --units b
--nosuffix`), never through liblvm2app (gone since lvm2 2.03, which is what killed GlusterFS's BD
translator). Commands run through a `CommandRunner`, so the exact argv of every operation and the
parsing of real reports are tested without touching a disk.

Mapping of the pool interface:
- a volume is a thin LV of the pool (`lvcreate -V SIZE --thin VG/POOL -n LV`); LVM rounds LV
  sizes up to whole extents and has no empty LV, so the byte size a file shows is kept in a tag
  `mortar.size=N` and the LV is at least one extent;
- snapshot = thin snapshot (`lvcreate -s`, activation skip off so it activates like any LV);
- clone = a new thin LV filled from a temporary thin snapshot of the source (a consistent point in
  time while the source stays writable), copied through the block devices with zero chunks skipped
  so the clone stays thin;
- data I/O goes to `/dev/VG/LV` with O_DIRECT (aligned bounce buffers, read-modify-write at
  unaligned edges); discard and zeroing use BLKDISCARD/BLKZEROOUT;
- seek data/hole cannot see dm-thin's mapping without thin_dump: the whole volume reads as data.

Without device-mapper (`/proc/misc` has no `device-mapper`), VG-level commands work but no thin
pool or LV can be created or activated; that failure is reported as ENODEV with a clear reason.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import re
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mortar.core.errors import FopError
from mortar.core.fops import Buffer
from mortar.thinpool.pool import PoolStats, check_name
from mortar.thinpool.volume import check_size

SIZE_TAG = "mortar.size="
ALIGN = 4096
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
_COPY_CHUNK = 4 << 20
_ALLOC_TTL = 1.0  # seconds an LV's allocation figure (one `lvs` call) is reused
_LV_NAME = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$")
#: substrings LVM keeps for its hidden sub-LVs
_RESERVED_PARTS: tuple[str, ...] = (
    "_cdata",
    "_cmeta",
    "_corig",
    "_mlog",
    "_mimage",
    "_pmspare",
    "_rimage",
    "_rmeta",
)
_RESERVED_PARTS += ("_tdata", "_tmeta", "_vorigin", "_vdata")
_LV_FIELDS = "lv_name,lv_uuid,lv_size,lv_attr,pool_lv,origin,data_percent,lv_tags,lv_time"
_POOL_FIELDS = (
    "lv_name,lv_uuid,lv_size,lv_attr,data_percent,metadata_percent,chunk_size,lv_metadata_size,"
    "transaction_id,lv_health_status"
)
_VG_FIELDS = "vg_name,vg_uuid,vg_size,vg_free,vg_extent_size,vg_extent_count,vg_free_count,vg_tags"
_PV_FIELDS = "pv_name,pv_uuid,vg_name,pv_size,pv_free"
_ERRNOS = (
    (errno.ENOENT, ("not found", "Failed to find")),
    (errno.EEXIST, ("already exists",)),
    (errno.ENOSPC, ("nsufficient",)),
)
_ACTIVATING = {("lvcreate",), ("lvresize",), ("lvchange",)}
_NOISE = re.compile(r"^File descriptor \d+ .* leaked on lvm invocation")


# ---- the command layer ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandRunner(Protocol):
    """Runs one command; the real one is `SubprocessRunner`, tests record argv and answer."""

    def run(self, argv: Sequence[str]) -> CommandResult: ...


class SubprocessRunner:
    """Runs `lvm` for real, without a shell, with a timeout."""

    def __init__(self, timeout: float = 300.0) -> None:
        self.timeout = timeout

    def run(self, argv: Sequence[str]) -> CommandResult:
        env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1", "LC_ALL": "C"}
        try:
            done = subprocess.run(
                list(argv), capture_output=True, text=True, env=env, timeout=self.timeout, check=False
            )
        except FileNotFoundError:
            raise FopError(errno.ENOENT, f"{argv[0]} not found: install lvm2") from None
        except subprocess.TimeoutExpired:
            what = " ".join(argv[:2])
            raise FopError(errno.ETIMEDOUT, f"{what} did not finish in {self.timeout:g} s") from None
        return CommandResult(tuple(argv), done.returncode, done.stdout, done.stderr)


def dm_available() -> bool:
    """Whether the kernel has device-mapper (its control node registers as a misc device)."""
    try:
        with open("/proc/misc", encoding="ascii", errors="replace") as f:
            return any(line.split()[1:2] == ["device-mapper"] for line in f)
    except OSError:
        return os.path.exists("/sys/module/dm_mod")


DM_MISSING = (
    "device-mapper is not available in this kernel (no 'device-mapper' in /proc/misc): LVM thin "
    "pools and LVs cannot be created or activated here; use the 'thin' backend (mortar's "
    "user-space pool) instead"
)


def _stderr_lines(stderr: str) -> list[str]:
    return [ln.strip() for ln in stderr.splitlines() if ln.strip() and not _NOISE.match(ln.strip())]


def command_error(res: CommandResult, what: str) -> FopError:
    """A failed lvm command as a FopError with an errno a client can act on and lvm's own reason."""
    lines = _stderr_lines(res.stderr)
    text = "\n".join(lines)
    if "device-mapper" in text:
        if not dm_available():
            return FopError(errno.ENODEV, f"{what}: {DM_MISSING}")
        target = next((ln for ln in lines if "target" in ln), lines[-1] if lines else "")
        return FopError(errno.ENODEV, f"{what}: the kernel's device-mapper lacks what LVM needs: {target}")
    said = [ln for ln in lines if not ln.startswith("Run `")]
    for code, keys in _ERRNOS:
        hit = next((ln for ln in said if any(k in ln for k in keys)), None)
        if hit is not None:
            return FopError(code, f"{what}: {hit}")
    if res.argv[1:2] in _ACTIVATING and not dm_available():
        return FopError(errno.ENODEV, f"{what}: {DM_MISSING}")
    return FopError(errno.EIO, f"{what}: {said[-1] if said else f'exit status {res.returncode}'}")


def parse_report(stdout: str, kind: str) -> list[dict[str, str]]:
    """Rows of an lvm JSON report (`{"report": [{KIND: [{field: "value"}...]}]}`)."""
    try:
        doc = json.loads(stdout)
        rows = [row for part in doc["report"] for row in part.get(kind, [])]
    except (ValueError, KeyError, TypeError) as exc:
        raise FopError(errno.EIO, f"unreadable lvm {kind} report: {exc}") from None
    if not all(isinstance(r, dict) for r in rows):
        raise FopError(errno.EIO, f"unreadable lvm {kind} report: rows are not objects")
    return [{str(k): str(v) for k, v in r.items()} for r in rows]


def _int(text: str) -> int:
    return int(text) if text.strip() else 0


def _pct(text: str) -> float:
    return float(text) if text.strip() else 0.0


@dataclass(frozen=True, slots=True)
class VgInfo:
    name: str
    uuid: str
    size: int
    free: int
    extent_size: int
    extent_count: int
    free_count: int
    tags: tuple[str, ...]

    @classmethod
    def from_row(cls, r: dict[str, str]) -> VgInfo:
        return cls(
            r["vg_name"],
            r["vg_uuid"],
            _int(r["vg_size"]),
            _int(r["vg_free"]),
            _int(r["vg_extent_size"]),
            _int(r["vg_extent_count"]),
            _int(r["vg_free_count"]),
            tuple(t for t in r.get("vg_tags", "").split(",") if t),
        )


@dataclass(frozen=True, slots=True)
class PvInfo:
    name: str
    uuid: str
    vg: str
    size: int
    free: int

    @classmethod
    def from_row(cls, r: dict[str, str]) -> PvInfo:
        return cls(r["pv_name"], r["pv_uuid"], r["vg_name"], _int(r["pv_size"]), _int(r["pv_free"]))


class Lvm:
    """argv builders for the lvm commands mortar uses; `devices` confines LVM to those devices."""

    def __init__(self, runner: CommandRunner | None = None, devices: Sequence[str] = ()) -> None:
        self.runner: CommandRunner = runner or SubprocessRunner()
        self.devices = tuple(devices)

    def argv(self, cmd: str, *args: str) -> list[str]:
        dev = ["--devices", ",".join(self.devices)] if self.devices else []
        return ["lvm", cmd, *dev, *args]

    def run(self, what: str, cmd: str, *args: str) -> str:
        res = self.runner.run(self.argv(cmd, *args))
        if res.returncode != 0:
            raise command_error(res, what)
        return res.stdout

    def report(self, what: str, cmd: str, kind: str, fields: str, *targets: str) -> list[dict[str, str]]:
        fmt = ("--reportformat", "json", "--units", "b", "--nosuffix")
        out = self.run(what, cmd, *fmt, "-o", fields, *targets)
        return parse_report(out, kind)

    # -- physical volumes and volume groups (these work without device-mapper) --------------------
    def pvcreate(self, device: str) -> None:
        self.run(f"pvcreate {device}", "pvcreate", "--yes", device)

    def pvremove(self, device: str) -> None:
        self.run(f"pvremove {device}", "pvremove", "--yes", "-ff", device)

    def vgcreate(self, vg: str, devices: Sequence[str]) -> None:
        self.run(f"vgcreate {vg}", "vgcreate", "--yes", vg, *devices)

    def vgremove(self, vg: str) -> None:
        self.run(f"vgremove {vg}", "vgremove", "--yes", "-f", vg)

    def vgs(self, vg: str) -> VgInfo:
        rows = self.report(f"vgs {vg}", "vgs", "vg", _VG_FIELDS, vg)
        if not rows:
            raise FopError(errno.ENOENT, f"volume group {vg} not found")
        return VgInfo.from_row(rows[0])

    def pvs(self) -> list[PvInfo]:
        return [PvInfo.from_row(r) for r in self.report("pvs", "pvs", "pv", _PV_FIELDS)]

    # -- logical volumes -------------------------------------------------------------------------
    def lvs(self, target: str, fields: str = _LV_FIELDS) -> list[dict[str, str]]:
        return self.report(f"lvs {target}", "lvs", "lv", fields, target)

    def create_thin_pool(self, vg: str, name: str, size: int, chunk: int) -> None:
        self.run(
            f"create thin pool {vg}/{name}",
            "lvcreate", "--yes", "--type", "thin-pool", "--size", f"{size}b", "--chunksize", f"{chunk}b",
            "--name", name, vg,
        )  # fmt: skip

    def create_thin(self, vg: str, pool: str, name: str, size: int, tags: Sequence[str]) -> None:
        tag_args = [a for t in tags for a in ("--addtag", t)]
        self.run(
            f"create thin volume {vg}/{name}",
            "lvcreate", "--yes", "--virtualsize", f"{size}b", "--thin", f"{vg}/{pool}", "--name", name,
            *tag_args,
        )  # fmt: skip

    def snapshot(self, vg: str, origin: str, name: str) -> None:
        self.run(
            f"snapshot {vg}/{origin} as {name}",
            "lvcreate", "--yes", "--snapshot", "--setactivationskip", "n", "--activate", "y",
            "--name", name, f"{vg}/{origin}",
        )  # fmt: skip

    def resize(self, vg: str, name: str, size: int) -> None:
        self.run(f"resize {vg}/{name}", "lvresize", "--yes", "--force", "--size", f"{size}b", f"{vg}/{name}")

    def retag(self, vg: str, name: str, remove: Sequence[str], add: Sequence[str]) -> None:
        args = [a for t in remove for a in ("--deltag", t)] + [a for t in add for a in ("--addtag", t)]
        self.run(f"tag {vg}/{name}", "lvchange", *args, f"{vg}/{name}")

    def remove(self, vg: str, name: str) -> None:
        self.run(f"remove {vg}/{name}", "lvremove", "--yes", f"{vg}/{name}")

    def rename(self, vg: str, old: str, new: str) -> None:
        self.run(f"rename {vg}/{old}", "lvrename", vg, old, new)


def check_lv_name(name: str) -> None:
    """The thin pool's rule plus LVM's character set (no spaces, no leading '-', not . or ..)."""
    check_name(name)
    reserved = name.startswith(("snapshot", "pvmove")) or any(s in name for s in _RESERVED_PARTS)
    if not _LV_NAME.match(name) or name in (".", "..") or reserved:
        raise FopError(errno.EINVAL, f"{name!r} is not a valid LVM name (letters, digits, + _ . -)")


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _size_tags(tags: Sequence[str]) -> list[str]:
    return [t for t in tags if t.startswith(SIZE_TAG)]


def _tags(row: dict[str, str]) -> list[str]:
    return [t for t in row.get("lv_tags", "").split(",") if t]


def logical_size(row: dict[str, str]) -> int:
    """The byte size a volume shows: its `mortar.size=` tag, else the LV's size."""
    sized = _size_tags(_tags(row))
    if len(sized) == 1 and sized[0][len(SIZE_TAG) :].isdigit():
        return int(sized[0][len(SIZE_TAG) :])
    return _int(row["lv_size"])


# ---- volumes ----------------------------------------------------------------------------------


class LvmVolume:
    """A thin LV seen as a byte-addressed volume; I/O through its device node with O_DIRECT."""

    def __init__(self, pool: LvmPool, row: dict[str, str]) -> None:
        self._pool = pool
        self.id: str = row["lv_uuid"]
        self._lock = threading.RLock()
        self._fd = -1
        self._alloc_at = 0.0
        self.deleted = False
        self.update(row)

    def update(self, row: dict[str, str]) -> None:
        self.name: str = row["lv_name"]
        self.lv_size = _int(row["lv_size"])
        self._tags = _tags(row)
        self._size = logical_size(row)
        self._origin = row.get("origin") or None
        self._allocated = int(self.lv_size * _pct(row.get("data_percent", "")) / 100)
        self._alloc_at = time.monotonic()

    def __repr__(self) -> str:
        return f"LvmVolume({self.name!r}, size={self._size})"

    @property
    def size(self) -> int:
        return self._size

    @property
    def origin(self) -> str | None:
        return self._origin

    @property
    def allocated_bytes(self) -> int:
        if time.monotonic() - self._alloc_at > _ALLOC_TTL:
            with contextlib.suppress(FopError):
                self._pool._refresh(self)
        return self._allocated

    def info(self) -> dict[str, Any]:
        self._pool._refresh(self)
        return {
            "name": self.name,
            "id": self.id,
            "size": self._size,
            "origin": self._origin,
            "block_size": self._pool.block_size,
            "lv_size": self.lv_size,
            "allocated_bytes": self._allocated,
            "device": self.device,
        }

    @property
    def device(self) -> str:
        return f"/dev/{self._pool.vg}/{self.name}"

    # -- device access ------------------------------------------------------------------------
    def _dev(self) -> int:
        if self.deleted:
            raise FopError(errno.ENOENT, f"volume {self.name!r} was deleted")
        if self._fd < 0:
            if not dm_available():
                raise FopError(errno.ENODEV, f"{self.device}: {DM_MISSING}")
            try:
                self._fd = os.open(self.device, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
            except OSError as exc:
                raise FopError(exc.errno or errno.EIO, f"cannot open {self.device}: {exc.strerror}") from None
        return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _pread(self, lo: int, hi: int) -> mmap.mmap:
        """The aligned range [lo, hi) in a page-aligned buffer (zeros past the device's end)."""
        buf = mmap.mmap(-1, max(hi - lo, ALIGN))
        view = memoryview(buf)
        try:
            done = 0
            while done < hi - lo:
                n = os.preadv(self._dev(), [view[done : hi - lo]], lo + done)
                if n <= 0:
                    break
                done += n
        except OSError as exc:
            raise FopError(errno.EIO, f"read from {self.device} failed: {exc}") from exc
        finally:
            view.release()
        return buf

    def _pwrite(self, buf: mmap.mmap, lo: int, length: int) -> None:
        view = memoryview(buf)
        try:
            done = 0
            while done < length:
                n = os.pwritev(self._dev(), [view[done:length]], lo + done)
                if n <= 0:
                    raise OSError(errno.EIO, "write made no progress")
                done += n
        except OSError as exc:
            code = exc.errno if exc.errno == errno.ENOSPC else errno.EIO
            raise FopError(code, f"write to {self.device} failed: {exc}") from exc
        finally:
            view.release()

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise FopError(errno.EINVAL, "negative offset or length")
        n = max(0, min(length, self._size - offset))
        if not n:
            return b""
        lo, hi = offset & -ALIGN, _round_up(offset + n, ALIGN)
        with self._lock, self._pread(lo, hi) as buf:
            return buf[offset - lo : offset - lo + n]

    def readinto(self, buf: Buffer, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        data = self.read(offset, len(mv))
        mv[: len(data)] = data
        return len(data)

    def write(self, data: Buffer, offset: int) -> int:
        mv = memoryview(data).cast("B")
        n = len(mv)
        if offset < 0:
            raise FopError(errno.EINVAL, "negative offset")
        if offset + n > self._size:
            raise FopError(errno.EFBIG, f"write beyond the end of {self.name!r} ({self._size} bytes)")
        if not n:
            return 0
        lo, hi = offset & -ALIGN, _round_up(offset + n, ALIGN)
        with self._lock:
            aligned = lo == offset and hi == offset + n
            # unaligned: read-modify-write of the partial blocks at the edges
            buf = mmap.mmap(-1, hi - lo) if aligned else self._pread(lo, hi)
            with buf:
                buf[offset - lo : offset - lo + n] = mv
                self._pwrite(buf, lo, hi - lo)
        return n

    def _ioctl_range(self, request: int, offset: int, length: int) -> None:
        try:
            fcntl.ioctl(self._dev(), request, struct.pack("QQ", offset, length))
        except OSError as exc:
            raise FopError(exc.errno or errno.EIO, f"{self.device}: {exc.strerror}") from None

    def _zero_range(self, offset: int, length: int, unmap: bool) -> None:
        if offset < 0 or length < 0:
            raise FopError(errno.EINVAL, "negative offset or length")
        end = min(offset + length, self._size)
        if offset >= end:
            return
        lo, hi = _round_up(offset, ALIGN), end & -ALIGN
        with self._lock:
            if lo >= hi:
                self.write(bytes(end - offset), offset)
                return
            if lo > offset:
                self.write(bytes(lo - offset), offset)
            if end > hi:
                self.write(bytes(end - hi), hi)
            # dm-thin unmaps discarded blocks, which then read as zeros
            self._ioctl_range(BLKDISCARD if unmap else BLKZEROOUT, lo, hi - lo)

    def discard(self, offset: int, length: int) -> None:
        self._zero_range(offset, length, True)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        self._zero_range(offset, length, unmap)

    def resize(self, size: int) -> None:
        check_size(size)
        self._pool._resize(self, size)

    def flush(self) -> None:
        with self._lock:
            if self._fd >= 0:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    raise FopError(errno.EIO, f"fsync of {self.device} failed: {exc}") from exc

    def seek_data(self, offset: int) -> int:
        if offset < 0 or offset >= self._size:
            raise FopError(errno.ENXIO, "offset beyond end of volume")
        return offset  # dm-thin's mapping is not visible without thin_dump: all of it is data

    def seek_hole(self, offset: int) -> int:
        if offset < 0 or offset >= self._size:
            raise FopError(errno.ENXIO, "offset beyond end of volume")
        return self._size


# ---- the pool ---------------------------------------------------------------------------------


class LvmPool:
    """An LVM2 thin pool `VG/POOL` with the `ThinPool` interface; use `create` or `open`."""

    def __init__(self, lvm: Lvm, vg: str, thinpool: str, row: dict[str, str]) -> None:
        self.lvm = lvm
        self.vg = vg
        self.thinpool = thinpool
        self._row = row
        self._lock = threading.RLock()
        self._vols: dict[str, LvmVolume] = {}  # by LV uuid: the same object for a volume's lifetime
        self._extent = 0

    @classmethod
    def create(
        cls, vg: str, thinpool: str, size: int, block_size: int = 64 << 10, *, lvm: Lvm | None = None
    ) -> LvmPool:
        """Make a thin pool of `size` bytes (chunk = `block_size`) in the existing volume group `vg`."""
        lvm = lvm or Lvm()
        check_lv_name(thinpool)
        lvm.vgs(vg)  # a clear ENOENT when the VG is missing
        lvm.create_thin_pool(vg, thinpool, size, block_size)
        return cls.open(vg, thinpool, lvm=lvm)

    @classmethod
    def open(cls, vg: str, thinpool: str, *, lvm: Lvm | None = None) -> LvmPool:
        lvm = lvm or Lvm()
        rows = lvm.lvs(f"{vg}/{thinpool}", _POOL_FIELDS)
        if not rows:
            raise FopError(errno.ENOENT, f"no logical volume {vg}/{thinpool}")
        if not rows[0]["lv_attr"].startswith("t"):
            raise FopError(errno.EINVAL, f"{vg}/{thinpool} is not a thin pool (attr {rows[0]['lv_attr']})")
        return cls(lvm, vg, thinpool, rows[0])

    @property
    def uuid(self) -> uuid.UUID:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"lvm-thin-pool:{self._row['lv_uuid']}")

    @property
    def block_size(self) -> int:
        return _int(self._row["chunk_size"]) or 64 << 10

    def __repr__(self) -> str:
        return f"LvmPool({self.vg}/{self.thinpool})"

    def _extent_size(self) -> int:
        if not self._extent:
            self._extent = self.lvm.vgs(self.vg).extent_size or ALIGN
        return self._extent

    # -- volume table -----------------------------------------------------------------------------
    def _adopt(self, row: dict[str, str]) -> LvmVolume:
        vol = self._vols.get(row["lv_uuid"])
        if vol is None:
            vol = self._vols[row["lv_uuid"]] = LvmVolume(self, row)
        else:
            vol.update(row)
        return vol

    def _thin_rows(self) -> list[dict[str, str]]:
        return [r for r in self.lvm.lvs(self.vg) if r.get("pool_lv") == self.thinpool]

    def _refresh(self, vol: LvmVolume) -> None:
        rows = self.lvm.lvs(f"{self.vg}/{vol.name}")
        if rows:
            vol.update(rows[0])

    def volume(self, name: str) -> LvmVolume:
        check_name(name)
        with self._lock:
            try:
                rows = self.lvm.lvs(f"{self.vg}/{name}")
            except FopError as exc:
                if exc.errno == errno.ENOENT:
                    raise FopError(errno.ENOENT, f"no thin volume {name!r}") from None
                raise
            if not rows or rows[0].get("pool_lv") != self.thinpool:
                raise FopError(errno.ENOENT, f"no thin volume {name!r} in {self.vg}/{self.thinpool}")
            return self._adopt(rows[0])

    def volumes(self) -> list[LvmVolume]:
        with self._lock:
            return sorted((self._adopt(r) for r in self._thin_rows()), key=lambda v: v.name)

    def create_volume(self, name: str, size: int) -> LvmVolume:
        check_lv_name(name)
        check_size(size)
        with self._lock:
            lv_size = _round_up(max(size, 1), self._extent_size())
            self.lvm.create_thin(self.vg, self.thinpool, name, lv_size, [f"{SIZE_TAG}{size}"])
            return self.volume(name)

    def _set_size_tag(self, vol: LvmVolume, size: int) -> None:
        want = f"{SIZE_TAG}{size}"
        have = _size_tags(vol._tags)
        if have != [want]:
            self.lvm.retag(self.vg, vol.name, have, [want])

    def snapshot(self, origin_name: str, new_name: str) -> LvmVolume:
        check_lv_name(new_name)
        with self._lock:
            origin = self.volume(origin_name)
            self.lvm.snapshot(self.vg, origin.name, new_name)
            snap = self.volume(new_name)
            self._set_size_tag(snap, origin.size)
            return self.volume(new_name)

    def clone(self, src_name: str, new_name: str) -> LvmVolume:
        """A full copy: a temporary snapshot pins the source's content, then its data is copied."""
        check_lv_name(new_name)
        if not dm_available():
            raise FopError(errno.ENODEV, f"clone {src_name}: {DM_MISSING}")
        src = self.volume(src_name)
        pin_name = f".mortar-clone-{uuid.uuid4().hex[:12]}"  # hidden by storage/bd
        pin = self.snapshot(src.name, pin_name)
        try:
            dst = self.create_volume(new_name, src.size)
            try:
                self._copy(pin, dst)
                dst.flush()
            except BaseException:
                dst.close()
                with contextlib.suppress(FopError):
                    self.delete_volume(new_name)
                raise
            return dst
        finally:
            pin.close()
            with contextlib.suppress(FopError):
                self.delete_volume(pin_name)

    @staticmethod
    def _copy(src: LvmVolume, dst: LvmVolume) -> None:
        zero = bytes(_COPY_CHUNK)
        pos = 0
        while pos < src.size:
            n = min(_COPY_CHUNK, src.size - pos)
            chunk = src.read(pos, n)
            if chunk != zero[:n]:  # a new thin LV reads as zeros: writing them would allocate
                dst.write(chunk, pos)
            pos += n

    def _resize(self, vol: LvmVolume, size: int) -> None:
        with self._lock, vol._lock:
            old = vol.size
            lv_size = _round_up(max(size, 1), self._extent_size())
            if size < old:  # zero the cut-off tail that stays inside the LV, so growing shows zeros
                vol.write_zeroes(size, min(old, lv_size) - size, unmap=True)
            if lv_size != vol.lv_size:
                self.lvm.resize(self.vg, vol.name, lv_size)
            self._set_size_tag(vol, size)
            self._refresh(vol)

    def delete_volume(self, name: str) -> None:
        with self._lock:
            vol = self.volume(name)
            vol.close()
            self.lvm.remove(self.vg, vol.name)
            vol.deleted = True
            self._vols.pop(vol.id, None)

    def rename_volume(self, old: str, new: str) -> None:
        check_lv_name(new)
        with self._lock:
            vol = self.volume(old)
            if new == old:
                return
            self.lvm.rename(self.vg, old, new)
            self._refresh_named(vol, new)

    def _refresh_named(self, vol: LvmVolume, name: str) -> None:
        rows = self.lvm.lvs(f"{self.vg}/{name}")
        if rows:
            vol.update(rows[0])

    # -- reporting and lifecycle --------------------------------------------------------------
    def _pool_row(self) -> dict[str, str]:
        rows = self.lvm.lvs(f"{self.vg}/{self.thinpool}", _POOL_FIELDS)
        if not rows:
            raise FopError(errno.ENOENT, f"thin pool {self.vg}/{self.thinpool} is gone")
        self._row = rows[0]
        return rows[0]

    def stats(self) -> PoolStats:
        with self._lock:
            row = self._pool_row()
            thin = self._thin_rows()
        bs = self.block_size
        data = _int(row["lv_size"])
        blocks = data // bs
        used = min(blocks, round(blocks * _pct(row["data_percent"]) / 100))
        virtual = sum(logical_size(r) for r in thin)
        return PoolStats(
            uuid=str(self.uuid),
            block_size=bs,
            data_blocks=blocks,
            used_blocks=used,
            free_blocks=blocks - used,
            withheld_blocks=0,
            data_bytes=data,
            used_bytes=used * bs,
            free_bytes=(blocks - used) * bs,
            metadata_bytes=_int(row["lv_metadata_size"]),
            mapping_nodes=0,
            volumes=len(thin),
            virtual_bytes=virtual,
            overcommit=virtual / data if data else 0.0,
            low_water_blocks=0,
            transaction=_int(row["transaction_id"]),
        )

    def check(self) -> list[str]:
        """What LVM itself reports wrong: pool health, and thin LVs whose state is not healthy."""
        with self._lock:
            row = self._pool_row()
            problems = []
            if row.get("lv_health_status"):
                problems.append(f"thin pool {self.vg}/{self.thinpool}: {row['lv_health_status']}")
            for r in self._thin_rows():
                attr = r["lv_attr"]
                if len(attr) > 8 and attr[8] not in "-":
                    problems.append(f"thin volume {r['lv_name']}: health flag {attr[8]!r} (lv_attr {attr})")
                if len(_size_tags(_tags(r))) > 1:
                    problems.append(f"thin volume {r['lv_name']}: several {SIZE_TAG} tags")
            return problems

    def commit(self) -> None:
        """LVM commits its metadata per command; data is durable once each open device is synced."""
        with self._lock:
            vols = list(self._vols.values())
        for vol in vols:
            vol.flush()

    def close(self) -> None:
        with self._lock:
            for vol in self._vols.values():
                vol.close()
            self._vols.clear()

    def __enter__(self) -> LvmPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_volume_group(lvm: Lvm, vg: str, devices: Sequence[str]) -> VgInfo:
    """pvcreate each device and make `vg` of them; works without device-mapper."""
    for dev in devices:
        lvm.pvcreate(dev)
    lvm.vgcreate(vg, devices)
    return lvm.vgs(vg)
