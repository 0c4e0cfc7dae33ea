"""GFIDs: the 128-bit identity every inode carries, the same on every brick."""

from __future__ import annotations

import os
import uuid


class Gfid(bytes):
    """A 16-byte identifier; `bytes` underneath so it hashes, compares and travels as raw bytes."""

    __slots__ = ()

    def __new__(cls, value: bytes | bytearray | memoryview | str = b"") -> Gfid:
        if isinstance(value, str):
            value = uuid.UUID(value).bytes
        raw = bytes(value)
        if len(raw) != 16:
            raise ValueError(f"a gfid is 16 bytes, got {len(raw)}")
        return super().__new__(cls, raw)

    @classmethod
    def random(cls) -> Gfid:
        return cls(os.urandom(16))

    @property
    def canonical(self) -> str:
        """The UUID text form, as GlusterFS prints gfids."""
        return str(uuid.UUID(bytes=bytes(self)))

    def __str__(self) -> str:
        return self.canonical

    def __repr__(self) -> str:
        return f"Gfid('{self.canonical}')"


NULL_GFID = Gfid(b"\0" * 16)
ROOT_GFID = Gfid(b"\0" * 15 + b"\1")
