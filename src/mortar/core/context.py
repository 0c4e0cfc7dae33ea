"""Caller identity that travels with every fop (a contextvar, so it follows the task across awaits)."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who is asking: checked by the brick, and the owner of the locks the call takes."""

    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    pid: int = 0
    lk_owner: bytes = b""
    #: the connection the call arrived on, set by protocol/server (never taken from the wire);
    #: lock translators key their locks by it so a dead client's locks can be released
    client: str = ""

    def to_tuple(self) -> tuple[object, ...]:
        return (self.uid, self.gid, list(self.groups), self.pid, self.lk_owner)

    @classmethod
    def from_tuple(cls, t: list[object] | tuple[object, ...]) -> CallContext:
        if len(t) != 5:
            raise ValueError("call context must have 5 fields")
        uid, gid, groups, pid, owner = t
        if not (
            isinstance(uid, int)
            and isinstance(gid, int)
            and isinstance(pid, int)
            and isinstance(groups, (list, tuple))
            and all(isinstance(g, int) for g in groups)
            and isinstance(owner, bytes)
        ):
            raise ValueError("malformed call context")
        return cls(uid, gid, tuple(groups), pid, owner)


ROOT_CONTEXT = CallContext()
call_context: contextvars.ContextVar[CallContext] = contextvars.ContextVar(
    "call_context", default=ROOT_CONTEXT
)


def current() -> CallContext:
    return call_context.get()
