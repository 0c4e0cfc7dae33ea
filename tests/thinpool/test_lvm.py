"""The LVM2 backend's command layer: the exact argv of every operation, and the parsing of reports.

The vgs/pvs reports are what lvm2 2.03.16 printed here for a loop-device VG; the lvs reports of
thin LVs (which this kernel, without device-mapper, cannot create) are in the same format.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Sequence

import pytest

from mortar.core.errors import FopError
from mortar.thinpool import lvm as lvm_mod
from mortar.thinpool.lvm import (
    SIZE_TAG,
    CommandResult,
    Lvm,
    LvmPool,
    PvInfo,
    VgInfo,
    check_lv_name,
    command_error,
    parse_report,
)

VGS_REAL = (
    '  {\n      "report": [\n          {\n              "vg": [\n                  {"vg_name":"mortarcapvg", '
    '"vg_uuid":"UMZ8AY-1mR1-jCvu-6SGe-K0oC-U4qV-090Ghq", "vg_size":"62914560", "vg_free":"62914560", '
    '"vg_extent_size":"4194304", "vg_extent_count":"15", "vg_free_count":"15", "vg_tags":""}\n'
    "              ]\n          }\n      ]\n  }\n"
)
PVS_REAL = (
    '  {\n      "report": [\n          {\n              "pv": [\n                  {"pv_name":"/dev/loop0", '
    '"pv_uuid":"kXJgVw-jP4S-lTh0-zFkO-dzxl-VMR4-HCZ75n", "vg_name":"mortarcapvg", "pv_size":"62914560", '
    '"pv_free":"62914560"}\n              ]\n          }\n      ]\n  }\n'
)
LVS_EMPTY_REAL = (
    '  {\n      "report": [\n          {\n              "lv": [\n              ]\n          }\n      ]\n  }\n'
)
DM_STDERR_REAL = (
    "  /dev/mapper/control: open failed: No such device\n  Failure to communicate with kernel device-mapper "
    "driver.\n  Check that device-mapper is available in the kernel.\n  Incompatible libdevmapper 1.02.185 "
    "(2022-05-18) and kernel driver (unknown version).\n  /sbin/modprobe: execvp failed: No such file or "
    "directory\n  /sbin/modprobe failed: 2\n  thin-pool: Required device-mapper target(s) not detected in "
    "your kernel.\n  Run `lvcreate --help' for more information.\n"
)
VG = "vg0"
EXTENT = 4 << 20


def report(kind: str, rows: list[dict[str, str]]) -> str:
    """A report in lvm's own layout (indentation and all)."""
    body = ",\n".join("                  " + json.dumps(r, separators=(", ", ":")) for r in rows)
    head = f'  {{\n      "report": [\n          {{\n              "{kind}": [\n'
    return head + body + "\n              ]\n          }\n      ]\n  }\n"


POOL_ROW = {
    "lv_name": "pool",
    "lv_uuid": "Pw3Ldt-eAbm-XT1w-qF7J-3yWm-B1Lq-0uSg9a",
    "lv_size": "1073741824",
    "lv_attr": "twi-aotz--",
    "data_percent": "12.50",
    "metadata_percent": "10.94",
    "chunk_size": "65536",
    "lv_metadata_size": "4194304",
    "transaction_id": "7",
    "lv_health_status": "",
}


def thin_row(
    name: str, size: int, logical: int | None, origin: str = "", pct: str = "0.00"
) -> dict[str, str]:
    return {
        "lv_name": name,
        "lv_uuid": f"{name}-uuid",
        "lv_size": str(size),
        "lv_attr": "Vwi-aotz--",
        "pool_lv": "pool",
        "origin": origin,
        "data_percent": pct,
        "lv_tags": f"{SIZE_TAG}{logical}" if logical is not None else "",
        "lv_time": "2024-05-02 10:11:12 +0000",
    }


