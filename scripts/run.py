"""`make run`: start mortar on the embedded single-node default and show it working.

Starts one `mortar-brick` process on a brick directory under $MORTAR_HOME (default `.mortar-home`
in the repository), writes a file through the native client, reads it back, and leaves the brick
running so you can use it. Running it again restarts the brick on the same directory.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from mortar.client import Volume
from mortar.mgmt.volgen import Brick, VolumeDescription, brick_volfile, client_volfile

HOME = Path(os.environ.get("MORTAR_HOME", Path(__file__).resolve().parent.parent / ".mortar-home"))
VENV_BIN = Path(sys.executable).parent


def stop_old_brick(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass


def wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text().strip()
        if proc.poll() is not None:
            sys.exit(f"the brick exited with status {proc.returncode}; see {log}")
        time.sleep(0.05)
    sys.exit(f"the brick did not start within 30 s; see {log}")


def main() -> None:
    HOME.mkdir(parents=True, exist_ok=True)
    id_file = HOME / "volume-id"
    if not id_file.exists():
        id_file.write_text(str(uuid.uuid4()))
    desc = VolumeDescription(
        "demo", id_file.read_text().strip(), [Brick("127.0.0.1", str(HOME / "bricks/b0"))]
    )
    pid_file, port_file, log = HOME / "brick.pid", HOME / "brick.port", HOME / "brick.log"
    stop_old_brick(pid_file)
    port_file.unlink(missing_ok=True)
    brick_vol = HOME / "demo.brick-0.vol"
    brick_vol.write_text(brick_volfile(desc, 0, create=True))
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "mortar-brick"),
            "--volfile",
            str(brick_vol),
            "--log-file",
            str(log),
            "--port-file",
            str(port_file),
            "--pid-file",
            str(pid_file),
        ],
        start_new_session=True,
    )
    port = int(wait_for(port_file, proc, log))
    desc.bricks[0] = Brick("127.0.0.1", desc.bricks[0].path, port)
    client_vol = HOME / "demo.client.vol"
    client_vol.write_text(client_volfile(desc))
    print(f"brick {desc.bricks[0].path} serving on 127.0.0.1:{port} (pid {proc.pid}, log {log})")

    payload = os.urandom(8 << 20)
    with Volume.from_volfile(client_vol) as vol:
        vol.makedirs("/hello", exist_ok=True)
        with vol.open("/hello/world.bin", "wb") as f:
            f.write(payload)
        with vol.open("/hello/world.bin", "rb") as f:
            back = f.read()
        st = vol.stat("/hello/world.bin")
        print(
            f"wrote and read back /hello/world.bin through the native client: {st.st_size} bytes, "
            f"sha256 {hashlib.sha256(back).hexdigest()[:16]}... "
            f"{'identical' if back == payload else 'DIFFERENT'}"
        )
        print("volume root:", sorted(vol.listdir("/")))
    print(f"""
The brick keeps running. Use it from Python:
    from mortar.client import Volume
    vol = Volume.from_volfile("{client_vol}")
Check a volfile:  {VENV_BIN / "mortar"} volfile check {client_vol}
Stop the brick:   kill $(cat {pid_file})""")
    if back != payload:
        sys.exit(1)


if __name__ == "__main__":
    main()
