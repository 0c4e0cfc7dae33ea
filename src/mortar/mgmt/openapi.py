"""The OpenAPI 3.1 description of mortard's API, generated from the route table (`api.ROUTES`) and
the schemas below, so every route is described by construction."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mortar.mgmt.api import Route


def _obj(props: dict[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    return out


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _list(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": item}


STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
STRS = _list(STR)

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _obj({"error": STR}, ["error"]),
    "Message": _obj({"message": STR}),
    "Node": _obj(
        {
            "uuid": STR,
            "hostnames": STRS,
            "port": INT,
            "version": STR,
            "store": {"enum": ["sqlite", "etcd"]},
            "store_detail": STR,
            "store_ready": BOOL,
            "peer_count": INT,
            "volume_count": INT,
        },
        ["uuid", "hostnames", "port"],
    ),
    "Peer": _obj(
        {
            "uuid": STR,
            "hostname": STR,
            "hostnames": STRS,
            "port": INT,
            "self": BOOL,
            "connected": BOOL,
            "state": STR,
        }
    ),
    "PeerList": _obj({"peers": _list(_ref("Peer"))}, ["peers"]),
    "PeerRecord": _obj(
        {"uuid": STR, "hostnames": STRS, "port": INT, "etcd_client_url": STR, "etcd_peer_url": STR}
    ),
    "Probe": _obj(
        {"host": {"type": "string", "description": "HOST or HOST:PORT of the other daemon"}}, ["host"]
    ),
    "ProbeResult": _obj({"peer": _ref("PeerRecord"), "message": STR}),
    "Brick": _obj(
        {"index": INT, "name": STR, "host": STR, "path": STR, "peer": STR, "arbiter": BOOL, "client": STR}
    ),
    "Volume": _obj(
        {
            "name": STR,
            "id": STR,
            "type": {"enum": ["Distribute", "Replicate", "Distributed-Replicate"]},
            "status": {"enum": ["Created", "Started", "Stopped"]},
            "replica_count": INT,
            "arbiter_count": INT,
            "distribute_count": INT,
            "brick_count": INT,
            "number_of_bricks": STR,
            "transport": {"enum": ["tcp", "unix"]},
            "bricks": _list(_ref("Brick")),
            "options": {"type": "object", "additionalProperties": STR},
            "version": INT,
            "brick_type": {"enum": ["posix", "bd"]},
            "device": STR,
            "bd_options": {"type": "object", "additionalProperties": STR},
        },
        ["name", "id", "type", "status", "bricks"],
    ),
    "VolumeList": _obj(
        {
            "volumes": _list(_ref("Volume")),
            "revision": {**STR, "description": "give it as wait= to long-poll"},
        },
        ["volumes"],
    ),
    "VolumeResult": _obj({"volume": _ref("Volume"), "message": STR}, ["volume"]),
    "StartResult": _obj({"volume": _ref("Volume"), "failed": STRS}, ["volume"]),
    "CreateVolume": _obj(
        {
            "name": STR,
            "bricks": {**STRS, "description": "HOST:/PATH, consecutive bricks form replica sets"},
            "replica": INT,
            "arbiter": INT,
            "stripe": {**INT, "description": "refused: not available yet"},
            "disperse": {**INT, "description": "refused: not available yet"},
            "transport": {"enum": ["tcp", "unix"]},
            "force": BOOL,
            "device": {"enum": ["lv"], "description": "the bricks are thin pools (storage/bd)"},
            "bd_options": {
                "type": "object",
                "additionalProperties": STR,
                "description": "pool-size, block-size, backend (thin|lvm), vg, thinpool",
            },
        },
        ["name", "bricks"],
    ),
    "Force": _obj({"force": BOOL}),
    "BrickStatus": _obj(
        {
            "index": INT,
            "name": STR,
            "host": STR,
            "path": STR,
            "port": INT,
            "pid": INT,
            "online": BOOL,
            "error": STR,
            "restarts": INT,
            "arbiter": BOOL,
            "socket": STR,
            "source": {
                "enum": ["node", "store"],
                "description": "live from the brick's node, or its last record",
            },
            "detail": _obj(
                {
                    "file_system": STR,
                    "device": STR,
                    "mount_point": STR,
                    "mount_options": STR,
                    "block_size": INT,
                    "total_bytes": INT,
                    "free_bytes": INT,
                    "inode_count": INT,
                    "free_inodes": INT,
                }
            ),
        }
    ),
    "VolumeStatus": _obj(
        {
            "volume": STR,
            "status": STR,
            "type": STR,
            "bricks": _list(_ref("BrickStatus")),
            "nbd": {
                **_list(_ref("NbdStatus")),
                "description": "each host's NBD server (exports VOLUME/path)",
            },
        }
    ),
    "NbdStatus": _obj(
        {
            "host": {**STR, "description": "the host's name in the pool (in a volume status)"},
            "node": {**STR, "description": "the host's node uuid (in a volume status)"},
            "listen": {**STR, "description": "the TCP listen address"},
            "enabled": BOOL,
            "port": {**INT, "description": "TCP port; 0 when it has no TCP listener"},
            "socket": {**STR, "description": "unix socket path; empty when it has none"},
            "pid": INT,
            "online": BOOL,
            "serving": {**BOOL, "description": "the volume's images are exports on this host now"},
            "volumes": {**STRS, "description": "the volumes it serves"},
            "restarts": INT,
            "error": STR,
        }
    ),
    "LocalNbd": _obj({"nbd": _ref("NbdStatus")}, ["nbd"]),
    "LocalBricks": _obj({"bricks": _list(_ref("BrickStatus"))}),
    "Option": _obj(
        {
            "key": STR,
            "value": STR,
            "source": {"enum": ["default", "set", "unavailable"]},
            "default": STR,
            "type": STR,
            "description": STR,
            "translator": STR,
        }
    ),
    "OptionList": _obj({"options": _list(_ref("Option"))}, ["options"]),
    "SetOptions": _obj(
        {
            "options": {"type": "object", "additionalProperties": STR},
            "group": {**STR, "description": "e.g. virt"},
        }
    ),
    "SetResult": _obj({"options": {"type": "object", "additionalProperties": STR}, "message": STR}),
    "ResetResult": _obj({"reset": STRS, "message": STR}),
    "Volfile": {
        "type": "string",
        "description": "a client volfile (GlusterFS grammar); header X-Mortar-Revision",
    },
    "Join": _obj({"endpoints": STRS, "hostname": STR}, ["endpoints"]),
    "Leave": _obj({"endpoints": STRS}),
    "CheckBricks": _obj({"paths": STRS, "force": BOOL}, ["paths"]),
    "CheckResult": _obj({"errors": STRS}, ["errors"]),
    "HealRequest": _obj(
        {
            "full": {**BOOL, "description": "crawl every directory, not only what the indexes list"},
            "wait": {**BOOL, "description": "answer when the crawls have finished"},
            "timeout": {**INT, "description": "longest wait in seconds (at most 300)"},
        }
    ),
    "HealCrawl": _obj(
        {
            "kind": {"enum": ["index", "full"]},
            "reason": STR,
            "start": {"type": "number"},
            "end": {"type": "number"},
            "scanned": INT,
            "healed": INT,
            "failed": INT,
            "split_brain": INT,
            "skipped": INT,
            "bytes": INT,
            "bricks": STR,
            "in_progress": BOOL,
        }
    ),
    "HealResult": _obj(
        {
            "volume": STR,
            "kind": STR,
            "failed": {"type": "object", "additionalProperties": STR},
            "crawls": _list(_ref("HealCrawl")),
        }
    ),
    "HealEntry": _obj({"gfid": STR, "path": STR, "split_brain": STRS, "conflicts": STRS}),
    "HealBrick": _obj(
        {
            "index": INT,
            "brick": STR,
            "status": STR,
            "count": {"type": ["integer", "null"]},
            "split_brain_count": INT,
            "pending_count": INT,
            "entries": _list(_ref("HealEntry")),
        }
    ),
    "HealInfo": _obj({"volume": STR, "mode": STR, "bricks": _list(_ref("HealBrick"))}),
    "HealStatistics": _obj(
        {"volume": STR, "hosts": _list(_obj({"host": STR, "error": STR, "crawls": _list(_ref("HealCrawl"))}))}
    ),
    "SplitBrainRequest": _obj(
        {
            "policy": {"enum": ["bigger-file", "latest-mtime", "latest-ctime", "majority", "source-brick"]},
            "file": {**STR, "description": "a path in the volume or gfid:UUID (optional with source-brick)"},
            "source": {**STR, "description": "HOST:/PATH of the brick to take as the source"},
        },
        ["policy"],
    ),
    "SplitBrainResult": _obj(
        {"volume": STR, "resolved": _list(_obj({"file": STR, "gfid": STR, "source": STR}))}
    ),
    "BrickChange": _obj(
        {
            "bricks": {**STRS, "description": "HOST:/PATH; consecutive bricks form replica sets"},
            "replica": {**INT, "description": "the new replica count (raising it adds copies)"},
            "arbiter": INT,
            "force": BOOL,
        },
        ["bricks"],
    ),
    "RemoveBricks": _obj(
        {
            "action": {"enum": ["start", "status", "stop", "commit"]},
            "bricks": STRS,
            "replica": INT,
            "force": {**BOOL, "description": "commit before the drain completed (files left are lost)"},
        },
        ["action"],
    ),
    "ReplaceBrick": _obj({"old": STR, "new": STR, "force": BOOL}, ["old", "new"]),
    "Rebalance": _obj(
        {"action": {"enum": ["start", "status", "stop"]}, "fix_layout": BOOL, "force": BOOL}, ["action"]
    ),
    "Task": _obj(
        {
            "id": STR,
            "kind": {"enum": ["rebalance", "fix-layout", "remove-brick"]},
            "volume": STR,
            "host": STR,
            "state": {"enum": ["starting", "running", "completed", "stopped", "failed"]},
            "error": STR,
            "bricks": STRS,
            "files_scanned": INT,
            "files_moved": INT,
            "bytes_moved": INT,
            "files_skipped": INT,
            "files_failed": INT,
            "dirs_fixed": INT,
            "skipped": {"type": "object", "additionalProperties": INT},
            "failed": {"type": "object", "additionalProperties": INT},
            "files": _list(_obj({"path": STR, "status": STR, "reason": STR, "detail": STR})),
            "remaining": {"type": "object", "additionalProperties": INT},
            "drained": BOOL,
            "elapsed": {"type": "number"},
            "started": {"type": "number"},
        }
    ),
    "TaskResult": _obj(
        {
            "task": {"oneOf": [_ref("Task"), {"type": "null"}]},
            "volume": _ref("Volume"),
            "files_left": INT,
            "message": STR,
        }
    ),
    "TaskStop": _obj({"kind": STR}),
    "FileCount": _obj({"files": INT}),
    "ShdRequest": _obj({"volume": STR}, ["volume"]),
    "ShdAnswer": {"type": "object", "description": "the heal daemon's answer to the operation"},
    "OpenApi": {"type": "object", "description": "this document"},
}

_ERRORS = {
    "400": "the request was refused (the error says why)",
    "404": "no such volume",
    "409": "wrong state, or a conflicting change",
    "502": "a peer daemon could not be reached",
    "503": "the pool has no quorum / the store is not available",
}


def describe(routes: Sequence[Route], version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        params = [
            {"name": p, "in": "path", "required": True, "schema": STR} for p in re.findall(r"{(\w+)}", r.path)
        ] + [
            {"name": q, "in": "query", "required": False, "schema": STR, "description": d}
            for q, d in r.query.items()
        ]
        media = "text/plain" if r.response == "Volfile" else "application/json"
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": r.handler.__name__ + ("_one" if "{key}" in r.path else ""),
            "tags": [r.tag],
            "responses": {
                "200": {
                    "description": "success",
                    "content": {media: {"schema": _ref(r.response or "Message")}},
                },
                **{
                    code: {"description": text, "content": {"application/json": {"schema": _ref("Error")}}}
                    for code, text in _ERRORS.items()
                },
            },
        }
        if r.response == "Volfile":
            op["responses"]["304"] = {"description": "unchanged within the timeout"}
        if params:
            op["parameters"] = params
        if r.body:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(r.body)}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mortard",
            "version": version,
            "description": "mortar's node daemon: the trusted pool, volumes, bricks and client volfiles.",
        },
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }
