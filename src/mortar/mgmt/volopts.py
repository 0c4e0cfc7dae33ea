"""The `volume set` keys: GlusterFS-style names mapped onto the translator options they set.

A key's type, default, range and description come from the target translator's declared `Option`,
never from a copy here, so `volume set` refuses exactly what a volfile would refuse and `volume get`
shows what the translator really uses. A few keys are the management plane's own (they change the
graph's shape rather than a translator option) and declare their `Option` here.

Groups (`volume set NAME group virt`) are `key=value` files: the ones shipped in
`mortar/mgmt/groups/`, and any the operator drops in `WORKDIR/groups/` (those win).
"""

from __future__ import annotations

import difflib
import importlib.resources
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mortar.core.options import Option, OptionError
from mortar.core.translator import find_option
from mortar.graph.registry import UnknownTypeError, translator_class
from mortar.mgmt.volgen import VolumeDescription


class OptionKeyError(ValueError):
    """An unknown key, a bad value, or a key whose translator this build lacks."""


@dataclass(frozen=True, slots=True)
class VolumeOption:
    """One settable key. `xlator`/`option` name its target; `local` declares a management-level key."""

    key: str
    xlator: str
    option: str
    local: Option | None = None

    def declaration(self) -> Option:
        if self.local is not None:
            return self.local
        try:
            cls = translator_class(self.xlator)
        except UnknownTypeError as exc:
            raise OptionKeyError(f"{self.key}: translator {self.xlator} is not available: {exc}") from None
        opt = find_option(cls.options, self.option)
        if opt is None:  # a table bug: the translator dropped or renamed the option
            raise OptionKeyError(f"{self.key}: {self.xlator} has no option {self.option!r}")
        return opt

    def parse(self, value: str) -> Any:
        try:
            return self.declaration().parse(value)
        except OptionError as exc:
            raise OptionKeyError(f"{self.key} {value!r}: {exc}") from None


def _key(key: str, xlator: str, option: str) -> VolumeOption:
    return VolumeOption(key, xlator, option)


AUTH_ALLOW = "auth.allow"
CLIENT_IO_THREADS = "performance.client-io-threads"
STAT_PREFETCH = "performance.stat-prefetch"
NL_CACHE = "performance.nl-cache"
SELF_HEAL_DAEMON = "cluster.self-heal-daemon"
SHD_KEYS = frozenset({SELF_HEAL_DAEMON, "cluster.heal-timeout", "cluster.shd-max-threads"})

TABLE: dict[str, VolumeOption] = {
    k.key: k
    for k in (
        _key("network.ping-timeout", "protocol/client", "ping-timeout"),
        _key("network.frame-timeout", "protocol/client", "frame-timeout"),
        _key("network.reconnect-backoff-max", "protocol/client", "reconnect-backoff-max"),
        _key("server.outstanding-rpc-limit", "protocol/server", "rpc.outstanding-rpc-limit"),
        VolumeOption(
            AUTH_ALLOW,
            "protocol/server",
            "auth.addr.*.allow",
            Option(
                "str",
                "*",
                "addresses allowed to reach the bricks: globs, CIDRs or '*' (clients also "
                "need the volume's login, which its volfile carries)",
            ),
        ),
        _key("performance.io-thread-count", "performance/io-threads", "thread-count"),
        VolumeOption(
            CLIENT_IO_THREADS,
            "performance/io-threads",
            "thread-count",
            Option("bool", False, "put performance/io-threads in the client graph too"),
        ),
        VolumeOption(
            STAT_PREFETCH,
            "performance/md-cache",
            "md-cache-timeout",
            Option("bool", True, "put performance/md-cache (client attribute cache) in the client graph"),
        ),
        _key("performance.md-cache-timeout", "performance/md-cache", "md-cache-timeout"),
        VolumeOption(
            NL_CACHE,
            "performance/nl-cache",
            "timeout",
            Option("bool", True, "put performance/nl-cache (negative lookup cache) in the client graph"),
        ),
        _key("performance.nl-cache-timeout", "performance/nl-cache", "timeout"),
        _key("cluster.quorum-type", "cluster/replicate", "quorum-type"),
        _key("cluster.quorum-count", "cluster/replicate", "quorum-count"),
        _key("cluster.eager-lock", "cluster/replicate", "eager-lock"),
        _key("cluster.post-op-delay-secs", "cluster/replicate", "post-op-delay"),
        _key("cluster.data-self-heal-algorithm", "cluster/replicate", "data-self-heal-algorithm"),
        _key("cluster.favorite-child-policy", "cluster/replicate", "favorite-child-policy"),
        _key("cluster.read-hash-mode", "cluster/replicate", "read-hash-mode"),
        _key("cluster.background-self-heal-count", "cluster/replicate", "background-self-heal-count"),
        _key("cluster.data-self-heal", "cluster/replicate", "data-self-heal"),
        _key("cluster.metadata-self-heal", "cluster/replicate", "metadata-self-heal"),
        _key("cluster.entry-self-heal", "cluster/replicate", "entry-self-heal"),
        VolumeOption(
            SELF_HEAL_DAEMON,
            "mgmt/shd",
            "enabled",
            Option("bool", True, "run the self-heal daemon for this volume on the hosts of its bricks"),
        ),
        VolumeOption(
            "cluster.heal-timeout",
            "mgmt/shd",
            "heal-timeout",
            Option("int", 600, "seconds between the self-heal daemon's index crawls", 1, 86400),
        ),
        VolumeOption(
            "cluster.shd-max-threads",
            "mgmt/shd",
            "max-threads",
            Option("int", 1, "replica sets the self-heal daemon heals at once on a host", 1, 64),
        ),
        _key("cluster.lookup-unhashed", "cluster/distribute", "lookup-unhashed"),
        _key("cluster.min-free-disk", "cluster/distribute", "min-free-disk"),
        _key("cluster.weighted-rebalance", "cluster/distribute", "weighted-rebalance"),
        _key("cluster.rsync-hash-regex", "cluster/distribute", "rsync-hash-regex"),
        _key("cluster.extra-hash-regex", "cluster/distribute", "extra-hash-regex"),
        _key("storage.reserve", "storage/posix", "reserve"),
        _key("storage.o-direct", "storage/posix", "o-direct"),
        _key("storage.health-check-interval", "storage/posix", "health-check-interval"),
        _key("diagnostics.latency-measurement", "debug/io-stats", "latency-measurement"),
        _key("diagnostics.count-fop-hits", "debug/io-stats", "count-fop-hits"),
    )
}


