"""Graph construction from volfiles: types, options, shape refusals, lifecycle order, events, live
reconfiguration. Small recording translators stand in for real ones."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mortar.core.options import Option
from mortar.core.translator import Event, Translator
from mortar.graph import VolfileError, VolumeSpec, build, from_text, load, register, unregister
from mortar.graph.registry import UnknownTypeError, translator_class

JOURNAL: list[tuple[str, str]] = []


class Recorder(Translator):
    """Writes every lifecycle call and event it receives into JOURNAL."""

    type_name = "test/recorder"
    options: ClassVar[dict[str, Option]] = {
        "depth": Option("int", 4, "how deep", min=1, max=64),
        "cache-size": Option("size", 1 << 20, "bytes"),
        "mode": Option("enum", "fast", "how", choices=("fast", "safe")),
    }

    async def init(self) -> None:
        JOURNAL.append(("init", self.name))

    async def fini(self) -> None:
        JOURNAL.append(("fini", self.name))

    def notify(self, event: Event, source: Any, data: Any = None) -> None:
        JOURNAL.append((event.value, self.name))
        super().notify(event, source, data)

    def reconfigure(self, options: Any) -> None:
        JOURNAL.append(("reconfigure", self.name))
        super().reconfigure(options)


class Connector(Recorder):
    """Like protocol/client: says CHILD_UP some time after PARENT_UP, CHILD_DOWN on request."""

    type_name = "test/connector"
    announces_child_up = True
    options: ClassVar[dict[str, Option]] = {"silent": Option("bool", False, "never come up")}

    def notify(self, event: Event, source: Any, data: Any = None) -> None:
        super().notify(event, source, data)
        if event is Event.PARENT_UP and not self.opts["silent"]:
            asyncio.get_running_loop().call_later(0.01, self.notify, Event.CHILD_UP, self, "connected")


class FailingInit(Recorder):
    type_name = "test/failing-init"

    async def init(self) -> None:
        raise RuntimeError("cannot start")


@pytest.fixture(autouse=True)
def _registered() -> Iterator[None]:
    JOURNAL.clear()
    for cls in (Recorder, Connector, FailingInit):
        register(cls.type_name, cls)
    yield
    for cls in (Recorder, Connector, FailingInit):
        unregister(cls.type_name)


DAG = """\
volume shared
    type test/recorder
    option depth 8
end-volume

volume left
    type test/recorder
    subvolumes shared
end-volume

volume right
    type test/recorder
    subvolumes shared
end-volume

volume top
    type test/recorder
    option cache-size 64KiB
    subvolumes left right
