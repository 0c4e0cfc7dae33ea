"""etcd as the configuration store of a multi-node pool, and the etcd member each mortard runs.

The client speaks etcd v3's HTTP/JSON gateway (`/v3/...`, keys and values base64) with aiohttp, so no
gRPC stack is needed. Every request carries the `hasleader` metadata: a member that has lost its
leader refuses at once ("no leader") instead of waiting for a raft timeout, and the client tries the
next endpoint until the operation's deadline, then raises `StoreUnavailable`.

A write whose answer is lost may or may not have been applied: etcd drops a proposal forwarded to a
leader that just died, and answers only after its own ~7 s request timeout. Plain `put` and `delete`
converge to the same state when repeated, so they are retried on another member within the deadline
(at least once; a repeated delete may report 0 keys). A `txn` is never repeated: a second run could
see its own first run as a conflict, so its caller gets `StoreUnavailable` ("outcome unknown") and
re-reads before deciding again. As in GlusterD 2, each node runs one etcd member (`EtcdMember`);
consensus is etcd's, never ours.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from mortar.mgmt.store import (
    Compare,
    Delete,
    DeletePrefix,
    KeyValue,
    LockHandle,
    Op,
    Put,
    Store,
    StoreCompacted,
    StoreError,
    StoreUnavailable,
    Watch,
    WatchEvent,
    check_key,
    check_prefix,
    lock_key_prefix,
    prefix_end,
)

log = logging.getLogger(__name__)

_HEADERS = {"Grpc-Metadata-hasleader": "true"}
_GRPC_UNAVAILABLE = 14
_PAGE = 1000
_T = TypeVar("_T")


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def _range_of(prefix: str) -> dict[str, str]:
    p = prefix.encode()
    return {"key": _b64(p or b"\x00"), "range_end": _b64(prefix_end(p))}


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(
        _unb64(raw["key"]).decode(),
        _unb64(raw.get("value")),
        int(raw.get("create_revision", 0)),
        int(raw.get("mod_revision", 0)),
        int(raw.get("version", 0)),
    )


class _Rejected(StoreError):
    """etcd answered with an error (gRPC status `code`)."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(message)


def _error_of(data: dict[str, Any]) -> _Rejected | None:
    err = data.get("error")
    if err is None:
        return None
    if isinstance(err, dict):  # streaming calls nest the status
        return _Rejected(int(err.get("grpc_code", 2)), str(err.get("message", err)))
    return _Rejected(int(data.get("code", 2)), str(data.get("message") or err))


