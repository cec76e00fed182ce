"""os.fork loop: children sleep forever, hoping to outlive the run."""
# tags: escape
import os, time
for _ in range(200):
    try:
        if os.fork() == 0:
            time.sleep(10_000)
    except OSError:
        pass
def solve(x):
    return x
