"""mortard's HTTP/JSON API (`/v1/...`), built from one route table that also produces the OpenAPI
description served at `/v1/openapi.json`, so the two cannot drift apart.

Errors are JSON `{"error": "one clear line"}` with a meaningful status: 400 refused request, 404 no
such volume, 409 wrong state or conflict, 502 a peer cannot be reached, 503 the pool has no quorum.
Routes under `/v1/internal/` are what daemons ask each other during probe, create and status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mortar import __version__
from mortar.mgmt.bricks_change import BrickChange, count_files
from mortar.mgmt.model import MgmtError, VolumeInfo
from mortar.mgmt.openapi import describe
from mortar.mgmt.store import StoreError, StoreUnavailable
from mortar.mgmt.volumes import CreateRequest, check_paths, revision_of

if TYPE_CHECKING:
    from mortar.mgmt.daemon import Node

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NODE: web.AppKey[Node] = web.AppKey("node")
MAX_WAIT = 300.0


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    body: str | None = None  # schema name of the JSON request body
    response: str | None = None  # schema name of the 200 answer
    query: dict[str, str] = field(default_factory=dict)  # query parameter -> description


def _node(request: web.Request) -> Node:
    return request.app[NODE]


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except ValueError:
        raise MgmtError("the request body is not JSON") from None
    if not isinstance(data, dict):
        raise MgmtError("the request body must be a JSON object")
    return data


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes", "on")


def _ok(data: dict[str, Any]) -> web.Response:
    return web.json_response(data)


# ---- node and pool ---------------------------------------------------------------------------------


async def get_node(request: web.Request) -> web.Response:
    node = _node(request)
    try:
        peers = len(await node.pool.peers())
        volumes = len(await node.volumes.all())
        ready = node.synced
    except MgmtError:
        peers, volumes, ready = 1, 0, False
    return _ok(
        {
            "uuid": node.uuid,
            "hostnames": node.hostnames,
            "port": node.port,
            "version": __version__,
            "store": node.holder.kind,
            "store_detail": node.holder.describe(),
            "store_ready": ready,
            "peer_count": peers,
            "volume_count": volumes,
        }
    )


async def list_peers(request: web.Request) -> web.Response:
    return _ok({"peers": await _node(request).pool.status()})


async def probe_peer(request: web.Request) -> web.Response:
    body = await _body(request)
    host = body.get("host")
    if not isinstance(host, str) or not host:
        raise MgmtError('give the host to probe: {"host": "HOST[:PORT]"}')
    return _ok(await _node(request).pool.probe(host))


async def detach_peer(request: web.Request) -> web.Response:
    return _ok(await _node(request).pool.detach(request.match_info["host"], _flag(request, "force")))


async def internal_join(request: web.Request) -> web.Response:
    body = await _body(request)
    endpoints = body.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        raise MgmtError("join needs the pool's etcd endpoints")
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    local = str(sock[0]) if sock else ""
    peer = await _node(request).pool.join(
        [str(e) for e in endpoints], str(body.get("hostname") or local), local
    )
    return _ok({"peer": peer.__dict__})


async def internal_leave(request: web.Request) -> web.Response:
    body = await _body(request)
    await _node(request).pool.leave([str(e) for e in body.get("endpoints") or []])
    return _ok({"message": "left the pool"})


async def internal_check_bricks(request: web.Request) -> web.Response:
    body = await _body(request)
    paths = body.get("paths")
    if not isinstance(paths, list):
        raise MgmtError("give the brick paths to check")
    errors = await asyncio.to_thread(check_paths, [str(p) for p in paths], bool(body.get("force")))
    return _ok({"errors": errors})


async def internal_bricks(request: web.Request) -> web.Response:
    node = _node(request)
    rows = await asyncio.to_thread(
        node.volumes.local_status, request.query.get("volume", ""), _flag(request, "detail")
    )
    return _ok({"bricks": rows})


# ---- volumes -----------------------------------------------------------------------------------------


async def list_volumes(request: web.Request) -> web.Response:
    """Every volume; with `wait=REVISION`, answers when the list differs from that revision or the
    timeout passes (a long poll: this host's NBD server follows started volumes with it)."""
    node = _node(request)
    wait = request.query.get("wait")
    deadline = time.monotonic() + _timeout(request)
    while True:
        changed = node.change_event()
        volumes = [await _public(node, v) for v in await node.volumes.all()]
        revision = revision_of(json.dumps(volumes, sort_keys=True))
        remaining = deadline - time.monotonic()
        if wait is None or revision != wait or remaining <= 0 or node.closing:
            return _ok({"volumes": volumes, "revision": revision})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining):
                await changed.wait()


