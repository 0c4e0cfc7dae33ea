"""The one error type of the fop layer: an errno plus a human message."""

from __future__ import annotations

import errno as _errno
import os


class FopError(Exception):
    """A fop failed with `errno`; travels over the wire unchanged and becomes `OSError` at the edge."""

    def __init__(self, errno: int, message: str = "") -> None:
        self.errno = errno
        self.message = message or os.strerror(errno)
        super().__init__(errno, self.message)

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"[{name}] {self.message}"

    def to_oserror(self, filename: str | None = None) -> OSError:
        return OSError(self.errno, self.message, filename) if filename else OSError(self.errno, self.message)

    @classmethod
    def from_oserror(cls, exc: OSError) -> FopError:
        return cls(exc.errno or _errno.EIO, exc.strerror or str(exc))
