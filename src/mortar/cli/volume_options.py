"""`mortar volume set|reset|get`: volume options by their GlusterFS-style keys, and option groups."""

from __future__ import annotations

import urllib.parse

from mortar.cli.command import CliError, Context, Result, command
from mortar.cli.remote import api, table


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


@command(
    "volume set",
    "volume set NAME KEY VALUE [KEY VALUE...] | volume set NAME group GROUP",
    "set volume options (validated against the translator that uses them), or apply an option group",
    details="""
Keys are GlusterFS's (network.ping-timeout, performance.io-thread-count, cluster.quorum-type,
storage.reserve, auth.allow...); 'mortar volume get NAME all' lists them with their meaning.
An unknown key is refused with the nearest valid one. Groups are key=value files: 'virt' ships
with mortar (options for VM images); more can be dropped in the daemon's WORKDIR/groups/.
Clients and bricks pick changes up live.
Example: mortar volume set vms group virt
""",
)
def volume_set(args: list[str], ctx: Context) -> Result:
    usage = "usage: mortar volume set NAME KEY VALUE [KEY VALUE...] | volume set NAME group GROUP"
    if len(args) < 3 or (len(args) - 1) % 2:
        raise CliError(usage, status=2)
    name, pairs = args[0], args[1:]
    body: dict[str, object] = {}
    options = {}
    for key, value in zip(pairs[::2], pairs[1::2], strict=True):
        if key == "group":
            body["group"] = value
        else:
            options[key] = value
    body["options"] = options
    reply = api(ctx, "POST", f"/v1/volumes/{_q(name)}/options", body, what="volume set")
    return Result("volume set: success", {"volume": name, **reply})


@command(
    "volume reset",
    "volume reset NAME [KEY|all]",
    "put one option (or all) back to its default",
)
def volume_reset(args: list[str], ctx: Context) -> Result:
    if len(args) not in (1, 2):
        raise CliError("usage: mortar volume reset NAME [KEY|all]", status=2)
    name = args[0]
    key = args[1] if len(args) == 2 and args[1] != "all" else None
    path = f"/v1/volumes/{_q(name)}/options" + (f"/{_q(key)}" if key else "")
    reply = api(ctx, "DELETE", path, what="volume reset")
    return Result("volume reset: success: reset volume successful", {"volume": name, **reply})


@command(
    "volume get",
    "volume get NAME KEY|all",
    "an option's value in effect, and whether it was set or is the default",
)
def volume_get(args: list[str], ctx: Context) -> Result:
    if len(args) != 2:
        raise CliError("usage: mortar volume get NAME KEY|all", status=2)
    name, key = args
    path = f"/v1/volumes/{_q(name)}/options" + ("" if key == "all" else f"/{_q(key)}")
    rows = api(ctx, "GET", path, what="volume get")["options"]
    text = table(
        [[r["key"], "(unavailable)" if r["value"] is None else str(r["value"]), r["source"]] for r in rows],
        ["Option", "Value", "Source"],
    )
    return Result(text, {"volume": name, "options": rows})
