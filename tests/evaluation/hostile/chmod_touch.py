"""change modes, times and ownership of outside files."""
# tags: escape
import os
for attempt in (lambda: os.chmod(SENTINEL, 0o777), lambda: os.utime(SENTINEL, (0, 0)),
                lambda: os.chown(SENTINEL, 65534, 65534), lambda: os.chmod(WATCHED, 0o777)):
    try:
        attempt()
        escaped("metadata changed")
    except Exception:
        pass
def solve(x):
    return x