def _timeout(request: web.Request) -> float:
    try:
        return min(float(request.query.get("timeout", "30")), MAX_WAIT)
    except ValueError:
        raise MgmtError("timeout must be a number of seconds") from None


async def _public(node: Node, info: VolumeInfo) -> dict[str, Any]:
    out = info.public()
    device = await node.volumes.device(info.name)
    out["brick_type"] = device.brick_type if device else "posix"
    if device is not None:
        out["device"], out["bd_options"] = device.device, device.options
    return out


async def create_volume(request: web.Request) -> web.Response:
    node = _node(request)
    info = await node.volumes.create(CreateRequest.from_json(await _body(request)))
    return _ok({"volume": await _public(node, info), "message": "please start the volume to access data"})


async def get_volume(request: web.Request) -> web.Response:
    node = _node(request)
    return _ok({"volume": await _public(node, await node.volumes.get(request.match_info["name"]))})


async def delete_volume(request: web.Request) -> web.Response:
    await _node(request).volumes.delete(request.match_info["name"])
    return _ok({"message": "success"})


async def start_volume(request: web.Request) -> web.Response:
    body = await _body(request)
    return _ok(await _node(request).volumes.start(request.match_info["name"], bool(body.get("force"))))


async def stop_volume(request: web.Request) -> web.Response:
    body = await _body(request)
    return _ok(await _node(request).volumes.stop(request.match_info["name"], bool(body.get("force"))))


async def volume_status(request: web.Request) -> web.Response:
    return _ok(await _node(request).volumes.status(request.match_info["name"], _flag(request, "detail")))


async def get_options(request: web.Request) -> web.Response:
    key = request.match_info.get("key")
    return _ok({"options": await _node(request).volumes.get_options(request.match_info["name"], key)})


async def set_options(request: web.Request) -> web.Response:
    body = await _body(request)
    options = body.get("options") or {}
    group = body.get("group")
    if not isinstance(options, dict) or not (group is None or isinstance(group, str)):
        raise MgmtError('give {"options": {KEY: VALUE...}} and/or {"group": NAME}')
    changed = await _node(request).volumes.set_options(
        request.match_info["name"], {str(k): str(v) for k, v in options.items()}, group
    )
    return _ok({"options": changed, "message": "success"})


async def reset_options(request: web.Request) -> web.Response:
    key = request.match_info.get("key")
    removed = await _node(request).volumes.reset_options(request.match_info["name"], key)
    return _ok({"reset": removed, "message": "reset volume successful"})


async def get_volfile(request: web.Request) -> web.StreamResponse:
    """The client volfile; with `wait=REVISION`, answers when it differs from that one (long poll)."""
    node = _node(request)
    name = request.match_info["name"]
    wait = request.query.get("wait")
    try:
        timeout = min(float(request.query.get("timeout", "30")), MAX_WAIT)
    except ValueError:
        raise MgmtError("timeout must be a number of seconds") from None
    deadline = time.monotonic() + timeout
    while True:
        if node.closing:
            raise MgmtError("the daemon is stopping; ask another one", 503)
        changed = node.change_event()
        try:
            text = await node.volumes.client_volfile(name)
        except MgmtError as exc:
            if wait is None or exc.status != 503:
                raise
            # a brick just added has no address yet: the client keeps its graph until it has
            text, revision = "", wait
        else:
            revision = revision_of(text)
        headers = {"X-Mortar-Revision": revision}
        if wait is None or revision != wait:
            return web.Response(text=text, content_type="text/plain", headers=headers)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return web.Response(status=304, headers=headers)
        try:
            async with asyncio.timeout(remaining):
                await changed.wait()
        except TimeoutError:
            return web.Response(status=304, headers=headers)