class _JsonLines:
    """Newline-separated JSON messages of a streaming gateway call, without a line-length limit."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self._buf = bytearray()

    async def next(self) -> dict[str, Any] | None:
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 1]
                if line.strip():
                    msg: dict[str, Any] = json.loads(line)
                    return msg
                continue
            chunk = await self.resp.content.readany()
            if not chunk:
                if self._buf.strip():
                    rest: dict[str, Any] = json.loads(bytes(self._buf))
                    self._buf.clear()
                    return rest
                return None
            self._buf += chunk


class _Gateway:
    """HTTP/JSON calls to a list of members with failover, bounded by a per-operation deadline."""

    def __init__(self, endpoints: Sequence[str], timeout: float) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._current = 0
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        return self._session

    def _order(self) -> list[str]:
        n = len(self.endpoints)
        return [self.endpoints[(self._current + i) % n] for i in range(n)]

    def _prefer(self, endpoint: str) -> None:
        if endpoint in self.endpoints:
            self._current = self.endpoints.index(endpoint)

    def _demote(self, endpoint: str) -> None:
        """Start the next call elsewhere: a dead or cut-off member costs one failure, not one per call."""
        if self.endpoints[self._current] == endpoint:
            self._current = (self._current + 1) % len(self.endpoints)

    async def _attempts(self, deadline: float) -> AsyncIterator[tuple[str, float]]:
        """Endpoints to try in turn, with a growing pause after each full round, until `deadline`."""
        backoff = 0.05
        while deadline - time.monotonic() > 0:
            for endpoint in self._order():
                if (remaining := deadline - time.monotonic()) <= 0:
                    return
                yield endpoint, remaining
            await asyncio.sleep(min(backoff, max(deadline - time.monotonic(), 0)))
            backoff = min(backoff * 2, 0.5)

    async def call(
        self, path: str, body: dict[str, Any], *, retry: bool = False, patience: float | None = None
    ) -> dict[str, Any]:
        """POST `body` to `path`. `retry`: the request is safe to repeat after an ambiguous failure.
        `patience`: total time budget (default the gateway's timeout; math.inf waits as long as it takes)."""
        deadline = time.monotonic() + (self.timeout if patience is None else patience)
        last: Exception | None = None
        async for endpoint, remaining in self._attempts(deadline):
            if math.isinf(remaining):
                attempt = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout)
            else:
                cap = remaining if not retry else min(remaining, max(self.timeout / 2, 1.0))
                attempt = aiohttp.ClientTimeout(total=cap)
            try:
                async with self.session().post(
                    endpoint + path, json=body, headers=_HEADERS, timeout=attempt
                ) as resp:
                    try:
                        data: dict[str, Any] = await resp.json(content_type=None)
                    except ValueError as exc:
                        raise StoreError(f"etcd {endpoint}{path}: HTTP {resp.status}, not JSON") from exc
            except aiohttp.ClientConnectorError as exc:  # never reached the member: always safe
                self._demote(endpoint)
                last = exc
                continue
            except (TimeoutError, aiohttp.ClientError) as exc:
                self._demote(endpoint)
                if not retry:
                    raise StoreUnavailable(
                        f"etcd {endpoint} did not answer {path} ({exc!r}); its outcome is unknown"
                    ) from exc
                last = exc
                continue
            err = _error_of(data)
            if err is None:
                self._prefer(endpoint)
                result = data.get("result")  # streaming calls (lease keepalive) wrap their answer
                return result if isinstance(result, dict) else data
            if err.code != _GRPC_UNAVAILABLE:
                raise err
            self._demote(endpoint)
            if not retry and "no leader" not in str(err):  # "no leader" is refused before any effect
                raise StoreUnavailable(f"etcd {endpoint}: {err}") from err
            last = err
        raise StoreUnavailable(f"etcd unavailable at {', '.join(self.endpoints)}: {last}") from last

    async def stream(self, path: str, body: dict[str, Any], deadline: float) -> tuple[_JsonLines, str]:
        """Open a streaming call on the first member that accepts it before `deadline`."""
        last: Exception | None = None
        async for endpoint, remaining in self._attempts(deadline):
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=remaining, sock_read=None)
            try:
                resp = await asyncio.wait_for(
                    self.session().post(endpoint + path, json=body, headers=_HEADERS, timeout=timeout),
                    remaining,
                )
            except (TimeoutError, aiohttp.ClientError) as exc:
                self._demote(endpoint)
                last = exc
                continue
            if resp.status == 200:
                self._prefer(endpoint)
                return _JsonLines(resp), endpoint
            last = StoreError(f"etcd {endpoint}{path}: HTTP {resp.status} {await resp.text()}")
            resp.close()
            self._demote(endpoint)
        raise StoreUnavailable(f"etcd unavailable at {', '.join(self.endpoints)}: {last}") from last

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(frozen=True, slots=True)
class MemberInfo:
    id: int
    name: str  # empty until the member has started and published itself
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    is_learner: bool = False

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> MemberInfo:
        return cls(
            int(raw["ID"]),
            raw.get("name", ""),
            tuple(raw.get("peerURLs", ())),
            tuple(raw.get("clientURLs", ())),
            bool(raw.get("isLearner", False)),
        )


