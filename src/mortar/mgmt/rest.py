"""Calls to a node daemon's HTTP/JSON API, from another daemon (asyncio) or from the CLI (blocking).

Errors come back as `MgmtError` carrying the daemon's own one-line message and HTTP status; a daemon
that cannot be reached at all is status 502 with the reason.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import aiohttp

from mortar.mgmt.model import MgmtError

DEFAULT_PORT = 24100


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _error_text(body: bytes, status: int) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:300] or f"HTTP {status}"
    return str(data.get("error") or data) if isinstance(data, dict) else str(data)


class PeerClient:
    """One aiohttp session for all calls this daemon makes to others."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def call(
        self,
        host: str,
        port: int,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float = 10.0,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        url = base_url(host, port) + path
        try:
            async with self.session().request(
                method, url, json=body, params=params, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise MgmtError(_error_text(raw, resp.status), resp.status)
                data: dict[str, Any] = json.loads(raw) if raw else {}
                return data
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or str(exc.os_error)
            raise MgmtError(f"{host}:{port} is not reachable ({reason.lower()})", 502) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            raise MgmtError(f"{host}:{port} is not reachable ({reason})", 502) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def request_sync(
    host: str,
    port: int,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    timeout: float = 120.0,
) -> tuple[bytes, dict[str, str]]:
    """A blocking call (the CLI): the raw answer and its headers, or MgmtError."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base_url(host, port) + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raise MgmtError(_error_text(exc.read(), exc.code), exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise MgmtError(
            f"cannot reach the node daemon at {host}:{port} ({reason}); is mortard running?", 502
        ) from None


def call_sync(
    host: str,
    port: int,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """A blocking JSON call: returns the JSON answer or raises MgmtError."""
    raw, _ = request_sync(host, port, method, path, body, timeout=timeout)
    result: dict[str, Any] = json.loads(raw) if raw else {}
    return result
