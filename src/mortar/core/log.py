"""Logging in mortar's format: `[timestamp] LEVEL [module:line] translator: message`."""

from __future__ import annotations

import logging
import sys


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        who = getattr(record, "xlator", None) or record.name.rsplit(".", 1)[-1]
        record.who = who
        return super().format(record)


FORMAT = "[%(asctime)s.%(msecs)03d] %(levelname)s [%(module)s:%(lineno)d] %(who)s: %(message)s"


def setup_logging(level: str | int = "INFO", path: str | None = None) -> None:
    """Send mortar's logs to `path` (or stderr) in the house format."""
    handler: logging.Handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("mortar")
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else level.upper())
    root.propagate = False
