"""`make run`: start mortar on one node and show it working.

Starts `mortard` in the background with its state under $MORTAR_HOME (default `.mortar-home` in the
repository), creates and starts a replica-3 volume `demo` on three local brick directories (with
`force`: one host holds every copy), writes and reads a file through the native client
(`Volume.connect`), and prints `volume info` and `volume status`. Running it again restarts the
daemon and the bricks cleanly on the same state; `make stop` stops everything.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stop import HOME, stop_all

from mortar.cli.main import main as mortar
from mortar.client import Volume
from mortar.mgmt.model import MgmtError
from mortar.mgmt.rest import call_sync

PORT = int(os.environ.get("MORTAR_PORT", "24100"))
REMOTE = f"127.0.0.1:{PORT}"
VOLUME = "demo"


def api(method: str, path: str, body: dict[str, object] | None = None) -> dict[str, object]:
    return call_sync("127.0.0.1", PORT, method, path, body)


def start_daemon() -> None:
    workdir, logdir = HOME / "state", HOME / "log"
    subprocess.run(
        [
            sys.executable, "-m", "mortar.mgmt.daemon",
            "--workdir", str(workdir), "--logdir", str(logdir),
            "--listen", "127.0.0.1", "--port", str(PORT),
            "--pid-file", str(HOME / "mortard.pid"),
        ],
        check=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            if api("GET", "/v1/node")["store_ready"]:
                return
        except MgmtError as exc:
            if time.monotonic() > deadline:
                sys.exit(f"mortard did not answer within 30 s ({exc}); see {logdir / 'mortard.log'}")
        time.sleep(0.1)


def cli(*args: str) -> None:
    status = mortar(["--remote-host", REMOTE, *args])
    if status:
        sys.exit(status)


def main() -> None:
    HOME.mkdir(parents=True, exist_ok=True)
    stopped = stop_all(quiet=True)
    if stopped:
        print(f"stopped the previous run ({stopped})")
    start_daemon()
    volumes = {v["name"]: v for v in api("GET", "/v1/volumes")["volumes"]}  # type: ignore[union-attr]
    if VOLUME not in volumes:
        bricks = [f"127.0.0.1:{HOME / 'bricks' / f'b{i}'}" for i in range(3)]
        cli("volume", "create", VOLUME, "replica", "3", *bricks, "force")
    cli("volume", "start", VOLUME, "force")

    payload = os.urandom(8 << 20)
    with Volume.connect(f"mortar://{REMOTE}/{VOLUME}") as vol:
        vol.makedirs("/hello", exist_ok=True)
        with vol.open("/hello/world.bin", "wb") as f:
            f.write(payload)
        with vol.open("/hello/world.bin", "rb") as f:
            back = f.read()
    same = back == payload
    print(
        f"\nwrote and read back /hello/world.bin through the native client: {len(back)} bytes, "
        f"sha256 {hashlib.sha256(back).hexdigest()[:16]}... {'identical' if same else 'DIFFERENT'}\n"
    )
    cli("volume", "info", VOLUME)
    print()
    cli("volume", "status", VOLUME)
    mortar_bin = Path(sys.executable).parent / "mortar"
    print(f"""
mortard runs in the background (state {HOME / "state"}, logs {HOME / "log"}).
  The CLI:      {mortar_bin} volume info      (also: volume status, volume set {VOLUME} group virt, help)
  From Python:  from mortar.client import Volume
                vol = Volume.connect("mortar://{REMOTE}/{VOLUME}")
  Stop it all:  make stop""")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
