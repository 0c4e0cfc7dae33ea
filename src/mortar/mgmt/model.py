"""What the pool's configuration store holds, as records, and where each record lives.

```
/peers/UUID                  PeerInfo: a node of the trusted pool
/volumes/NAME/info           VolumeInfo: type, bricks, options, status, version
/volumes/NAME/bricks/INDEX   BrickState: facts the owning node learnt (first start done)
/portmap/HOST/BRICKPATH      PortEntry: where a brick listens, its pid, whether it is online
```

Records are JSON so an operator can read them with `etcdctl get --prefix /volumes`. Every daemon
writes only what it owns: volume info through a pool-wide lock, brick state and port map entries
for its own bricks.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Self

PEERS = "/peers/"
VOLUMES = "/volumes/"
PORTMAP = "/portmap/"

VolumeStatus = Literal["Created", "Started", "Stopped"]
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class MgmtError(Exception):
    """A refused or failed management operation: one clear line, and the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _load(cls: type[Any], raw: bytes | str | dict[str, Any]) -> Any:
    data = json.loads(raw) if isinstance(raw, bytes | str) else raw
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


class Record:
    """JSON (de)serialisation for the dataclasses below; unknown fields are ignored (newer writers)."""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> Self:
        result: Self = _load(cls, raw)
        return result


@dataclass
class PeerInfo(Record):
    uuid: str
    hostnames: list[str]
    port: int
    etcd_client_url: str = ""
    etcd_peer_url: str = ""

    @property
    def hostname(self) -> str:
        return self.hostnames[0] if self.hostnames else self.uuid

    def key(self) -> str:
        return f"{PEERS}{self.uuid}"


@dataclass
class BrickInfo(Record):
    host: str
    path: str
    peer: str  # uuid of the node that owns the brick
    #: N of the brick's client translator `VOL-client-N`, given once and kept for the brick's life
    #: (and by a brick that replaces it): AFR's pending keys and the heal indexes are named by it
    id: int = -1
    #: K of its replica set's `VOL-replicate-K` (a DHT subvolume, named in link files), also kept
    group: int = -1

    @property
    def name(self) -> str:
        return f"{self.host}:{self.path}"


@dataclass
class VolumeInfo(Record):
    name: str
    id: str
    bricks: list[BrickInfo]
    replica_count: int = 1
    arbiter_count: int = 0
    transport: str = "tcp"
    status: VolumeStatus = "Created"
    options: dict[str, str] = field(default_factory=dict)
    version: int = 1
    username: str = ""
    password: str = ""
    #: the next brick id and replica-set id to give: ids of removed bricks are never given again
    next_brick_id: int = 0
    next_set_id: int = 0

    def __post_init__(self) -> None:
        """Records written before bricks had ids get the names they always had (by position)."""
        for i, b in enumerate(self.bricks):
            if b.id < 0:
                b.id = i
            if b.group < 0:
                b.group = i // max(1, self.replica_count)
        self.next_brick_id = max([self.next_brick_id, *(b.id + 1 for b in self.bricks)])
        self.next_set_id = max([self.next_set_id, *(b.group + 1 for b in self.bricks)])

    def take_brick_id(self) -> int:
        self.next_brick_id += 1
        return self.next_brick_id - 1

    def take_set_id(self) -> int:
        self.next_set_id += 1
        return self.next_set_id - 1

    def client_name(self, index: int) -> str:
        """The client translator of brick `index` (its AFR pending key is `trusted.afr.` + this)."""
        return f"{self.name}-client-{self.bricks[index].id}"

    def subvolume_name(self, index: int) -> str:
        """The DHT subvolume brick `index` belongs to: its replica set, or itself when not replicated."""
        if self.replica_count == 1:
            return self.client_name(index)
        return f"{self.name}-replicate-{self.bricks[index].group}"

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> VolumeInfo:
        data = json.loads(raw) if isinstance(raw, bytes | str) else dict(raw)
        data["bricks"] = [BrickInfo.from_json(b) for b in data.get("bricks", [])]
        result: VolumeInfo = _load(cls, data)
        return result

    @classmethod
    def new(
        cls, name: str, bricks: list[BrickInfo], replica: int, arbiter: int, transport: str
    ) -> VolumeInfo:
        volume_id = str(uuid.uuid4())
        password = secrets.token_hex(16)
        return cls(
            name, volume_id, bricks, replica, arbiter, transport, username=volume_id, password=password
        )

    def key(self) -> str:
        return info_key(self.name)

    @property
    def type(self) -> str:
        sets = len(self.bricks) // self.replica_count
        if self.replica_count == 1:
            return "Distribute"
        return "Replicate" if sets == 1 else "Distributed-Replicate"

    @property
    def brick_count_text(self) -> str:
        """GlusterFS's `Number of Bricks` line: `3`, `1 x 3 = 3`, `2 x (2 + 1) = 6`."""
        n = len(self.bricks)
        if self.replica_count == 1:
            return str(n)
        per = (
            f"({self.replica_count - self.arbiter_count} + {self.arbiter_count})"
            if self.arbiter_count
            else str(self.replica_count)
        )
        return f"{n // self.replica_count} x {per} = {n}"

    def is_arbiter(self, index: int) -> bool:
        return bool(self.arbiter_count) and index % self.replica_count == self.replica_count - 1

    def public(self) -> dict[str, Any]:
        """The facts `volume info` shows (no credentials)."""
        return {
            "name": self.name,
            "id": self.id,
            "type": self.type,
            "status": self.status,
            "replica_count": self.replica_count,
            "arbiter_count": self.arbiter_count,
            "distribute_count": len(self.bricks) // self.replica_count,
            "brick_count": len(self.bricks),
            "number_of_bricks": self.brick_count_text,
            "transport": self.transport,
            "bricks": [
                {
                    "index": i,
                    "name": b.name,
                    "host": b.host,
                    "path": b.path,
                    "peer": b.peer,
                    "arbiter": self.is_arbiter(i),
                    "client": self.client_name(i),
                }
                for i, b in enumerate(self.bricks)
            ],
            "options": dict(sorted(self.options.items())),
            "version": self.version,
        }


@dataclass
class BrickState(Record):
    initialized: bool = False


@dataclass
class PortEntry(Record):
    """A brick's listening endpoint as its owning node last saw it (the port stays when it goes down)."""

    volume: str
    port: int = 0
    socket: str = ""
    pid: int = 0
    online: bool = False
    node: str = ""
    error: str = ""


def info_key(volume: str) -> str:
    return f"{VOLUMES}{volume}/info"


def brick_state_key(volume: str, index: int) -> str:
    return f"{VOLUMES}{volume}/bricks/{index}"


def portmap_key(host: str, path: str) -> str:
    return f"{PORTMAP}{host}{path}"


def check_volume_name(name: str) -> str:
    if not NAME_RE.match(name) or name in ("all", "help"):
        raise MgmtError(
            f"bad volume name {name!r}: use up to 64 letters, digits, '_', '-' or '.', "
            "not starting with '-' or '.'"
        )
    return name