# ---- heal ------------------------------------------------------------------------------------------


async def heal_volume(request: web.Request) -> web.Response:
    body = await _body(request)
    try:
        timeout = min(float(body.get("timeout", MAX_WAIT)), MAX_WAIT)
    except (TypeError, ValueError):
        raise MgmtError("timeout must be a number of seconds") from None
    return _ok(
        await _node(request).volumes.heal.trigger(
            request.match_info["name"], bool(body.get("full")), bool(body.get("wait")), timeout
        )
    )


async def heal_info(request: web.Request) -> web.Response:
    heal = _node(request).volumes.heal
    return _ok(await heal.info(request.match_info["name"], request.query.get("mode", "")))


async def heal_statistics(request: web.Request) -> web.Response:
    return _ok(await _node(request).volumes.heal.statistics(request.match_info["name"]))


async def heal_split_brain(request: web.Request) -> web.Response:
    body = await _body(request)
    file, source = body.get("file"), body.get("source")
    return _ok(
        await _node(request).volumes.heal.split_brain(
            request.match_info["name"],
            str(body.get("policy", "")),
            str(file) if file else None,
            str(source) if source else None,
        )
    )


async def internal_nbd(request: web.Request) -> web.Response:
    return _ok({"nbd": _node(request).nbd.status()})


async def internal_shd(request: web.Request) -> web.Response:
    return _ok(await _node(request).volumes.heal.local(request.match_info["op"], await _body(request)))


# ---- bricks changing, long tasks -----------------------------------------------------------------


async def add_bricks(request: web.Request) -> web.Response:
    changes = _node(request).volumes.changes
    return _ok(await changes.add(request.match_info["name"], BrickChange.from_json(await _body(request))))


async def remove_bricks(request: web.Request) -> web.Response:
    body = await _body(request)
    changes = _node(request).volumes.changes
    action = str(body.get("action", ""))
    return _ok(await changes.remove(request.match_info["name"], action, BrickChange.from_json(body)))


async def replace_brick(request: web.Request) -> web.Response:
    body = await _body(request)
    old, new = body.get("old"), body.get("new")
    if not isinstance(old, str) or not isinstance(new, str):
        raise MgmtError('give {"old": "HOST:/PATH", "new": "HOST:/PATH", "force": true}')
    changes = _node(request).volumes.changes
    return _ok(await changes.replace(request.match_info["name"], old, new, bool(body.get("force"))))


async def rebalance_volume(request: web.Request) -> web.Response:
    body = await _body(request)
    changes = _node(request).volumes.changes
    return _ok(
        await changes.rebalance(
            request.match_info["name"],
            str(body.get("action", "")),
            bool(body.get("fix_layout")),
            bool(body.get("force")),
        )
    )


