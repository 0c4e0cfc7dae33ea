"""The DHT name hash: GlusterFS's `gf_dm_hashfn` (Davies-Meyer over TEA, as in ext3 htree), bit for bit.

Bit-for-bit matters: a brick laid out by GlusterFS (or by another mortar client) must place every
name on the same subvolume, so the hash is part of the on-disk format, like the layout xattr.
"""

from __future__ import annotations

import re
import struct

_M = 0xFFFFFFFF
_DELTA = 0x9E3779B9
_FULL_ROUNDS = 10
_PART_ROUNDS = 6

#: GlusterFS's default: rsync writes `.name.XXXXXX` then renames it to `name`; hashing the temporary
#: like the final name puts both on the same subvolume, so the rename leaves no link file behind.
RSYNC_HASH_REGEX = r"^\.(.+)\.[^.]+$"


def _rounds(rounds: int, a0: int, a1: int, a2: int, a3: int, h0: int, h1: int) -> tuple[int, int]:
    """`dm_round`: `rounds` TEA rounds of the block (a0..a3) keyed on (h0, h1), added back (Davies-Meyer)."""
    b0, b1, total = h0, h1, 0
    for _ in range(rounds):
        total = (total + _DELTA) & _M
        b0 = (b0 + ((((b1 << 4) + a0) ^ (b1 + total) ^ ((b1 >> 5) + a1)) & _M)) & _M
        b1 = (b1 + ((((b0 << 4) + a2) ^ (b0 + total) ^ ((b0 >> 5) + a3)) & _M)) & _M
    return (h0 + b0) & _M, (h1 + b1) & _M


def dm_hash(data: bytes) -> int:
    """`gf_dm_hashfn(data, len(data))` as compiled by GCC on x86 (little-endian, signed `char`)."""
    length = len(data)
    pad = (length | (length << 8)) & _M
    pad = (pad | (pad << 16)) & _M
    nwords = length // 4
    words = struct.unpack_from(f"<{nwords}I", data)
    h0, h1 = 0x9464A485, 0x542E1A94
    full = (length // 16) * 4
    for i in range(0, full, 4):
        h0, h1 = _rounds(_PART_ROUNDS, words[i], words[i + 1], words[i + 2], words[i + 3], h0, h1)
    # the last block: whole words left over, then one word of pad with the tail bytes shifted in
    # (each as a signed char, so a byte >= 0x80 ORs in 0xffffff..), then words of pure pad
    block = list(words[full:])
    if len(block) < 4:
        word = pad
        for b in data[nwords * 4 :]:
            word = ((word << 8) & _M) | (b if b < 0x80 else 0xFFFFFF00 | b)
        block.append(word)
        block.extend([pad] * (4 - len(block)))
    h0, h1 = _rounds(_FULL_ROUNDS, block[0], block[1], block[2], block[3], h0, h1)
    return h0 ^ h1


class NameHasher:
    """Hashes a basename the way DHT places it: `extra-hash-regex`, then `rsync-hash-regex`, may
    replace the name by their first group before hashing."""

    __slots__ = ("_patterns",)

    def __init__(self, rsync_regex: str = RSYNC_HASH_REGEX, extra_regex: str = "") -> None:
        self._patterns = [re.compile(p) for p in (extra_regex, rsync_regex) if p]

    def effective_name(self, name: str) -> str:
        """The name that is actually hashed."""
        for pattern in self._patterns:
            m = pattern.search(name)
            if m is not None and m.groups() and m.group(1):
                return m.group(1)
        return name

    def __call__(self, name: str) -> int:
        return dm_hash(self.effective_name(name).encode("utf-8", "surrogateescape"))


DEFAULT_HASHER = NameHasher()
