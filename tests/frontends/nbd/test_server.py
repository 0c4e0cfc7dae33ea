"""The asyncio server in-process, driven by the small client: concurrency, errors, hostile input."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mortar.core.errors import FopError
from mortar.core.fops import Buffer
from mortar.frontends.nbd import protocol as p
from mortar.frontends.nbd.backend import FileExportProvider
from mortar.frontends.nbd.server import NbdServer
from tests.frontends.nbd.nbdclient import NbdClient, block_status_extents, info_query

MiB = 1024 * 1024


@dataclass
class MemoryProvider:
    """Exports held in memory, with hooks to hold or fail I/O at chosen offsets."""

    images: dict[str, bytearray]
    hold: dict[int, asyncio.Event] = field(default_factory=dict)
    fail: dict[int, BaseException] = field(default_factory=dict)
    active: int = 0
    peak: int = 0
    closed: int = 0

    async def list_exports(self) -> list[tuple[str, str]]:
        return [(name, "in memory") for name in self.images]

    async def open_export(self, name: str, read_only: bool) -> MemoryExport:
        return MemoryExport(self, self.images[name], read_only)


class MemoryExport:
    can_multi_conn = False
    description = "in memory"

    def __init__(self, provider: MemoryProvider, data: bytearray, read_only: bool) -> None:
        self.provider = provider
        self.data = data
        self.size = len(data)
        self.read_only = read_only

    async def _io(self, offset: int) -> None:
        prov = self.provider
        prov.active += 1
        prov.peak = max(prov.peak, prov.active)
        try:
            if offset in prov.hold:
                await prov.hold[offset].wait()
            if offset in prov.fail:
                raise prov.fail[offset]
        finally:
            prov.active -= 1

    async def pread(self, length: int, offset: int) -> Buffer:
        await self._io(offset)
        return bytes(self.data[offset : offset + length])

    async def pwrite(self, data: Buffer, offset: int, fua: bool) -> None:
        await self._io(offset)
        self.data[offset : offset + len(data)] = data

    async def flush(self) -> None:
        await self._io(-1)

    async def trim(self, length: int, offset: int) -> None:
        await self._io(offset)

    async def zero(self, length: int, offset: int, may_trim: bool, fast: bool) -> None:
        await self._io(offset)
        if fast:
            raise FopError(errno.ENOTSUP, "no fast zeroing in memory")
        self.data[offset : offset + length] = bytes(length)

    async def cache(self, length: int, offset: int) -> None:
        await self._io(offset)

    async def block_status(self, length: int, offset: int) -> list[tuple[int, int]]:
        await self._io(offset)
        return [(length, 0)]

    async def close(self) -> None:
        self.provider.closed += 1


@dataclass
class Served:
    server: NbdServer
    sock: str
    port: int

    async def client(self, name: str | None = "disk", tcp: bool = False, **go: bool) -> NbdClient:
        client = await (NbdClient.tcp("127.0.0.1", self.port) if tcp else NbdClient.unix(self.sock))
        if name is not None:
            await client.go(name, **go)
        return client


async def serve(tmp_path: Path, provider: object, **kw: object) -> Served:
    server = NbdServer(provider, **kw)  # type: ignore[arg-type]
    tmp_path.mkdir(exist_ok=True)
    sock = str(tmp_path / "nbd.sock")
    await server.listen_unix(sock)
    port = await server.listen_tcp("127.0.0.1", 0)
    return Served(server, sock, port)


@pytest.fixture
async def memory(tmp_path: Path) -> AsyncIterator[tuple[Served, MemoryProvider]]:
    provider = MemoryProvider({"disk": bytearray(os.urandom(MiB)), "ro": bytearray(4096)})
    served = await serve(tmp_path, provider, max_inflight=4)
    yield served, provider
    for event in provider.hold.values():
        event.set()
    await asyncio.wait_for(served.server.close(), 10)


@pytest.fixture
async def files(tmp_path: Path) -> AsyncIterator[tuple[Served, Path]]:
    root = tmp_path / "images"
    (root / "vm").mkdir(parents=True)
    with open(root / "vm" / "disk.raw", "wb") as f:
        f.truncate(64 * MiB)
    provider = FileExportProvider(str(root))
    served = await serve(tmp_path, provider)
    yield served, root / "vm" / "disk.raw"
    await asyncio.wait_for(served.server.close(), 10)
    provider.close()


async def wait_until(predicate: object, timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


# ---- concurrency -----------------------------------------------------------------------------


async def test_replies_come_back_out_of_order(memory: tuple[Served, MemoryProvider]) -> None:
    served, prov = memory
    prov.hold[0] = asyncio.Event()
    client = await served.client()
    await client.request(p.Cmd.READ, 0, 512, cookie=1)
    await client.request(p.Cmd.READ, 4096, 512, cookie=2)
    second = await client.reply()
    assert second.cookie == 2 and second.data == prov.images["disk"][4096:4608]
    prov.hold[0].set()
    first = await client.reply()
    assert first.cookie == 1 and first.data == prov.images["disk"][:512]
    await client.disconnect()


async def test_in_flight_requests_are_bounded(memory: tuple[Served, MemoryProvider]) -> None:
    served, prov = memory
    prov.hold[0] = asyncio.Event()
    client = await served.client()
    for cookie in range(20):
        await client.request(p.Cmd.READ, 0, 512, cookie=cookie)
    await wait_until(lambda: prov.active == 4)
    await asyncio.sleep(0.05)
    assert prov.peak == 4  # max_inflight=4: the server stopped reading instead of queueing more
    prov.hold[0].set()
    cookies = {(await client.reply()).cookie for _ in range(20)}
    assert cookies == set(range(20))
    await client.disconnect()


async def test_one_request_at_a_time(memory: tuple[Served, MemoryProvider], tmp_path: Path) -> None:
    """The smallest bound still makes progress: through the handshake, then a pipelined burst."""
    _, prov = memory
    serial = await serve(tmp_path / "serial", prov, max_inflight=1)
    try:
        client = await serial.client()
        for cookie in range(10):
            await client.request(p.Cmd.READ, cookie * 100, 100, cookie=cookie)
        replies = [await client.reply() for _ in range(10)]
        assert [r.cookie for r in replies] == list(range(10))  # one at a time: in order
        assert all(r.data == prov.images["disk"][r.cookie * 100 : r.cookie * 100 + 100] for r in replies)
        assert prov.peak == 1
        await client.disconnect()
    finally:
        await serial.server.close()


async def test_disconnect_waits_for_in_flight_writes(memory: tuple[Served, MemoryProvider]) -> None:
    served, prov = memory
    prov.hold[8192] = asyncio.Event()
    client = await served.client()
    await client.request(p.Cmd.WRITE, 8192, cookie=5, data=b"late")
    await client.request(p.Cmd.DISC)
    await wait_until(lambda: prov.active == 1)
    prov.hold[8192].set()
    reply = await client.reply()
    assert reply.cookie == 5 and reply.error == 0
    assert prov.images["disk"][8192:8196] == b"late"
    assert await client.closed_by_server()
    await client.close()
    await wait_until(lambda: prov.closed == 1)


# ---- errors are replies, not dropped connections -----------------------------------------------


async def test_errors_keep_the_connection(memory: tuple[Served, MemoryProvider]) -> None:
    served, prov = memory
    prov.fail[4096] = FopError(errno.EDQUOT, "quota")
    prov.fail[8192] = RuntimeError("backend bug")
    client = await served.client()
    cases = [
        ((p.Cmd.READ, MiB - 1, 2), p.EINVAL),
        ((p.Cmd.READ, 0, p.MAX_PAYLOAD + 1), p.EINVAL),
        ((p.Cmd.WRITE, MiB, 0), 0),  # zero-length write at the end: nothing to do
        ((p.Cmd.TRIM, MiB, 1), p.ENOSPC),
        ((p.Cmd.READ, 4096, 16), p.ENOSPC),  # EDQUOT from the backend, as NBD says it
        ((p.Cmd.READ, 8192, 16), p.EIO),
        ((p.Cmd.WRITE_ZEROES, 0, 4096), 0),
    ]
    for (cmd, offset, length), error in cases:
        reply = await client.call(cmd, offset, length)
        assert reply.error == error, (cmd, offset, length)
    reply = await client.call(p.Cmd.WRITE_ZEROES, 0, 4096, flags=p.CmdFlag.FAST_ZERO)
    assert reply.error == p.ENOTSUP
    reply = await client.call(p.Cmd.WRITE, MiB - 1, data=b"xx")
    assert reply.error == p.ENOSPC and "rejected" in reply.message
    reply = await client.call(p.Cmd.READ, 0, 16, flags=0x4000)
    assert reply.error == p.EINVAL
    reply = await client.call(p.Cmd.READ, 0, 16)
    assert reply.error == 0 and reply.data == prov.images["disk"][:16]
    await client.disconnect()


async def test_read_only_export(memory: tuple[Served, MemoryProvider], tmp_path: Path) -> None:
    _, prov = memory
    ro = await serve(tmp_path / "ro", prov, read_only=True)
    try:
        client = await ro.client("ro")
        assert client.flags & p.TxFlag.READ_ONLY
        for cmd, kw in [
            (p.Cmd.WRITE, {"data": b"x"}),
            (p.Cmd.TRIM, {"length": 1}),
            (p.Cmd.WRITE_ZEROES, {"length": 1}),
        ]:
            reply = await client.call(cmd, 0, **kw)  # type: ignore[arg-type]
            assert reply.error == p.EPERM
        assert (await client.call(p.Cmd.FLUSH)).error == 0
        await client.disconnect()
    finally:
        await ro.server.close()


async def test_simple_replies_without_structured_negotiation(memory: tuple[Served, MemoryProvider]) -> None:
    served, prov = memory
    client = await served.client(structured=False)
    assert not client.flags & p.TxFlag.SEND_DF
    assert (await client.call(p.Cmd.READ, MiB, 1)).error == p.EINVAL  # no payload follows an error
    reply = await client.call(p.Cmd.READ, 100, 300)
    assert reply.error == 0 and reply.data == prov.images["disk"][100:400]
    assert (await client.call(p.Cmd.BLOCK_STATUS, 0, 512)).error == p.EINVAL
    await client.disconnect()


async def test_export_name_handshake(memory: tuple[Served, MemoryProvider]) -> None:
    served, prov = memory
    client = await served.client(None)
    await client.greeting(client_flags=1)  # fixed newstyle, but the 124 zero bytes wanted
    await client.send(struct.pack(">QII", p.IHAVEOPT, p.Opt.EXPORT_NAME, 4) + b"disk")
    size, flags = struct.unpack(">QH", await client.recv(10))
    assert size == MiB and flags & p.TxFlag.HAS_FLAGS
    assert await client.recv(124) == bytes(124)
    assert (await client.call(p.Cmd.READ, 0, 8)).data == prov.images["disk"][:8]
    await client.disconnect()

    client = await served.client(None)
    await client.greeting()
    await client.send(struct.pack(">QII", p.IHAVEOPT, p.Opt.EXPORT_NAME, 4) + b"nope")
    assert await client.closed_by_server()  # EXPORT_NAME cannot fail any other way
    await client.close()


async def test_list_info_and_unknown_export(memory: tuple[Served, MemoryProvider]) -> None:
    served, _ = memory
    client = await served.client(None)
    await client.greeting()
    replies = await client.option(p.Opt.LIST)
    assert [d[4:] for r, d in replies if r == p.Rep.SERVER] == [b"diskin memory", b"roin memory"]
    assert (await client.option(p.Opt.GO, info_query("nope", [])))[-1][0] == p.Rep.ERR_UNKNOWN
    assert (await client.option(p.Opt.INFO, info_query("disk", [])))[-1][0] == p.Rep.ACK
    assert (await client.option(77))[-1][0] == p.Rep.ERR_UNSUP
    assert (await client.option(p.Opt.ABORT))[-1][0] == p.Rep.ACK
    assert await client.closed_by_server()
    await client.close()


# ---- hostile clients ----------------------------------------------------------------------------

REQUEST = struct.Struct(">IHHQQI")


@pytest.mark.parametrize(
    ("handshake", "junk"),
    [
        (False, os.urandom(3000)),
        (False, struct.pack(">I", 0xFFFFFFFF)),  # unknown client flags
        (False, struct.pack(">IQII", 3, p.IHAVEOPT, p.Opt.GO, 0xFFFFFFFF)),  # absurd option length
        (True, os.urandom(1000)),
        (True, REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 1, 0, 0xFFFFFFFF)),  # absurd write length
        (True, REQUEST.pack(p.REQUEST_MAGIC, 0, 42, 1, 0, 512)),  # unknown command
        (True, REQUEST.pack(0x12345678, 0, p.Cmd.READ, 1, 0, 512)),  # bad magic
    ],
)
async def test_hostile_input_closes_only_that_connection(
    memory: tuple[Served, MemoryProvider], handshake: bool, junk: bytes
) -> None:
    served, prov = memory
    bystander = await served.client()
    hostile = await served.client("disk" if handshake else None)
    if not handshake:
        await hostile.recv(18)
    await hostile.send(junk)
    assert await hostile.closed_by_server()
    await hostile.close()
    assert (await bystander.call(p.Cmd.READ, 0, 4)).data == prov.images["disk"][:4]
    fresh = await served.client()
    assert (await fresh.call(p.Cmd.READ, 4, 4)).data == prov.images["disk"][4:8]
    await fresh.disconnect()
    await bystander.disconnect()


async def test_client_vanishing_mid_write(memory: tuple[Served, MemoryProvider]) -> None:
    served, prov = memory
    client = await served.client()
    await client.send(REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 1, 0, 65536) + b"partial")
    await client.close()
    await wait_until(lambda: served.server.connection_count == 0 and prov.closed == 1)
    assert prov.images["disk"][:7] != b"partial"


async def test_handshake_timeout(memory: tuple[Served, MemoryProvider], tmp_path: Path) -> None:
    _, prov = memory
    quick = await serve(tmp_path / "quick", prov, handshake_timeout=0.2)
    try:
        idle = await quick.client(None)
        await idle.recv(18)
        assert await idle.closed_by_server()
        await idle.close()
    finally:
        await quick.server.close()


async def test_server_close_releases_connections(memory: tuple[Served, MemoryProvider]) -> None:
    served, prov = memory
    clients = [await served.client() for _ in range(3)]
    await served.server.close()
    assert prov.closed == 3
    for client in clients:
        assert await client.closed_by_server()
        await client.close()
    with pytest.raises(OSError):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(served.sock)
        finally:
            s.close()


# ---- real files through the server ----------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True])
async def test_file_export_commands(files: tuple[Served, Path], tcp: bool) -> None:
    served, path = files
    client = await served.client("vm/disk.raw", tcp=tcp)
    assert client.size == 64 * MiB
    assert client.flags & p.TxFlag.CAN_MULTI_CONN and client.flags & p.TxFlag.SEND_DF
    big = os.urandom(p.MAX_PAYLOAD)  # the largest write, received in place
    assert (await client.call(p.Cmd.WRITE, 8 * MiB, data=big, flags=p.CmdFlag.FUA)).error == 0
    assert (await client.call(p.Cmd.READ, 8 * MiB, len(big), flags=p.CmdFlag.DF)).data == big
    odd = os.urandom(4097)
    assert (await client.call(p.Cmd.WRITE, 511, data=odd)).error == 0
    assert (await client.call(p.Cmd.FLUSH)).error == 0
    with open(path, "rb") as f:
        assert os.pread(f.fileno(), len(odd), 511) == odd

    status = await client.call(p.Cmd.BLOCK_STATUS, 0, 64 * MiB)
    extents = block_status_extents(status)
    assert sum(n for n, _ in extents) <= 64 * MiB
    assert extents[0][1] == 0 and extents[0][0] >= 4608  # data at the start
    assert any(flags == 3 for _, flags in extents)  # and holes later
    one = block_status_extents(await client.call(p.Cmd.BLOCK_STATUS, 48 * MiB, MiB, flags=p.CmdFlag.REQ_ONE))
    assert one == [(MiB, 3)]

    assert (await client.call(p.Cmd.TRIM, 8 * MiB, 16 * MiB, flags=p.CmdFlag.FUA)).error == 0
    assert (await client.call(p.Cmd.READ, 8 * MiB, 4096)).data == bytes(4096)
    zero_flags = p.CmdFlag.NO_HOLE | p.CmdFlag.FAST_ZERO
    assert (await client.call(p.Cmd.WRITE_ZEROES, 511, 4097, flags=zero_flags)).error == 0
    assert (await client.call(p.Cmd.READ, 0, 8192)).data == bytes(8192)
    assert (await client.call(p.Cmd.CACHE, 0, MiB)).error == 0
    await client.disconnect()
