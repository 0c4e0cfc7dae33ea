"""`mortar image create|info|resize|delete VOLUME/path ...`: disk images on volumes (see virt.images).

The first component of VOLUME/path names the volume, reached through its node daemon
(`--remote-host`, else `$MORTAR_HOST`, else this host) or through its client volfile (`--volfile`);
`mortar://HOST[:PORT]/VOLUME/path` names the daemon in the image reference itself.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import uvloop

from mortar.cli.command import CliError, Context, Result, command
from mortar.cli.nbd import ArgumentParser, daemon_uri
from mortar.client import AsyncVolume
from mortar.frontends.nbd.volume import open_volume, split_export_name
from mortar.virt import images
from mortar.virt.images import FORMATS, PREALLOCATIONS, ImageError, ImageInfo, format_size, parse_size

_T = TypeVar("_T")

CREATE = "image create VOLUME/path SIZE [--format raw|qcow2] [--preallocation MODE] [--volfile FILE]"
INFO = "image info VOLUME/path [--format raw|qcow2] [--volfile FILE]"
RESIZE = (
    "image resize VOLUME/path [+|-]SIZE [--shrink] [--preallocation MODE] [--format FMT] [--volfile FILE]"
)
DELETE = "image delete VOLUME/path [--volfile FILE]"


def locate(ref: str, volfile: str | None, ctx: Context) -> tuple[str, str]:
    """(volfile or mortar:// URI of the volume, path of the image on it) for an image reference."""
    if ref.startswith("mortar://"):
        netloc, _, rest = ref[len("mortar://") :].partition("/")
        if not netloc:
            raise CliError(f"{ref}: expected mortar://HOST[:PORT]/VOLUME/path", status=2)
        try:
            volume, path = split_export_name(rest)
        except ValueError:
            raise CliError(f"{ref}: expected mortar://HOST[:PORT]/VOLUME/path", status=2) from None
        if volfile:
            raise CliError("give the volume by mortar:// or by --volfile, not both", status=2)
        return f"mortar://{netloc}/{volume}", path
    try:
        volume, path = split_export_name(ref)
    except ValueError:
        raise CliError(f"{ref!r}: expected VOLUME/path/to/image", status=2) from None
    return (volfile or daemon_uri(ctx, volume)), path


def on_volume(source: str, ref: str, path: str, work: Callable[[AsyncVolume], Awaitable[_T]]) -> _T:
    """Open the volume, run `work` on it, close it: one event loop for the whole command. Errors
    name the image as the command line did (`ref`), not by its path inside the volume."""

    async def main() -> _T:
        try:
            _, volume = await open_volume(source, timeout=30)
        except (OSError, ValueError, LookupError, TimeoutError) as exc:
            raise CliError(f"cannot open the volume {source}: {exc}") from None
        try:
            return await work(volume)
        finally:
            await volume.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            return runner.run(main())
        except ImageError as exc:
            message = str(exc)
            if message.startswith(f"{path}:") or message.startswith(f"{path} "):
                message = ref + message[len(path) :]
            raise CliError(message) from None
        except OSError as exc:
            name = ref if exc.filename in (None, path) else exc.filename
            raise CliError(f"{name}: {exc.strerror or exc}") from None


def _describe(ref: str, info: ImageInfo) -> str:
    lines = [
        f"image: {ref}",
        f"format: {info.format}",
        f"virtual size: {format_size(info.virtual_size)} ({info.virtual_size} bytes)",
        f"file size: {format_size(info.file_size)} ({info.file_size} bytes)",
        f"allocated: {format_size(info.allocated)} ({info.allocated} bytes)",
    ]
    if info.cluster_size:
        lines.append(f"cluster size: {info.cluster_size}")
    if info.backing_file:
        lines.append(f"backing file: {info.backing_file}")
    if info.dirty or info.corrupt:
        flags = (("dirty", info.dirty), ("corrupt", info.corrupt))
        lines.append("state: " + ", ".join(name for name, on in flags if on))
    return "\n".join(lines)


def _data(ref: str, info: ImageInfo) -> dict[str, Any]:
    return {"image": ref, **info.as_dict()}


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ImageError as exc:
        raise CliError(str(exc), status=2) from None


@command(
    "image create",
    CREATE,
    "create a raw or qcow2 disk image on a volume",
    details="""
SIZE takes K, M, G, T suffixes (binary). --preallocation MODE: off (sparse, the default), metadata
(qcow2: all its tables written now), full (every block reserved on the bricks). A qcow2 image
lives in a container file sized for its largest possible extent (sparse until used).
""",
)
def image_create(args: list[str], ctx: Context) -> Result:
    parser = ArgumentParser(CREATE)
    parser.add_argument("image")
    parser.add_argument("size")
    parser.add_argument("--format", "-f", choices=FORMATS, default="raw")
    parser.add_argument("--preallocation", choices=PREALLOCATIONS, default="off")
    parser.add_argument("--volfile")
    opts = parser.parse_args(args)
    size = _size(opts.size)
    source, path = locate(opts.image, opts.volfile, ctx)
    info = on_volume(
        source,
        opts.image,
        path,
        lambda vol: images.create_image(vol, path, size, opts.format, opts.preallocation),
    )
    text = f"created {opts.image}: {info.format}, {format_size(info.virtual_size)}"
    return Result(text, _data(opts.image, info))


@command("image info", INFO, "show an image's format, virtual size and allocated space")
def image_info(args: list[str], ctx: Context) -> Result:
    parser = ArgumentParser(INFO)
    parser.add_argument("image")
    parser.add_argument("--format", "-f", choices=FORMATS)
    parser.add_argument("--volfile")
    opts = parser.parse_args(args)
    source, path = locate(opts.image, opts.volfile, ctx)
    info = on_volume(source, opts.image, path, lambda vol: images.image_info(vol, path, opts.format))
    return Result(_describe(opts.image, info), _data(opts.image, info))


@command(
    "image resize",
    RESIZE,
    "grow (or, with --shrink, shrink) an image to SIZE, or by +SIZE / -SIZE",
    details="""
Shrinking discards the data past the new end and needs --shrink. An image mortar did not create
needs --format (a probe is never trusted to write). Resize an image only while no VM uses it; a
running VM's disk is grown through the VM (block_resize).
""",
)
def image_resize(args: list[str], ctx: Context) -> Result:
    parser = ArgumentParser(RESIZE)
    parser.add_argument("image")
    parser.add_argument("size")
    parser.add_argument("--shrink", action="store_true")
    parser.add_argument("--preallocation", choices=PREALLOCATIONS, default="off")
    parser.add_argument("--format", "-f", choices=FORMATS)
    parser.add_argument("--volfile")
    negative = [a for a in args if re.match(r"-[0-9]", a)]  # "-1G" is a size, not an option
    opts = parser.parse_args([a for a in args if a not in negative] + (["--", *negative] if negative else []))
    relative = opts.size[0] if opts.size[:1] in ("+", "-") else ""
    amount = _size(opts.size[1:] if relative else opts.size)
    source, path = locate(opts.image, opts.volfile, ctx)

    async def resize(vol: AsyncVolume) -> tuple[ImageInfo, ImageInfo]:
        fmt = await images.writable_format(vol, path, opts.format)
        before = await images.image_info(vol, path, fmt)
        size = amount
        if relative:
            size = before.virtual_size + (amount if relative == "+" else -amount)
        after = await images.resize_image(
            vol, path, size, fmt=fmt, shrink=opts.shrink, preallocation=opts.preallocation
        )
        return before, after

    before, after = on_volume(source, opts.image, path, resize)
    text = f"resized {opts.image}: {format_size(before.virtual_size)} -> {format_size(after.virtual_size)}"
    return Result(text, {**_data(opts.image, after), "previous_size": before.virtual_size})


@command("image delete", DELETE, "delete an image file from its volume")
def image_delete(args: list[str], ctx: Context) -> Result:
    parser = ArgumentParser(DELETE)
    parser.add_argument("image")
    parser.add_argument("--volfile")
    opts = parser.parse_args(args)
    source, path = locate(opts.image, opts.volfile, ctx)
    on_volume(source, opts.image, path, lambda vol: images.delete_image(vol, path))
    return Result(f"deleted {opts.image}", {"image": opts.image, "path": path, "deleted": True})
