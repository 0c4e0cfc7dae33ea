"""Block-device volumes (`volume create NAME device lv HOST:/POOL...`): what makes a volume's bricks
thin pools served by storage/bd instead of directories served by storage/posix.

The fact is kept beside the volume's record, as `/volumes/NAME/device` (a `DeviceRecord`), so the
volume record keeps its shape; volgen reads it through `VolumeDescription.brick_type` and
`bd_options`. At a brick's first start the pool is created with these options unless one already
exists there (made by `mortar bd pool create`, with the volume's id claimed at first start).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mortar.core.options import OptionError, parse_size
from mortar.mgmt.model import VOLUMES, MgmtError, Record

#: `volume create ... device lv` words that become storage/bd options
BD_WORDS: dict[str, str | tuple[str, ...]] = {
    "pool-size": "size",
    "block-size": "size",
    "backend": ("thin", "lvm"),
    "vg": "str",
    "thinpool": "str",
}


def device_key(volume: str) -> str:
    return f"{VOLUMES}{volume}/device"


@dataclass
class DeviceRecord(Record):
    brick_type: str = "bd"
    device: str = "lv"
    #: storage/bd options for every brick (pool-size, block-size, backend, vg, thinpool)
    options: dict[str, str] = field(default_factory=dict)


def check_bd_options(options: dict[str, Any]) -> dict[str, str]:
    """Validate the pool options of a `device lv` create; returns them as volfile values."""
    out: dict[str, str] = {}
    for key, raw in options.items():
        kind = BD_WORDS.get(key)
        value = str(raw).strip()
        if kind is None:
            raise MgmtError(f"unknown block-device option {key!r} (use {', '.join(BD_WORDS)})")
        if kind == "size":
            try:
                parse_size(value)
            except OptionError as exc:
                raise MgmtError(f"{key}: {exc}") from None
        elif isinstance(kind, tuple) and value not in kind:
            raise MgmtError(f"{key} must be one of {', '.join(kind)}")
        out[key] = value
    if out.get("backend") == "lvm" and not (out.get("vg") and out.get("thinpool")):
        raise MgmtError("backend lvm needs vg VG and thinpool NAME")
    return out
