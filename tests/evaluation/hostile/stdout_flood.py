"""print gigabytes to stdout."""
# tags: escape
import sys
chunk = "x" * (1 << 20)
for _ in range(10_000):
    sys.stdout.write(chunk)
