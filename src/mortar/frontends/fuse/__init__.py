"""FUSE mount of a mortar volume (pyfuse3 in asyncio mode), for everything that is not QEMU.

- `ops`: the pyfuse3 request handlers, each a fop on the client graph's top (`MortarOperations`)
- `inodes`: FUSE inode numbers <-> gfids, with the kernel's lookup counts
- `identity`: the caller of each request (uid, gid, pid, supplementary groups) as a CallContext
- `options`: the `-o` mount options
- `mount`: the process (`mortar mount`, `python -m mortar.frontends.fuse`): daemon, logging,
  signals, clean unmount; `unmount()` for `mortar umount`

Nothing is imported here, so the CLI can load the options parser without pyfuse3 and trio.
"""
