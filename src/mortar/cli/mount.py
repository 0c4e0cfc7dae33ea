"""`mortar mount` and `mortar umount`: the FUSE mount of a volume (frontends/fuse does the work).

The FUSE modules (pyfuse3, trio) are imported only when these commands run, so every other command
starts as fast as before.
"""

from __future__ import annotations

from mortar.cli.command import CliError, Context, Result, command


@command(
    "mount",
    "mount [-o OPTIONS] HOST:/VOLUME|--volfile FILE MOUNTPOINT",
    "mount a volume on MOUNTPOINT with FUSE",
    details="""
Starts the mount process in the background and returns once the mount is live, or fails with the
reason (exit status 1). The process logs to /var/log/mortar/mnt-<mountpoint-dashed>.log and ends
cleanly, with the graph stopped, on `umount MOUNTPOINT`, `mortar umount MOUNTPOINT` or SIGTERM.

Options (-o, comma separated, may be repeated):
  ro                        read-only mount
  attr-timeout=SECONDS      how long the kernel trusts attributes (default 1)
  entry-timeout=SECONDS     how long the kernel trusts names (default 1)
  negative-timeout=SECONDS  how long the kernel remembers a missing name (default 0)
  allow_other[=on|off]      let other users in (default: on when mounted by root)
  direct-io-mode=auto|on|off  bypass the page cache: auto (default) for O_DIRECT opens only
  read-ahead-kb=KIB         the kernel's read-ahead on the mount (default 1024; 0: kernel's)
  log-file=PATH, log-level=DEBUG|INFO|WARNING|ERROR, fsname=NAME
  nosuid, nodev, noexec, noatime...: mount flags, given to the kernel as they are

Other arguments: -f (serve in the foreground), --timeout SECONDS (wait for the volume, default 30).
The kernel checks permissions (default_permissions) and so does the brick, as the calling user.
""",
)
def mount(args: list[str], ctx: Context) -> Result:
    from mortar.frontends.fuse.mount import MountError, parse_request, run, spawn

    try:
        req = parse_request(args)
        if req.foreground:
            if run(req) != 0:
                where = req.log_file or "the messages above"
                raise CliError(f"mount of {req.mountpoint} failed; see {where}")
            return Result(f"{req.mountpoint} unmounted", {"mountpoint": req.mountpoint})
        pid = spawn(req, args)
    except MountError as exc:
        raise CliError(str(exc)) from None
    source = req.source or req.volfile
    data = {"mountpoint": req.mountpoint, "source": source, "pid": pid, "log_file": req.log_file}
    return Result(f"{source} mounted on {req.mountpoint} (pid {pid}, log {req.log_file})", data)


@command(
    "umount",
    "umount [-l] MOUNTPOINT",
    "unmount a mortar FUSE mount and wait for its process to exit",
    details="-l unmounts lazily: the mount leaves the namespace now, and goes when no longer busy.",
)
def umount(args: list[str], ctx: Context) -> Result:
    from mortar.frontends.fuse.mount import MountError, unmount

    lazy = "-l" in args
    paths = [a for a in args if a != "-l"]
    if len(paths) != 1 or paths[0].startswith("-"):
        raise CliError("usage: mortar umount [-l] MOUNTPOINT", status=2)
    try:
        pid = unmount(paths[0], lazy=lazy)
    except MountError as exc:
        raise CliError(str(exc)) from None
    return Result(f"{paths[0]} unmounted", {"mountpoint": paths[0], "pid": pid})
