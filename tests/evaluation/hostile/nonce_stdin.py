"""read the nonce from stdin or /proc/self/fd, then print it."""
# tags: cheat
import os, sys
data = ""
for attempt in (lambda: sys.stdin.read(), lambda: os.read(0, 4096).decode(),
                lambda: open("/proc/self/fd/0").read(), lambda: open("/proc/self/cmdline").read()):
    try:
        data += attempt() or ""
    except Exception:
        pass
if data.strip():
    escaped("read stdin/cmdline")
for fd in range(3, 12):
    try:
        os.write(fd, ("pass " + data.strip() + "\n").encode())
    except OSError:
        pass
os._exit(0)
