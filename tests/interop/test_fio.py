"""fio's nbd engine with crc32c verification: four jobs, each on its own image (four connections,
served concurrently), on a quiet volume and while a brick is SIGKILLed and restarted.

One image per job, not four regions of one image: cluster/replicate still hangs when one fd of a
file is closed while other fds of that file are writing (fio jobs end one by one), see the issue
note. nbdcopy's four connections to one image cover multi-conn (test_libnbd).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from mortar.cli.main import main as mortar
from tests.interop.cluster import REPLICA, cluster, nbd_serve
from tests.interop.conftest import MiB, Served, need, run

pytestmark = [pytest.mark.interop, need("fio")]

JOBS = 4
REGION = 16 * MiB


def fio_args(uris: list[str], *job: str) -> list[str]:
    """One fio job per image: global options first, then a section per job."""
    args = [
        "fio",
        "--ioengine=nbd",
        f"--size={REGION}",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",  # no state file left in the working directory
        "--output-format=json",
        *job,
    ]
    for k, uri in enumerate(uris):
        args += [f"--name=job{k}", f"--uri={uri}"]
    return args


def check_report(out: str, time_based: bool) -> None:
    report = json.loads(out[out.index("{") :])
    assert len(report["jobs"]) == JOBS
    for job in report["jobs"]:
        assert job["error"] == 0, job
        written, verified = job["write"]["io_bytes"], job["read"]["io_bytes"]
        assert written > 0 and (verified == written if not time_based else verified > 0), job


@pytest.mark.parametrize(
    "job",
    [
        ["--rw=randwrite", "--bs=4k"],
        ["--rw=randwrite", "--bsrange=512-256k"],
        ["--rw=write", "--bs=1M"],
    ],
)
def test_fio_verify_four_jobs(served: Served, job: list[str]) -> None:
    name = "-".join(a.split("=")[1] for a in job)
    uris = [served.image(f"fio/{name}/{k}.raw", REGION) for k in range(JOBS)]
    check_report(run(*fio_args(uris, "--runtime=60", *job), timeout=90), time_based=False)


@pytest.mark.integration
@pytest.mark.skipif(
    REPLICA < 3, reason="pending: needs cluster/replicate (replica 3) to survive a brick kill"
)
def test_fio_verify_while_a_brick_is_killed_and_restarted(tmp_path: Path) -> None:
    """Writes keep being acknowledged with one brick of three gone (SIGKILL), the brick comes back
    on its port, and every block fio wrote reads back with its checksum."""
    with (
        cluster(tmp_path / "volume", name="fio") as vol,
        nbd_serve(tmp_path, "--volfile", str(vol.client_volfile)) as server,
    ):
        for k in range(JOBS):
            image = ["image", "create", f"fio/{k}.raw", str(REGION), "--volfile", str(vol.client_volfile)]
            assert mortar(image) == 0
        uris = [server.uri(f"fio/{k}.raw") for k in range(JOBS)]
        args = fio_args(
            uris, "--rw=randwrite", "--bsrange=4k-128k", "--time_based", "--runtime=6", "--verify_backlog=64"
        )
        fio = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        finished = False
        try:
            time.sleep(1.5)  # fio is writing
            vol.bricks[1].kill()
            time.sleep(2)  # writes go on against two bricks
            vol.restart(1)
            out, err = fio.communicate(timeout=60)
            finished = True
        finally:
            if not finished:
                fio.kill()
                fio.communicate()
        assert fio.returncode == 0, f"fio failed:\n{out}\n{err}\n{vol.logs()}"
        check_report(out, time_based=True)
