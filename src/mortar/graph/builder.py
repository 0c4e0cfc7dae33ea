"""Build a live translator graph from volfile specs, start and stop it, and switch options live.

The last volume of a volfile is the top; the process (client API, FUSE, brick server) stacks itself
above it as the graph's listener. Translators are initialised children first and finalised parents
first, each once even when the graph is a DAG.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mortar.core.options import OptionError
from mortar.core.translator import Event, Translator, find_option
from mortar.graph.registry import UnknownTypeError, translator_class
from mortar.graph.volfile import VolfileError, VolumeSpec, parse

__all__ = ["CONNECTING_TYPES", "Graph", "VolfileError", "VolumeSpec", "build", "from_text", "load"]

log = logging.getLogger(__name__)

#: types that connect to something and announce CHILD_UP only once it answers; a graph containing
#: one is up when its top says so. A translator class can also declare `announces_child_up = True`.
CONNECTING_TYPES = frozenset({"protocol/client"})

EventCallback = Callable[[Event, Any], None]


def _check_options(cls: type[Translator], spec: VolumeSpec, filename: str) -> None:
    """Validate every option against the class's declarations, naming the key and the reason."""
    for key, raw in spec.options.items():
        opt = find_option(cls.options, key)
        if opt is None:
            reason = f"volume {spec.name!r} ({spec.type}) has no option {key!r}"
            raise VolfileError(filename, spec.line, reason)
        try:
            opt.parse(raw)
        except OptionError as exc:
            reason = f"volume {spec.name!r}: option {key} {raw!r}: {exc}"
            raise VolfileError(filename, spec.line, reason) from None


def _order(specs: Sequence[VolumeSpec], filename: str) -> list[VolumeSpec]:
    """Children-first order; refuses unknown subvolumes, cycles and more than one top."""
    by_name: dict[str, VolumeSpec] = {}
    for spec in specs:
        if spec.name in by_name:
            raise VolfileError(filename, spec.line, f"duplicate volume name {spec.name!r}")
        by_name[spec.name] = spec
    for spec in specs:
        for sub in spec.subvolumes:
            if sub not in by_name:
                raise VolfileError(filename, spec.line, f"subvolume {sub!r} of {spec.name!r} is not defined")

    ordered: list[VolumeSpec] = []
    state: dict[str, int] = {}  # 1 = on the DFS path, 2 = done

    def visit(spec: VolumeSpec, path: list[str]) -> None:
        if state.get(spec.name) == 2:
            return
        if state.get(spec.name) == 1:
            cycle = " -> ".join([*path[path.index(spec.name) :], spec.name])
            raise VolfileError(filename, spec.line, f"cycle in the graph: {cycle}")
        state[spec.name] = 1
        for sub in spec.subvolumes:
            visit(by_name[sub], [*path, spec.name])
        state[spec.name] = 2
        ordered.append(spec)

    for spec in specs:
        visit(spec, [])

    used = {sub for spec in specs for sub in spec.subvolumes}
    top = specs[-1]
    if top.name in used:
        raise VolfileError(filename, top.line, f"the last volume {top.name!r} must be the top of the graph")
    for spec in specs:
        if spec.name not in used and spec is not top:
            raise VolfileError(
                filename,
                spec.line,
                f"volume {spec.name!r} is not a subvolume of any volume: a graph has one top, "
                f"the last volume ({top.name!r})",
            )
    return ordered


def build(specs: Sequence[VolumeSpec], filename: str = "<volfile>") -> Graph:
    """Instantiate every translator with its options and children; nothing is started yet."""
    if not specs:
        raise VolfileError(filename, 1, "the volfile defines no volume")
    xlators: dict[str, Translator] = {}
    needs_child_up = False
    for spec in _order(specs, filename):
        try:
            cls = translator_class(spec.type)
        except UnknownTypeError as exc:
            raise VolfileError(filename, spec.line, f"volume {spec.name!r}: {exc}") from None
        _check_options(cls, spec, filename)
        try:
            xl = cls(spec.name, dict(spec.options), [xlators[sub] for sub in spec.subvolumes])
        except (OptionError, ValueError, TypeError) as exc:
            raise VolfileError(filename, spec.line, f"volume {spec.name!r} ({spec.type}): {exc}") from None
        xlators[spec.name] = xl
        needs_child_up |= spec.type in CONNECTING_TYPES or bool(getattr(cls, "announces_child_up", False))
    return Graph(list(specs), {s.name: xlators[s.name] for s in specs}, filename, needs_child_up)


def from_text(text: str, filename: str = "<volfile>") -> Graph:
    return build(parse(text, filename), filename)


def load(path: str | Path) -> Graph:
    return from_text(Path(path).read_text(), str(path))


def _children_first(top: Translator) -> list[Translator]:
    """Post-order over the DAG below `top`, each translator once."""
    order: list[Translator] = []
    seen: set[int] = set()

    def visit(xl: Translator) -> None:
        if id(xl) in seen:
            return
        seen.add(id(xl))
        for child in xl.children:
            visit(child)
        order.append(xl)

    visit(top)
    return order


