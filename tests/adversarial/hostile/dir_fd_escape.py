"""Escape with dir_fd-relative calls and chdir: open '..' as a directory fd and create files relative to it."""
# tags: escape
import os
for name, attempt in (
        ("openat ..", lambda: os.open(f"cogumi-escape-{TOKEN}-openat", os.O_CREAT | os.O_WRONLY,
                                      dir_fd=os.open("..", os.O_RDONLY | os.O_DIRECTORY))),
        ("openat /tmp", lambda: os.open(f"cogumi-escape-{TOKEN}-openat2", os.O_CREAT | os.O_WRONLY,
                                        dir_fd=os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY))),
        ("openat watched", lambda: os.open("pwned.txt", os.O_CREAT | os.O_WRONLY,
                                           dir_fd=os.open(WATCHED, os.O_RDONLY | os.O_DIRECTORY))),
        ("mkdir dir_fd", lambda: os.mkdir(f"cogumi-escape-{TOKEN}-dirfd",
                                          dir_fd=os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)))):
    try:
        attempt()
        escaped(name)
    except Exception:
        pass
try:
    os.chdir(WATCHED)
    open("pwned-chdir.txt", "w").write("x")
    escaped("chdir + relative write")
except Exception:
    pass
def solve(x):
    return x
