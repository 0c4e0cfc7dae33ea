"""Declared translator options: type, default, range and description, validated in one place.

The same declarations drive volfile validation, `volume set` checks and `volume get` listings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_TRUE = {"on", "yes", "true", "enable", "1"}
_FALSE = {"off", "no", "false", "disable", "0"}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1 << 40,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}
_TIME_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


class OptionError(ValueError):
    """A value that does not fit its option's declaration."""


def parse_size(text: str) -> int:
    """'64KiB' -> 65536; units are binary (GlusterFS's convention: 1MB is 1048576)."""
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise OptionError(f"{text!r} is not a size (examples: 4096, 64KB, 1MiB, 2G)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise OptionError(f"{text!r} is not a boolean (on/off, yes/no, true/false, enable/disable)")


@dataclass(frozen=True, slots=True)
class Option:
    """One option a translator accepts. `type` is bool, int, size, time, percent, str, enum or path."""

    type: str
    default: Any
    description: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()

    def parse(self, raw: str | int | float | bool) -> Any:
        """Turn a volfile or CLI value into the typed value; raises OptionError with a clear reason."""
        text = str(raw).strip() if not isinstance(raw, bool) else ("on" if raw else "off")
        value: Any
        if self.type == "bool":
            value = parse_bool(text)
        elif self.type == "int":
            try:
                value = int(text, 0)
            except ValueError:
                raise OptionError(f"{text!r} is not an integer") from None
        elif self.type == "size":
            value = parse_size(text)
        elif self.type == "time":
            m = _TIME_RE.match(text)
            if not m or m.group(2) not in _TIME_UNITS:
                raise OptionError(f"{text!r} is not a duration (examples: 42, 42s, 500ms, 2m)")
            value = float(m.group(1)) * _TIME_UNITS[m.group(2)]
        elif self.type == "percent":
            try:
                value = float(text.rstrip("%"))
            except ValueError:
                raise OptionError(f"{text!r} is not a percentage") from None
            if not 0 <= value <= 100:
                raise OptionError(f"{text!r} is not between 0% and 100%")
        elif self.type == "enum":
            if text not in self.choices:
                raise OptionError(f"{text!r} is not one of {', '.join(self.choices)}")
            value = text
        elif self.type in ("str", "path"):
            if self.type == "path" and not text.startswith("/"):
                raise OptionError(f"{text!r} is not an absolute path")
            value = text
        else:  # pragma: no cover - a declaration bug, caught by the option tests
            raise OptionError(f"unknown option type {self.type}")
        if self.min is not None and value < self.min:
            raise OptionError(f"{text!r} is below the minimum {self.min:g}")
        if self.max is not None and value > self.max:
            raise OptionError(f"{text!r} is above the maximum {self.max:g}")
        return value

    def format(self, value: Any) -> str:
        """The volfile spelling of a typed value."""
        if self.type == "bool":
            return "on" if value else "off"
        if self.type == "time":
            return f"{value:g}"
        return str(value)