class FakeRunner:
    """Records every argv; answers lvs/vgs from a table of reports keyed by (command, last arg)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.answers: dict[tuple[str, str], CommandResult] = {}

    def answer(self, cmd: str, target: str, stdout: str = "", rc: int = 0, stderr: str = "") -> None:
        self.answers[(cmd, target)] = CommandResult((), rc, stdout, stderr)

    def run(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append(list(argv))
        got = self.answers.get((argv[1], argv[-1]))
        if got is None:
            return CommandResult(tuple(argv), 0, "", "")
        return CommandResult(tuple(argv), got.returncode, got.stdout, got.stderr)

    def commands(self) -> list[list[str]]:
        """The calls that change something (reports filtered out)."""
        return [c for c in self.calls if c[1] not in ("lvs", "vgs", "pvs")]


@pytest.fixture
def runner() -> FakeRunner:
    r = FakeRunner()
    r.answer("vgs", VG, report("vg", [{**json.loads(VGS_REAL)["report"][0]["vg"][0], "vg_name": VG}]))
    r.answer("lvs", f"{VG}/pool", report("lv", [POOL_ROW]))
    r.answer(
        "lvs",
        VG,
        report(
            "lv",
            [
                {**thin_row("pool", 1 << 30, None), "lv_attr": "twi-aotz--", "pool_lv": ""},
                thin_row("vm1", 8 << 30, 8 << 30, pct="1.56"),
                thin_row("vm1-snap", 8 << 30, 8 << 30, origin="vm1", pct="1.56"),
                thin_row("small", EXTENT, 1000),
                {**thin_row("plain", EXTENT, None), "lv_attr": "-wi-a-----", "pool_lv": ""},
            ],
        ),
    )
    for name, size, logical in (("vm1", 8 << 30, 8 << 30), ("small", EXTENT, 1000), ("new", EXTENT, 0)):
        r.answer("lvs", f"{VG}/{name}", report("lv", [thin_row(name, size, logical)]))
    return r


@pytest.fixture
def pool(runner: FakeRunner) -> LvmPool:
    return LvmPool.open(VG, "pool", lvm=Lvm(runner))


def test_real_vgs_and_pvs_reports_parse() -> None:
    vg = VgInfo.from_row(parse_report(VGS_REAL, "vg")[0])
    assert vg == VgInfo(
        "mortarcapvg", "UMZ8AY-1mR1-jCvu-6SGe-K0oC-U4qV-090Ghq", 62914560, 62914560, 4194304, 15, 15, ()
    )
    (pv,) = [PvInfo.from_row(r) for r in parse_report(PVS_REAL, "pv")]
    assert pv == PvInfo(
        "/dev/loop0", "kXJgVw-jP4S-lTh0-zFkO-dzxl-VMR4-HCZ75n", "mortarcapvg", 62914560, 62914560
    )
    assert parse_report(LVS_EMPTY_REAL, "lv") == []
    for bad in ("", "{}", '{"report": [{"lv": [1]}]}', "not json"):
        with pytest.raises(FopError) as exc:
            parse_report(bad, "lv")
        assert exc.value.errno == errno.EIO


def test_devices_confine_every_command() -> None:
    r = FakeRunner()
    r.answer("vgs", "vgx", VGS_REAL)
    lvm = Lvm(r, devices=["/dev/loop7", "/dev/loop8"])
    lvm.pvcreate("/dev/loop7")
    lvm.vgcreate("vgx", ["/dev/loop7", "/dev/loop8"])
    lvm.vgs("vgx")
    lvm.vgremove("vgx")
    lvm.pvremove("/dev/loop7")
    assert r.calls == [
        ["lvm", "pvcreate", "--devices", "/dev/loop7,/dev/loop8", "--yes", "/dev/loop7"],
        ["lvm", "vgcreate", "--devices", "/dev/loop7,/dev/loop8", "--yes", "vgx", "/dev/loop7", "/dev/loop8"],
        [
            "lvm", "vgs", "--devices", "/dev/loop7,/dev/loop8", "--reportformat", "json", "--units", "b",
            "--nosuffix", "-o", lvm_mod._VG_FIELDS, "vgx",
        ],
        ["lvm", "vgremove", "--devices", "/dev/loop7,/dev/loop8", "--yes", "-f", "vgx"],
        ["lvm", "pvremove", "--devices", "/dev/loop7,/dev/loop8", "--yes", "-ff", "/dev/loop7"],
    ]  # fmt: skip


def test_pool_create_argv(runner: FakeRunner) -> None:
    created = LvmPool.create(VG, "pool", 1 << 30, 64 << 10, lvm=Lvm(runner))
    assert runner.commands() == [
        ["lvm", "lvcreate", "--yes", "--type", "thin-pool", "--size", "1073741824b", "--chunksize", "65536b",
         "--name", "pool", VG],
    ]  # fmt: skip
    assert created.block_size == 64 << 10


def test_open_refuses_what_is_not_a_thin_pool(runner: FakeRunner) -> None:
    runner.answer(
        "lvs", f"{VG}/plain", report("lv", [{**POOL_ROW, "lv_name": "plain", "lv_attr": "-wi-a-----"}])
    )
    with pytest.raises(FopError) as exc:
        LvmPool.open(VG, "plain", lvm=Lvm(runner))
    assert exc.value.errno == errno.EINVAL and "not a thin pool" in str(exc.value)
    runner.answer("lvs", f"{VG}/gone", rc=5, stderr='  Failed to find logical volume "vg0/gone"\n')
    with pytest.raises(FopError) as exc:
        LvmPool.open(VG, "gone", lvm=Lvm(runner))
    assert exc.value.errno == errno.ENOENT


def test_volumes_sizes_origins_and_stats(pool: LvmPool) -> None:
    vols = pool.volumes()
    assert [v.name for v in vols] == ["small", "vm1", "vm1-snap"]  # the pool itself and plain LVs are not
    small, vm1, snap = vols
    assert (small.size, small.lv_size, small.id) == (1000, EXTENT, "small-uuid")
    assert vm1.size == 8 << 30 and vm1.origin is None and snap.origin == "vm1"
    assert vm1.allocated_bytes == int((8 << 30) * 1.56 / 100)
    assert pool.volume("vm1") is vm1  # one object per volume for its lifetime
    st = pool.stats()
    assert (st.block_size, st.data_blocks, st.used_blocks) == (65536, 16384, 2048)
    assert st.free_blocks == 16384 - 2048 and st.volumes == 3 and st.transaction == 7
    assert st.virtual_bytes == 1000 + 2 * (8 << 30) and st.metadata_bytes == 4 << 20
    assert pool.check() == []
    assert str(pool.uuid) == st.uuid


def test_create_snapshot_rename_delete_argv(pool: LvmPool, runner: FakeRunner) -> None:
    vol = pool.create_volume("new", 0)
    assert vol.size == 0 and vol.lv_size == EXTENT
    runner.answer("lvs", f"{VG}/vm1-s2", report("lv", [thin_row("vm1-s2", 8 << 30, None, origin="vm1")]))
    pool.snapshot("vm1", "vm1-s2")
    small = pool.volume("small")
    runner.answer(
        "lvs", f"{VG}/tiny", report("lv", [{**thin_row("tiny", EXTENT, 1000), "lv_uuid": "small-uuid"}])
    )
    pool.rename_volume("small", "tiny")
    assert pool.volume("tiny") is small and small.name == "tiny"  # the same volume, renamed
    pool.delete_volume("vm1")
    assert runner.commands() == [
        ["lvm", "lvcreate", "--yes", "--virtualsize", f"{EXTENT}b", "--thin", f"{VG}/pool", "--name", "new",
         "--addtag", f"{SIZE_TAG}0"],
        ["lvm", "lvcreate", "--yes", "--snapshot", "--setactivationskip", "n", "--activate", "y",
         "--name", "vm1-s2", f"{VG}/vm1"],
        # the snapshot carries its origin's byte size, whatever LVM copied of the tags
        ["lvm", "lvchange", "--addtag", f"{SIZE_TAG}{8 << 30}", f"{VG}/vm1-s2"],
        ["lvm", "lvrename", VG, "small", "tiny"],
        ["lvm", "lvremove", "--yes", f"{VG}/vm1"],
    ]  # fmt: skip


def test_growing_resizes_the_lv_and_retags(pool: LvmPool, runner: FakeRunner) -> None:
    vol = pool.volume("small")
    vol.resize(10 << 20)  # 10 MiB: the LV grows to 3 extents
    assert runner.commands() == [
        ["lvm", "lvresize", "--yes", "--force", "--size", f"{3 * EXTENT}b", f"{VG}/small"],
        ["lvm", "lvchange", "--deltag", f"{SIZE_TAG}1000", "--addtag", f"{SIZE_TAG}10485760", f"{VG}/small"],
    ]


@pytest.mark.skipif(lvm_mod.dm_available(), reason="this kernel has device-mapper")
def test_io_and_clone_without_device_mapper_say_why(pool: LvmPool, runner: FakeRunner) -> None:
    vol = pool.volume("vm1")
    before = len(runner.calls)
    for call in (lambda: vol.read(0, 10), lambda: vol.write(b"x", 0), lambda: pool.clone("vm1", "c")):
        with pytest.raises(FopError) as exc:
            call()
        assert exc.value.errno == errno.ENODEV and "device-mapper" in str(exc.value)
    assert len(runner.calls) == before  # refused before running anything


def test_names_lvm_refuses(pool: LvmPool) -> None:
    for bad in ("with space", "-dash", "a/b", "..", "snapshot1", "pvmove0", "x_tmeta", "x" * 300, "é"):
        with pytest.raises(FopError) as exc:
            check_lv_name(bad)
        assert exc.value.errno == errno.EINVAL
    check_lv_name("vm1.img")
    check_lv_name(".mortar-unlinked-00ff")
    with pytest.raises(FopError):
        pool.create_volume("disk 1", 0)


@pytest.mark.parametrize(
    ("stderr", "code"),
    [
        ('  Failed to find logical volume "vg0/x"\n', errno.ENOENT),
        ('  Volume group "nosuchvg" not found\n  Cannot process volume group nosuchvg\n', errno.ENOENT),
        ('  Logical Volume "vm1" already exists in volume group "vg0"\n', errno.EEXIST),
        ("  Insufficient free space: 1024 extents needed, but only 15 available\n", errno.ENOSPC),
        ("  Something else broke.\n", errno.EIO),
    ],
)
def test_errors_carry_an_errno_and_lvms_reason(stderr: str, code: int) -> None:
    err = command_error(CommandResult(("lvm", "lvrename", "vg0", "a", "b"), 5, "", stderr), "rename vg0/a")
    assert err.errno == code
    assert str(err).startswith(f"[{errno.errorcode[code]}] rename vg0/a: ")
    assert "Run `" not in str(err)


def test_missing_device_mapper_is_named() -> None:
    err = command_error(CommandResult(("lvm", "lvcreate"), 3, "", DM_STDERR_REAL), "create thin pool vg/pool")
    assert err.errno == errno.ENODEV and "device-mapper" in str(err)
    if not lvm_mod.dm_available():
        assert "use the 'thin' backend" in str(err)
