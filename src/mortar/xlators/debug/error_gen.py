"""debug/error-gen: fault injection between a translator and its child (GlusterFS's error-gen).

Two kinds of fault:
- failures: a share (`failure`, percent) of the fops named in `enable` fail with `error-no`, either at
  random (`random-failure`) or deterministically (one in every 100/failure calls), so a test can
  make writes fail on one replica without touching the others;
- a runtime "down" switch (`set_down`, or setxattr of `mortar.error-gen.down` to "1"/"0") that makes
  the child look like a disconnected brick: every fop fails with ENOTCONN, CHILD_DOWN goes up, the
  locks the callers held below are released (CLIENT_DISCONNECT, as a brick does when a connection
  dies) and fds opened before answer EBADF after the child comes back, exactly as protocol/client
  behaves after a reconnect. Replication tests use it to kill a replica in-process.

It also counts the fops that pass and the bytes written (`counts`, `bytes_written`, or getxattr of
`mortar.error-gen.stats`), which tests use to see what a translator above really sent.
"""

from __future__ import annotations

import errno
import json
import random
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, ClassVar

from mortar.core.context import call_context
from mortar.core.errors import FopError
from mortar.core.fops import FOPS, Fd, Loc, XattrReply, Xdata, XdataReply
from mortar.core.options import Option, OptionError
from mortar.core.translator import Event, Translator

DOWN_KEY = "mortar.error-gen.down"
STATS_KEY = "mortar.error-gen.stats"
#: fops that never fail by injection: a close must always reach the brick
_NEVER_FAIL = frozenset({"release", "releasedir"})
_OPENERS = {"open": 2, "create": 4, "opendir": 1}  # fop -> position of its new fd
_FD_ARGS: dict[str, tuple[int, ...]] = {
    name: tuple(i for i, (_, kind) in enumerate(spec.args) if kind == "fd") for name, spec in FOPS.items()
}
_DATA_ARG: dict[str, int] = {"writev": 1}


def parse_errno(name: str) -> int:
    """`EIO` or `5` -> 5; OptionError for anything else."""
    text = name.strip().upper()
    if text.isdigit():
        return int(text)
    value = getattr(errno, text, None)
    if not text.startswith("E") or not isinstance(value, int):
        raise OptionError(f"{name!r} is not an errno name (examples: EIO, ENOSPC, ENOTCONN)")
    return value


