"""Real NBD clients against `python -m mortar.frontends.nbd`: nbdinfo, qemu-img, qemu-io, nbdcopy, fio.

The server runs as a subprocess (on uvloop, as in production) over a unix socket and TCP 127.0.0.1.
Every client call is bounded by a timeout; the server must never log a traceback.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
TOOLS = ("nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "fio")
missing = [tool for tool in TOOLS if shutil.which(tool) is None]
if missing:
    pytest.skip(f"missing NBD clients: {', '.join(missing)}", allow_module_level=True)


@dataclass
class Server:
    root: Path
    sock: str
    port: int
    proc: subprocess.Popen[str]

    def uri(self, name: str, tcp: bool = False) -> str:
        if tcp:
            return f"nbd://127.0.0.1:{self.port}/{name}"
        return f"nbd+unix:///{name}?socket={self.sock}"


def run(*cmd: str, timeout: float = 60) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd[0]} failed ({result.returncode}): {result.stdout}\n{result.stderr}"
    return result.stdout


@contextlib.contextmanager
def start_server(base: Path, *extra: str) -> Iterator[Server]:
    """Run the server until the block ends; it must exit cleanly and never log a traceback."""
    root = base / "images"
    (root / "vm").mkdir(parents=True, exist_ok=True)
    sock = str(base / "nbd.sock")
    log = open(base / "server.log", "w+")  # noqa: SIM115 - read back at teardown
    cmd = [sys.executable, "-m", "mortar.frontends.nbd", "--dir", str(root), "--socket", sock, "--port", "0"]
    proc = subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        port = 0
        deadline = time.monotonic() + 20
        for line in proc.stdout:
            if line.startswith("listening tcp:"):
                port = int(line.rsplit(":", 1)[1])
            if line.strip() == "ready" or time.monotonic() > deadline:
                break
        assert port, "server did not start"
        yield Server(root, sock, port, proc)
        assert proc.poll() is None, "the server died"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        output = log.read()
        log.close()
    assert "Traceback" not in output, output
    assert proc.returncode == 0, output


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start_server(tmp_path_factory.mktemp("nbd-interop")) as srv:
        yield srv


def image(server: Server, name: str, size: int, data: bytes | None = None, at: int = 0) -> Path:
    path = server.root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
        if data:
            f.seek(at)
            f.write(data)
    return path


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    return path


# ---- nbdinfo ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True])
def test_nbdinfo_list(server: Server, tcp: bool) -> None:
    image(server, "vm/listed.raw", MiB)
    out = json.loads(run("nbdinfo", "--list", "--json", server.uri("", tcp), timeout=30))
    names = {export["export-name"] for export in out["exports"]}
    assert "vm/listed.raw" in names
    listed = next(e for e in out["exports"] if e["export-name"] == "vm/listed.raw")
    assert listed["export-size"] == MiB


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd not installed")
def test_qemu_nbd_list(server: Server) -> None:
    """QEMU's own listing: LIST, then INFO and LIST_META_CONTEXT for each export."""
    image(server, "vm/qlisted.raw", 3 * MiB)
    out = run("qemu-nbd", "-L", "-k", server.sock, timeout=30)
    section = out[out.index("export: 'vm/qlisted.raw'") :]
    assert f"size:  {3 * MiB}" in section and "base:allocation" in section
    assert "multi" in section.splitlines()[3]  # the flags line


def test_nbdinfo_export_size_and_flags(server: Server) -> None:
    image(server, "info.raw", 5 * MiB + 512)
    info = json.loads(run("nbdinfo", "--json", server.uri("info.raw"), timeout=30))
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    [export] = info["exports"]
    assert export["export-size"] == 5 * MiB + 512
    assert export["contexts"] == ["base:allocation"]
    assert export["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_df"):
        assert export[flag] is True, flag
    assert export["can_multi_conn"] is True
    assert (export["block_size_minimum"], export["block_size_maximum"]) == (1, 32 * MiB)


def test_nbdinfo_map_shows_holes(server: Server) -> None:
    image(server, "sparse.raw", 16 * MiB, os.urandom(128 * 1024), at=5 * MiB)
    extents = json.loads(run("nbdinfo", "--map", "--json", server.uri("sparse.raw"), timeout=30))
    assert [(e["offset"], e["length"], e["type"]) for e in extents] == [
        (0, 5 * MiB, 3),
        (5 * MiB, 128 * 1024, 0),
        (5 * MiB + 128 * 1024, 11 * MiB - 128 * 1024, 3),
    ]


# ---- qemu-img and qemu-io ---------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True])
def test_qemu_img_convert_round_trip(server: Server, tmp_path: Path, tcp: bool) -> None:
    src = random_file(tmp_path / "src.raw", 64 * MiB)
    name = f"vm/convert-{'tcp' if tcp else 'unix'}.raw"
    image(server, name, 64 * MiB)
    uri = server.uri(name, tcp)
    info = json.loads(run("qemu-img", "info", "--output=json", uri))
    assert info["virtual-size"] == 64 * MiB
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(back))
    assert filecmp.cmp(src, back, shallow=False)
    assert filecmp.cmp(src, server.root / name, shallow=False)


