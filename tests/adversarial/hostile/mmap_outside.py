"""Map a file outside the work dir writable and change it through memory; map a huge anonymous region."""
# tags: escape
import mmap, os
try:
    fd = os.open(SENTINEL, os.O_RDWR)
    m = mmap.mmap(fd, 0)
    m[:5] = b"pwned"
    m.flush()
    escaped("mmap write")
except Exception:
    pass
try:
    big = mmap.mmap(-1, 64 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
    big[-1] = 1
except Exception:
    pass
def solve(x):
    return x