end-volume
"""


def test_build_wires_children_and_options() -> None:
    graph = from_text(DAG, "dag.vol")
    assert graph.top.name == "top"
    assert list(graph.xlators) == ["shared", "left", "right", "top"]
    assert [c.name for c in graph.top.children] == ["left", "right"]
    shared = graph.xlators["shared"]
    assert graph.xlators["left"].children == [shared] and graph.xlators["right"].children == [shared]
    assert shared.opts["depth"] == 8 and graph.top.opts["cache-size"] == 65536
    assert graph.top.opts["depth"] == 4  # the default
    assert {p.name for p in shared.parents} == {"left", "right"}  # type: ignore[attr-defined]


async def test_start_stop_order_each_once_in_a_dag() -> None:
    graph = from_text(DAG, "dag.vol")
    events: list[tuple[Event, Any]] = []
    graph.subscribe(lambda event, data: events.append((event, data)))
    await graph.start(timeout=5)
    inits = [name for what, name in JOURNAL if what == "init"]
    assert inits == ["shared", "left", "right", "top"]
    assert ("parent-up", "top") in JOURNAL and ("parent-up", "shared") in JOURNAL
    assert graph in graph.top.parents
    assert await graph.wait_up(timeout=1)  # nothing connects anywhere: up once started
    JOURNAL.clear()
    await graph.stop()
    finis = [name for what, name in JOURNAL if what == "fini"]
    assert finis == ["top", "right", "left", "shared"]
    assert JOURNAL.index(("parent-down", "top")) < JOURNAL.index(("fini", "top"))
    assert graph not in graph.top.parents and not graph.up
    await graph.stop()  # idempotent
    assert len([1 for what, _ in JOURNAL if what == "fini"]) == 4


async def test_wait_up_follows_the_tops_events() -> None:
    text = (
        "volume conn\n    type test/connector\nend-volume\n"
        "volume top\n    type test/recorder\n    subvolumes conn\nend-volume\n"
    )
    graph = from_text(text)
    assert graph.needs_child_up
    seen: list[Event] = []
    unsubscribe = graph.subscribe(lambda event, data: seen.append(event))
    await graph.start()
    assert not graph.up  # the connector has not answered yet
    assert await graph.wait_up(timeout=5)
    assert seen == [Event.CHILD_UP]
    graph.xlators["conn"].notify(Event.CHILD_DOWN, graph.xlators["conn"], "lost")
    assert not graph.up and seen == [Event.CHILD_UP, Event.CHILD_DOWN]
    assert not await graph.wait_up(timeout=0.05)
    unsubscribe()
    graph.xlators["conn"].notify(Event.CHILD_UP, graph.xlators["conn"])
    assert graph.up and seen == [Event.CHILD_UP, Event.CHILD_DOWN]
    await graph.stop()


async def test_wait_up_times_out_when_nothing_answers() -> None:
    graph = from_text("volume c\n    type test/connector\n    option silent on\nend-volume\n")
    await graph.start()
    assert not await graph.wait_up(timeout=0.05)
    await graph.stop()


async def test_failed_init_finalises_what_started() -> None:
    text = (
        "volume a\n    type test/recorder\nend-volume\n"
        "volume b\n    type test/failing-init\n    subvolumes a\nend-volume\n"
    )
    graph = from_text(text)
    with pytest.raises(RuntimeError, match="cannot start"):
        await graph.start()
    assert JOURNAL == [("init", "a"), ("fini", "a")]
    assert not graph.started


def test_unknown_type_names_the_line() -> None:
    with pytest.raises(VolfileError) as info:
        from_text(
            "volume a\n    type test/recorder\nend-volume\n\nvolume b\n    type nope/nothing\n"
            "    subvolumes a\nend-volume\n",
            "x.vol",
        )
    assert info.value.line == 5 and "nope/nothing" in str(info.value)
    assert str(info.value).startswith("x.vol:5: ")


@pytest.mark.parametrize(
    ("option", "reason"),
    [
        ("depth 100", "above the maximum"),
        ("depth many", "not an integer"),
        ("mode reckless", "not one of"),
        ("cache-size 12parsecs", "not a size"),
        ("colour blue", "has no option 'colour'"),
    ],
)
def test_bad_options_name_file_line_key_and_reason(option: str, reason: str) -> None:
    text = f"# header\nvolume a\n    type test/recorder\n    option {option}\nend-volume\n"
    with pytest.raises(VolfileError) as info:
        from_text(text, "opts.vol")
    assert info.value.filename == "opts.vol" and info.value.line == 2
    assert option.split()[0] in info.value.reason and reason in info.value.reason


def test_two_roots_refused() -> None:
    text = "volume a\n    type test/recorder\nend-volume\nvolume b\n    type test/recorder\nend-volume\n"
    with pytest.raises(VolfileError, match="not a subvolume of any volume") as info:
        from_text(text)
    assert info.value.line == 1


def test_programmatic_specs_checked_for_shape() -> None:
    with pytest.raises(VolfileError, match="no volume"):
        build([])
    with pytest.raises(VolfileError, match="cycle"):
        build(
            [
                VolumeSpec("a", "test/recorder", subvolumes=["b"], line=1),
                VolumeSpec("b", "test/recorder", subvolumes=["a"], line=2),
            ]
        )
    with pytest.raises(VolfileError, match="not defined"):
        build([VolumeSpec("a", "test/recorder", subvolumes=["ghost"], line=1)])
    with pytest.raises(VolfileError, match="must be the top"):
        build(
            [
                VolumeSpec("top", "test/recorder", subvolumes=["leaf"], line=1),
                VolumeSpec("leaf", "test/recorder", line=2),
            ]
        )
    with pytest.raises(VolfileError, match="duplicate"):
        build([VolumeSpec("a", "test/recorder"), VolumeSpec("a", "test/recorder")])


async def test_out_of_order_specs_still_init_children_first() -> None:
    graph = build(
        [VolumeSpec("leaf", "test/recorder"), VolumeSpec("top", "test/recorder", subvolumes=["leaf"])]
    )
    await graph.start()
    await graph.stop()
    assert JOURNAL[0] == ("init", "leaf") and ("fini", "top") in JOURNAL


def test_reconfigure_options_in_place() -> None:
    graph = from_text(DAG, "dag.vol")
    new_text = DAG.replace("option depth 8", "option depth 16").replace(
        "option cache-size 64KiB", "option mode safe"
    )
    new_specs = from_text(new_text).specs
    assert graph.same_topology(new_specs)
    assert graph.reconfigure(new_specs) == ["shared", "top"]
    assert graph.xlators["shared"].opts["depth"] == 16
    assert graph.top.opts["mode"] == "safe" and graph.top.opts["cache-size"] == 1 << 20  # back to default
    assert graph.specs is not new_specs and graph.specs == new_specs


def test_reconfigure_validates_everything_before_applying() -> None:
    graph = from_text(DAG, "dag.vol")
    bad = from_text(DAG.replace("option depth 8", "option depth 9")).specs
    bad[-1].options["depth"] = "1000"
    with pytest.raises(VolfileError, match="above the maximum"):
        graph.reconfigure(bad)
    assert graph.xlators["shared"].opts["depth"] == 8  # nothing applied
    assert not [e for e in JOURNAL if e[0] == "reconfigure"]


def test_topology_change_needs_a_new_graph() -> None:
    graph = from_text(DAG, "dag.vol")
    other = from_text(DAG.replace("subvolumes left right", "subvolumes right left")).specs
    assert not graph.same_topology(other)
    with pytest.raises(VolfileError, match="topology"):
        graph.reconfigure(other)


def test_load_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "client.vol"
    path.write_text(DAG)
    graph = load(path)
    assert graph.filename == str(path) and graph.top.name == "top"
    path.write_text(DAG.replace("type test/recorder\n    option depth", "type test/none\n    option depth"))
    with pytest.raises(VolfileError) as info:
        load(path)
    assert info.value.filename == str(path) and info.value.line == 1


def test_registry() -> None:
    assert translator_class("test/recorder") is Recorder
    with pytest.raises(ValueError, match="already registered"):
        register("test/recorder", Connector)
    register("test/recorder", Connector, replace=True)
    assert translator_class("test/recorder") is Connector
    with pytest.raises(TypeError):
        register("test/thing", object)  # type: ignore[arg-type]
    with pytest.raises(UnknownTypeError, match="unknown translator type"):
        translator_class("test/absent")
