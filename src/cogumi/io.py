"""Crash-safe file output and line-numbered input.

Everything cogumi writes goes to a temporary path beside the destination and is renamed into place
when complete (``os.replace`` is atomic on POSIX within one filesystem), so a crash or ``kill -9``
leaves either the old file, the new file, or nothing -- never half a file.

Permissions: ``tempfile.mkstemp`` / ``mkdtemp`` create 0600 files and 0700 dirs whatever the umask; a
merged model a serving container or a colleague cannot read is useless, so every temp path is given the
mode an ordinary ``open()`` / ``mkdir()`` would have had (0644 / 0755 under the default umask 022)
before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Iterator

from cogumi.errors import DataError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it, which
    would briefly change it for every thread); the swap is the fallback where /proc is not there."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Give a temp file/dir the mode ``open()`` / ``mkdir()`` would have given it under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                 # someone else's live process
    return True


def _remove_dead_partials(out: Path) -> None:
    """Remove ``.{name}.partial-{pid}-*`` dirs left by a killed writer (``kill -9`` skips cleanup; an 8B merge
    leaves ~16 GB). Only dirs whose PID is no longer alive are removed; a live writer's dir is kept."""
    prefix = f".{out.name}.partial-"
    for stale in out.parent.glob(f"{glob_escape(prefix)}*"):
        pid_text = stale.name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit():
            continue                # an older unnamed temp: its owner is unknown, leave it
        pid = int(pid_text)
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; rename it to ``out`` when the block succeeds.

    On any exception the temporary directory is removed and ``out`` is untouched. With ``overwrite``
    an existing ``out`` is replaced only after the new one is complete.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        honour_umask(tmp, directory=True)
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_jsonl(path: str | os.PathLike, *, max_errors: int = 5) -> list[dict]:
    """Read a JSONL file of objects. Bad lines raise one DataError naming file, line and count."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    rows: list[dict] = []
    errors: list[str] = []
    n_bad = 0
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            n_bad += 1
            if len(errors) < max_errors:
                errors.append(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            n_bad += 1
            if len(errors) < max_errors:
                errors.append(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            continue
        rows.append(obj)
    if n_bad:
        more = f"\n  ... and {n_bad - len(errors)} more" if n_bad > len(errors) else ""
        raise DataError(f"{n_bad} bad line(s) in {path}:\n  " + "\n  ".join(errors) + more +
                        "\nFix or remove these lines and run again.")
    return rows
