"""volgen: the brick and client volfiles of a volume, generated from its description.

Graphs follow glusterd's shapes so a GlusterFS operator recognises them:

- brick: storage/posix -> features/locks -> features/index -> performance/io-threads
  -> debug/io-stats (named after the brick) -> protocol/server
- client: protocol/client per brick -> cluster/replicate per replica set -> cluster/distribute
  (when there is more than one subvolume) -> debug/io-stats (named after the volume)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mortar.graph.volfile import VolumeSpec, dump


@dataclass(frozen=True, slots=True)
class Brick:
    """One brick: where it lives and, once started, where its server listens."""

    host: str
    path: str
    port: int = 0
    socket_path: str = ""


@dataclass(slots=True)
class VolumeDescription:
    """What volgen needs to know about a volume."""

    name: str
    volume_id: str
    bricks: list[Brick]
    replica_count: int = 1
    arbiter_count: int = 0
    transport: str = "tcp"
    #: translator type -> option -> value, already mapped from `volume set` keys
    xlator_options: dict[str, dict[str, str]] = field(default_factory=dict)
    auth_allow: str = "127.0.0.1"
    username: str = ""
    password: str = ""

    def brick_name(self, index: int) -> str:
        """The name clients ask for in their handshake (`remote-subvolume`)."""
        return f"{self.name}-brick-{index}"

    def client_name(self, index: int) -> str:
        return f"{self.name}-client-{index}"


def _opts(desc: VolumeDescription, xl_type: str, base: dict[str, str]) -> dict[str, str]:
    return {**base, **desc.xlator_options.get(xl_type, {})}


def brick_volfile(desc: VolumeDescription, index: int, *, create: bool = False) -> str:
    """The volfile `mortar-brick` serves brick `index` from; `create` stamps a new brick directory."""
    brick = desc.bricks[index]
    top = desc.brick_name(index)
    v = f"{desc.name}-{index}"
    posix = {"directory": brick.path, "volume-id": desc.volume_id}
    if create:
        posix["brick-create"] = "on"
    server: dict[str, str] = {"transport-type": desc.transport, f"auth.addr.{top}.allow": desc.auth_allow}
    if desc.transport == "unix":
        server["transport.socket.listen-path"] = brick.socket_path
    else:
        server["transport.socket.listen-port"] = str(brick.port)
        server["transport.socket.bind-address"] = (
            "0.0.0.0" if brick.host not in ("127.0.0.1", "localhost") else "127.0.0.1"
        )
    if desc.username:
        server[f"auth.login.{top}.allow"] = desc.username
        server[f"auth.login.{desc.username}.password"] = desc.password
    specs = [
        VolumeSpec(f"{v}-posix", "storage/posix", _opts(desc, "storage/posix", posix)),
        VolumeSpec(f"{v}-locks", "features/locks", _opts(desc, "features/locks", {}), [f"{v}-posix"]),
        VolumeSpec(f"{v}-index", "features/index", _opts(desc, "features/index", {}), [f"{v}-locks"]),
        VolumeSpec(
            f"{v}-io-threads",
            "performance/io-threads",
            _opts(desc, "performance/io-threads", {}),
            [f"{v}-index"],
        ),
        VolumeSpec(top, "debug/io-stats", _opts(desc, "debug/io-stats", {}), [f"{v}-io-threads"]),
        VolumeSpec(f"{v}-server", "protocol/server", _opts(desc, "protocol/server", server), [top]),
    ]
    return dump(specs)


def client_volfile(desc: VolumeDescription) -> str:
    """The volfile clients build their graph from; bricks must carry their ports (or sockets)."""
    specs: list[VolumeSpec] = []
    for i, brick in enumerate(desc.bricks):
        opts = {
            "remote-host": brick.host,
            "remote-subvolume": desc.brick_name(i),
            "transport-type": desc.transport,
        }
        if desc.transport == "unix":
            opts["transport.socket.connect-path"] = brick.socket_path
        else:
            opts["remote-port"] = str(brick.port)
        if desc.username:
            opts["username"], opts["password"] = desc.username, desc.password
        specs.append(VolumeSpec(desc.client_name(i), "protocol/client", _opts(desc, "protocol/client", opts)))
    subvols = [s.name for s in specs]
    if desc.replica_count > 1:
        sets = [subvols[i : i + desc.replica_count] for i in range(0, len(subvols), desc.replica_count)]
        subvols = []
        for k, members in enumerate(sets):
            name = f"{desc.name}-replicate-{k}"
            afr = {
                "volume-name": desc.name,
                "afr-pending-xattr": ",".join(members),
                "arbiter-count": str(desc.arbiter_count),
            }
            specs.append(
                VolumeSpec(name, "cluster/replicate", _opts(desc, "cluster/replicate", afr), members)
            )
            subvols.append(name)
    if len(subvols) > 1:
        specs.append(
            VolumeSpec(
                f"{desc.name}-dht", "cluster/distribute", _opts(desc, "cluster/distribute", {}), subvols
            )
        )
        subvols = [f"{desc.name}-dht"]
    specs.append(VolumeSpec(desc.name, "debug/io-stats", _opts(desc, "debug/io-stats", {}), subvols))
    return dump(specs)
