"""Stable brick names: a brick's `VOL-client-N` and its set's `VOL-replicate-K` are given once and
kept across remove-brick and replace-brick (AFR's pending keys, heal indexes and DHT link files
name them), volumes stored before ids default to today's numbering by position, and volgen puts
the bricks being drained in distribute's `decommissioned-bricks`."""

from __future__ import annotations

import json
import uuid

import pytest

from mortar.graph import from_text, parse
from mortar.mgmt.model import BrickInfo, VolumeInfo
from mortar.mgmt.volgen import Brick, VolumeDescription, brick_volfile, client_volfile
from tests.integration.afr import HAVE_AFR

VID = str(uuid.uuid4())


def _info(n: int, replica: int = 1) -> VolumeInfo:
    bricks = [BrickInfo("127.0.0.1", f"/b/{i}", "peer") for i in range(n)]
    return VolumeInfo.new("vol", bricks, replica, 0, "tcp")


def _desc(info: VolumeInfo) -> VolumeDescription:
    bricks = [Brick(b.host, b.path, 49152 + i, "", b.id, b.group) for i, b in enumerate(info.bricks)]
    return VolumeDescription(info.name, VID, bricks, info.replica_count, username="u", password="p")


def _by_type(text: str, kind: str) -> list[tuple[str, list[str]]]:
    return [(s.name, s.subvolumes) for s in parse(text) if s.type == kind]


def test_a_record_stored_before_ids_keeps_its_names() -> None:
    old = {
        "name": "vol",
        "id": VID,
        "replica_count": 2,
        "bricks": [{"host": "h", "path": f"/b/{i}", "peer": "p"} for i in range(4)],
    }
    info = VolumeInfo.from_json(json.dumps(old))
    assert [b.id for b in info.bricks] == [0, 1, 2, 3]
    assert [b.group for b in info.bricks] == [0, 0, 1, 1]
    assert (info.next_brick_id, info.next_set_id) == (4, 2)
    assert [info.client_name(i) for i in range(4)] == [f"vol-client-{i}" for i in range(4)]
    assert info.subvolume_name(3) == "vol-replicate-1"
    assert [b["client"] for b in info.public()["bricks"]] == [f"vol-client-{i}" for i in range(4)]
    again = VolumeInfo.from_json(info.to_json())  # written back with the ids, read the same
    assert [(b.id, b.group) for b in again.bricks] == [(b.id, b.group) for b in info.bricks]


def test_a_removed_brick_leaves_the_others_names_alone() -> None:
    info = _info(3)
    before = parse(client_volfile(_desc(info)))
    assert [s.name for s in before if s.type == "protocol/client"] == [f"vol-client-{i}" for i in range(3)]
    info.bricks = info.bricks[1:]  # remove-brick of the first brick of a distribute volume
    desc = _desc(info)
    after = client_volfile(desc)
    clients = {s.name: s.options["remote-subvolume"] for s in parse(after) if s.type == "protocol/client"}
    assert clients == {"vol-client-1": "vol-brick-1", "vol-client-2": "vol-brick-2"}
    assert _by_type(after, "cluster/distribute") == [("vol-dht", ["vol-client-1", "vol-client-2"])]
    # the brick side answers to the same name, with the same inner names as before the removal
    brick = parse(brick_volfile(desc, 0))
    assert [s.name for s in brick] == [
        "vol-1-posix", "vol-1-locks", "vol-1-index", "vol-1-io-threads", "vol-brick-1", "vol-1-server",
    ]  # fmt: skip
    # a new brick gets a new number, never one a removed brick had
    assert info.take_brick_id() == 3


@pytest.mark.skipif(not HAVE_AFR, reason="needs cluster/replicate")
def test_replica_sets_keep_their_names_and_pending_keys() -> None:
    info = _info(4, replica=2)
    info.bricks = info.bricks[2:]  # the first replica set removed
    text = client_volfile(_desc(info))
    assert _by_type(text, "cluster/replicate") == [("vol-replicate-1", ["vol-client-2", "vol-client-3"])]
    afr = next(s for s in parse(text) if s.type == "cluster/replicate")
    assert afr.options["afr-pending-xattr"] == "vol-client-2,vol-client-3"
    graph = from_text(text)
    assert graph.top.name == "vol"


@pytest.mark.skipif(not HAVE_AFR, reason="needs cluster/replicate")
def test_lowering_the_replica_count_keeps_the_names_left() -> None:
    info = _info(6, replica=3)
    info.bricks = [b for i, b in enumerate(info.bricks) if i % 3 != 0]  # replica 3 -> 2, first copies gone
    info.replica_count = 2
    text = client_volfile(_desc(info))
    assert _by_type(text, "cluster/replicate") == [
        ("vol-replicate-0", ["vol-client-1", "vol-client-2"]),
        ("vol-replicate-1", ["vol-client-4", "vol-client-5"]),
    ]
    from_text(text)


@pytest.mark.skipif(not HAVE_AFR, reason="needs cluster/replicate")
def test_a_replacement_inherits_the_name_of_the_brick_it_replaces() -> None:
    info = _info(2, replica=2)
    gone = info.bricks[0]
    new = BrickInfo("127.0.0.1", "/b/new", "peer", gone.id, gone.group)
    info.bricks[0] = new
    desc = _desc(info)
    text = client_volfile(desc)
    clients = {s.name: s.options["remote-subvolume"] for s in parse(text) if s.type == "protocol/client"}
    assert clients == {"vol-client-0": "vol-brick-0", "vol-client-1": "vol-brick-1"}
    assert parse(brick_volfile(desc, 0))[0].options["directory"] == "/b/new"


@pytest.mark.skipif(not HAVE_AFR, reason="needs cluster/replicate")
def test_bricks_being_drained_are_decommissioned_in_the_client_graph() -> None:
    info = _info(6, replica=2)
    info.bricks = info.bricks[2:]  # sets 1 and 2 remain, named by their groups
    desc = _desc(info)
    desc.decommissioned = [info.bricks[2].name, info.bricks[3].name]  # the set vol-replicate-2
    text = client_volfile(desc)
    dht = next(s for s in parse(text) if s.type == "cluster/distribute")
    assert dht.options["decommissioned-bricks"] == "vol-replicate-2"
    graph = from_text(text)  # distribute accepts the names: they are its subvolumes
    assert graph.xlators["vol-dht"].decommissioned == frozenset({"vol-replicate-2"})  # type: ignore[attr-defined]
    desc.decommissioned = []  # remove-brick stopped or committed: the option goes away
    dht = next(s for s in parse(client_volfile(desc)) if s.type == "cluster/distribute")
    assert "decommissioned-bricks" not in dht.options


def test_distribute_decommissions_client_subvolumes() -> None:
    info = _info(3)
    desc = _desc(info)
    desc.decommissioned = [info.bricks[1].name]
    dht = next(s for s in parse(client_volfile(desc)) if s.type == "cluster/distribute")
    assert dht.options["decommissioned-bricks"] == "vol-client-1"
