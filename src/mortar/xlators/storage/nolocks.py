"""What a storage translator answers to lock fops: locks live in features/locks, stacked above it."""

from __future__ import annotations

import errno

from mortar.core.errors import FopError
from mortar.core.fops import Fd, Flock, LkReply, Loc, Xdata, XdataReply
from mortar.core.translator import Translator


class NoLockTable(Translator):
    """Lock fops refused with ENOSYS and a message naming the translator that provides them."""

    def _no_locks(self, fop: str) -> FopError:
        return FopError(
            errno.ENOSYS, f"{fop}: {self.type_name} has no lock table; load features/locks above it"
        )

    async def inodelk(self, domain: str, loc: Loc, cmd: int, flock: Flock, xdata: Xdata = None) -> XdataReply:
        raise self._no_locks("inodelk")

    async def finodelk(self, domain: str, fd: Fd, cmd: int, flock: Flock, xdata: Xdata = None) -> XdataReply:
        raise self._no_locks("finodelk")

    async def entrylk(
        self, domain: str, loc: Loc, basename: str | None, cmd: int, lktype: int, xdata: Xdata = None
    ) -> XdataReply:
        raise self._no_locks("entrylk")

    async def fentrylk(
        self, domain: str, fd: Fd, basename: str | None, cmd: int, lktype: int, xdata: Xdata = None
    ) -> XdataReply:
        raise self._no_locks("fentrylk")

    async def lk(self, fd: Fd, cmd: int, flock: Flock, xdata: Xdata = None) -> LkReply:
        raise self._no_locks("lk")
