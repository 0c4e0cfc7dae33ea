"""volgen: the brick and client volfiles of a volume, generated from its description.

Graphs follow glusterd's shapes so a GlusterFS operator recognises them:

- brick: storage/posix -> features/locks -> features/index -> performance/io-threads
  -> debug/io-stats (named after the brick) -> protocol/server
- client: protocol/client per brick -> cluster/replicate per replica set -> cluster/distribute
  (when there is more than one subvolume) -> [performance/io-threads with client-io-threads]
  -> [performance/nl-cache] -> [performance/md-cache] -> debug/io-stats (named after the volume)

Option values arrive already mapped from `volume set` keys to translator options (see `volopts`);
each translator type's options apply wherever that type appears, brick side or client side.
"""

from __future__ import annotations

import hashlib
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


def local_socket(desc: VolumeDescription, brick: Brick) -> str:
    """The unix socket a TCP brick also serves clients on its own host through (cheaper than TCP
    loopback). Clients on any host get it in their volfile and use it only when it answers there and
    the handshake proves it is this brick. An abstract address (`@...`): it belongs to the network
    namespace, as the brick's TCP address does, and vanishes with the process. The name is a hash of
    what makes the brick unique in the pool, as glusterd names its brick sockets."""
    key = f"{desc.volume_id}/{brick.host}:{brick.path}".encode()
    return "@mortar/brick/" + hashlib.sha256(key).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Brick:
    """One brick: where it lives and, once started, where its server listens."""

    host: str
    path: str
    port: int = 0
    socket_path: str = ""
    #: the stable N of `VOL-client-N` / `VOL-brick-N` and K of its set's `VOL-replicate-K`, kept
    #: across remove-brick and replace-brick (-1: by position, as for a volume made before ids)
    id: int = -1
    group: int = -1


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
    #: put performance/md-cache (`performance.stat-prefetch`) and performance/nl-cache
    #: (`performance.nl-cache`) at the top of the client graph
    md_cache: bool = True
    nl_cache: bool = True
    #: what serves the bricks: "posix" (directories) or "bd" (thin pools, `volume create ... device lv`)
    brick_type: str = "posix"
    #: storage/bd options for every brick of a bd volume (backend, pool-size, block-size, vg, thinpool)
    bd_options: dict[str, str] = field(default_factory=dict)
    #: bricks (`HOST:PATH`) being drained by `remove-brick ... start`: their distribute subvolumes
    #: get no new files and no range in new layouts (cluster/distribute's `decommissioned-bricks`)
    decommissioned: list[str] = field(default_factory=list)

    def brick_number(self, index: int) -> int:
        n = self.bricks[index].id
        return n if n >= 0 else index

    def brick_name(self, index: int) -> str:
        """The name clients ask for in their handshake (`remote-subvolume`)."""
        return f"{self.name}-brick-{self.brick_number(index)}"

    def client_name(self, index: int) -> str:
        return f"{self.name}-client-{self.brick_number(index)}"

    def set_name(self, first: int) -> str:
        """The replica set that begins at brick `first` (a multiple of the replica count)."""
        k = self.bricks[first].group
        return f"{self.name}-replicate-{k if k >= 0 else first // self.replica_count}"

    def subvolume_name(self, index: int) -> str:
        """The distribute subvolume brick `index` is part of."""
        if self.replica_count == 1:
            return self.client_name(index)
        return self.set_name(index - index % self.replica_count)

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
    v = f"{desc.name}-{desc.brick_number(index)}"
    posix = {"directory": brick.path, "volume-id": desc.volume_id}
    if create:
        posix["brick-create"] = "on"
    server: dict[str, str] = {"transport-type": desc.transport, f"auth.addr.{top}.allow": desc.auth_allow}
    if desc.transport == "unix":
        server["transport.socket.listen-path"] = brick.socket_path
    else:
        server["transport.socket.listen-port"] = str(brick.port)
        server["transport.socket.bind-address"] = bind_address(brick.host)
        server["transport.socket.local-path"] = local_socket(desc, brick)
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
            opts["transport.socket.local-path"] = local_socket(desc, brick)
        if desc.username:
            opts["username"], opts["password"] = desc.username, desc.password
        specs.append(VolumeSpec(desc.client_name(i), "protocol/client", _opts(desc, "protocol/client", opts)))
    subvols = [s.name for s in specs]
    if desc.replica_count > 1:
        sets = [subvols[i : i + desc.replica_count] for i in range(0, len(subvols), desc.replica_count)]
        subvols = []
        for k, members in enumerate(sets):
            name = desc.set_name(k * desc.replica_count)
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
        dht = _opts(desc, "cluster/distribute", {})
        gone = set(desc.decommissioned)
        drained = [desc.subvolume_name(i) for i, b in enumerate(desc.bricks) if f"{b.host}:{b.path}" in gone]
        if drained:
            dht["decommissioned-bricks"] = " ".join(dict.fromkeys(drained))
        specs.append(VolumeSpec(f"{desc.name}-dht", "cluster/distribute", dht, subvols))
        subvols = [f"{desc.name}-dht"]
    if desc.client_io_threads:
        name = f"{desc.name}-io-threads"
        specs.append(
            VolumeSpec(name, "performance/io-threads", _opts(desc, "performance/io-threads", {}), subvols)
        )
        subvols = [name]
    caches = ((desc.nl_cache, "performance/nl-cache"), (desc.md_cache, "performance/md-cache"))
    for enabled, xl_type in caches:
        if enabled:
            name = f"{desc.name}-{xl_type.split('/')[1]}"
            specs.append(VolumeSpec(name, xl_type, _opts(desc, xl_type, {}), subvols))
            subvols = [name]
    specs.append(VolumeSpec(desc.name, "debug/io-stats", _opts(desc, "debug/io-stats", {}), subvols))
    return dump(specs)
