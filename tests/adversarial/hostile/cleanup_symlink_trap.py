"""Leave symlinks to a watched dir, a sentinel file and / in the work dir, hoping the cleanup follows them."""
# tags: escape
import os
for target, name in ((WATCHED, "watched-link"), (SENTINEL, "sentinel-link"), ("/", "root-link"),
                     (WATCHED + "/subdir", "deep/er/nested-link")):
    try:
        os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
        os.symlink(target, name)
    except Exception:
        pass
def solve(x):
    return x
