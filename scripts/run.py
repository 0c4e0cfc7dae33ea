"""`make run`: start mortar on one node and show it working.

Starts `mortard` in the background with its state under $MORTAR_HOME (default `.mortar-home` in the
repository), creates and starts a replica-3 volume `demo` on three local brick directories (with
`force`: one host holds every copy), writes and reads a file through the native client
(`Volume.connect`), and prints `volume info` and `volume status`. mortard's NBD server serves the
volume's images: the script makes a qcow2 image over NBD and shows it with `qemu-img info` and
`nbdinfo` (port $MORTAR_NBD_PORT, default 10809, or a free one when that is taken). Running it again
restarts the daemon and the bricks cleanly on the same state; `make stop` stops everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
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
IMAGE = "vm1/disk.qcow2"


def nbd_port() -> int:
    """$MORTAR_NBD_PORT (default NBD's 10809), or a free port when something else holds it."""
    wanted = int(os.environ.get("MORTAR_NBD_PORT", "10809"))
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", wanted))
            return wanted
        except OSError:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
    print(f"port {wanted} is taken: the NBD server listens on {port}")
    return port


NBD_PORT = 10809  # chosen in main(), once the previous run's NBD server has stopped


def api(method: str, path: str, body: dict[str, object] | None = None) -> dict[str, object]:
    return call_sync("127.0.0.1", PORT, method, path, body)


def start_daemon() -> None:
    workdir, logdir = HOME / "state", HOME / "log"
    subprocess.run(
        [
            sys.executable, "-m", "mortar.mgmt.daemon",
            "--workdir", str(workdir), "--logdir", str(logdir),
            "--listen", "127.0.0.1", "--port", str(PORT),
            "--pid-file", str(HOME / "mortard.pid"), "--nbd-port", str(NBD_PORT),
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
    global NBD_PORT
    NBD_PORT = nbd_port()
    start_daemon()
    listed = api("GET", "/v1/volumes")["volumes"]
    assert isinstance(listed, list)
    if VOLUME not in {v["name"] for v in listed}:
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
    nbd_ok = show_nbd()
    cli("volume", "info", VOLUME)
    print()
    cli("volume", "status", VOLUME)
    mortar_bin = Path(sys.executable).parent / "mortar"
    print(f"""
mortard runs in the background (state {HOME / "state"}, logs {HOME / "log"}).
  The CLI:      {mortar_bin} volume info      (also: volume status, volume set {VOLUME} group virt, help)
  From Python:  from mortar.client import Volume
                vol = Volume.connect("mortar://{REMOTE}/{VOLUME}")
  Over NBD:     qemu-img info nbd://127.0.0.1:{NBD_PORT}/{VOLUME}/{IMAGE}
                nbdinfo --list 'nbd+unix:///?socket={HOME / "state" / "run" / "nbd.sock"}'
  Stop it all:  make stop""")
    if not same or not nbd_ok:
        sys.exit(1)


def show_nbd() -> bool:
    """Make a qcow2 image over mortard's NBD server and show it with qemu-img and nbdinfo."""
    if not (shutil.which("qemu-img") and shutil.which("nbdinfo")):
        print("qemu-img or nbdinfo is missing (scripts/setup-system.sh installs them): NBD demo skipped\n")
        return True
    url = f"nbd://127.0.0.1:{NBD_PORT}/{VOLUME}/{IMAGE}"
    with Volume.connect(f"mortar://{REMOTE}/{VOLUME}") as vol:
        vol.makedirs("/" + IMAGE.rsplit("/", 1)[0], exist_ok=True)
        if not vol.exists("/" + IMAGE):
            with vol.open("/" + IMAGE, "wb") as f:
                f.truncate(256 << 20)  # NBD exports existing files: the image file comes first
    deadline = time.monotonic() + 30
    while subprocess.run(["nbdinfo", "--size", url], capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            print(f"the NBD server does not serve {url} (see {HOME / 'log' / 'nbd.log'})")
            return False
        time.sleep(0.2)  # the volume was just started: the NBD server opens it within moments
    fmt = subprocess.run(["qemu-img", "info", "--output=json", url], capture_output=True, text=True)
    if '"qcow2"' not in fmt.stdout:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", url, "128M"], check=True)
    print(f"$ qemu-img info {url}")
    subprocess.run(["qemu-img", "info", url], check=True)
    listed = subprocess.run(
        ["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{NBD_PORT}"], check=True, capture_output=True
    )
    print(f"\n$ nbdinfo --list nbd://127.0.0.1:{NBD_PORT}   (export names and sizes)")
    for export in json.loads(listed.stdout)["exports"]:
        print(f"  {export['export-name']:<40} {export['export-size']:>12} bytes")
    print()
    return True


if __name__ == "__main__":
    main()
