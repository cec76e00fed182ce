"""Shared by the two hostile-code suites (tests/evaluation/test_sandbox.py, tests/adversarial/test_hostile_code.py):
reading a corpus of hostile programs and snapshotting the files they must not touch."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def load_corpus(directory: Path) -> dict[str, tuple[str, set[str]]]:
    """{program name: (source, tags from its '# tags:' line)} for every *.py in ``directory``."""
    out = {}
    for path in sorted(directory.glob("*.py")):
        text = path.read_text()
        tags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("# tags:")),
                    set())
        out[path.stem] = (text, tags)
    return out


def tree_snapshot(*roots: Path) -> dict:
    """Mode, size, mtime, owner and content hash of every path under ``roots`` (symlinks not followed)."""
    snap = {}
    for root in roots:
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            st = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
            snap[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_uid, digest)
    return snap
