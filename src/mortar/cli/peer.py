"""`mortar peer probe|detach|status` and `mortar pool list`: the trusted storage pool."""

from __future__ import annotations

import urllib.parse

from mortar.cli.command import CliError, Context, Result, command, expect
from mortar.cli.remote import api


@command(
    "peer probe",
    "peer probe HOST[:PORT]",
    "add a host to the trusted storage pool",
    details="""
The daemon on HOST (default port 24100) joins this node's pool. The first probe moves the pool's
configuration from this node's SQLite file to etcd, with one etcd member per node. Refused when
HOST is this node, does not answer, or already belongs to another pool or has volumes.
Example: mortar peer probe 10.0.0.2
""",
)
def peer_probe(args: list[str], ctx: Context) -> Result:
    (host,) = expect(args, 1, "peer probe HOST[:PORT]")
    reply = api(ctx, "POST", "/v1/peers", {"host": host}, what="peer probe")
    message = reply.get("message", "success")
    text = "peer probe: success" if message == "success" else f"peer probe: success. {message}"
    return Result(text, {"host": host, **reply})


@command(
    "peer detach",
    "peer detach HOST [force]",
    "remove a host from the trusted storage pool",
    details="""
The host's etcd member is removed and it starts over on its own. Refused while the host holds
bricks of any volume (even with force). 'force' detaches a host that does not answer.
""",
)
def peer_detach(args: list[str], ctx: Context) -> Result:
    force = bool(args) and args[-1] == "force"
    (host,) = expect(args[:-1] if force else args, 1, "peer detach HOST [force]")
    query = "?force=true" if force else ""
    reply = api(ctx, "DELETE", f"/v1/peers/{urllib.parse.quote(host, safe='')}{query}", what="peer detach")
    return Result("peer detach: success", {"host": host, **reply})


def _peers(ctx: Context) -> list[dict[str, object]]:
    return list(api(ctx, "GET", "/v1/peers")["peers"])


@command("peer status", "peer status", "the other hosts of the pool and whether they answer")
def peer_status(args: list[str], ctx: Context) -> Result:
    expect(args, 0, "peer status")
    others = [p for p in _peers(ctx) if not p["self"]]
    lines = [f"Number of Peers: {len(others)}"]
    for p in others:
        state = "Connected" if p["connected"] else "Disconnected"
        lines += ["", f"Hostname: {p['hostname']}", f"Uuid: {p['uuid']}", f"State: {p['state']} ({state})"]
        extra = [h for h in p["hostnames"] if h != p["hostname"]]  # type: ignore[attr-defined]
        if extra:
            lines += ["Other names:", *extra]
    return Result("\n".join(lines), {"peers": others})


@command("pool list", "pool list", "every host of the pool, this one included")
def pool_list(args: list[str], ctx: Context) -> Result:
    if args:
        raise CliError("usage: mortar pool list", status=2)
    peers = _peers(ctx)
    rows = [
        [
            str(p["uuid"]),
            "localhost" if p["self"] else str(p["hostname"]),
            "Connected" if p["connected"] else "Disconnected",
        ]
        for p in peers
    ]
    width = max(len(r[1]) for r in rows) if rows else 8
    lines = [f"{'UUID':<36}\t{'Hostname':<{width}}\tState"] + [f"{u}\t{h:<{width}}\t{s}" for u, h, s in rows]
    return Result("\n".join(lines), {"peers": peers})
