"""The native client API (gfapi's role): `Volume` (blocking) and `AsyncVolume` (asyncio)."""

from mortar.client.file import AsyncFile, RawFile
from mortar.client.results import DirEntry, StatResult, StatVfsResult
from mortar.client.scandir import AsyncScandir
from mortar.client.sync import ScandirIterator, Volume
from mortar.client.volume import IO_CHUNK, AsyncVolume, FileHandle

__all__ = [
    "IO_CHUNK",
    "AsyncFile",
    "AsyncScandir",
    "AsyncVolume",
    "DirEntry",
    "FileHandle",
    "RawFile",
    "ScandirIterator",
    "StatResult",
    "StatVfsResult",
    "Volume",
]
