"""Fop types and the Translator base class: the vocabulary every part of mortar speaks."""

from mortar.core.context import CallContext, call_context
from mortar.core.errors import FopError
from mortar.core.fops import (
    FOPS,
    AttrReply,
    AttrSet,
    ChangeReply,
    ChecksumReply,
    CopyReply,
    DirEntry,
    DirReply,
    EntryReply,
    Fd,
    Flock,
    LkReply,
    Loc,
    ReadlinkReply,
    ReadReply,
    RenameReply,
    SeekReply,
    StatfsReply,
    XattrReply,
    Xdata,
    XdataReply,
)
from mortar.core.gfid import NULL_GFID, ROOT_GFID, Gfid
from mortar.core.iatt import Iatt, StatVfs
from mortar.core.inode import Inode, InodeTable
from mortar.core.options import Option, OptionError
from mortar.core.translator import Event, Translator

__all__ = [
    "FOPS",
    "NULL_GFID",
    "ROOT_GFID",
    "AttrReply",
    "AttrSet",
    "CallContext",
    "ChangeReply",
    "ChecksumReply",
    "CopyReply",
    "DirEntry",
    "DirReply",
    "EntryReply",
    "Event",
    "Fd",
    "Flock",
    "FopError",
    "Gfid",
    "Iatt",
    "Inode",
    "InodeTable",
    "LkReply",
    "Loc",
    "Option",
    "OptionError",
    "ReadReply",
    "ReadlinkReply",
    "RenameReply",
    "SeekReply",
    "StatVfs",
    "StatfsReply",
    "Translator",
    "XattrReply",
    "Xdata",
    "XdataReply",
    "call_context",
]
