"""Removing a directory tree that hostile code wrote. Stdlib only (used inside the jail by the zygote and
outside by the sandbox's parent).

A loop, not recursion (a 5,000-deep chain cannot hit the recursion limit), holding one directory open at a
time (nor the open-file limit), climbing back through ``..`` (never a symbolic link: links are unlinked, not
followed), making each directory writable by its owner before emptying it, and skipping what cannot be
removed instead of retrying it forever.
"""

import os
import stat

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(top: str) -> bool:
    """Delete ``top`` and everything under it; True when nothing is left."""
    try:
        fd = os.open(top, DIR_FLAGS)
    except OSError:
        try:
            os.unlink(top)
        except OSError:
            pass
        return not os.path.lexists(top)
    names: list[str] = []
    stuck: set[tuple[int, int]] = set()   # (device, inode) of what could not be removed
    while True:
        _make_writable(fd)
        subdir = _empty_files(fd, stuck)
        if subdir is not None:
            try:
                child = os.open(subdir, DIR_FLAGS, dir_fd=fd)
            except OSError:
                stuck.add(_key(subdir, fd))
                continue
            os.close(fd)
            fd, names = child, names + [subdir]
            continue
        if not names:
            os.close(fd)
            try:
                os.rmdir(top)
            except OSError:
                pass
            return not os.path.lexists(top)
        parent = os.open("..", DIR_FLAGS, dir_fd=fd)
        os.close(fd)
        name = names.pop()
        try:
            os.rmdir(name, dir_fd=parent)
        except OSError:
            stuck.add(_key(name, parent))
        fd = parent


def _make_writable(fd: int) -> None:
    try:
        mode = os.fstat(fd).st_mode
        if mode & 0o700 != 0o700:
            os.fchmod(fd, stat.S_IMODE(mode) | 0o700)
    except OSError:
        pass


def _empty_files(fd: int, stuck: set) -> str | None:
    """Unlink every non-directory in the directory; return the name of a subdirectory to enter, if any."""
    try:
        entries = list(os.scandir(fd))
    except OSError:
        return None
    for entry in entries:
        try:
            key = (entry.stat(follow_symlinks=False).st_dev, entry.inode())
        except OSError:
            continue
        if key in stuck:
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            os.unlink(entry.name, dir_fd=fd)
        except OSError:
            stuck.add(key)
    return None


def _key(name: str, dir_fd: int) -> tuple[int, int]:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return st.st_dev, st.st_ino
    except OSError:
        return -1, -1
