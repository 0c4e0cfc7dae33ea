"""One volume (replica 3 once cluster/replicate exists, one brick until then) served by
`mortar nbd serve` for the whole interop session, and helpers to run the real clients."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mortar.cli.main import main as mortar
from tests.interop.cluster import Cluster, NbdServe, cluster, nbd_serve

MiB = 1024 * 1024
TOOLS = ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "fio")


def need(*tools: str) -> pytest.MarkDecorator:
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


def run(*cmd: str, timeout: float = 120) -> str:
    """Run a client; its stdout. Any failure fails the test with what the client said."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


@dataclass
class Served:
    """The session's volume and its NBD server."""

    cluster: Cluster
    nbd: NbdServe
    workdir: Path

    @property
    def volume(self) -> str:
        return self.cluster.name

    def uri(self, path: str, tcp: bool = False) -> str:
        return self.nbd.uri(f"{self.volume}/{path}", tcp)

    def image(self, path: str, size: int, *options: str) -> str:
        """`mortar image create` on the volume; returns the image's NBD URI."""
        args = ["image", "create", f"{self.volume}/{path}", str(size), *options]
        assert mortar([*args, "--volfile", str(self.cluster.client_volfile)]) == 0
        return self.uri(path)


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("interop")
    with (
        cluster(workdir / "volume", name="images") as vol,
        nbd_serve(workdir, "--volfile", str(vol.client_volfile)) as server,
    ):
        yield Served(vol, server, workdir)


def random_file(path: Path, size: int, chunk: int = 4 * MiB) -> Path:
    with open(path, "wb") as f:
        for _ in range(size // chunk):
            f.write(os.urandom(chunk))
        f.write(os.urandom(size % chunk))
    return path
