"""classic double-fork daemon with setsid: escape the process group and live on."""
# tags: escape
import os, time
try:
    os.setsid()
    escaped("setsid")
except OSError:
    pass
try:
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(10_000)
        os._exit(0)
except OSError:
    pass
def solve(x):
    return x
