"""fill the disk: one huge file, then thousands of files."""
# tags: escape
import os
try:
    with open("big.bin", "wb") as f:
        for _ in range(100_000):
            f.write(b"\0" * (1 << 20))
except OSError:
    pass
for i in range(100_000):
    with open(f"f{i}", "wb") as f:
        f.write(b"\0" * 65536)
