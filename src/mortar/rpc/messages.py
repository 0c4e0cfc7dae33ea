"""Control messages: the handshake, its answer and brick events, as records with strict decoding.

They are msgpack maps (not positional lists like fop meta) so either side can add a field without
breaking an older peer; unknown keys are ignored, known keys are type-checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mortar.core.fops import Buffer
from mortar.rpc.codec import check_int, check_str, check_xdata, pack, unpack
from mortar.rpc.frame import VERSION, ProtocolError


def _map(meta: Buffer, what: str) -> dict[str, Any]:
    raw = unpack(meta)
    if type(raw) is not dict:
        raise ProtocolError(f"{what}: expected a map")
    return raw


def _opt_str(raw: dict[str, Any], key: str) -> str | None:
    v = raw.get(key)
    return None if v is None else check_str(v, key)


@dataclass(frozen=True, slots=True)
class Handshake:
    """First request of a connection: which brick the client wants, who it is, its credentials."""

    subvolume: str
    client_uid: str
    version: int = VERSION
    username: str | None = None
    password: str | None = None

    def encode(self) -> bytes:
        return pack(
            {
                "version": self.version,
                "subvolume": self.subvolume,
                "client-uid": self.client_uid,
                "username": self.username,
                "password": self.password,
            }
        )

    @classmethod
    def decode(cls, meta: Buffer) -> Handshake:
        raw = _map(meta, "handshake")
        return cls(
            subvolume=check_str(raw.get("subvolume"), "subvolume"),
            client_uid=check_str(raw.get("client-uid"), "client-uid"),
            version=check_int(raw.get("version"), "version"),
            username=_opt_str(raw, "username"),
            password=_opt_str(raw, "password"),
        )


@dataclass(frozen=True, slots=True)
class HandshakeReply:
    """The server accepted: the brick it will serve (a refusal is an error reply instead) and, on a
    brick's local socket, that socket's address and the brick's TCP port, so a client knows it
    reached the very server its volfile names."""

    brick: str
    version: int = VERSION
    local_path: str | None = None
    port: int | None = None

    def encode(self) -> bytes:
        raw: dict[str, Any] = {"brick": self.brick, "version": self.version}
        if self.local_path is not None:
            raw["local-path"] = self.local_path
        if self.port is not None:
            raw["port"] = self.port
        return pack(raw)

    @classmethod
    def decode(cls, meta: Buffer) -> HandshakeReply:
        raw = _map(meta, "handshake reply")
        brick = check_str(raw.get("brick"), "brick")
        version = check_int(raw.get("version"), "version")
        port = raw.get("port")
        return cls(
            brick=brick,
            version=version,
            local_path=_opt_str(raw, "local-path"),
            port=None if port is None else check_int(port, "port"),
        )


def encode_upcall(data: dict[str, Any]) -> bytes:
    """An UPCALL event: a map of facts from the brick (invalidations, lock contention)."""
    return pack(data)


def decode_upcall(meta: Buffer) -> dict[str, Any]:
    data = check_xdata(unpack(meta))
    if data is None:
        raise ProtocolError("upcall: expected a map")
    return data
