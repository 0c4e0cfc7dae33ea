"""`mortar nbd serve`: the images of mortar volumes over NBD, for QEMU, qemu-img, nbdcopy and fio."""

from __future__ import annotations

import argparse
import os
from typing import NoReturn

from mortar.cli.command import CliError, Context, Result, command
from mortar.core.log import setup_logging

DEFAULT_SOCKET = "/run/mortar/nbd.sock"
DEFAULT_PORT = 10809  # IANA's NBD port
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are the CLI's one-line usage errors instead of an exit."""

    def __init__(self, synopsis: str) -> None:
        super().__init__(prog=f"mortar {synopsis.split(' [')[0]}", add_help=False, allow_abbrev=False)
        self.synopsis = synopsis

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message}\nusage: mortar {self.synopsis}", status=2)


def daemon_uri(ctx: Context, volume: str) -> str:
    """`mortar://HOST/VOLUME` for a volume named on the command line: its node daemon is
    `--remote-host`, else `$MORTAR_HOST`, else this host."""
    host = ctx.remote_host or os.environ.get("MORTAR_HOST") or "localhost"
    return f"mortar://{host}/{volume}"


SERVE = "nbd serve [--socket PATH] [--port [PORT]] [--host ADDR] [--read-only] VOLUME|--volfile FILE ..."


@command(
    "nbd serve",
    SERVE,
    "serve the images of volumes over NBD (exports VOLUME/path/to/image); runs in the foreground",
    details=f"""
Every regular file of each volume is an export named VOLUME/path/to/image:

    qemu-img info 'nbd+unix:///data/vm1/disk.qcow2?socket={DEFAULT_SOCKET}'
    qemu-system-x86_64 -drive file=nbd://HOST:{DEFAULT_PORT}/data/vm1/disk.qcow2,format=qcow2 ...

A volume is named (its node daemon, --remote-host or this host, gives the volfile), given as a
mortar://HOST[:PORT]/VOLUME URI, or by its client volfile (--volfile FILE, or --volume NAME=FILE
to serve it under another name). --default EXPORT is served to clients asking for the empty name.

The server listens on the unix socket {DEFAULT_SOCKET} unless --socket says where; --port
(default {DEFAULT_PORT}) or --host also listen on TCP (--host defaults to 127.0.0.1: NBD has no
authentication, so expose it only to trusted networks). mortard already runs an NBD server on each
host that serves every started volume (port {DEFAULT_PORT}, socket {DEFAULT_SOCKET}; see the
admin guide): this command is for a server of your own, on another socket and port (a path a live
server listens on is refused). Logs go to stderr (--log-file to a file,
--log-level to choose); SIGTERM or SIGINT stops the server after the requests in flight.
""",
)
def nbd_serve(args: list[str], ctx: Context) -> Result:
    from mortar.frontends.nbd import __main__ as nbd_main  # the server, loaded only to serve

    parser = ArgumentParser(SERVE)
    parser.add_argument("volumes", nargs="*")
    parser.add_argument("--volfile", action="append", default=[])
    parser.add_argument("--volume", action="append", default=[])
    parser.add_argument("--socket")
    parser.add_argument("--port", type=int, nargs="?", const=DEFAULT_PORT)
    parser.add_argument("--host")
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--default")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    parser.add_argument("--log-file")
    opts = parser.parse_args(args)
    if not (opts.volumes or opts.volfile or opts.volume):
        parser.error("name at least one volume to serve")
    argv: list[str] = []
    for volume in opts.volumes:
        if volume.startswith("mortar://"):
            argv.append(volume)
        elif "/" in volume or not volume:
            parser.error(f"{volume!r} is not a volume name")
        else:
            argv += ["--volume", f"{volume}={daemon_uri(ctx, volume)}"]
    for volfile in opts.volfile:
        if not os.path.isfile(volfile):
            parser.error(f"--volfile {volfile}: no such file")
        argv += ["--volfile", volfile]
    for named in opts.volume:
        name, _, source = named.partition("=")
        if not name or "/" in name or not source:
            parser.error(f"--volume {named}: expected NAME=VOLFILE or NAME=mortar://HOST/VOLUME")
        if not source.startswith("mortar://") and not os.path.isfile(source):
            parser.error(f"--volume {named}: no such file {source}")
        argv += ["--volume", named]
    tcp = opts.port is not None or opts.host is not None
    if opts.socket or not tcp:
        argv += ["--socket", opts.socket or DEFAULT_SOCKET]
    if tcp:
        argv += ["--port", str(DEFAULT_PORT if opts.port is None else opts.port)]
        argv += ["--host", opts.host or "127.0.0.1"]
    if opts.read_only:
        argv.append("--read-only")
    if opts.default:
        argv += ["--default", opts.default]
    argv += ["--log-level", opts.log_level]
    try:
        server_args = nbd_main.parse_args(argv)
    except SystemExit:  # argparse already said why on stderr
        raise CliError("bad arguments", status=2) from None
    setup_logging(opts.log_level, opts.log_file)
    try:
        nbd_main.run(server_args)
    except nbd_main.SERVE_ERRORS as exc:
        raise CliError(f"nbd serve: {exc}") from None
    return Result("", {"stopped": True})