def test_qemu_img_map_shows_holes(server: Server) -> None:
    image(server, "map.raw", 8 * MiB, os.urandom(MiB), at=2 * MiB)
    extents = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", server.uri("map.raw")))
    data = [(e["start"], e["length"]) for e in extents if e["data"]]
    assert data == [(2 * MiB, MiB)]
    assert all(e["zero"] for e in extents if not e["data"])


def test_qemu_io_patterns(server: Server) -> None:
    image(server, "io.raw", 32 * MiB)
    commands = [
        "write -P 0x11 0 64k",
        "write -P 0x22 512 1536",  # 512-byte aligned inside the first write
        "write -P 0x33 65537 7777",  # odd offset and size
        "write -f -P 0x44 3M 1M",  # FUA
        "aio_write -P 0x55 8M 256k",
        "aio_write -P 0x66 9M 256k",
        "aio_write -P 0x77 10M 4M",
        "aio_flush",
        "read -P 0x11 0 512",
        "read -P 0x22 512 1536",
        "read -P 0x11 2048 63488",
        "read -P 0x33 65537 7777",
        "read -P 0 73314 1000",
        "read -P 0x44 3M 1M",
        "read -P 0x55 8M 256k",
        "read -P 0x66 9M 256k",
        "read -P 0x77 10M 4M",
        "discard 3M 1M",
        "read -P 0 3M 1M",
        "write -z 8M 256k",
        "read -P 0 8M 256k",
        "write -z -u 9M 256k",  # may unmap
        "read -P 0 9M 256k",
        "flush",
    ]
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    out = run(*args, server.uri("io.raw"))
    assert "fail" not in out.lower(), out
    assert out.count("read ") == 12


# ---- nbdcopy (four connections: multi-conn) ----------------------------------------------------


def test_nbdcopy_in_and_out(server: Server, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", 64 * MiB)
    image(server, "vm/copy.raw", 64 * MiB)
    uri = server.uri("vm/copy.raw")
    run("nbdcopy", "--connections=4", "--requests=64", str(src), uri)
    back = tmp_path / "back.raw"
    run("nbdcopy", "--connections=4", uri, str(back))
    assert filecmp.cmp(src, back, shallow=False)


def test_nbdcopy_preserves_sparseness(server: Server, tmp_path: Path) -> None:
    src = image(server, "holes.raw", 32 * MiB, os.urandom(MiB), at=7 * MiB)
    out = tmp_path / "out.raw"
    run("nbdcopy", server.uri("holes.raw"), str(out))
    assert filecmp.cmp(src, out, shallow=False)
    assert os.stat(out).st_blocks * 512 < 4 * MiB  # holes were reported, not copied as zeros


# ---- fio with verification ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tcp", "job"),
    [
        (False, ["--rw=randwrite", "--bs=4k", "--size=24M"]),
        (True, ["--rw=randwrite", "--bsrange=512-128k", "--size=24M"]),
        (False, ["--rw=write", "--bs=1M", "--size=64M"]),
        # two seconds of writes with verifying reads interleaved (verify_backlog), many sizes in flight
        (
            False,
            [
                "--rw=randwrite",
                "--bsrange=4k-256k",
                "--size=64M",
                "--verify_backlog=128",
                "--time_based",
                "--runtime=2",
            ],
        ),
    ],
)
def test_fio_verify(server: Server, tcp: bool, job: list[str]) -> None:
    image(server, "fio.raw", 64 * MiB)
    out = run(
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={server.uri('fio.raw', tcp)}",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",  # no state file left in the working directory
        "--runtime=30",  # a bound; sized jobs end in well under a second
        "--output-format=json",
        *job,
        timeout=60,
    )
    report = json.loads(out[out.index("{") :])
    [result] = report["jobs"]
    assert result["error"] == 0
    written, verified = result["write"]["io_bytes"], result["read"]["io_bytes"]
    assert written > 0 and (verified == written or ("--time_based" in job and verified > 0))


# ---- the server survives hostile clients -------------------------------------------------------


def test_garbage_does_not_hurt_the_server(server: Server) -> None:
    image(server, "survivor.raw", MiB)
    for junk in (os.urandom(4096), b"NBDMAGIC" * 100, b"\0\0\0\x03" + b"\xff" * 64):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(server.sock)
            s.recv(18)
            s.sendall(junk)
            while s.recv(65536):  # the server closes this connection
                pass
    info = json.loads(run("nbdinfo", "--json", server.uri("survivor.raw"), timeout=30))
    assert info["exports"][0]["export-size"] == MiB
    assert server.proc.poll() is None


def test_read_only_server_with_default_export(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with start_server(tmp_path, "--read-only", "--default", "base.raw") as ro:
        image(ro, "base.raw", 2 * MiB, b"golden", at=4096)
        info = json.loads(run("nbdinfo", "--json", ro.uri(""), timeout=30))  # the empty name
        [export] = info["exports"]
        assert export["is_read_only"] is True and export["export-size"] == 2 * MiB
        out = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", ro.uri("base.raw")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode != 0 and "Permission denied" in out.stderr  # QEMU sees READ_ONLY
        run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 4k", ro.uri("base.raw"))
        assert (ro.root / "base.raw").read_bytes()[4096:4102] == b"golden"
