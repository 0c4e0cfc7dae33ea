"""`mortar volume create|start|stop|delete|info|list|status|volfile`, in GlusterFS's grammar."""

from __future__ import annotations

import urllib.parse
from typing import Any

from mortar.cli.command import CliError, Context, Result, command, expect
from mortar.cli.remote import api, fetch_text, table

CREATE = (
    "volume create NAME [replica N [arbiter 1]] [stripe N] [disperse N] [transport tcp|unix] "
    "[device lv [pool-size SIZE] [block-size SIZE] [backend thin|lvm [vg VG thinpool TP]]] "
    "HOST:/PATH... [force]"
)


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _number(word: str, value: str | None) -> int:
    if value is None or not value.isdigit():
        raise CliError(f"usage: mortar {CREATE} ({word} needs a number)", status=2)
    return int(value)


def parse_create(args: list[str]) -> dict[str, Any]:
    """The words after `volume create` -> the API's create request."""
    if not args:
        raise CliError(f"usage: mortar {CREATE}", status=2)
    req: dict[str, Any] = {"name": args[0], "bricks": [], "force": False}
    words = args[1:]
    if words and words[-1] == "force":
        req["force"] = True
        words = words[:-1]
    i = 0
    while i < len(words):
        word = words[i]
        nxt = words[i + 1] if i + 1 < len(words) else None
        if word in ("replica", "arbiter", "stripe", "disperse", "disperse-data", "redundancy"):
            if req["bricks"]:
                raise CliError(f"'{word}' must come before the bricks", status=2)
            key = "disperse" if word in ("disperse-data", "redundancy") else word
            req[key] = _number(word, nxt)
            i += 2
        elif word == "device":
            if nxt != "lv" or req["bricks"]:
                raise CliError("'device lv' comes before the bricks (the only device type is lv)", status=2)
            req["device"] = nxt
            i += 2
        elif word in ("pool-size", "block-size", "backend", "vg", "thinpool") and "device" in req:
            if nxt is None:
                raise CliError(f"{word} needs a value", status=2)
            req.setdefault("bd_options", {})[word] = nxt
            i += 2
        elif word == "transport":
            if nxt not in ("tcp", "unix", "rdma", "tcp,rdma"):
                raise CliError("transport must be tcp or unix", status=2)
            req["transport"] = nxt
            i += 2
        elif ":" in word:
            req["bricks"].append(word)
            i += 1
        else:
            raise CliError(f"unexpected {word!r}: bricks are HOST:/PATH (usage: mortar {CREATE})", status=2)
    if not req["bricks"]:
        raise CliError(f"usage: mortar {CREATE} (no bricks given)", status=2)
    return req


@command(
    "volume create",
    CREATE,
    "create a volume from bricks (plain distribute, replicate, distributed-replicate)",
    details="""
Consecutive bricks form a replica set: 'replica 3' with six bricks makes 2 x 3. With 'arbiter 1'
(only with replica 3) the third brick of each set keeps metadata only. 'force' allows bricks on
the root file system and several bricks of one set on the same host. stripe and disperse are
refused: they are not available yet.
Example: mortar volume create vms replica 3 h1:/bricks/vms h2:/bricks/vms h3:/bricks/vms
""",
)
def volume_create(args: list[str], ctx: Context) -> Result:
    req = parse_create(args)
    what = f"volume create: {req['name']}"
    reply = api(ctx, "POST", "/v1/volumes", req, what=what)
    return Result(f"{what}: success: please start the volume to access data", reply)


def _start_stop(verb: str, args: list[str], ctx: Context) -> Result:
    force = len(args) == 2 and args[1] == "force"
    if len(args) != 1 and not force:
        raise CliError(f"usage: mortar volume {verb} NAME [force]", status=2)
    name = args[0]
    reply = api(
        ctx, "POST", f"/v1/volumes/{_q(name)}/{verb}", {"force": force}, what=f"volume {verb}: {name}"
    )
    failed = reply.get("failed") or []
    text = f"volume {verb}: {name}: success"
    if failed:
        text += "\n" + "\n".join(f"warning: brick {f}" for f in failed)
    return Result(text, reply)


