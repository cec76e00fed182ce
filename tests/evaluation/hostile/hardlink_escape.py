"""hard-link a file from outside into the work dir and write it."""
# tags: escape
import os
try:
    os.link(SENTINEL, "hl")
    open("hl", "w").write("pwned")
    escaped("hardlink write")
except Exception:
    pass
def solve(x):
    return x