class EtcdStore(Store):
    """The `Store` over an etcd cluster. `timeout` bounds every operation (except waiting for a lock)."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 5.0) -> None:
        self._gw = _Gateway(endpoints, timeout)
        self._watches: set[_EtcdWatch] = set()

    @classmethod
    async def open(cls, endpoints: Sequence[str], timeout: float = 5.0) -> EtcdStore:
        """Connect and check that the cluster answers (StoreUnavailable otherwise)."""
        store = cls(endpoints, timeout)
        try:
            await store.revision()
        except BaseException:
            await store.close()
            raise
        return store

    @property
    def endpoints(self) -> list[str]:
        return list(self._gw.endpoints)

    @property
    def timeout(self) -> float:
        return self._gw.timeout

    async def get_with_revision(self, key: str) -> KeyValue | None:
        data = await self._gw.call("/v3/kv/range", {"key": _b64(check_key(key))}, retry=True)
        kvs = data.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    async def snapshot(self, prefix: str) -> tuple[dict[str, bytes], int]:
        body: dict[str, Any] = {**_range_of(check_prefix(prefix)), "limit": _PAGE}
        items: dict[str, bytes] = {}
        revision = 0
        while True:
            data = await self._gw.call("/v3/kv/range", body, retry=True)
            if not revision:  # later pages read at the first page's revision: one consistent view
                revision = int(data["header"]["revision"])
                body["revision"] = revision
            kvs = data.get("kvs") or []
            for raw in kvs:
                items[_unb64(raw["key"]).decode()] = _unb64(raw.get("value"))
            if not data.get("more") or not kvs:
                return items, revision
            body["key"] = _b64(_unb64(kvs[-1]["key"]) + b"\x00")

    async def revision(self) -> int:
        data = await self._gw.call("/v3/kv/range", {"key": _b64(b"\x00"), "count_only": True}, retry=True)
        return int(data["header"]["revision"])

    async def txn(
        self, compares: Sequence[Compare], on_success: Sequence[Op], on_failure: Sequence[Op] = ()
    ) -> bool:
        body = {
            "compare": [_compare_json(c) for c in compares],
            "success": [_op_json(op) for op in on_success],
            "failure": [_op_json(op) for op in on_failure],
        }
        data = await self._gw.call("/v3/kv/txn", body)
        return bool(data.get("succeeded", False))

    async def put(self, key: str, value: bytes) -> None:
        await self._gw.call("/v3/kv/put", _op_json(Put(key, value))["request_put"], retry=True)

    async def _delete_count(self, op: Delete | DeletePrefix) -> int:
        body = _op_json(op)["request_delete_range"]
        data = await self._gw.call("/v3/kv/deleterange", body, retry=True)
        return int(data.get("deleted", 0))

    def watch(self, prefix: str, after: int | None = None) -> Watch:
        return _EtcdWatch(self, prefix, after)

    @contextlib.asynccontextmanager
    async def lock(
        self, name: str, ttl: float = 10.0, timeout: float | None = None
    ) -> AsyncIterator[LockHandle]:
        """etcd's v3lock on a lease of `ttl` s kept alive while held: if this process dies, the lease
        expires and the next waiter gets the lock."""
        if ttl <= 0:
            raise ValueError("lock ttl must be positive")
        base = lock_key_prefix(name)
        granted = await self._gw.call("/v3/lease/grant", {"TTL": max(1, math.ceil(ttl))}, retry=True)
        lease = int(granted["ID"])
        handle = LockHandle(name, "")
        keeper = asyncio.create_task(self._keep_alive(lease, float(granted.get("TTL", ttl)), handle))
        try:
            # Locking again with the same lease is a no-op in etcd, so the wait may be retried anywhere.
            acquire = asyncio.ensure_future(
                self._gw.call(
                    "/v3/lock/lock", {"name": _b64(base), "lease": lease}, retry=True, patience=math.inf
                )
            )
            try:
                async with asyncio.timeout(timeout):
                    done, _ = await asyncio.wait({acquire, keeper}, return_when=asyncio.FIRST_COMPLETED)
                if acquire not in done:
                    raise StoreUnavailable(f"lease of lock {name!r} expired while waiting for it")
            finally:
                if not acquire.done():
                    acquire.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await acquire
            handle.key = _unb64(acquire.result()["key"]).decode()
            log.debug("lock %s held as %s", name, handle.key)
            yield handle
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            try:  # revoking deletes the lock key; if this fails the lease expires within ttl anyway
                await self._gw.call("/v3/lease/revoke", {"ID": lease}, retry=True)
            except StoreError as exc:
                log.warning(
                    "could not revoke lease %x of lock %s (%s); it expires in %ss", lease, name, exc, ttl
                )

    async def _keep_alive(self, lease: int, ttl: float, handle: LockHandle) -> None:
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(max(ttl / 3, 0.2))
            try:
                data = await self._gw.call("/v3/lease/keepalive", {"ID": lease}, retry=True)
            except StoreError as exc:
                if time.monotonic() - last_ok < ttl:
                    continue
                log.error("lost lease %x of lock %s: %s", lease, handle.name, exc)
                handle.lost.set()
                return
            if int(data.get("TTL", 0)) <= 0:
                log.error("lease %x of lock %s expired", lease, handle.name)
                handle.lost.set()
                return
            last_ok = time.monotonic()

    async def member_list(self) -> list[MemberInfo]:
        data = await self._gw.call("/v3/cluster/member/list", {}, retry=True)
        return [MemberInfo.parse(m) for m in data.get("members", ())]

    async def member_add(self, peer_url: str) -> tuple[MemberInfo, list[MemberInfo]]:
        """Announce a new voting member; it must then start with `--initial-cluster-state existing`."""
        data = await self._gw.call("/v3/cluster/member/add", {"peerURLs": [peer_url]})
        return MemberInfo.parse(data["member"]), [MemberInfo.parse(m) for m in data.get("members", ())]

    async def member_remove(self, member_id: int) -> None:
        await self._gw.call("/v3/cluster/member/remove", {"ID": member_id})

    async def sync_endpoints(self) -> list[str]:
        """Use the client URLs of every started member as endpoints (after a join or a removal)."""
        urls = [u for m in await self.member_list() for u in m.client_urls]
        if urls:
            self._gw.endpoints = [u.rstrip("/") for u in urls]
            self._gw._current = 0
        return self.endpoints

    async def close(self) -> None:
        for w in list(self._watches):
            await w.aclose()
        await self._gw.close()


def _compare_json(c: Compare) -> dict[str, Any]:
    out: dict[str, Any] = {"key": _b64(check_key(c.key)), "result": "EQUAL" if c.op == "==" else "NOT_EQUAL"}
    if c.target == "value":
        assert isinstance(c.operand, bytes)
        out.update(target="VALUE", value=_b64(c.operand))
    elif c.target == "mod":
        out.update(target="MOD", mod_revision=str(c.operand))
    else:
        out.update(target="CREATE", create_revision=str(c.operand))
    return out


def _op_json(op: Op) -> dict[str, Any]:
    if isinstance(op, Put):
        return {"request_put": {"key": _b64(check_key(op.key)), "value": _b64(bytes(op.value))}}
    if isinstance(op, Delete):
        return {"request_delete_range": {"key": _b64(check_key(op.key))}}
    return {"request_delete_range": _range_of(check_prefix(op.prefix))}


class _EtcdWatch(Watch):
    """A watch stream that survives the loss of its member: it resumes on another member from the
    revision after the last one delivered, and gives up with StoreUnavailable after the timeout."""

    def __init__(self, store: EtcdStore, prefix: str, after: int | None) -> None:
        super().__init__(prefix, after)
        self._store = store
        self._lines: _JsonLines | None = None
        self._next_rev = 0 if after is None else after + 1
        self._pending: list[WatchEvent] = []

    async def _connect(self) -> None:
        self._drop()
        request: dict[str, Any] = dict(_range_of(self.prefix))
        if self._next_rev:
            request["start_revision"] = self._next_rev
        deadline = time.monotonic() + self._store.timeout
        while True:
            lines, endpoint = await self._store._gw.stream("/v3/watch", {"create_request": request}, deadline)
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.1)):
                    first = await lines.next()
            except (TimeoutError, aiohttp.ClientError, ValueError):
                first = None
            result = (first or {}).get("result") or {}
            if result.get("created"):
                self._lines = lines
                if not self._next_rev:
                    self._next_rev = int(result["header"]["revision"]) + 1
                self._store._watches.add(self)
                return
            lines.resp.close()
            self._check_compacted(result)
            if time.monotonic() >= deadline:
                raise StoreUnavailable(f"cannot set up a watch on {self.prefix!r}: {first}")
            log.debug("watch on %s refused (%s), trying another member", endpoint, first)
            await asyncio.sleep(0.1)

    @staticmethod
    def _check_compacted(result: dict[str, Any]) -> None:
        if result.get("canceled") and int(result.get("compact_revision", 0)):
            raise StoreCompacted(int(result["compact_revision"]))

    def _drop(self) -> None:
        if self._lines is not None:
            self._lines.resp.close()
            self._lines = None
        self._store._watches.discard(self)

    async def _start(self) -> None:
        await self._connect()

    async def _next(self) -> WatchEvent:
        while not self._pending:
            if self._lines is None:
                await self._connect()
            assert self._lines is not None
            try:
                msg = await self._lines.next()
            except (aiohttp.ClientError, ValueError) as exc:
                msg = {"error": {"message": repr(exc)}}
            if self._closed:
                raise StopAsyncIteration
            result = (msg or {}).get("result") or {}
            if msg is None or "error" in msg or result.get("canceled"):
                self._check_compacted(result)
                log.info(
                    "watch on %r interrupted (%s); resuming at revision %d", self.prefix, msg, self._next_rev
                )
                self._drop()
                continue
            for raw in result.get("events") or ():
                kv = _kv(raw["kv"])
                if kv.mod_revision < self._next_rev:
                    continue
                if raw.get("type") == "DELETE":
                    self._pending.append(WatchEvent("delete", kv.key, None, kv.mod_revision))
                else:
                    self._pending.append(WatchEvent("put", kv.key, kv.value, kv.mod_revision))
            if self._pending:
                self._next_rev = self._pending[-1].revision + 1
        return self._pending.pop(0)

    async def _close(self) -> None:
        self._drop()


# --------------------------------------------------------------------------- member process

# etcd 3.4 refuses to run on architectures other than amd64 unless told to (ETCD_UNSUPPORTED_ARCH).
_GOARCH = dict(aarch64="arm64", armv7l="arm", i686="386", ppc64le="ppc64le", s390x="s390x")


class EtcdMember:
    """One etcd member process of the pool (one per node), with its data dir, URLs and log file.

    The process gets SIGTERM if its parent dies (setpriv --pdeathsig, where available), like the
    etcd embedded in GlusterD 2: start members from the event-loop thread that outlives them.
    """

    def __init__(
        self,
        name: str,
        data_dir: str | os.PathLike[str],
        client_url: str,
        peer_url: str,
        *,
        log_path: str | os.PathLike[str] | None = None,
        binary: str = "etcd",
        heartbeat_ms: int = 100,
        election_ms: int = 1000,
        cluster_token: str = "mortar",
        compaction_retention: int = 10000,
    ) -> None:
        self.name = name
        self.data_dir = Path(data_dir)
        self.client_url = client_url.rstrip("/")
        self.peer_url = peer_url.rstrip("/")
        self.log_path = Path(log_path) if log_path else self.data_dir.with_name(self.data_dir.name + ".log")
        self.binary = binary
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.cluster_token = cluster_token
        self.compaction_retention = compaction_retention
        self.member_id: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"EtcdMember({self.name!r}, {self.client_url}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def initialized(self) -> bool:
        """The data dir already holds a member: restart it with `start()`, never re-bootstrap it."""
        return (self.data_dir / "member" / "wal").is_dir()

    async def start_new_cluster(self, timeout: float = 30.0) -> None:
        """Bootstrap a new single-member cluster (or restart this member if it already exists)."""
        if self.initialized:
            await self.start(timeout)
            return
        self._spawn(["--initial-cluster", f"{self.name}={self.peer_url}", "--initial-cluster-state", "new"])
        await self._ready(timeout)

    async def join(self, via: Sequence[str], timeout: float = 60.0) -> None:
        """Join the cluster that the members at client URLs `via` belong to: member-add, then start.

        etcd refuses a new voting member until every member has been connected for a few seconds,
        so the add is retried until `timeout`. If this member fails to come up it is removed again,
        so a failed join does not leave the cluster waiting for a member that will never start.
        """
        if self.initialized:
            await self.start(timeout)
            return
        deadline = time.monotonic() + timeout
        async with _admin(via) as admin:
            new, members = await self._add(admin, deadline)
            peers = [
                f"{self.name if m.id == new.id else m.name}={url}" for m in members for url in m.peer_urls
            ]
            self._spawn(["--initial-cluster", ",".join(peers), "--initial-cluster-state", "existing"])
            try:
                await self._ready(max(deadline - time.monotonic(), 5.0))
            except BaseException:
                await self.stop()
                with contextlib.suppress(StoreError):
                    await admin.member_remove(new.id)
                shutil.rmtree(self.data_dir, ignore_errors=True)
                raise
        log.info("etcd member %s joined the cluster as %x", self.name, new.id)

    async def _add(self, admin: EtcdStore, deadline: float) -> tuple[MemberInfo, list[MemberInfo]]:
        async def add() -> tuple[MemberInfo, list[MemberInfo]]:
            members = await admin.member_list()
            if any(self.peer_url in m.peer_urls for m in members):  # announced by an unfinished attempt
                return next(m for m in members if self.peer_url in m.peer_urls), members
            return await admin.member_add(self.peer_url)

        return await _retry_unhealthy(add, deadline - time.monotonic(), f"add {self.name}")

    async def start(self, timeout: float = 30.0) -> None:
        """Restart an existing member from its data dir (it catches up from the others)."""
        if not self.initialized:
            raise StoreError(f"{self.data_dir} holds no etcd member; use start_new_cluster() or join()")
        self._spawn([])
        await self._ready(timeout)

    def _spawn(self, cluster_args: list[str]) -> None:
        if self.running:
            raise StoreError(f"etcd member {self.name} is already running (pid {self.pid})")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster-token", self.cluster_token,
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--auto-compaction-mode", "revision",
            "--auto-compaction-retention", str(self.compaction_retention),
            "--logger", "zap",
            "--log-outputs", "stderr",
            *cluster_args,
        ]  # fmt: skip
        setpriv = shutil.which("setpriv")
        if setpriv:
            args = [setpriv, "--pdeathsig", "TERM", *args]
        env = dict(os.environ)
        arch = _GOARCH.get(platform.machine())
        if arch:
            env.setdefault("ETCD_UNSUPPORTED_ARCH", arch)
        with open(self.log_path, "ab") as logf:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        log.info("started etcd member %s (pid %d), log %s", self.name, self.process.pid, self.log_path)

    async def _ready(self, timeout: float) -> None:
        """Wait until this process, not some other etcd on the same URL, serves as this member."""
        try:
            await self.wait_healthy(timeout)
            gw = _Gateway([self.client_url], 5.0)
            try:
                data = await gw.call("/v3/cluster/member/list", {}, retry=True)
            finally:
                await gw.close()
            answering = int(data["header"]["member_id"])
            me = [
                m.id for m in map(MemberInfo.parse, data.get("members", ())) if self.peer_url in m.peer_urls
            ]
            if me != [answering] or not self.running:
                raise StoreError(
                    f"another etcd answers on {self.client_url} (member {answering:x}); "
                    f"{self.name}: {self.log_tail()}"
                )
            self.member_id = answering
        except BaseException:
            await self.stop()
            raise

    async def healthy(self) -> bool:
        """etcd's /health: true when the member has a leader and serves reads."""
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(self.client_url + "/health", timeout=aiohttp.ClientTimeout(total=3)) as resp,
            ):
                data = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return False
        return str(data.get("health")) == "true"

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.running or not await self.healthy():
            if not self.running:
                raise StoreError(f"etcd member {self.name} exited: {self.log_tail()}")
            if time.monotonic() >= deadline:
                raise StoreUnavailable(
                    f"etcd member {self.name} unhealthy after {timeout}s: {self.log_tail()}"
                )
            await asyncio.sleep(0.1)

    def log_tail(self, lines: int = 3) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited after `timeout`. A leader first hands over to a
        live member; stopping every member at once makes it wait for etcd's transfer timeout (~7 s)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            deadline = time.monotonic() + timeout
            while self.process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.process.poll() is None:
                log.warning("etcd member %s ignored SIGTERM; killing it", self.name)
                await self.kill()
        self.process = None

    async def kill(self) -> None:
        """SIGKILL (a crash, as tests and a stuck member need)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            while self.process.poll() is None:
                await asyncio.sleep(0.02)
        self.process = None

    async def remove(
        self, via: Sequence[str] | None = None, wipe: bool = True, timeout: float = 30.0
    ) -> None:
        """Remove this member from its cluster (peer detach), stop it and wipe its data dir.

        The removal is sent through another member when one is known, since a member that removes
        itself shuts down while answering.
        """
        endpoints = [*(via or ()), self.client_url]
        async with _admin(endpoints, timeout) as admin:
            members = await admin.member_list()
            me = next((m for m in members if self.peer_url in m.peer_urls), None)
            if me is not None:
                others = [u for m in members if m.id != me.id for u in m.client_urls]
                async with _admin(others or endpoints) as remover:
                    await _retry_unhealthy(
                        lambda: remover.member_remove(me.id), timeout, f"remove {self.name}"
                    )
                log.info("removed etcd member %s (%x) from the cluster", self.name, me.id)
        await self.stop()
        self.member_id = None
        if wipe:
            shutil.rmtree(self.data_dir, ignore_errors=True)


async def _retry_unhealthy(fn: Callable[[], Awaitable[_T]], timeout: float, what: str) -> _T:
    """Run a membership change, retrying while etcd's strict reconfiguration check refuses it (every
    member must have been connected for a few seconds, and quorum must survive the change)."""
    deadline = time.monotonic() + timeout
    for attempt in itertools.count():
        try:
            return await fn()
        except StoreError as exc:
            if time.monotonic() >= deadline:
                raise StoreUnavailable(f"etcd refused to {what}: {exc}") from exc
            log.log(logging.INFO if attempt == 0 else logging.DEBUG, "etcd refuses to %s yet (%s)", what, exc)
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def _admin(endpoints: Sequence[str], timeout: float = 5.0) -> AsyncIterator[EtcdStore]:
    store = EtcdStore(endpoints, timeout)
    try:
        yield store
    finally:
        await store.close()