class ErrorGenTranslator(Translator):
    """Injects failures into the fops that pass through; can make its child look disconnected."""

    type_name: ClassVar[str] = "debug/error-gen"
    options: ClassVar[Mapping[str, Option]] = {
        "failure": Option("percent", 0.0, "share of the enabled fops that fail"),
        "error-no": Option("str", "EIO", "errno the injected failures carry (a name such as EIO or ENOSPC)"),
        "enable": Option("str", "", "comma-separated fops that may fail (empty: every fop but release)"),
        "random-failure": Option(
            "bool", False, "fail at random with probability `failure`; off: exactly one call in 100/failure"
        ),
        "random-seed": Option("int", 0, "seed of the random failures (0: unpredictable)"),
        "down": Option("bool", False, "start with the child looking disconnected"),
    }

    def __init__(
        self, name: str, options: Mapping[str, Any] | None = None, children: Sequence[Translator] = ()
    ) -> None:
        super().__init__(name, options, children)
        if len(self.children) != 1:
            raise ValueError(f"{name}: debug/error-gen takes exactly one subvolume")
        self.counts: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self.bytes_written = 0
        self.down = bool(self.opts["down"])
        #: bumped each time the child goes down: fds opened in an older generation are stale
        self.generation = 0
        self._clients: set[str] = set()
        self._apply()

    def _apply(self) -> None:
        self._errno = parse_errno(self.opts["error-no"])
        enabled = {f.strip() for f in self.opts["enable"].split(",") if f.strip()}
        unknown = enabled - set(FOPS)
        if unknown:
            raise OptionError(f"enable: unknown fops {', '.join(sorted(unknown))}")
        self._enabled = enabled or (set(FOPS) - _NEVER_FAIL)
        seed = self.opts["random-seed"]
        self._random = random.Random(seed or None)
        self._credit = 0.0

    def reconfigure(self, options: Mapping[str, Any]) -> None:
        super().reconfigure(options)
        self._apply()

    # ---- the down switch ------------------------------------------------------------------------

    def set_down(self, down: bool, reason: str = "error-gen switch") -> None:
        """Make the child look disconnected (or connected again) and tell the parents."""
        if down == self.down:
            return
        self.down = down
        if down:
            self.generation += 1
            clients, self._clients = self._clients, set()
            for client in sorted(clients):
                self.children[0].notify(Event.CLIENT_DISCONNECT, self, client)
        self.log.info("child %s (%s)", "down" if down else "up", reason)
        for parent in list(self.parents):
            parent.notify(Event.CHILD_DOWN if down else Event.CHILD_UP, self, reason)

    # ---- injection ------------------------------------------------------------------------------

    def _should_fail(self, fop: str) -> bool:
        rate = self.opts["failure"]
        if fop not in self._enabled or rate <= 0:
            return False
        if self.opts["random-failure"]:
            return self._random.random() * 100 < rate
        self._credit += rate
        if self._credit >= 100:
            self._credit -= 100
            return True
        return False

    def _check_fd(self, fop: str, fd: Fd) -> None:
        opened = fd.ctx.get(self)
        if opened is not None and opened != self.generation:
            raise FopError(errno.EBADF, f"{self.name}: {fop} on {fd!r} opened before the child went down")

    async def _pass(self, fop: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.counts[fop] += 1
        pos = _DATA_ARG.get(fop)
        if pos is not None and len(args) > pos:
            self.bytes_written += memoryview(args[pos]).nbytes
        self._clients.add(call_context.get().client)
        child = self.children[0]
        if fop in _NEVER_FAIL:
            fd = args[0]
            fd.ctx.pop(self, None)
            return await getattr(child, fop)(*args, **kwargs)
        if self.down:
            raise FopError(errno.ENOTCONN, f"{self.name}: the child is down (error-gen)")
        for i in _FD_ARGS[fop]:
            self._check_fd(fop, args[i])
        if self._should_fail(fop):
            self.injected[fop] += 1
            raise FopError(self._errno, f"{self.name}: injected failure of {fop}")
        newfd_pos = _OPENERS.get(fop)
        if newfd_pos is not None:
            fd = args[newfd_pos]
            if fd.ctx.get(self, self.generation) != self.generation:  # a reopen: drop the stale one
                try:
                    await child.release(fd) if fop != "opendir" else await child.releasedir(fd)
                except FopError as exc:
                    self.log.debug("releasing the stale copy of %r: %s", fd, exc)
            reply = await getattr(child, fop)(*args, **kwargs)
            fd.ctx[self] = self.generation
            return reply
        return await getattr(child, fop)(*args, **kwargs)

    def stats(self) -> dict[str, Any]:
        return {
            "down": self.down,
            "generation": self.generation,
            "counts": dict(self.counts),
            "injected": dict(self.injected),
            "bytes_written": self.bytes_written,
        }

    # ---- control keys ---------------------------------------------------------------------------

    async def setxattr(
        self, loc: Loc, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        if DOWN_KEY in xattrs:
            self.set_down(bytes(xattrs[DOWN_KEY]).strip() not in (b"0", b"", b"off"), "set by setxattr")
            return XdataReply()
        return await self._pass("setxattr", (loc, xattrs, flags, xdata), {})

    async def getxattr(self, loc: Loc, name: str | None, xdata: Xdata = None) -> XattrReply:
        if name == STATS_KEY:
            return XattrReply({STATS_KEY: json.dumps(self.stats()).encode()})
        return await self._pass("getxattr", (loc, name, xdata), {})


def _make(fop: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    async def method(self: ErrorGenTranslator, *args: Any, **kwargs: Any) -> Any:
        return await self._pass(fop, args, kwargs)

    method.__name__ = fop
    method.__qualname__ = f"ErrorGenTranslator.{fop}"
    method.__doc__ = f"{fop}, with faults injected."
    return method


for _fop in FOPS:
    if _fop not in ("setxattr", "getxattr"):
        setattr(ErrorGenTranslator, _fop, _make(_fop))
