"""Plain coreutils (and tar, diff, df) on a kernel FUSE mount of a one-brick, a two-brick
distribute and a replica 3 volume, compared with what the same commands do on the local disk."""

from __future__ import annotations

import os
import random
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Mount, mounted, run


def make_tree(root: Path, files: int, seed: int = 7) -> Path:
    """A tree of `files` regular files (sizes 0 to 300 KiB, nested dirs), symlinks and hard links."""
    rnd = random.Random(seed)
    root.mkdir()
    dirs = [root]
    for i in range(files):
        if i % 50 == 0:
            d = rnd.choice(dirs) / f"dir{i}"
            d.mkdir()
            d.chmod(rnd.choice([0o755, 0o750, 0o700]))
            dirs.append(d)
        path = rnd.choice(dirs) / f"f{i}.dat"
        size = rnd.choice([0, 1, 100, 4096, 5000, 65536, 300 * 1024]) if i % 10 == 0 else rnd.randrange(2000)
        path.write_bytes(rnd.randbytes(size))
        path.chmod(rnd.choice([0o644, 0o600, 0o755, 0o640]))
        os.utime(path, ns=(rnd.randrange(10**18), rnd.randrange(10**18)))
        if i % 97 == 0:
            (path.parent / f"ln{i}").symlink_to(path.name)
        if i % 131 == 0:
            os.link(path, path.parent / f"hard{i}")
    return root


@pytest.fixture(scope="module")
def tree(base: Path) -> Path:
    """A generated tree of 2,000 files (and links) and its tarball, made once on the local disk."""
    root = make_tree(base / "tree-src", 2000)
    with tarfile.open(base / "tree.tar", "w") as tar:
        tar.add(root, arcname="tree")
    return root


@pytest.fixture(scope="module", params=["one-brick", "distribute", "replica-3"])
def anymnt(request: pytest.FixtureRequest, base: Path) -> Iterator[Mount]:
    volume = {"one-brick": "volume", "distribute": "dht_volume", "replica-3": "replica_volume"}
    volfile = request.getfixturevalue(volume[request.param])
    with mounted(volfile, base / f"cu-{request.param}") as m:
        yield m


@pytest.mark.parametrize("anymnt", ["distribute"], indirect=True)  # runs all the one-brick paths, and more
def test_tar_extract_and_diff(anymnt: Mount, tree: Path, base: Path) -> None:
    dest = anymnt.path / "untar"
    dest.mkdir()
    run("tar", "-xf", base / "tree.tar", "-C", dest, timeout=240)
    run("diff", "-r", "--no-dereference", tree, dest / "tree", timeout=120)
    count = run("find", dest / "tree", "-type", "f", timeout=60).stdout.count("\n")
    assert count > 2000
    # tar keeps modes and times; diff compared contents: compare the metadata too
    for src in list(tree.rglob("*"))[:300]:
        dst = dest / "tree" / src.relative_to(tree)
        s, d = src.lstat(), dst.lstat()
        assert s.st_mode == d.st_mode
        if not stat.S_ISLNK(s.st_mode) and not stat.S_ISDIR(s.st_mode):
            assert (s.st_size, s.st_nlink) == (d.st_size, d.st_nlink)
            assert abs(s.st_mtime_ns - d.st_mtime_ns) < 1_000_000  # tarfile stores times as floats
    run("rm", "-rf", dest, timeout=120)
    assert not dest.exists()


def test_cp_mv_and_friends(anymnt: Mount, tree: Path) -> None:
    top = anymnt.path / "cu"
    top.mkdir()
    # a subtree of 20 to 80 entries: enough of every kind, and quick on a replicated volume too
    sub = next(p for p in sorted(tree.rglob("dir*")) if 20 <= sum(1 for _ in p.rglob("*")) <= 80)
    run("cp", "-a", sub, top / "copy", timeout=120)
    run("diff", "-r", "--no-dereference", sub, top / "copy", timeout=60)
    listing = run("ls", "-la", top / "copy").stdout.splitlines()
    assert listing[0].startswith("total") and listing[1].endswith(" .") and listing[2].endswith(" ..")

    f = top / "file"
    f.write_bytes(b"x" * 1000)
    run("mv", f, top / "moved")
    run("mv", top / "copy", top / "copy2")  # a directory, with its contents
    assert not f.exists() and (top / "moved").read_bytes() == b"x" * 1000 and (top / "copy2").is_dir()
    run("ln", top / "moved", top / "hard")
    run("ln", "-s", "moved", top / "soft")
    assert os.readlink(top / "soft") == "moved" and (top / "soft").read_bytes() == b"x" * 1000
    assert (top / "moved").stat().st_nlink == 2
    assert (top / "moved").stat().st_ino == (top / "hard").stat().st_ino
    run("chmod", "640", top / "hard")
    run("chown", "65534:65534", top / "moved")
    run("truncate", "-s", "5M", top / "hard")
    run("touch", "-d", "2001-02-03 04:05:06.789", top / "moved")
    out = run("stat", "-c", "%a %u %g %s %Y %h %F", top / "moved").stdout.split(maxsplit=6)
    assert out == ["640", "65534", "65534", str(5 << 20), "981173106", "2", "regular file\n"]
    run("truncate", "-s", "10", top / "moved")
    assert (top / "hard").read_bytes() == b"x" * 10
    run("touch", top / "new")
    assert (top / "new").stat().st_size == 0
    run("rm", "-rf", top, timeout=60)
    assert not top.exists()


def test_df(anymnt: Mount, base: Path) -> None:
    mine = os.statvfs(anymnt.path)
    disk = os.statvfs(base)  # the bricks live on the same file system
    assert mine.f_frsize > 0 and 0 < mine.f_bavail <= mine.f_blocks
    assert mine.f_blocks * mine.f_frsize >= disk.f_blocks * disk.f_frsize * 0.9
    assert mine.f_namemax == 255
    line = run("df", "-P", anymnt.path).stdout.splitlines()[1].split()
    assert line[5] == str(anymnt.path) and int(line[1]) > 0 and int(line[3]) > 0
