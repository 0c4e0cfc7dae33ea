"""`mortar://HOST[:PORT][,HOST2[:PORT]...]/VOLUME`: a volume reached through its node daemons.

`connect()` fetches the client volfile (`GET /v1/volumes/VOLUME/volfile`, brick ports filled in),
runs the graph in this process, and keeps one long poll open (`?wait=REVISION`) so that a changed
volfile (an option set, a brick restarted on another port) is applied at once by a live graph
switch (`client.switch`). Several daemons may be listed: the next is tried when one does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from mortar.client.switch import CallGate, GraphSwitch, Switcher
from mortar.graph.builder import from_text

if TYPE_CHECKING:
    from mortar.client.volume import AsyncVolume

log = logging.getLogger(__name__)

DEFAULT_PORT = 24100
POLL = 30.0  # how long the daemon holds a long poll before answering "unchanged"


class VolfileUnavailable(ConnectionError):
    """No listed daemon gave the volfile (unreachable, or it refused: no such volume, not started)."""


@dataclass(frozen=True, slots=True)
class MortarUri:
    servers: tuple[tuple[str, int], ...]
    volume: str

    def __str__(self) -> str:
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.servers)
        return f"mortar://{hosts}/{self.volume}"


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = text.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"bad server {text!r} in a mortar:// URI")
    return host, int(port) if port else DEFAULT_PORT


def parse_uri(uri: str) -> MortarUri:
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme != "mortar":
        raise ValueError(f"{uri!r} is not a mortar:// URI (mortar://HOST[:PORT]/VOLUME)")
    servers = tuple(_host_port(s) for s in parts.netloc.split(",") if s)
    volume = parts.path.strip("/")
    if not servers or not volume or "/" in volume or parts.query or parts.fragment:
        raise ValueError(f"{uri!r}: expected mortar://HOST[:PORT][,HOST2...]/VOLUME")
    return MortarUri(servers, volume)


class VolfileSource:
    """Fetches the volume's client volfile from the first daemon that answers."""

    def __init__(self, uri: MortarUri) -> None:
        self.uri = uri
        self._session: aiohttp.ClientSession | None = None
        self._current = 0

    async def fetch(self, wait: str | None = None, timeout: float = POLL) -> tuple[str, str] | None:
        """(text, revision), or None when `wait` is given and nothing changed within `timeout`."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        params = {"timeout": f"{timeout:g}"}
        if wait is not None:
            params["wait"] = wait
        last = ""
        n = len(self.uri.servers)
        for i in range(n):
            host, port = self.uri.servers[(self._current + i) % n]
            base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            url = f"{base}/v1/volumes/{urllib.parse.quote(self.uri.volume)}/volfile"
            try:
                async with self._session.get(
                    url, params=params, timeout=aiohttp.ClientTimeout(total=timeout + 15, sock_connect=5)
                ) as resp:
                    body = await resp.text()
                    revision = resp.headers.get("X-Mortar-Revision", "")
                    if resp.status == 304:
                        return None
                    if resp.status == 200:
                        self._current = (self._current + i) % n
                        return body, revision
                    last = f"{host}:{port}: {_error(body, resp.status)}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                last = f"{host}:{port}: {exc!r}"
        raise VolfileUnavailable(f"{self.uri}: no volfile ({last})")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _error(body: str, status: int) -> str:
    try:
        return str(json.loads(body).get("error", body))
    except (ValueError, AttributeError):
        return body.strip()[:200] or f"HTTP {status}"


class VolfileWatcher:
    """One long poll at a time; each new volfile goes to the switcher."""

    def __init__(self, source: VolfileSource, switcher: Switcher, revision: str) -> None:
        self.source = source
        self.switcher = switcher
        self.revision = revision

    async def run(self) -> None:
        delay = 1.0
        while True:
            try:
                got = await self.source.fetch(self.revision)
            except VolfileUnavailable as exc:
                log.warning("%s; retrying in %gs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 1.0
            if got is None:
                continue
            text, revision = got
            try:
                result = await self.switcher.apply(text, str(self.source.uri))
            except Exception as exc:
                log.warning(
                    "%s: new volfile %s not applied, keeping the current graph: %s",
                    self.source.uri,
                    revision,
                    exc,
                )
                await asyncio.sleep(2.0)
                continue
            log.info("%s: volfile %s -> %s: %s", self.source.uri, self.revision, revision, result)
            self.revision = revision


async def connect(
    cls: type[AsyncVolume], uri: str, *, timeout: float = 30, watch: bool = True, **kwargs: Any
) -> AsyncVolume:
    """See `AsyncVolume.connect`. The volfile watch starts before the graph is up: a volfile fetched
    while bricks restart names ports that are already gone, and the next one replaces it."""
    parsed = parse_uri(uri)
    source = VolfileSource(parsed)
    task: asyncio.Task[None] | None = None
    volume: AsyncVolume | None = None
    try:
        got = await source.fetch(None, timeout)
        assert got is not None
        text, revision = got
        graph = from_text(text, str(parsed))
        proxy = GraphSwitch(graph)
        volume = cls(graph, top=proxy, **kwargs)
        volume.gate = CallGate()
        switcher = Switcher(volume, proxy, timeout=timeout)
        async with asyncio.timeout(timeout):
            await graph.start(timeout)
            if watch:
                task = asyncio.get_running_loop().create_task(
                    VolfileWatcher(source, switcher, revision).run(), name=f"volfile-watch {parsed}"
                )
            while not volume.up:  # the graph in place may change under this loop
                await asyncio.sleep(0.05)
        await volume._start(timeout)
    except BaseException as exc:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if volume is not None:
            await volume.graph.stop()  # the original one, or the one a switch put in its place
        await source.close()
        if isinstance(exc, TimeoutError):
            raise TimeoutError(f"{parsed}: volume not up within {timeout:g}s") from None
        raise

    async def close() -> None:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await switcher.close()
        await source.close()

    volume.on_close.append(close)
    return volume
