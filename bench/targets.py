"""The rows of the table as targets: one way of reaching one volume (or the local disk), with the
same jobs behind one interface so every row runs exactly the same work.

- `DirTarget`: a directory: the local disk (Base) or a FUSE mount. fio (psync / libaio),
  `qemu-img convert` on paths, the small-file loop with `os` calls.
- `GfapiTarget`: a GlusterFS volume through libgfapi: fio's gfapi engines, QEMU's gluster:// driver.
- `NbdTarget`: images of a mortar volume over NBD: fio's nbd engine, qemu-img with nbd:// URIs.
- `NativeTarget`: mortar's native client in a separate process (bench/native_job.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import fio, procs

MIB = 1 << 20


class Unsupported(Exception):
    """This row has no way to run this job; the message goes into the cell."""


class Target:
    key = ""  # the row's key (--rows)
    family = ""  # "base", "gluster" or "mortar"
    where: fio.Target  # how fio reaches this row

    def __init__(self, label: str, shape: str, workdir: Path) -> None:
        self.label = label
        self.shape = shape
        self.workdir = workdir

    def prepare(self, files: dict[str, int]) -> None:
        """Files (name -> bytes) full of data, written in one untimed run."""
        fio.run(self.where, "write", list(files), list(files.values()), MIB, 1, self.workdir)

    def seq(self, rw: str, files: list[str], size: int) -> fio.Result:
        raise Unsupported("n/a")

    def rand(self, rw: str, name: str, size: int, seconds: float, depth: int = 32) -> fio.Result:
        raise Unsupported("n/a")

    def convert(self, direction: str, local: Path, size: int) -> tuple[float, float]:
        """qemu-img convert of a raw image into (`in`) or out of the volume: (MiB/s of the copy,
        MiB/s including the process's start and exit)."""
        raise Unsupported("n/a")

    def smallfiles(self, count: int, size: int, tag: str, budget: float) -> dict[str, float]:
        """files/s of "create", "stat", "delete", and "files": how many (see posix_smallfiles)."""
        raise Unsupported("n/a")

    _conv_size = 0

    def _qemu_convert(self, inside: str, direction: str, local: Path, size: int) -> tuple[float, float]:
        """Into an image that already exists at full size (`-n`, created once, untimed), as for NBD
        exports, so no row times the creation of its target; out of it into a new local file."""
        cache = ["-t", "none", "-T", "none"]
        if direction == "in":
            if self._conv_size != size:
                procs.run(["qemu-img", "create", "-q", "-f", "raw", inside, str(size)], timeout=600)
                self._conv_size = size
            return qemu_img_convert(str(local), inside, target_exists=True, src_opts=cache, size=size)
        return qemu_img_convert(inside, str(local), src_opts=cache, size=size)


def qemu_img_convert(
    src: str,
    dst: str,
    *,
    target_exists: bool = False,
    src_opts: list[str] | None = None,
    dst_opts: list[str] | None = None,
    size: int = 0,
) -> tuple[float, float]:
    """(MiB/s of the copy: from qemu-img's first progress report (images open) to 100 %, MiB/s of
    the whole process). The second adds creating, opening and closing the images: each gfapi
    instance spends ~10 s in glfs_fini here, and creating a gluster:// target takes one more."""
    cmd = ["qemu-img", "convert", "-p", "-f", "raw", "-O", "raw", *(src_opts or []), *(dst_opts or [])]
    if target_exists:
        cmd.append("-n")
    cmd += [src, dst]
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            preexec_fn=procs.die_with_parent,
        )
        assert proc.stdout is not None
        tail, first, done = b"", 0.0, 0.0
        while chunk := os.read(proc.stdout.fileno(), 4096):
            now = time.perf_counter()
            tail = (tail + chunk)[-64:]
            if not first and b"/100%)" in tail:  # the first progress line: both images are open
                first = now
            if not done and b"(100.00/100%)" in tail:
                done = now
        proc.wait(1800)
        end = time.perf_counter()
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"qemu-img convert failed ({proc.returncode}): {err.read().decode()[-400:]}")
    copy = (done or end) - (first or start)
    return size / MIB / copy, size / MIB / (end - start)


def posix_smallfiles(directory: Path, count: int, size: int, budget: float) -> dict[str, float]:
    """create (+4 KiB write, close), stat, unlink of `count` files, one call at a time; files/s.
    Creating stops early after `budget` seconds; stat and unlink then cover the files made."""
    directory.mkdir(parents=True, exist_ok=False)
    payload = os.urandom(size)
    paths = [str(directory / f"f{i:06d}") for i in range(count)]
    out: dict[str, float] = {}
    start = time.perf_counter()
    deadline = start + budget
    for made, p in enumerate(paths):
        if made % 64 == 0 and made and time.perf_counter() > deadline:
            del paths[made:]
            break
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.close(fd)
    out["create"] = len(paths) / (time.perf_counter() - start)
    start = time.perf_counter()
    for p in paths:
        os.stat(p)
    out["stat"] = len(paths) / (time.perf_counter() - start)
    start = time.perf_counter()
    for p in paths:
        os.unlink(p)
    out["delete"] = len(paths) / (time.perf_counter() - start)
    out["files"] = len(paths)
    directory.rmdir()
    return out


