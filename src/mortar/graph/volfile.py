"""Volfiles in GlusterFS's grammar: parse to `VolumeSpec`s and write them back in glusterd's layout.

```
volume NAME
    type CATEGORY/NAME          # first in the block
    option KEY VALUE            # a key at most once; the rest of the line is the value
    subvolumes A B ...          # each defined earlier in the file
end-volume
```

Operators read, diff and hand-write these files, so every refusal names the file and line. Values
that would not survive the unquoted form (empty, surrounding blanks, `#`, `"`, `\\`) are written in
double quotes with `\\"` and `\\\\` escapes, so `parse(dump(specs)) == specs` for any specs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

# blanks as the grammar sees them: ASCII only, so odd Unicode spaces stay part of values and names
_BLANKS = " \t\r\f\v"
_TOKEN_RE = re.compile(r'[^\s#"]+')
_TYPE_RE = re.compile(r"[A-Za-z0-9_.+-]+/[A-Za-z0-9_.+-]+")
_INDENT = "    "
_WORD_RE = re.compile(f"[^{_BLANKS}#]+")


@dataclass(slots=True)
class VolumeSpec:
    """One `volume ... end-volume` block; `line` is where it starts (not part of equality)."""

    name: str
    type: str
    options: dict[str, str] = field(default_factory=dict)
    subvolumes: list[str] = field(default_factory=list)
    line: int = field(default=0, compare=False)


class VolfileError(ValueError):
    """A volfile that cannot be used; `str()` is `FILE:LINE: reason` like a compiler's message."""

    def __init__(self, filename: str, line: int, reason: str) -> None:
        self.filename = filename
        self.line = line
        self.reason = reason
        super().__init__(f"{filename}:{line}: {reason}")


def _split_blanks(text: str) -> list[str]:
    return [w for w in re.split(f"[{_BLANKS}]+", text) if w]


def _strip_comment(text: str) -> str:
    """Drop a `#` comment from a non-option line (names cannot contain `#`)."""
    cut = text.find("#")
    return text if cut < 0 else text[:cut]


def _parse_value(rest: str, err: _ErrorAt) -> str:
    """The value of an `option` line: a quoted string, or the rest of the line up to a ` #` comment."""
    rest = rest.strip(_BLANKS)
    if rest.startswith('"'):
        out: list[str] = []
        i = 1
        while i < len(rest):
            ch = rest[i]
            if ch == "\\" and i + 1 < len(rest) and rest[i + 1] in '"\\':
                out.append(rest[i + 1])
                i += 2
                continue
            if ch == '"':
                tail = rest[i + 1 :].strip(_BLANKS)
                if tail and not tail.startswith("#"):
                    raise err(f"unexpected text after the quoted value: {tail!r}")
                return "".join(out)
            out.append(ch)
            i += 1
        raise err("unterminated quoted value")
    # a comment starts at a '#' that follows a blank; 'a#b' stays a value
    m = re.search(f"[{_BLANKS}]#", rest)
    value = (rest[: m.start()] if m else rest).strip(_BLANKS)
    if value.startswith("#"):
        value = ""
    return value


