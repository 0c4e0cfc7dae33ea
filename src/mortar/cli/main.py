"""`mortar`: the command line, in GlusterFS's grammar (`mortar volume create NAME ...`)."""

from __future__ import annotations

import json
import sys

from mortar import __version__
from mortar.cli import (  # noqa: F401
    bd,
    bricks,
    heal,
    image,
    mount,
    nbd,
    peer,
    thinpool,
    volfile,
    volume,
    volume_options,
)
from mortar.cli.command import COMMANDS, CliError, Context, find

USAGE = """usage: mortar [--json] [--remote-host HOST[:PORT]] COMMAND [ARGS...]
       mortar help [COMMAND...]

Global options:
  --json                     print results as JSON (every command)
  --remote-host HOST[:PORT]  talk to the node daemon on HOST instead of this host
  --version                  print mortar's version

Commands:
"""


def _overview() -> str:
    width = max(len(c.synopsis) for c in COMMANDS)
    rows = [f"  {c.synopsis:<{width}}  {c.summary}" for c in sorted(COMMANDS, key=lambda c: c.words)]
    return USAGE + "\n".join(rows) + "\n"


def _parse_globals(argv: list[str]) -> tuple[Context, list[str]]:
    ctx = Context()
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--json":
            ctx.json = True
        elif arg == "--remote-host":
            if i + 1 >= len(argv):
                raise CliError("--remote-host needs HOST[:PORT]", status=2)
            ctx.remote_host = argv[i + 1]
            i += 1
        elif arg.startswith("--remote-host="):
            ctx.remote_host = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return ctx, rest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        ctx, tokens = _parse_globals(argv)
        if not tokens or tokens[0] in ("-h", "--help"):
            print(_overview(), end="")
            return 0
        if tokens[0] == "--version":
            print(f"mortar {__version__}")
            return 0
        if tokens[0] == "help":
            cmd, _ = find(tokens[1:])
            print(cmd.help() if cmd else _overview(), end="")
            return 0
        cmd, args = find(tokens)
        if cmd is None:
            raise CliError(f"unknown command {' '.join(tokens[:2])!r}; 'mortar help' lists the commands", 2)
        if "-h" in args or "--help" in args:
            print(cmd.help(), end="")
            return 0
        result = cmd.run(args, ctx)
    except CliError as exc:
        print(f"mortar: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    if ctx.json:
        print(json.dumps(result.data, indent=2, sort_keys=True))
    elif result.text:
        print(result.text)
    return 0

