"""Translator types by their volfile name (`storage/posix`), imported on first use."""

from __future__ import annotations

import importlib

from mortar.core.translator import Translator

# type name -> "module:Class"; a module is imported only when a volfile uses its type
KNOWN_TYPES: dict[str, str] = {
    "storage/posix": "mortar.xlators.storage.posix:PosixTranslator",
    "protocol/client": "mortar.xlators.protocol.client:ClientTranslator",
    "protocol/server": "mortar.xlators.protocol.server:ServerTranslator",
    "performance/io-threads": "mortar.xlators.performance.io_threads:IoThreadsTranslator",
    "debug/io-stats": "mortar.xlators.debug.io_stats:IoStatsTranslator",
}


class UnknownTypeError(LookupError):
    """A volfile names a translator type mortar does not have."""


def translator_class(type_name: str) -> type[Translator]:
    target = KNOWN_TYPES.get(type_name)
    if target is None:
        raise UnknownTypeError(
            f"unknown translator type {type_name!r} (known: {', '.join(sorted(KNOWN_TYPES))})"
        )
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Translator)):
        raise TypeError(f"{target} is not a Translator")
    return cls
