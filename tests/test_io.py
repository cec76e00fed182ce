"""cogumi.io: atomic writes leave the modes an ordinary open()/mkdir() would (the umask), never 0600/0700."""

from __future__ import annotations

import os
import stat

import pytest

from cogumi.io import atomic_dir, atomic_write_json, atomic_write_text, current_umask


@pytest.fixture
def umask():
    def set_mask(mask: int) -> int:
        os.umask(mask)
        return mask
    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    f = atomic_write_text(tmp_path / "a.txt", "x")
    j = atomic_write_json(tmp_path / "sub" / "b.json", {"a": 1})
    with atomic_dir(tmp_path / "model") as d:
        (d / "weights.bin").write_bytes(b"1")
        atomic_write_text(d / "cogumi.json", "{}")
    assert mode(f) == mode(j) == mode(tmp_path / "model" / "cogumi.json") == 0o666 & ~mask
    assert mode(tmp_path / "model") == 0o777 & ~mask
    assert os.umask(mask) == mask          # reading the umask did not change it


def test_replacing_an_existing_file_gets_fresh_modes(tmp_path, umask):
    umask(0o022)
    p = tmp_path / "a.txt"
    p.write_text("old")
    p.chmod(0o600)
    atomic_write_text(p, "new")
    assert p.read_text() == "new" and mode(p) == 0o644
