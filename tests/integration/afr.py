"""Whether cluster/replicate is available in this tree (replica volumes need it)."""

from __future__ import annotations

from mortar.graph.registry import UnknownTypeError, translator_class


def have_afr() -> bool:
    try:
        translator_class("cluster/replicate")
    except UnknownTypeError:
        return False
    return True


HAVE_AFR = have_afr()
