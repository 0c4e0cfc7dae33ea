"""Volfiles (GlusterFS grammar), the translator registry, and building/running translator graphs."""

from mortar.graph.builder import Graph, build, from_text, load
from mortar.graph.registry import UnknownTypeError, register, translator_class, unregister
from mortar.graph.volfile import VolfileError, VolumeSpec, dump, parse

__all__ = [
    "Graph",
    "UnknownTypeError",
    "VolfileError",
    "VolumeSpec",
    "build",
    "dump",
    "from_text",
    "load",
    "parse",
    "register",
    "translator_class",
    "unregister",
]
