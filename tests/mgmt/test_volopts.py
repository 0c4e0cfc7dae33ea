"""The `volume set` key table: lookups, suggestions, validation against translator declarations,
mapping into volgen's description, and option groups."""

from __future__ import annotations

from pathlib import Path

import pytest

from mortar.graph.registry import UnknownTypeError, translator_class
from mortar.mgmt import volopts
from mortar.mgmt.volgen import Brick, VolumeDescription
from mortar.xlators.protocol.client import ClientTranslator
from mortar.xlators.storage.posix import PosixTranslator
from tests.integration.afr import HAVE_AFR


def test_known_key_and_unknown_key_with_suggestion() -> None:
    assert volopts.lookup("network.ping-timeout").option == "ping-timeout"
    with pytest.raises(volopts.OptionKeyError, match=r"did you mean 'network\.ping-timeout'"):
        volopts.lookup("network.ping-timout")
    with pytest.raises(volopts.OptionKeyError, match=r"did you mean 'network\.ping-timeout'"):
        volopts.lookup("ping-timeout")  # the last part alone names one key
    with pytest.raises(volopts.OptionKeyError, match=r"did you mean 'storage\.reserve'"):
        volopts.lookup("storage.reserv")
    with pytest.raises(volopts.OptionKeyError) as info:
        volopts.lookup("completely.unrelated-thing-xyz")
    assert "did you mean" not in str(info.value)


def test_values_are_checked_by_the_translator_declaration() -> None:
    assert volopts.validate("network.ping-timeout", " 20 ") == "20"
    assert volopts.validate("storage.reserve", "5%") == "5%"
    with pytest.raises(volopts.OptionKeyError, match="is not a duration"):
        volopts.validate("network.ping-timeout", "soon")
    with pytest.raises(volopts.OptionKeyError, match="below the minimum"):
        volopts.validate("network.ping-timeout", "0.01")
    with pytest.raises(volopts.OptionKeyError, match="not between 0% and 100%"):
        volopts.validate("storage.reserve", "150")
    with pytest.raises(volopts.OptionKeyError, match="is not one of"):
        volopts.validate("cluster.lookup-unhashed", "sometimes")
    with pytest.raises(volopts.OptionKeyError, match="not a boolean"):
        volopts.validate("performance.client-io-threads", "maybe")


def test_defaults_and_descriptions_come_from_the_translators() -> None:
    row = volopts.describe("network.ping-timeout", None)
    decl = ClientTranslator.options["ping-timeout"]
    assert row["source"] == "default"
    assert row["value"] == row["default"] == decl.format(decl.default)
    assert row["description"] == decl.description and row["type"] == "time"
    row = volopts.describe("storage.reserve", "7")
    assert (row["value"], row["source"], row["default"]) == ("7", "set", "1.0")
    assert row["description"] == PosixTranslator.options["reserve"].description


def test_every_key_targets_a_real_declared_option() -> None:
    for entry in volopts.TABLE.values():
        if entry.local is not None:
            continue
        try:
            cls = translator_class(entry.xlator)
        except UnknownTypeError:
            continue  # a translator still being written; its keys say "unavailable"
        assert entry.declaration() is not None, entry.key
        assert cls.type_name == entry.xlator
    rows = volopts.describe_all({})
    assert [r["key"] for r in rows] == sorted(volopts.TABLE)


def test_apply_maps_keys_onto_translator_options() -> None:
    desc = VolumeDescription("v", "00000000-0000-0000-0000-000000000001", [Brick("h", "/b")])
    volopts.apply(
        desc,
        {
            "network.ping-timeout": "20",
            "performance.io-thread-count": "32",
            "storage.reserve": "3",
            "auth.allow": "10.0.0.*",
            "performance.client-io-threads": "on",
            "some.key-from-a-newer-build": "x",
        },
    )
    assert desc.xlator_options == {
        "protocol/client": {"ping-timeout": "20"},
        "performance/io-threads": {"thread-count": "32"},
        "storage/posix": {"reserve": "3"},
    }
    assert desc.auth_allow == "10.0.0.*" and desc.client_io_threads


def test_group_files(tmp_path: Path) -> None:
    text = "# comment\nnetwork.ping-timeout=20  # trailing comment\n\nstorage.reserve = 2\n"
    assert volopts.parse_group(text, "g") == {"network.ping-timeout": "20", "storage.reserve": "2"}
    with pytest.raises(volopts.OptionKeyError, match=r"group g line 2: option 'no\.such-key' does not exist"):
        volopts.parse_group("storage.reserve=2\nno.such-key=1\n", "g")
    with pytest.raises(volopts.OptionKeyError, match="line 1: expected key=value"):
        volopts.parse_group("storage.reserve\n", "g")
    with pytest.raises(volopts.OptionKeyError, match="sets no option"):
        volopts.parse_group("# nothing\n", "g")
    with pytest.raises(volopts.OptionKeyError, match=r"known groups: .*virt"):
        volopts.load_group("nosuchgroup", [tmp_path])
    with pytest.raises(volopts.OptionKeyError, match=r"bad group name"):
        volopts.load_group("../etc/passwd", [tmp_path])
    (tmp_path / "mine").write_text("network.ping-timeout=5\n")
    assert volopts.load_group("mine", [tmp_path]) == {"network.ping-timeout": "5"}
    assert "mine" in volopts.group_names([tmp_path])
    (tmp_path / "virt").write_text("network.ping-timeout=9\n")  # an operator's file wins
    assert volopts.load_group("virt", [tmp_path]) == {"network.ping-timeout": "9"}


@pytest.mark.skipif(not HAVE_AFR, reason="the virt group sets cluster/replicate options")
def test_shipped_virt_group() -> None:
    virt = volopts.load_group("virt")
    assert virt["network.ping-timeout"] == "20"
    assert virt["cluster.quorum-type"] == "auto"
    assert virt["cluster.eager-lock"] == "enable"
    assert virt["cluster.data-self-heal-algorithm"] == "full"
    assert virt["performance.io-thread-count"] == "32"
    assert virt["performance.client-io-threads"] == "on"
    assert virt["storage.o-direct"] == "on"  # O_DIRECT from QEMU reaches the disk, as in GlusterFS's
