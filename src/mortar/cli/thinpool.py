"""`mortar thinpool create|info|check ...`: the thin pool tool (`python -m mortar.thinpool`) as
mortar commands, with the CLI's conventions: `--json` everywhere, one-line errors, exit status
non-zero on failure (1 when `check` finds problems)."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import asdict
from typing import Any

from mortar.cli.command import CliError, Context, Result, command
from mortar.core.errors import FopError
from mortar.thinpool.__main__ import main as thinpool_main
from mortar.thinpool.pool import ThinPool

CREATE = (
    "thinpool create DEVICE [--size SIZE] [--block-size SIZE] [--metadata FILE] "
    "[--low-water BLOCKS] [--force]"
)
INFO = "thinpool info DEVICE [--metadata FILE]"
CHECK = "thinpool check DEVICE [--metadata FILE]"


def _delegate(words: list[str], ctx: Context) -> tuple[int, str]:
    """Run the tool; (status, stdout). Its error line on stderr becomes the CLI's error."""
    out, err = io.StringIO(), io.StringIO()
    argv = words + (["--json"] if ctx.json and words[0] != "create" else [])
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = thinpool_main(argv)
        except SystemExit as exc:  # argparse's usage errors
            status = exc.code if isinstance(exc.code, int) else 2
    if status == 2:
        said = err.getvalue().strip().splitlines()
        message = said[-1] if said else "failed"
        raise CliError(message.removeprefix("error: "), status=2)
    return status, out.getvalue().rstrip("\n")


@command("thinpool create", CREATE, "make a thin pool on a file or block device (metadata beside it)")
def thinpool_create(args: list[str], ctx: Context) -> Result:
    _, text = _delegate(["create", *args], ctx)
    device = next((a for a in args if not a.startswith("-")), "")
    metadata = args[args.index("--metadata") + 1] if "--metadata" in args[:-1] else None
    try:
        with ThinPool.open(device, metadata_path=metadata, commit_interval=0, read_only=True) as pool:
            stats = asdict(pool.stats())
    except FopError as exc:
        raise CliError(f"{device}: {exc.message}") from None
    return Result(text, {"device": device, "pool": stats})


@command("thinpool info", INFO, "show a thin pool's usage and its volumes")
def thinpool_info(args: list[str], ctx: Context) -> Result:
    _, text = _delegate(["info", *args], ctx)
    return Result(text, json.loads(text) if ctx.json else {})


@command("thinpool check", CHECK, "verify a thin pool's metadata (exit status 1 when it has problems)")
def thinpool_check(args: list[str], ctx: Context) -> Result:
    status, text = _delegate(["check", *args], ctx)
    data: dict[str, Any] = json.loads(text) if ctx.json else {"clean": status == 0, "problems": []}
    problems: list[str] = data["problems"] if ctx.json else (text.splitlines() if status else [])
    data["problems"] = problems
    if status == 1:
        raise CliError(f"{len(problems)} problems found:\n" + "\n".join(problems), status=1)
    return Result(text, data)
