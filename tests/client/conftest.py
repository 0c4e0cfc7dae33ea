"""Client test fixtures: a one-brick volume (storage/posix on a temp directory, and the in-memory
brick) under a counting translator that records each fop, its payload sizes and caller identity."""

from __future__ import annotations

import importlib.util
import uuid
from collections import Counter as Tally
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mortar.client import AsyncVolume, Volume
from mortar.core.context import CallContext, call_context
from mortar.core.fops import FOPS
from mortar.core.translator import Translator
from mortar.graph import register, unregister

from .memfs import MemFs

HAVE_POSIX = importlib.util.find_spec("mortar.xlators.storage.posix") is not None
BACKENDS = ["posix", "memfs"] if HAVE_POSIX else ["memfs"]


class Counter(Translator):
    """Pass-through that counts fops, remembers the largest readv/writev and the caller identity."""

    type_name = "test/counter"

    def __init__(self, name: str, options: Any = None, children: Any = ()) -> None:
        super().__init__(name, options, children)
        self.calls: Tally[str] = Tally()
        self.max_io: Tally[str] = Tally()
        self.identities: set[CallContext] = set()


def _counting(name: str) -> Callable[..., Any]:
    async def fop(self: Counter, *args: Any, **kwargs: Any) -> Any:
        self.calls[name] += 1
        self.identities.add(call_context.get())
        if name == "readv":
            self.max_io[name] = max(self.max_io[name], args[1])
        elif name == "writev":
            self.max_io[name] = max(self.max_io[name], memoryview(args[1]).nbytes)
        return await getattr(self.children[0], name)(*args, **kwargs)

    return fop


for _name in FOPS:
    setattr(Counter, _name, _counting(_name))


@pytest.fixture(autouse=True, scope="session")
def _test_types() -> Iterator[None]:
    register(Counter.type_name, Counter, replace=True)
    register(MemFs.type_name, MemFs, replace=True)
    yield
    unregister(Counter.type_name)
    unregister(MemFs.type_name)


def brick_volfile(backend: str, directory: Path, volume_id: str) -> str:
    if backend == "posix":
        brick = (
            "volume brick\n    type storage/posix\n"
            f"    option directory {directory}\n    option volume-id {volume_id}\n"
            "    option brick-create on\nend-volume\n"
        )
    else:
        brick = "volume brick\n    type test/memfs\nend-volume\n"
    return brick + "\nvolume counter\n    type test/counter\n    subvolumes brick\nend-volume\n"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def volfile(tmp_path: Path, backend: str) -> Path:
    path = tmp_path / "client.vol"
    path.write_text(brick_volfile(backend, tmp_path / "brick", str(uuid.uuid4())))
    return path


@pytest.fixture
def vol(volfile: Path) -> Iterator[Volume]:
    with Volume.from_volfile(volfile, timeout=10) as volume:
        yield volume


@pytest.fixture
async def avol(volfile: Path) -> AsyncIterator[AsyncVolume]:
    volume = await AsyncVolume.from_volfile(volfile, timeout=10)
    try:
        yield volume
    finally:
        await volume.aclose()


def counter_of(volume: Volume | AsyncVolume) -> Counter:
    top = volume.avolume.top if isinstance(volume, Volume) else volume.top
    assert isinstance(top, Counter)
    return top