class DirTarget(Target):
    def __init__(self, key: str, family: str, label: str, shape: str, workdir: Path, directory: Path) -> None:
        super().__init__(label, shape, workdir)
        self.key, self.family = key, family
        self.directory = directory
        self.where = fio.Target("dir", directory=directory)

    def seq(self, rw: str, files: list[str], size: int) -> fio.Result:
        return fio.run(self.where, rw, files, size, MIB, 1, self.workdir)

    def rand(self, rw: str, name: str, size: int, seconds: float, depth: int = 32) -> fio.Result:
        return fio.run(self.where, rw, [name], size, 4096, depth, self.workdir, runtime=seconds)

    def convert(self, direction: str, local: Path, size: int) -> tuple[float, float]:
        return self._qemu_convert(str(self.directory / "conv.img"), direction, local, size)

    def smallfiles(self, count: int, size: int, tag: str, budget: float) -> dict[str, float]:
        return posix_smallfiles(self.directory / f"small-{tag}", count, size, budget)


class GfapiTarget(Target):
    key, family = "gluster-native", "gluster"

    def __init__(self, label: str, shape: str, workdir: Path, volume: str, host: str) -> None:
        super().__init__(label, shape, workdir)
        self.volume, self.host = volume, host
        self.where = fio.Target("gfapi", volume=volume, host=host)

    def seq(self, rw: str, files: list[str], size: int) -> fio.Result:
        return fio.run(self.where, rw, files, size, MIB, 1, self.workdir)

    def rand(self, rw: str, name: str, size: int, seconds: float, depth: int = 32) -> fio.Result:
        return fio.run(self.where, rw, [name], size, 4096, depth, self.workdir, runtime=seconds)

    def convert(self, direction: str, local: Path, size: int) -> tuple[float, float]:
        return self._qemu_convert(f"gluster://{self.host}/{self.volume}/conv.img", direction, local, size)


class NativeTarget(Target):
    """mortar's native client; each job is one `native_job.py` process (py-spy'd with --profile)."""

    def __init__(
        self, key: str, label: str, shape: str, workdir: Path, volfile: Path, profile_dir: Path | None = None
    ) -> None:
        super().__init__(label, shape, workdir)
        self.key, self.family = key, "mortar"
        self.volfile = volfile
        self.profile_dir = profile_dir
        self._profiled: set[str] = set()

    def _job(self, tag: str, *args: str) -> dict[str, float]:
        cmd = [
            str(procs.BIN / "python"),
            str(Path(__file__).with_name("native_job.py")),
            str(self.volfile),
            *args,
        ]
        profile = None
        if self.profile_dir is not None and tag not in self._profiled:  # the first run of each job
            self._profiled.add(tag)
            profile = self.profile_dir / f"{self.key}-{self.shape.replace(' ', '')}-{tag}.speedscope.json"
        full = procs.profiled(cmd, profile)
        res = procs.run(full, timeout=3600)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1]
        result: dict[str, float] = json.loads(line)
        return result

    @staticmethod
    def _result(d: dict[str, float]) -> fio.Result:
        agg = d.get("aggregate", 0.0)
        return fio.Result(agg, d.get("job_min", agg), d.get("job_max", agg), d.get("iops", 0.0))

    def prepare(self, files: dict[str, int]) -> None:
        self._job(
            "prepare", "prepare", "--files", ",".join(files), "--sizes", ",".join(map(str, files.values()))
        )

    def seq(self, rw: str, files: list[str], size: int) -> fio.Result:
        return self._result(
            self._job(
                f"seq{rw}",
                "seq",
                "--rw",
                rw,
                "--files",
                ",".join(files),
                "--size",
                str(size),
                "--bs",
                str(MIB),
            )
        )

    def rand(self, rw: str, name: str, size: int, seconds: float, depth: int = 32) -> fio.Result:
        return self._result(
            self._job(
                rw,
                "rand",
                "--rw",
                rw,
                "--files",
                name,
                "--size",
                str(size),
                "--bs",
                "4096",
                "--depth",
                str(depth),
                "--seconds",
                str(seconds),
            )
        )

    def convert(self, direction: str, local: Path, size: int) -> tuple[float, float]:
        start = time.perf_counter()
        d = self._job(
            f"copy-{direction}",
            f"copy-{direction}",
            "--files",
            "/conv.img",
            "--local",
            str(local),
            "--size",
            str(size),
        )
        return d["aggregate"], size / MIB / (time.perf_counter() - start)

    def smallfiles(self, count: int, size: int, tag: str, budget: float) -> dict[str, float]:
        args = ["--dir", f"/small-{tag}", "--count", str(count), "--bs", str(size), "--budget", str(budget)]
        return self._job("smallfiles", "smallfiles", *args)


class NbdTarget(Target):
    """Images on a mortar volume served by mortar's NBD server; `uri(name)` names one image."""

    key, family = "mortar-nbd", "mortar"

    def __init__(
        self, label: str, shape: str, workdir: Path, uri: Callable[[str], str], native: NativeTarget
    ) -> None:
        super().__init__(label, shape, workdir)
        self.uri = uri
        self.native = native  # creates the images: an NBD export cannot create or grow a file
        self.where = fio.Target("nbd", uri=uri)
        self.sized: dict[str, int] = {}

    def prepare(self, files: dict[str, int]) -> None:
        self.native.prepare(files)
        self.sized.update(files)

    def seq(self, rw: str, files: list[str], size: int) -> fio.Result:
        return fio.run(self.where, rw, files, size, MIB, 1, self.workdir)

    def rand(self, rw: str, name: str, size: int, seconds: float, depth: int = 32) -> fio.Result:
        return fio.run(self.where, rw, [name], size, 4096, depth, self.workdir, runtime=seconds)

    def convert(self, direction: str, local: Path, size: int) -> tuple[float, float]:
        if self.sized.get("conv.img") != size:
            self.prepare({"conv.img": size})
        if direction == "in":
            return qemu_img_convert(
                str(local), self.uri("conv.img"), target_exists=True, src_opts=["-T", "none"], size=size
            )
        return qemu_img_convert(self.uri("conv.img"), str(local), src_opts=["-t", "none"], size=size)