@command(
    "volume start",
    "volume start NAME [force]",
    "start the volume's brick processes on every host",
    details="""
Waits until every brick listens. Without 'force' every host with bricks must answer and a brick
that fails to start fails the command (the volume stays stopped); with 'force' the bricks that can
start do, and a started volume's offline bricks are started again.
""",
)
def volume_start(args: list[str], ctx: Context) -> Result:
    return _start_stop("start", args, ctx)


@command(
    "volume stop",
    "volume stop NAME [force]",
    "stop the volume's brick processes (clients lose access)",
    details="'force' stops what can be stopped even when some host does not answer.",
)
def volume_stop(args: list[str], ctx: Context) -> Result:
    return _start_stop("stop", args, ctx)


@command(
    "volume delete",
    "volume delete NAME",
    "delete a stopped volume (the data stays in the brick directories)",
)
def volume_delete(args: list[str], ctx: Context) -> Result:
    (name,) = expect(args, 1, "volume delete NAME")
    reply = api(ctx, "DELETE", f"/v1/volumes/{_q(name)}", what=f"volume delete: {name}")
    return Result(f"volume delete: {name}: success", {"volume": name, **reply})


def info_text(v: dict[str, Any]) -> str:
    lines = [
        f"Volume Name: {v['name']}",
        f"Type: {v['type']}",
        f"Volume ID: {v['id']}",
        f"Status: {v['status']}",
        f"Number of Bricks: {v['number_of_bricks']}",
        f"Transport-type: {v['transport']}",
        "Bricks:",
    ]
    lines += [
        f"Brick{b['index'] + 1}: {b['name']}" + (" (arbiter)" if b["arbiter"] else "") for b in v["bricks"]
    ]
    if v["options"]:
        lines.append("Options Reconfigured:")
        lines += [f"{k}: {val}" for k, val in v["options"].items()]
    return "\n".join(lines)


@command("volume info", "volume info [NAME|all]", "a volume's type, id, status, bricks and options")
def volume_info(args: list[str], ctx: Context) -> Result:
    if len(args) > 1:
        raise CliError("usage: mortar volume info [NAME|all]", status=2)
    if args and args[0] != "all":
        volumes = [api(ctx, "GET", f"/v1/volumes/{_q(args[0])}", what=f"volume info: {args[0]}")["volume"]]
    else:
        volumes = api(ctx, "GET", "/v1/volumes", what="volume info")["volumes"]
        if not volumes:
            return Result("No volumes present", {"volumes": []})
    return Result("\n\n".join(info_text(v) for v in volumes), {"volumes": volumes})


@command("volume list", "volume list", "the names of all volumes")
def volume_list(args: list[str], ctx: Context) -> Result:
    expect(args, 0, "volume list")
    names = [v["name"] for v in api(ctx, "GET", "/v1/volumes", what="volume list")["volumes"]]
    return Result("\n".join(names) if names else "No volumes present in cluster", {"volumes": names})


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if value < 1024 or unit == "PB":
            return f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}PB"


