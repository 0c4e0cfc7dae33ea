"""How CLI commands reach the node daemon: `--remote-host`, else `$MORTAR_HOST`, else this host."""

from __future__ import annotations

import os
from typing import Any

from mortar.cli.command import CliError, Context
from mortar.mgmt.model import MgmtError
from mortar.mgmt.rest import DEFAULT_PORT, call_sync, request_sync


def target(ctx: Context) -> tuple[str, int]:
    text = ctx.remote_host or os.environ.get("MORTAR_HOST") or "localhost"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    if port_text and not port_text.isdigit():
        raise CliError(f"bad --remote-host {text!r}: expected HOST[:PORT]", status=2)
    return ("127.0.0.1" if host == "localhost" else host), int(port_text or DEFAULT_PORT)


def api(
    ctx: Context, method: str, path: str, body: dict[str, Any] | None = None, *, what: str = ""
) -> dict[str, Any]:
    """Call the daemon; its refusal becomes the command's one-line error (`WHAT: failed: REASON`)."""
    host, port = target(ctx)
    try:
        return call_sync(host, port, method, path, body)
    except MgmtError as exc:
        raise CliError(f"{what}: failed: {exc}" if what else str(exc)) from None


def fetch_text(ctx: Context, path: str, *, what: str) -> tuple[str, dict[str, str]]:
    """A non-JSON answer (a volfile) and its headers."""
    host, port = target(ctx)
    try:
        raw, headers = request_sync(host, port, "GET", path, timeout=30)
    except MgmtError as exc:
        raise CliError(f"{what}: failed: {exc}") from None
    return raw.decode(), headers


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
