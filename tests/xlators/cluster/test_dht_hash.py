"""The DHT hash must equal GlusterFS's `gf_dm_hashfn` bit for bit: it decides where files live on disk."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from mortar.xlators.cluster.dht_hash import DEFAULT_HASHER, NameHasher, dm_hash

VECTORS = [
    ("a", 0x3A17E4E6),
    ("hello world", 0xDAB8AAD1),
    ("0123456789abcdef", 0x6ECB5ADA),
    ("file-ÄÖ.txt", 0x9C52CDCC),
]


@pytest.mark.parametrize(("name", "expected"), VECTORS)
def test_reference_vectors(name: str, expected: int) -> None:
    assert dm_hash(name.encode("utf-8")) == expected


def test_rsync_temporaries_hash_like_their_final_name() -> None:
    assert DEFAULT_HASHER(".disk.img.Xa81bQ") == DEFAULT_HASHER("disk.img")
    assert DEFAULT_HASHER.effective_name(".foo.XXXX") == "foo"
    # no match: a dot file without a suffix, or a plain name
    assert DEFAULT_HASHER.effective_name(".bashrc") == ".bashrc"
    assert DEFAULT_HASHER("plain") == dm_hash(b"plain")


def test_extra_regex_is_tried_first_and_rsync_can_be_disabled() -> None:
    hasher = NameHasher(extra_regex=r"^(.+)\.part$")
    assert hasher("video.mkv.part") == dm_hash(b"video.mkv")
    assert hasher(".x.tmp") == dm_hash(b"x")
    no_rsync = NameHasher(rsync_regex="")
    assert no_rsync(".x.tmp") == dm_hash(b".x.tmp")


# GlusterFS's libglusterfs/src/hashfn.c, compiled as the reference for random names: the test
# catches any Python slip in 32-bit wrap-around, word order, padding or signed-char handling.
_C_SOURCE = r"""
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#define DM_DELTA 0x9E3779B9
static void dm_round(int rounds, uint32_t *array, uint32_t *h0, uint32_t *h1) {
    uint32_t sum = 0, b0 = *h0, b1 = *h1; int n = rounds;
    do {
        sum += DM_DELTA;
        b0 += ((b1 << 4) + array[0]) ^ (b1 + sum) ^ ((b1 >> 5) + array[1]);
        b1 += ((b0 << 4) + array[2]) ^ (b0 + sum) ^ ((b0 >> 5) + array[3]);
    } while (--n);
    *h0 += b0; *h1 += b1;
}
static uint32_t gf_dm_hashfn(const char *msg, int len) {
    uint32_t h0 = 0x9464a485, h1 = 0x542e1a94, array[4], pad;
    int i, j, full_quads, full_words, full_bytes; const uint32_t *intmsg = (const uint32_t *)msg;
    pad = (uint32_t)len | ((uint32_t)len << 8); pad |= pad << 16;
    full_bytes = len; full_words = len / 4; full_quads = len / 16;
    for (i = 0; i < full_quads; i++) {
        for (j = 0; j < 4; j++) { array[j] = *intmsg++; full_words--; full_bytes -= 4; }
        dm_round(6, array, &h0, &h1);
    }
    for (j = 0; j < 4; j++) {
        if (full_words) { array[j] = *intmsg++; full_words--; full_bytes -= 4; }
        else {
            array[j] = pad;
            while (full_bytes) { array[j] <<= 8; array[j] |= msg[len - full_bytes]; full_bytes--; }
        }
    }
    dm_round(10, array, &h0, &h1);
    return h0 ^ h1;
}
int main(void) {
    char line[4096];
    while (fgets(line, sizeof line, stdin)) {
        unsigned char buf[2048]; int n = 0;
        for (char *p = line; p[0] && p[1] && p[0] != '\n'; p += 2) {
            unsigned v; sscanf(p, "%2x", &v); buf[n++] = v;
        }
        printf("%08x\n", gf_dm_hashfn((const char *)buf, n));
    }
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_matches_the_c_code_on_random_names(tmp_path: Path) -> None:
    src = tmp_path / "hashfn.c"
    src.write_text(_C_SOURCE)
    exe = tmp_path / "hashfn"
    subprocess.run(["cc", "-O1", "-fsigned-char", "-o", str(exe), str(src)], check=True, timeout=60)
    rng = random.Random(4242)
    names = [b""] + [bytes(rng.randrange(1, 256) for _ in range(n)) for n in range(1, 70) for _ in range(8)]
    names += [rng.choice([b"vm", b".img.", b"\xc3\xa4", b"x" * 17]) * rng.randrange(1, 9) for _ in range(200)]
    out = subprocess.run(
        [str(exe)],
        input="".join(n.hex() + "\n" for n in names if n),
        capture_output=True,
        text=True,
        timeout=60,
    )
    expected = [int(h, 16) for h in out.stdout.split()]
    assert [dm_hash(n) for n in names if n] == expected