def status_text(s: dict[str, Any], detail: bool) -> str:
    if detail:
        blocks = []
        for b in s["bricks"]:
            d = b.get("detail") or {}
            rows = [
                ("Brick", f"Brick {b['name']}"),
                ("TCP Port", str(b["port"] or "N/A")),
                ("Online", "Y" if b["online"] else "N"),
                ("Pid", str(b["pid"] or "N/A")),
                ("File System", d.get("file_system", "N/A")),
                ("Device", d.get("device", "N/A")),
                ("Mount Options", d.get("mount_options", "N/A")),
                ("Disk Space Free", _size(d["free_bytes"]) if "free_bytes" in d else "N/A"),
                ("Total Disk Space", _size(d["total_bytes"]) if "total_bytes" in d else "N/A"),
                ("Inode Count", str(d.get("inode_count", "N/A"))),
                ("Free Inodes", str(d.get("free_inodes", "N/A"))),
            ]
            if b.get("error"):
                rows.append(("Last Error", b["error"]))
            blocks.append("\n".join(f"{k:<21}: {v}" for k, v in rows))
        sep = "-" * 78
        return f"Status of volume: {s['volume']}\n{sep}\n" + f"\n{sep}\n".join(blocks)
    cells = [
        [f"Brick {b['name']}", str(b["port"] or "N/A"), "Y" if b["online"] else "N", str(b["pid"] or "N/A")]
        for b in s["bricks"]
    ]
    nbd = [n for n in s.get("nbd", []) if n.get("enabled")]
    cells += [
        [
            f"NBD Server on {n['host']}",
            str(n["port"] or "N/A"),
            "Y" if n["serving"] else "N",
            str(n["pid"] or "N/A"),
        ]
        for n in nbd
    ]
    header = ["mortar process", "TCP Port", "Online", "Pid"]
    text = f"Status of volume: {s['volume']}\n" + table(cells, header)
    errors = [f"Brick {b['name']}: {b['error']}" for b in s["bricks"] if b.get("error") and not b["online"]]
    if errors:
        text += "\n\nOffline bricks:\n" + "\n".join(errors)
    down = [
        f"NBD Server on {n['host']}: {n['error'] or 'not serving this volume yet'}"
        for n in nbd
        if not n["serving"]
    ]
    if down:
        text += "\n\nNBD servers not serving it:\n" + "\n".join(down)
    text += nbd_urls(s["volume"], nbd)
    return text + "\n\nTask Status of Volume " + s["volume"] + "\nThere are no active volume tasks"


def nbd_urls(volume: str, nbd: list[dict[str, Any]]) -> str:
    """How QEMU reaches the volume's images through the NBD servers that serve it."""
    lines = []
    for n in nbd:
        if n["serving"] and n["port"]:
            lines.append(f"  nbd://{n['host']}:{n['port']}/{volume}/PATH")
        if n["serving"] and n["socket"]:
            lines.append(f"  nbd+unix:///{volume}/PATH?socket={n['socket']}  (on {n['host']})")
    return "\n\nNBD exports (PATH: an image file in the volume):\n" + "\n".join(lines) if lines else ""


@command(
    "volume status",
    "volume status [NAME|all] [detail]",
    "per brick: port, pid, online; with detail: disk space, inodes, file system",
    details="Facts come live from each brick's node; a node that does not answer shows its last record.",
)
def volume_status(args: list[str], ctx: Context) -> Result:
    detail = bool(args) and args[-1] == "detail"
    words = args[:-1] if detail else args
    if len(words) > 1:
        raise CliError("usage: mortar volume status [NAME|all] [detail]", status=2)
    if words and words[0] != "all":
        names = [words[0]]
    else:
        names = [v["name"] for v in api(ctx, "GET", "/v1/volumes")["volumes"] if v["status"] == "Started"]
        if not names:
            return Result(
                "No volumes present" if not words else "No started volumes present", {"volumes": []}
            )
    query = "?detail=true" if detail else ""
    statuses = [
        api(ctx, "GET", f"/v1/volumes/{_q(n)}/status{query}", what=f"volume status: {n}") for n in names
    ]
    return Result("\n\n".join(status_text(s, detail) for s in statuses), {"volumes": statuses})


@command(
    "volume volfile",
    "volume volfile NAME",
    "print the client volfile of a started volume, brick ports filled in",
    details="Save it to hand-edit a client graph: mortar volume volfile vms > vms.vol",
)
def volume_volfile(args: list[str], ctx: Context) -> Result:
    (name,) = expect(args, 1, "volume volfile NAME")
    text, headers = fetch_text(ctx, f"/v1/volumes/{_q(name)}/volfile", what=f"volume volfile: {name}")
    return Result(
        text.rstrip("\n"), {"volume": name, "revision": headers.get("X-Mortar-Revision", ""), "volfile": text}
    )
