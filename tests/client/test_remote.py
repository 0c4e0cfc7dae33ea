"""The client API over the wire: a client graph whose bottom is protocol/client, talking to a brick
graph (protocol/server over storage/posix) served from another event loop in this process."""

from __future__ import annotations

import errno
import importlib.util
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mortar.client import IO_CHUNK, Volume
from mortar.client.sync import LoopThread
from mortar.core.translator import Event
from mortar.graph import Graph, from_text

pytestmark = pytest.mark.skipif(
    not all(
        importlib.util.find_spec(m)
        for m in (
            "mortar.xlators.protocol.server",
            "mortar.xlators.protocol.client",
            "mortar.xlators.storage.posix",
        )
    ),
    reason="needs protocol/client, protocol/server and storage/posix",
)


class Brick:
    """A brick graph served from its own loop thread, as a brick process would serve it."""

    def __init__(self, directory: Path) -> None:
        self.graph: Graph = from_text(
            f"volume brick\n    type storage/posix\n    option directory {directory}\n"
            f"    option volume-id {uuid.uuid4()}\n    option brick-create on\nend-volume\n\n"
            "volume server\n    type protocol/server\n    option transport.socket.listen-port 0\n"
            "    subvolumes brick\nend-volume\n",
            "brick.vol",
        )
        self.loop = LoopThread("test-brick")
        self.loop.run(self.graph.start(timeout=10))
        self.port = int(self.graph.top.listen_port)  # type: ignore[attr-defined]
        self.stopped = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            self.loop.run(self.graph.stop())
        finally:
            self.loop.stop()


@pytest.fixture
def brick(tmp_path: Path) -> Iterator[Brick]:
    served = Brick(tmp_path / "brick")
    try:
        yield served
    finally:
        served.stop()


def client_volfile(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "remote.vol"
    path.write_text(
        "volume vol-client-0\n    type protocol/client\n    option remote-host 127.0.0.1\n"
        f"    option remote-port {port}\n    option remote-subvolume brick\n    option ping-timeout 2\n"
        "end-volume\n"
    )
    return path


def test_volume_over_tcp(brick: Brick, tmp_path: Path) -> None:
    with Volume.from_volfile(client_volfile(tmp_path, brick.port), timeout=10) as vol:
        assert vol.avolume.graph.needs_child_up and vol.avolume.up
        vol.makedirs("/images/vm1")
        data = os.urandom(3 * IO_CHUNK + 4321)
        with vol.open("/images/vm1/disk.raw", "w+b") as f:
            f.write(data)
            f.seek(IO_CHUNK - 10)
            assert f.read(20) == data[IO_CHUNK - 10 : IO_CHUNK + 10]
        h = vol.open_fd("/images/vm1/disk.raw")
        assert vol.pread(h, len(data) + 1, 0) == data
        buf = bytearray(len(data))
        assert vol.preadinto(h, buf, 0) == len(data) and buf == data
        vol.close(h)
        vol.symlink("vm1/disk.raw", "/images/current")
        assert vol.stat("/images/current").st_size == len(data)
        assert sorted(e.name for e in vol.scandir("/images")) == ["current", "vm1"]
        with pytest.raises(FileNotFoundError):
            vol.stat("/images/vm2")
        with pytest.raises(FileExistsError):
            vol.mkdir("/images")


def test_brick_going_away_is_seen(brick: Brick, tmp_path: Path) -> None:
    with Volume.from_volfile(client_volfile(tmp_path, brick.port), timeout=10) as vol:
        events: list[Event] = []
        vol.subscribe(lambda event, data: events.append(event))
        vol.mkdir("/d")
        brick.stop()
        with pytest.raises(OSError) as info:
            for _ in range(100):  # until the client notices the closed connection
                vol.stat("/d")
        assert info.value.errno in (errno.ENOTCONN, errno.EBADF, errno.ECONNRESET)
        assert Event.CHILD_DOWN in events and not vol.avolume.up
