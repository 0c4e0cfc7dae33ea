"""A small asyncio NBD client for tests: raw enough to misbehave, complete enough to check replies.

Real clients (qemu, libnbd) are driven in test_interop.py; this one exists to reach the corners they
never visit: out-of-order replies, hostile bytes, error paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

from mortar.frontends.nbd import protocol as p

TIMEOUT = 10.0


@dataclass
class Reply:
    cookie: int
    error: int = 0
    data: bytes = b""  # READ data reassembled from chunks
    chunks: list[tuple[int, bytes]] = field(default_factory=list)  # structured (type, payload)
    message: str = ""


class NbdClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.structured = False
        self.size = 0
        self.flags = 0
        self._reads: dict[int, tuple[int, int]] = {}  # cookie -> (offset, length) of pending reads

    @classmethod
    async def unix(cls, path: str) -> NbdClient:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), TIMEOUT)
        return cls(reader, writer)

    @classmethod
    async def tcp(cls, host: str, port: int) -> NbdClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
        return cls(reader, writer)

    async def recv(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), TIMEOUT)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)

    async def closed_by_server(self) -> bool:
        """True once the server has closed the connection (EOF or reset), within the timeout."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), TIMEOUT):
                pass
        except (ConnectionError, OSError):
            pass
        return True

    # -- handshake ---------------------------------------------------------------------------

    async def greeting(self, client_flags: int = 3) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", await self.recv(18))
        assert (magic, opt_magic) == (p.NBDMAGIC, p.IHAVEOPT)
        await self.send(struct.pack(">I", client_flags))
        return flags

    async def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option and collect its replies up to the final one (ACK or an error)."""
        await self.send(struct.pack(">QII", p.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, rep, length = struct.unpack(">QIII", await self.recv(20))
            assert magic == p.OPTION_REPLY_MAGIC and opt == option
            replies.append((rep, await self.recv(length)))
            if rep == p.Rep.ACK or rep & (1 << 31):
                return replies

    async def go(self, name: str, *, structured: bool = True, meta: bool = True) -> None:
        """Fixed-newstyle handshake ending in GO, as QEMU does it."""
        await self.greeting()
        if structured:
            assert (await self.option(p.Opt.STRUCTURED_REPLY))[-1][0] == p.Rep.ACK
            self.structured = True
            if meta:
                await self.option(p.Opt.SET_META_CONTEXT, meta_query(name, [p.BASE_ALLOCATION]))
        replies = await self.option(p.Opt.GO, info_query(name, [p.Info.BLOCK_SIZE]))
        if replies[-1][0] != p.Rep.ACK:
            raise FileNotFoundError(replies[-1][1].decode())
        for rep, data in replies:
            if rep == p.Rep.INFO and struct.unpack_from(">H", data)[0] == p.Info.EXPORT:
                _, self.size, self.flags = struct.unpack(">HQH", data)

    # -- transmission ------------------------------------------------------------------------

    async def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        cookie: int = 1,
        flags: int = 0,
        data: bytes = b"",
    ) -> None:
        if cmd == p.Cmd.WRITE:
            length = len(data)
        if cmd == p.Cmd.READ:
            self._reads[cookie] = (offset, length)
        header = struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        await self.send(header + data)

    async def reply(self) -> Reply:
        (magic,) = struct.unpack(">I", await self.recv(4))
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", await self.recv(12))
            offset_length = self._reads.pop(cookie, None)
            data = await self.recv(offset_length[1]) if offset_length and not error else b""
            return Reply(cookie, error, data)
        assert magic == p.STRUCTURED_REPLY_MAGIC, hex(magic)
        reply: Reply | None = None
        while True:
            flags, kind, cookie, length = struct.unpack(">HHQI", await self.recv(16))
            payload = await self.recv(length)
            if reply is None:
                reply = Reply(cookie)
            assert reply.cookie == cookie
            reply.chunks.append((kind, payload))
            if kind & 0x8000:
                reply.error, msg_len = struct.unpack_from(">IH", payload)
                reply.message = payload[6 : 6 + msg_len].decode()
            if flags & p.REPLY_FLAG_DONE:
                break
            (magic,) = struct.unpack(">I", await self.recv(4))
            assert magic == p.STRUCTURED_REPLY_MAGIC
        self._assemble(reply)
        return reply

    def _assemble(self, reply: Reply) -> None:
        read = self._reads.pop(reply.cookie, None)
        if read is None or reply.error:
            return
        start, length = read
        buf = bytearray(length)
        for kind, payload in reply.chunks:
            if kind == p.ReplyType.OFFSET_DATA:
                (off,) = struct.unpack_from(">Q", payload)
                buf[off - start : off - start + len(payload) - 8] = payload[8:]
        reply.data = bytes(buf)

    async def call(self, cmd: int, offset: int = 0, length: int = 0, **kw: object) -> Reply:
        await self.request(cmd, offset, length, **kw)  # type: ignore[arg-type]
        return await self.reply()

    async def disconnect(self) -> None:
        await self.request(p.Cmd.DISC)
        await self.close()


def info_query(name: str, requests: list[int]) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(requests)}H", len(requests), *requests)


def meta_query(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def block_status_extents(reply: Reply) -> list[tuple[int, int]]:
    """(length, flags) pairs of the base:allocation chunk of a BLOCK_STATUS reply."""
    for kind, payload in reply.chunks:
        if kind == p.ReplyType.BLOCK_STATUS:
            values = struct.unpack(f">I{(len(payload) - 4) // 4}I", payload)[1:]
            return list(zip(values[::2], values[1::2], strict=True))
    raise AssertionError("no block status chunk")
