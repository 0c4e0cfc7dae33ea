"""volgen: the brick and client volfiles of a volume, generated from its description.

Graphs follow glusterd's shapes so a GlusterFS operator recognises them:

- brick: storage/posix -> features/locks -> features/index -> performance/io-threads
  -> debug/io-stats (named after the brick) -> protocol/server
- client: protocol/client per brick -> cluster/replicate per replica set -> cluster/distribute
  (when there is more than one subvolume) -> [performance/io-threads with client-io-threads]
  -> debug/io-stats (named after the volume)

Option values arrive already mapped from `volume set` keys to translator options (see `volopts`);
each translator type's options apply wherever that type appears, brick side or client side.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from mortar.graph.volfile import VolumeSpec, dump


def dashed(path: str) -> str:
    """glusterd's spelling of a brick path in file names: `/data/b1` -> `data-b1`."""
    return path.strip("/").replace("/", "-") or "root"


def bind_address(host: str) -> str:
    """Bricks listen on their host's address when it is an IP literal, on every address otherwise."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return "127.0.0.1" if host == "localhost" else "0.0.0.0"


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
    #: addresses allowed to reach the bricks (`auth.allow`); clients also need the volume's login
    auth_allow: str = "*"
    username: str = ""
    password: str = ""
    #: put performance/io-threads in the client graph (`performance.client-io-threads`)
    client_io_threads: bool = False
    #: what serves the bricks: "posix" (directories) or "bd" (thin pools, `volume create ... device lv`)
    brick_type: str = "posix"
    #: storage/bd options for every brick of a bd volume (backend, pool-size, block-size, vg, thinpool)
    bd_options: dict[str, str] = field(default_factory=dict)

    def brick_name(self, index: int) -> str:
        """The name clients ask for in their handshake (`remote-subvolume`)."""
        return f"{self.name}-brick-{index}"

    def client_name(self, index: int) -> str:
        return f"{self.name}-client-{index}"

    def brick_volfile_name(self, index: int) -> str:
        """glusterd's file name for a brick volfile: `VOL.HOST.PATH-DASHED.vol`."""
        brick = self.bricks[index]
        return f"{self.name}.{brick.host}.{dashed(brick.path)}.vol"


def _opts(desc: VolumeDescription, xl_type: str, base: dict[str, str]) -> dict[str, str]:
    return {**base, **desc.xlator_options.get(xl_type, {})}


def _bd_storage(
    desc: VolumeDescription, brick: Brick, v: str, create: bool
) -> tuple[VolumeSpec, dict[str, str]]:
    """storage/bd for a brick of a bd volume (its path is a pool directory), and features/index's
    options: the index lives in the pool directory, as there is no brick directory to find."""
    bd = {"pool": brick.path, "volume-id": desc.volume_id, **desc.bd_options}
    if create:
        bd["pool-create"] = "on"
    index = {"index-base": f"{brick.path.rstrip('/')}/.mortar/indices"}
    return VolumeSpec(f"{v}-bd", "storage/bd", _opts(desc, "storage/bd", bd)), index


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
        server["transport.socket.bind-address"] = bind_address(brick.host)
    if desc.username:
        server[f"auth.login.{top}.allow"] = desc.username
        server[f"auth.login.{desc.username}.password"] = desc.password
    storage = VolumeSpec(f"{v}-posix", "storage/posix", _opts(desc, "storage/posix", posix))
    index_opts: dict[str, str] = {}
    if desc.brick_type == "bd":
        storage, index_opts = _bd_storage(desc, brick, v, create)
    specs = [
        storage,
        VolumeSpec(f"{v}-locks", "features/locks", _opts(desc, "features/locks", {}), [storage.name]),
        VolumeSpec(f"{v}-index", "features/index", _opts(desc, "features/index", index_opts), [f"{v}-locks"]),
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
    if desc.client_io_threads:
        name = f"{desc.name}-io-threads"
        specs.append(
            VolumeSpec(name, "performance/io-threads", _opts(desc, "performance/io-threads", {}), subvols)
        )
        subvols = [name]
    specs.append(VolumeSpec(desc.name, "debug/io-stats", _opts(desc, "debug/io-stats", {}), subvols))
    return dump(specs)