class _ErrorAt:
    """Builds VolfileErrors for the line being parsed."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.line = 0

    def __call__(self, reason: str, line: int | None = None) -> VolfileError:
        return VolfileError(self.filename, self.line if line is None else line, reason)


def parse(text: str, filename: str = "<volfile>") -> list[VolumeSpec]:
    """Parse volfile text; raises VolfileError naming the first problem's line."""
    err = _ErrorAt(filename)
    specs: list[VolumeSpec] = []
    defined: dict[str, int] = {}
    current: VolumeSpec | None = None
    seen_type = seen_subvols = False

    for lineno, raw in enumerate(text.split("\n"), start=1):
        err.line = lineno
        stripped = raw.strip(_BLANKS)
        if not stripped or stripped.startswith("#"):
            continue
        m = _WORD_RE.match(stripped)
        keyword, rest = (m.group(0), stripped[m.end() :]) if m else ("", stripped)
        if rest.startswith("#"):
            rest = ""

        if keyword == "volume":
            if current is not None:
                raise err(f"volume {current.name!r} (line {current.line}) is missing end-volume")
            words = _split_blanks(_strip_comment(rest))
            if len(words) != 1:
                raise err("'volume' takes exactly one name")
            name = words[0]
            if not _TOKEN_RE.fullmatch(name):
                raise err(f"bad volume name {name!r}")
            if name in defined:
                raise err(f"duplicate volume name {name!r} (first defined at line {defined[name]})")
            current = VolumeSpec(name, "", line=lineno)
            seen_type = seen_subvols = False
            continue

        if current is None:
            if keyword in ("type", "option", "subvolumes", "end-volume"):
                raise err(f"{keyword!r} outside a volume block")
            raise err(f"unknown keyword {keyword!r}")

        if keyword == "type":
            if seen_type:
                raise err(f"volume {current.name!r} gives 'type' twice")
            if current.options or seen_subvols:
                raise err(f"'type' must come first in volume {current.name!r}")
            words = _split_blanks(_strip_comment(rest))
            if len(words) != 1 or not _TYPE_RE.fullmatch(words[0]):
                raise err("'type' takes one CATEGORY/NAME, e.g. storage/posix")
            current.type = words[0]
            seen_type = True
        elif keyword == "option":
            if not seen_type:
                raise err(f"'type' missing: it must come first in volume {current.name!r}")
            rest = rest.lstrip(_BLANKS)
            m = _WORD_RE.match(rest)
            if not m:
                raise err("'option' needs a key and a value")
            key, value_text = m.group(0), rest[m.end() :]
            if not _TOKEN_RE.fullmatch(key):
                raise err(f"bad option key {key!r}")
            if not value_text.strip(_BLANKS) or value_text.strip(_BLANKS).startswith("#"):
                raise err(f"option {key!r} has no value")
            if key in current.options:
                raise err(f"duplicate option {key!r} in volume {current.name!r}")
            current.options[key] = _parse_value(value_text, err)
        elif keyword == "subvolumes":
            if not seen_type:
                raise err(f"'type' missing: it must come first in volume {current.name!r}")
            if seen_subvols:
                raise err(f"volume {current.name!r} gives 'subvolumes' twice")
            names = _split_blanks(_strip_comment(rest))
            if not names:
                raise err(f"empty 'subvolumes' in volume {current.name!r}")
            for sub in names:
                if sub == current.name:
                    raise err(f"volume {current.name!r} lists itself as a subvolume (cycle)")
                if sub not in defined:
                    raise err(f"subvolume {sub!r} of {current.name!r} is not defined earlier in the file")
                if names.count(sub) > 1:
                    raise err(f"subvolume {sub!r} listed twice in volume {current.name!r}")
            current.subvolumes = names
            seen_subvols = True
        elif keyword == "end-volume":
            if _strip_comment(rest).strip(_BLANKS):
                raise err(f"unexpected text after end-volume: {rest.strip(_BLANKS)!r}")
            if not seen_type:
                raise err(f"'type' missing in volume {current.name!r}", current.line)
            specs.append(current)
            defined[current.name] = current.line
            current = None
        else:
            raise err(f"unknown keyword {keyword!r}")

    if current is not None:
        raise err(f"volume {current.name!r} is missing end-volume", current.line)
    return specs


def _format_value(value: str) -> str:
    if "\n" in value:
        raise ValueError("option values cannot contain a newline")
    plain = (
        value
        and value == value.strip(_BLANKS)
        and not any(c in value for c in '#"\\')
        and value.strip() == value  # other Unicode blanks at the ends would be lost by readers
    )
    if plain:
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_token(kind: str, text: str) -> None:
    if not _TOKEN_RE.fullmatch(text):
        raise ValueError(f"{kind} {text!r} cannot be written in a volfile")


def dump(specs: Iterable[VolumeSpec]) -> str:
    """The canonical text: 4-space indent, one blank line between blocks, as glusterd writes them."""
    blocks: list[str] = []
    for spec in specs:
        _check_token("volume name", spec.name)
        if not _TYPE_RE.fullmatch(spec.type):
            raise ValueError(f"translator type {spec.type!r} is not CATEGORY/NAME")
        lines = [f"volume {spec.name}", f"{_INDENT}type {spec.type}"]
        for key, value in spec.options.items():
            _check_token("option key", key)
            lines.append(f"{_INDENT}option {key} {_format_value(value)}")
        if spec.subvolumes:
            for sub in spec.subvolumes:
                _check_token("subvolume name", sub)
            lines.append(f"{_INDENT}subvolumes {' '.join(spec.subvolumes)}")
        lines.append("end-volume")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)
