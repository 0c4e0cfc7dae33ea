"""`mortar volume add-brick | remove-brick | replace-brick | rebalance`, in GlusterFS's grammar."""

from __future__ import annotations

import urllib.parse
from typing import Any

from mortar.cli.command import CliError, Context, Result, command
from mortar.cli.remote import api, table

ADD = "volume add-brick NAME [replica N [arbiter 1]] HOST:/PATH... [force]"
REMOVE = "volume remove-brick NAME [replica N] HOST:/PATH... start | status | stop | commit [force] | force"
REPLACE = "volume replace-brick NAME HOST:/OLD HOST:/NEW commit force"
REBALANCE = "volume rebalance NAME [fix-layout] start [force] | status | stop"


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _number(synopsis: str, value: str | None) -> int:
    if value is None or not value.isdigit():
        raise CliError(f"usage: mortar {synopsis} (a number is needed)", status=2)
    return int(value)


def _bricks_and_counts(words: list[str], synopsis: str) -> dict[str, Any]:
    req: dict[str, Any] = {"bricks": []}
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("replica", "arbiter"):
            if req["bricks"]:
                raise CliError(f"'{word}' must come before the bricks", status=2)
            req[word] = _number(synopsis, words[i + 1] if i + 1 < len(words) else None)
            i += 2
        elif ":" in word:
            req["bricks"].append(word)
            i += 1
        else:
            raise CliError(f"unexpected {word!r} (usage: mortar {synopsis})", status=2)
    if not req["bricks"]:
        raise CliError(f"usage: mortar {synopsis} (no bricks given)", status=2)
    return req


def format_task(task: dict[str, Any] | None) -> str:
    if not task:
        return "no task has run on this volume"
    rows = [[
        task["host"], str(task["files_moved"]), str(task["bytes_moved"]), str(task["files_scanned"]),
        str(task["files_failed"]), str(task["files_skipped"]), task["state"], f"{task['elapsed']:.1f}s",
    ]]  # fmt: skip
    text = table(rows, ["Node", "Rebalanced-files", "size", "scanned", "failures", "skipped", "status",
                        "run time"])  # fmt: skip
    extra = []
    if task["kind"] == "remove-brick":
        extra.append(f"Bricks: {', '.join(task['bricks'])}; drained: {'yes' if task['drained'] else 'no'}")
        for sub, n in task.get("remaining", {}).items():
            extra.append(f"  {sub}: {n} file(s) still there")
    for reason, n in {**task.get("skipped", {}), **task.get("failed", {})}.items():
        extra.append(f"  {n} file(s): {reason}")
    if task.get("error"):
        extra.append(f"Error: {task['error']}")
    return "\n".join([text, *extra])


@command(
    "volume add-brick",
    ADD,
    "add bricks to a volume while it serves (new replica sets, or a higher replica count)",
    details="""
Bricks come in whole replica sets. 'replica N' with N above the volume's count on a volume of one
set adds copies (a plain 1-brick volume becomes replicate): a full heal fills them. Running
clients switch to the new graph live. Spread existing files over new sets with
'mortar volume rebalance NAME start'.
Example: mortar volume add-brick vms h4:/bricks/vms h5:/bricks/vms
""",
)
def volume_add_brick(args: list[str], ctx: Context) -> Result:
    if not args:
        raise CliError(f"usage: mortar {ADD}", status=2)
    words = args[1:]
    force = bool(words) and words[-1] == "force"
    req = _bricks_and_counts(words[:-1] if force else words, ADD)
    req["force"] = force
    reply = api(ctx, "POST", f"/v1/volumes/{_q(args[0])}/bricks", req, what="volume add-brick")
    text = "volume add-brick: success"
    if reply.get("failed"):
        text += "\n" + "\n".join(f"warning: brick {f}" for f in reply["failed"])
    return Result(text, reply)


@command(
    "volume remove-brick",
    REMOVE,
    "drain bricks onto the others (start), follow (status), stop, then commit",
    details="""
'start' migrates every file off the bricks while the volume serves (new files go elsewhere);
'commit' removes them once drained, and is refused before unless 'force', which reports how many
files were still on them (and are no longer in the volume). Remove whole replica sets, or lower the
replica count: 'remove-brick NAME replica N BRICK... force' drops the same number of copies from
every replica set (nothing moves: the copies left hold the data).
""",
)
def volume_remove_brick(args: list[str], ctx: Context) -> Result:
    if len(args) < 2:
        raise CliError(f"usage: mortar {REMOVE}", status=2)
    words = args[1:]
    force = words[-1] == "force"
    if force:
        words = words[:-1]
        if words and words[-1] not in ("start", "status", "stop", "commit"):
            words = [*words, "commit"]  # GlusterFS's `remove-brick NAME [replica N] BRICK... force`
    if not words or words[-1] not in ("start", "status", "stop", "commit"):
        raise CliError(f"usage: mortar {REMOVE}", status=2)
    action = words[-1]
    req = _bricks_and_counts(words[:-1], REMOVE) if action not in ("status", "stop") or words[:-1] else {}
    req.update(action=action, force=force)
    reply = api(ctx, "POST", f"/v1/volumes/{_q(args[0])}/bricks/remove", req, what="volume remove-brick")
    if action in ("status", "stop"):
        return Result(format_task(reply.get("task")), reply)
    return Result(reply.get("message", f"volume remove-brick {action}: success"), reply)


@command(
    "volume replace-brick",
    REPLACE,
    "swap a brick of a replicated volume for a new empty one; heal fills it",
)
def volume_replace_brick(args: list[str], ctx: Context) -> Result:
    if len(args) != 5 or args[3:] != ["commit", "force"]:
        raise CliError(f"usage: mortar {REPLACE}", status=2)
    body = {"old": args[1], "new": args[2], "force": True}
    reply = api(ctx, "POST", f"/v1/volumes/{_q(args[0])}/bricks/replace", body, what="volume replace-brick")
    return Result("volume replace-brick: success: " + reply.get("message", ""), reply)


@command(
    "volume rebalance",
    REBALANCE,
    "spread files over the volume's bricks (a long task run by one host; status from any)",
)
def volume_rebalance(args: list[str], ctx: Context) -> Result:
    if len(args) < 2:
        raise CliError(f"usage: mortar {REBALANCE}", status=2)
    name, words = args[0], args[1:]
    fix_layout = words[0] == "fix-layout"
    if fix_layout:
        words = words[1:]
    force = words[-1:] == ["force"]
    if force:
        words = words[:-1]
    if words not in (["start"], ["status"], ["stop"]) or ((fix_layout or force) and words != ["start"]):
        raise CliError(f"usage: mortar {REBALANCE}", status=2)
    body = {"action": words[0], "fix_layout": fix_layout, "force": force}
    reply = api(ctx, "POST", f"/v1/volumes/{_q(name)}/rebalance", body, what="volume rebalance")
    if words[0] == "start":
        return Result(
            f"volume rebalance: {name}: success: Rebalance on {name} has been started successfully. "
            "Use rebalance status command to check status of the rebalance process.\n"
            f"ID: {reply['task']['id']}",
            reply,
        )
    return Result(format_task(reply.get("task")), reply)