class Graph:
    """A built graph and its owner's view of it: lifecycle, the top's events, live reconfiguration."""

    def __init__(
        self,
        specs: list[VolumeSpec],
        xlators: dict[str, Translator],
        filename: str = "<volfile>",
        needs_child_up: bool = False,
    ) -> None:
        self.specs = specs
        self.xlators = xlators
        self.filename = filename
        self.top: Translator = xlators[specs[-1].name]
        #: False when nothing in the graph connects anywhere: such a graph is up once started
        self.needs_child_up = needs_child_up
        self.started = False
        self._inited: list[Translator] = []
        self._top_state: Event | None = None
        self._up_event = asyncio.Event()
        self._listeners: list[EventCallback] = []

    def __repr__(self) -> str:
        return f"<Graph {self.filename} top={self.top.name} {len(self.xlators)} translators>"

    # ---- events from the top -----------------------------------------------------------------

    @property
    def up(self) -> bool:
        if not self.started:
            return False
        if self._top_state is None:
            return not self.needs_child_up
        return self._top_state is Event.CHILD_UP

    def notify(self, event: Event, source: Any, data: Any = None) -> None:
        """Listener entry point: the top reports CHILD_UP/CHILD_DOWN (and upcalls) here."""
        if source is not self.top:
            return
        if event in (Event.CHILD_UP, Event.CHILD_DOWN):
            self._top_state = event
            log.info("graph %s: top %s reports %s", self.filename, self.top.name, event.value)
            self._sync_up_event()
        for callback in list(self._listeners):
            try:
                callback(event, data)
            except Exception:
                log.exception("graph %s: event listener failed on %s", self.filename, event.value)

    def subscribe(self, callback: EventCallback) -> Callable[[], None]:
        """Call `callback(event, data)` for every event the top sends up; returns an unsubscriber."""
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return unsubscribe

    def _sync_up_event(self) -> None:
        if self.up:
            self._up_event.set()
        else:
            self._up_event.clear()

    async def wait_up(self, timeout: float | None = None) -> bool:
        """True once the graph can serve fops; False if that did not happen within `timeout`."""
        if self.up:
            return True
        try:
            async with asyncio.timeout(timeout):
                while not self.up:
                    await self._up_event.wait()
        except TimeoutError:
            return False
        return True

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self, timeout: float | None = 30) -> None:
        """init() children first, then PARENT_UP down from the top; undoes the inits on failure."""
        if self.started:
            return
        try:
            async with asyncio.timeout(timeout):
                for xl in _children_first(self.top):
                    await xl.init()
                    self._inited.append(xl)
        except BaseException:
            log.error("graph %s: init failed, finalising what was started", self.filename)
            await self._fini_all()
            raise
        if self not in self.top.parents:
            self.top.parents.append(self)
        self.started = True
        self._sync_up_event()
        self.top.notify(Event.PARENT_UP, self)

    async def stop(self, timeout: float | None = 30) -> None:
        """PARENT_DOWN down from the top, then fini() parents first; the first fini error is raised."""
        if not self.started:
            return
        self.started = False
        self._sync_up_event()
        try:
            self.top.notify(Event.PARENT_DOWN, self)
        except Exception:
            log.exception("graph %s: PARENT_DOWN failed", self.filename)
        try:
            async with asyncio.timeout(timeout):
                await self._fini_all()
        finally:
            if self in self.top.parents:
                self.top.parents.remove(self)
            self._top_state = None

    async def _fini_all(self) -> None:
        first: BaseException | None = None
        while self._inited:
            xl = self._inited.pop()
            try:
                await xl.fini()
            except Exception as exc:
                log.exception("graph %s: fini of %s failed", self.filename, xl.name)
                first = first or exc
        if first is not None:
            raise first

    # ---- live switch -------------------------------------------------------------------------

    def same_topology(self, other_specs: Sequence[VolumeSpec]) -> bool:
        """Same volumes with the same types and subvolumes: only option values may differ."""
        mine = [(s.name, s.type, list(s.subvolumes)) for s in self.specs]
        theirs = [(s.name, s.type, list(s.subvolumes)) for s in other_specs]
        return mine == theirs

    def reconfigure(self, specs: Sequence[VolumeSpec], filename: str | None = None) -> list[str]:
        """Apply changed options in place; all values are validated before any is applied.

        Returns the names of the reconfigured translators. A topology change is refused: the caller
        builds a new graph and switches to it.
        """
        filename = filename or self.filename
        if not self.same_topology(specs):
            line = specs[0].line if specs else 1
            raise VolfileError(filename, line, "topology changed: a new graph is needed")
        changed: list[tuple[Translator, Mapping[str, str]]] = []
        for new, old in zip(specs, self.specs, strict=True):
            if new.options == old.options and list(new.options) == list(old.options):
                continue
            xl = self.xlators[new.name]
            _check_options(type(xl), new, filename)
            changed.append((xl, dict(new.options)))
        for xl, options in changed:
            log.info("graph %s: reconfiguring %s", filename, xl.name)
            xl.reconfigure(options)
        self.specs = list(specs)
        self.filename = filename
        return [xl.name for xl, _ in changed]
