"""NBD server: QEMU, qemu-img, nbdcopy and fio reach mortar images through it, with no FUSE in the path."""

from mortar.frontends.nbd.backend import ExportBackend, ExportProvider, FileExport, FileExportProvider
from mortar.frontends.nbd.server import NbdServer

__all__ = ["ExportBackend", "ExportProvider", "FileExport", "FileExportProvider", "NbdServer"]
