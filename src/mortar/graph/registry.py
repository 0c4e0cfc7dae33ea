"""Translator types by their volfile name (`storage/posix`), imported on first use."""

from __future__ import annotations

import importlib

from mortar.core.translator import Translator

# type name -> "module:Class"; a module is imported only when a volfile uses its type
KNOWN_TYPES: dict[str, str] = {
    "storage/posix": "mortar.xlators.storage.posix:PosixTranslator",
    "storage/bd": "mortar.xlators.storage.bd:BdTranslator",
    "protocol/client": "mortar.xlators.protocol.client:ClientTranslator",
    "protocol/server": "mortar.xlators.protocol.server:ServerTranslator",
    "performance/io-threads": "mortar.xlators.performance.io_threads:IoThreadsTranslator",
    "performance/md-cache": "mortar.xlators.performance.md_cache:MdCacheTranslator",
    "performance/nl-cache": "mortar.xlators.performance.nl_cache:NlCacheTranslator",
    "debug/io-stats": "mortar.xlators.debug.io_stats:IoStatsTranslator",
    "features/locks": "mortar.xlators.features.locks:LocksTranslator",
    "features/index": "mortar.xlators.features.index:IndexTranslator",
    "cluster/distribute": "mortar.xlators.cluster.dht:DistributeTranslator",
    "cluster/replicate": "mortar.xlators.cluster.afr:ReplicateTranslator",
    "debug/error-gen": "mortar.xlators.debug.error_gen:ErrorGenTranslator",
}

# classes registered at run time (plugins, tests); they take precedence over KNOWN_TYPES
_REGISTERED: dict[str, type[Translator]] = {}


class UnknownTypeError(LookupError):
    """A volfile names a translator type mortar does not have."""


def register(type_name: str, cls: type[Translator], *, replace: bool = False) -> None:
    """Make `type_name` build `cls`; refuses to shadow an existing registration unless `replace`."""
    if not (isinstance(cls, type) and issubclass(cls, Translator)):
        raise TypeError(f"{cls!r} is not a Translator subclass")
    if "/" not in type_name:
        raise ValueError(f"translator type {type_name!r} is not of the form CATEGORY/NAME")
    if not replace and type_name in _REGISTERED and _REGISTERED[type_name] is not cls:
        raise ValueError(f"translator type {type_name!r} is already registered")
    _REGISTERED[type_name] = cls


def unregister(type_name: str) -> None:
    """Forget a run-time registration (tests clean up with this)."""
    _REGISTERED.pop(type_name, None)


def known_types() -> list[str]:
    return sorted(set(KNOWN_TYPES) | set(_REGISTERED))


def translator_class(type_name: str) -> type[Translator]:
    registered = _REGISTERED.get(type_name)
    if registered is not None:
        return registered
    target = KNOWN_TYPES.get(type_name)
    if target is None:
        raise UnknownTypeError(f"unknown translator type {type_name!r} (known: {', '.join(known_types())})")
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownTypeError(f"translator type {type_name!r} is not available: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Translator)):
        raise UnknownTypeError(f"translator type {type_name!r}: {target} is not a Translator")
    return cls