async def get_task(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    node = _node(request)
    await node.volumes.get(name)
    task = await node.volumes.changes.tasks.get(name)
    return _ok({"task": task.public() if task else None})


async def internal_task_stop(request: web.Request) -> web.Response:
    body = await _body(request)
    tasks = _node(request).volumes.changes.tasks
    task = await tasks.stop(request.match_info["name"], str(body.get("kind", "rebalance")))
    return _ok({"task": task.to_json().decode()})


async def internal_count_files(request: web.Request) -> web.Response:
    body = await _body(request)
    paths = [str(p) for p in body.get("paths") or []]
    counts = await asyncio.gather(*(asyncio.to_thread(count_files, p) for p in paths))
    return _ok({"files": sum(counts)})


async def get_openapi(request: web.Request) -> web.Response:
    return _ok(describe(ROUTES, __version__))


ROUTES: list[Route] = [
    Route("GET", "/v1/node", get_node, "this node: id, names, store, pool size", "pool", response="Node"),
    Route(
        "GET",
        "/v1/peers",
        list_peers,
        "the pool's nodes and whether they answer (peer status, pool list)",
        "pool",
        response="PeerList",
    ),
    Route(
        "POST",
        "/v1/peers",
        probe_peer,
        "add a host to the pool (peer probe)",
        "pool",
        body="Probe",
        response="ProbeResult",
    ),
    Route(
        "DELETE",
        "/v1/peers/{host}",
        detach_peer,
        "remove a host from the pool (peer detach)",
        "pool",
        response="Message",
        query={"force": "detach even if the host does not answer"},
    ),
    Route(
        "GET",
        "/v1/volumes",
        list_volumes,
        "every volume with its bricks and options",
        "volumes",
        response="VolumeList",
        query={
            "wait": "answer only when the list's revision differs from this one (long poll)",
            "timeout": "longest wait in seconds (default 30, at most 300); then the list as it is",
        },
    ),
    Route(
        "POST",
        "/v1/volumes",
        create_volume,
        "create a volume (volume create)",
        "volumes",
        body="CreateVolume",
        response="VolumeResult",
    ),
    Route(
        "GET",
        "/v1/volumes/{name}",
        get_volume,
        "one volume (volume info)",
        "volumes",
        response="VolumeResult",
    ),
    Route(
        "DELETE",
        "/v1/volumes/{name}",
        delete_volume,
        "delete a stopped volume",
        "volumes",
        response="Message",
    ),
    Route(
        "POST",
        "/v1/volumes/{name}/start",
        start_volume,
        "start the volume's bricks everywhere",
        "volumes",
        body="Force",
        response="StartResult",
    ),
    Route(
        "POST",
        "/v1/volumes/{name}/stop",
        stop_volume,
        "stop the volume's bricks everywhere",
        "volumes",
        body="Force",
        response="VolumeResult",
    ),
    Route(
        "GET",
        "/v1/volumes/{name}/status",
        volume_status,
        "per brick, and per host's NBD server: port, pid, online (volume status)",
        "volumes",
        response="VolumeStatus",
        query={"detail": "add disk space, inodes, file system"},
    ),
    Route(
        "GET",
        "/v1/volumes/{name}/options",
        get_options,
        "every option with value and source",
        "options",
        response="OptionList",
    ),
    Route(
        "GET",
        "/v1/volumes/{name}/options/{key}",
        get_options,
        "one option (volume get)",
        "options",
        response="OptionList",
    ),
    Route(
        "POST",
        "/v1/volumes/{name}/options",
        set_options,
        "set options or apply a group (volume set)",
        "options",
        body="SetOptions",
        response="SetResult",
    ),
    Route(
        "DELETE",
        "/v1/volumes/{name}/options",
        reset_options,
        "reset every option (volume reset)",
        "options",
        response="ResetResult",
    ),
    Route(
        "DELETE",
        "/v1/volumes/{name}/options/{key}",
        reset_options,
        "reset one option",
        "options",
        response="ResetResult",
    ),
    Route(
        "GET",
        "/v1/volumes/{name}/volfile",
        get_volfile,
        "the client volfile, with brick ports filled in",
        "volfiles",
        response="Volfile",
        query={
            "wait": "answer only when the revision differs from this one (long poll)",
            "timeout": "longest wait in seconds (default 30, at most 300); 304 when unchanged",
        },
    ),
    Route(
        "POST",
        "/v1/volumes/{name}/heal",
        heal_volume,
        "heal now what the indexes list, or crawl everything with full (volume heal)",
        "heal",
        body="HealRequest",
        response="HealResult",
    ),
    Route(
        "GET",
        "/v1/volumes/{name}/heal/info",
        heal_info,
        "per brick, the entries needing heal and those in split-brain (volume heal info)",
        "heal",
        response="HealInfo",
        query={"mode": "'summary' (counts only) or 'split-brain' (only entries in split-brain)"},
    ),
    Route(
        "GET",
        "/v1/volumes/{name}/heal/statistics",
        heal_statistics,
        "each host's recent heal crawls (volume heal statistics)",
        "heal",
        response="HealStatistics",
    ),
    Route(
        "POST",
        "/v1/volumes/{name}/heal/split-brain",
        heal_split_brain,
        "resolve split-brain: bigger-file, latest-mtime, latest-ctime, majority or source-brick",
        "heal",
        body="SplitBrainRequest",
        response="SplitBrainResult",
    ),
    Route(
        "POST",
        "/v1/volumes/{name}/bricks",
        add_bricks,
        "add bricks: new replica sets, or a higher replica count (volume add-brick)",
        "bricks",
        body="BrickChange",
        response="StartResult",
    ),
    Route(
        "POST",
        "/v1/volumes/{name}/bricks/remove",
        remove_bricks,
        "remove bricks: start the drain, status, stop, commit [force] (volume remove-brick)",
        "bricks",
        body="RemoveBricks",
        response="TaskResult",
    ),
    Route(
        "POST",
        "/v1/volumes/{name}/bricks/replace",
        replace_brick,
        "put a new empty brick in a replica set; heal fills it (volume replace-brick)",
        "bricks",
        body="ReplaceBrick",
        response="StartResult",
    ),
    Route(
        "POST",
        "/v1/volumes/{name}/rebalance",
        rebalance_volume,
        "start (or fix-layout), stop or ask the status of the rebalance (volume rebalance)",
        "bricks",
        body="Rebalance",
        response="TaskResult",
    ),
    Route(
        "GET",
        "/v1/volumes/{name}/task",
        get_task,
        "the volume's current or last long task (rebalance, remove-brick) with its progress",
        "bricks",
        response="TaskResult",
    ),
    Route("GET", "/v1/openapi.json", get_openapi, "this description", "meta", response="OpenApi"),
    Route(
        "POST",
        "/v1/internal/join",
        internal_join,
        "join the prober's pool (daemon to daemon)",
        "internal",
        body="Join",
        response="ProbeResult",
    ),
    Route(
        "POST",
        "/v1/internal/leave",
        internal_leave,
        "leave the pool (daemon to daemon)",
        "internal",
        body="Leave",
        response="Message",
    ),
    Route(
        "POST",
        "/v1/internal/bricks/check",
        internal_check_bricks,
        "can these paths become bricks here?",
        "internal",
        body="CheckBricks",
        response="CheckResult",
    ),
    Route(
        "GET",
        "/v1/internal/nbd",
        internal_nbd,
        "this host's NBD server: port, socket, pid, online, volumes served",
        "internal",
        response="LocalNbd",
    ),
    Route(
        "POST",
        "/v1/internal/shd/{op}",
        internal_shd,
        "ask this host's self-heal daemon (heal, info, statistics, split-brain)",
        "internal",
        body="ShdRequest",
        response="ShdAnswer",
    ),
    Route(
        "POST",
        "/v1/internal/tasks/{name}/stop",
        internal_task_stop,
        "stop the long task this host runs for the volume",
        "internal",
        body="TaskStop",
        response="ShdAnswer",
    ),
    Route(
        "POST",
        "/v1/internal/bricks/count",
        internal_count_files,
        "files (not link files) under these local brick paths",
        "internal",
        body="CheckBricks",
        response="FileCount",
    ),
    Route(
        "GET",
        "/v1/internal/bricks",
        internal_bricks,
        "this node's bricks of a volume, live",
        "internal",
        response="LocalBricks",
        query={"volume": "the volume", "detail": "add disk details"},
    ),
]


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except MgmtError as exc:
        return web.json_response({"error": str(exc)}, status=exc.status)
    except StoreUnavailable as exc:
        return web.json_response(
            {"error": f"the pool's configuration store is unavailable: {exc}"}, status=503
        )
    except StoreError as exc:
        return web.json_response({"error": f"configuration store error: {exc}"}, status=503)
    except web.HTTPException:
        raise
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": f"internal error: {exc!r}"}, status=500)


def make_app(node: Node) -> web.Application:
    app = web.Application(middlewares=[errors])
    app[NODE] = node
    for r in ROUTES:
        app.router.add_route(r.method, r.path, r.handler)
    return app
