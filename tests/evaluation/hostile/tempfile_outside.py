"""create temp files in /tmp and /dev/shm instead of the work dir."""
# tags: escape
import tempfile
for d in ("/tmp", "/dev/shm", "/var/tmp"):
    try:
        fd, path = tempfile.mkstemp(dir=d, prefix=f"cogumi-escape-{TOKEN}-")
        escaped("mkstemp in " + d)
    except Exception:
        pass
def solve(x):
    return x