def lookup(key: str) -> VolumeOption:
    """The table entry for `key`; an unknown key is refused with the nearest valid one suggested."""
    found = TABLE.get(key)
    if found is not None:
        return found
    hint = suggest(key)
    raise OptionKeyError(f"option {key!r} does not exist" + (f"; did you mean {hint!r}?" if hint else ""))


def suggest(key: str) -> str | None:
    """The closest key by spelling, or by its last part (`ping-timeout` -> `network.ping-timeout`)."""
    tail = [k for k in TABLE if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    if len(tail) == 1:
        return tail[0]
    close = difflib.get_close_matches(key, list(TABLE), n=1, cutoff=0.6)
    if close:
        return close[0]
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], [k.rsplit(".", 1)[-1] for k in TABLE], 1, 0.6)
    return next((k for k in TABLE if close and k.rsplit(".", 1)[-1] == close[0]), None)


def validate(key: str, value: str) -> str:
    """Check `value` for `key` against the translator's declaration; returns the value to store."""
    lookup(key).parse(value)
    return value.strip()


def describe(key: str, value: str | None) -> dict[str, Any]:
    """One row of `volume get`: the value in effect and where it comes from."""
    entry = lookup(key)
    try:
        opt = entry.declaration()
    except OptionKeyError as exc:
        return {
            "key": key,
            "value": value,
            "source": "set" if value is not None else "unavailable",
            "default": None,
            "type": None,
            "description": str(exc),
        }
    default = opt.format(opt.default)
    return {
        "key": key,
        "value": value if value is not None else default,
        "source": "set" if value is not None else "default",
        "default": default,
        "type": opt.type,
        "description": opt.description,
        "translator": entry.xlator,
    }


def describe_all(options: Mapping[str, str]) -> list[dict[str, Any]]:
    return [describe(key, options.get(key)) for key in sorted(TABLE)]


def apply(desc: VolumeDescription, options: Mapping[str, str]) -> None:
    """Put a volume's set options into its description for volgen."""
    for key, value in options.items():
        entry = TABLE.get(key)
        if entry is None:
            continue  # a key a newer or older build knew; it cannot be applied here
        if key in SHD_KEYS:
            continue  # the heal daemon reads these from the volume's options, not from a volfile
        if key == AUTH_ALLOW:
            desc.auth_allow = value
        elif key == CLIENT_IO_THREADS:
            desc.client_io_threads = bool(entry.parse(value))
        elif key == STAT_PREFETCH:
            desc.md_cache = bool(entry.parse(value))
        elif key == NL_CACHE:
            desc.nl_cache = bool(entry.parse(value))
        else:
            desc.xlator_options.setdefault(entry.xlator, {})[entry.option] = value


# ---- groups --------------------------------------------------------------------------------------


def parse_group(text: str, name: str) -> dict[str, str]:
    """`key=value` lines (`#` comments); every key must exist and every value must fit."""
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise OptionKeyError(f"group {name} line {number}: expected key=value, got {raw.strip()!r}")
        try:
            out[key] = validate(key, value)
        except OptionKeyError as exc:
            raise OptionKeyError(f"group {name} line {number}: {exc}") from None
    if not out:
        raise OptionKeyError(f"group {name} sets no option")
    return out


def group_names(extra_dirs: Sequence[Path] = ()) -> list[str]:
    names = {p.name for p in importlib.resources.files("mortar.mgmt").joinpath("groups").iterdir()}
    for d in extra_dirs:
        if d.is_dir():
            names.update(p.name for p in d.iterdir() if p.is_file())
    return sorted(n for n in names if not n.startswith((".", "_")))


def load_group(name: str, extra_dirs: Sequence[Path] = ()) -> dict[str, str]:
    """The options of group `name`: an operator's file in `extra_dirs` first, then the shipped one."""
    if not name or "/" in name or name.startswith("."):
        raise OptionKeyError(f"bad group name {name!r}")
    for d in extra_dirs:
        path = d / name
        if path.is_file():
            return parse_group(path.read_text(), name)
    shipped = importlib.resources.files("mortar.mgmt").joinpath("groups", name)
    if not shipped.is_file():
        known = ", ".join(group_names(extra_dirs)) or "none"
        raise OptionKeyError(f"option group {name!r} does not exist (known groups: {known})")
    return parse_group(shipped.read_text(), name)
