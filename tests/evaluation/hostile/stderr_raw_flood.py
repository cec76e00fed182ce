"""raw os.write floods on fd 1 and 2, ignoring errors."""
# tags: escape
import os
chunk = b"y" * (1 << 20)
for _ in range(10_000):
    for fd in (1, 2):
        try:
            os.write(fd, chunk)
        except OSError:
            pass
def solve(x):
    return x
