"""`mortar volume heal NAME ...`: trigger heals, show what needs heal, resolve split-brain."""

from __future__ import annotations

import time
import urllib.parse
from typing import Any

from mortar.cli.command import CliError, Context, Result, command
from mortar.cli.remote import api

HEAL = (
    "volume heal NAME [enable | disable | full | info [summary | split-brain] | statistics | "
    "split-brain {bigger-file FILE | latest-mtime FILE | latest-ctime FILE | source-brick HOST:/PATH [FILE]}]"
)


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _usage(extra: str = "") -> CliError:
    return CliError(f"usage: mortar {HEAL}" + (f" ({extra})" if extra else ""), status=2)


def _when(t: float) -> str:
    return time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(t)) if t else "-"


def format_info(data: dict[str, Any]) -> str:
    mode = data.get("mode", "all")
    out: list[str] = []
    for row in data["bricks"]:
        out.append(f"Brick {row['brick']}")
        if mode != "summary":
            for e in row.get("entries", []):
                mark = " - Is in split-brain" if e["split_brain"] and mode == "all" else ""
                out.append(f"{e['path']}{mark}")
        out.append(f"Status: {row['status']}")
        count = row.get("count")
        shown = "-" if count is None else str(count)
        if mode == "summary":
            sb = row.get("split_brain_count", 0)
            pending = "-" if count is None else str(count - sb)
            out += [
                f"Total Number of entries: {shown}",
                f"Number of entries in heal pending: {pending}",
                f"Number of entries in split-brain: {'-' if count is None else sb}",
            ]
        elif mode == "split-brain":
            out.append(f"Number of entries in split-brain: {'-' if count is None else len(row['entries'])}")
        else:
            out.append(f"Number of entries: {shown}")
        out.append("")
    return "\n".join(out).rstrip("\n")


def format_statistics(data: dict[str, Any]) -> str:
    out = [f"Gathering crawl statistics on volume {data['volume']} has been successful"]
    for host in data["hosts"]:
        out += ["-" * 48, f"Crawl statistics for host {host['host']}"]
        if host.get("error"):
            out.append(f"  not available: {host['error']}")
        for c in host["crawls"]:
            out += [
                "",
                f"Starting time of crawl: {_when(c['start'])}",
                f"Ending time of crawl: {'In progress' if c.get('in_progress') else _when(c['end'])}",
                f"Type of crawl: {c['kind'].upper()} ({c['reason']})",
                f"No. of entries healed: {c['healed']}",
                f"No. of entries in split-brain: {c['split_brain']}",
                f"No. of heal failed entries: {c['failed']}",
                f"Bytes healed: {c['bytes']}",
            ]
    return "\n".join(out)


def _split_brain(name: str, words: list[str], ctx: Context) -> Result:
    if not words:
        raise _usage("split-brain needs a policy")
    policy, rest = words[0], words[1:]
    body: dict[str, Any] = {"policy": policy}
    if policy == "source-brick":
        if not rest or len(rest) > 2 or ":" not in rest[0]:
            raise _usage("source-brick HOST:/PATH [FILE]")
        body["source"] = rest[0]
        if len(rest) == 2:
            body["file"] = rest[1]
    elif policy in ("bigger-file", "latest-mtime", "latest-ctime", "majority"):
        if len(rest) != 1:
            raise _usage(f"{policy} FILE")
        body["file"] = rest[0]
    else:
        raise _usage(f"unknown split-brain policy {policy!r}")
    reply = api(ctx, "POST", f"/v1/volumes/{_q(name)}/heal/split-brain", body, what="volume heal")
    lines = [f"Healed {r['file']} (source: {r['source']})." for r in reply.get("resolved", [])]
    return Result("\n".join(lines) or "Nothing was in split-brain.", reply)


@command(
    "volume heal",
    HEAL,
    "heal a replicated volume now, show what needs heal, resolve split-brain",
    details="""
'heal NAME' asks every host's self-heal daemon to heal what its bricks' indexes list, now; 'full'
crawls every directory. 'info' lists per brick the entries needing heal (paths where the brick can
tell, else <gfid:...>), 'info summary' only counts, 'info split-brain' only split-brain entries.
'statistics' shows each host's recent crawls. 'enable'/'disable' set cluster.self-heal-daemon.
split-brain: FILE is a path in the volume or gfid:UUID; 'source-brick HOST:/PATH' without FILE
resolves every split-brain entry with that brick's copy.
Example: mortar volume heal vms split-brain bigger-file /images/disk.img
""",
)
def volume_heal(args: list[str], ctx: Context) -> Result:
    if not args:
        raise _usage()
    name, words = args[0], args[1:]
    base = f"/v1/volumes/{_q(name)}"
    if not words or words == ["full"]:
        full = bool(words)
        reply = api(ctx, "POST", f"{base}/heal", {"full": full}, what="volume heal")
        kind = "full" if full else "index"
        text = f"Launching heal operation to perform {kind} self heal on volume {name} has been successful"
        for host, err in reply.get("failed", {}).items():
            text += f"\n{host}: {err}"
        return Result(text + "\nUse heal info commands to check status.", reply)
    if words[0] in ("enable", "disable") and len(words) == 1:
        value = "on" if words[0] == "enable" else "off"
        body = {"options": {"cluster.self-heal-daemon": value}}
        reply = api(ctx, "POST", f"{base}/options", body, what="volume heal")
        return Result(f"{words[0].capitalize()} heal on volume {name} has been successful", reply)
    if words[0] == "info" and len(words) <= 2:
        mode = words[1] if len(words) == 2 else ""
        if mode not in ("", "summary", "split-brain"):
            raise _usage("info takes summary or split-brain")
        query = f"?mode={mode}" if mode else ""
        reply = api(ctx, "GET", f"{base}/heal/info{query}", what="volume heal")
        return Result(format_info(reply), reply)
    if words == ["statistics"]:
        reply = api(ctx, "GET", f"{base}/heal/statistics", what="volume heal")
        return Result(format_statistics(reply), reply)
    if words[0] == "split-brain":
        return _split_brain(name, words[1:], ctx)
    raise _usage(f"unexpected {' '.join(words)!r}")
