"""read the parent's memory and cmdline through /proc/PID/mem and /proc/PID/cmdline."""
# tags: escape
import os
for path in (f"/proc/{PARENT_PID}/mem", f"/proc/{PARENT_PID}/cmdline", f"/proc/{PARENT_PID}/maps",
             "/proc/self/mountinfo", f"/proc/{PARENT_PID}/root/etc/hostname"):
    try:
        with open(path, "rb") as f:
            f.read(100)
        escaped("read " + path)
    except Exception:
        pass
def solve(x):
    return x
