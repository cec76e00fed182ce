"""delete, rename and rmtree files outside the work dir."""
# tags: escape
import os, shutil
for attempt in (lambda: os.remove(SENTINEL), lambda: os.unlink(os.path.join(WATCHED, "keep.txt")),
                lambda: shutil.rmtree(WATCHED), lambda: os.rename(SENTINEL, "stolen"),
                lambda: os.rename(os.path.join(WATCHED, "keep.txt"), os.path.join(WATCHED, "moved.txt")),
                lambda: os.rmdir(os.path.join(WATCHED, "subdir"))):
    try:
        attempt()
        escaped("deleted/renamed")
    except Exception:
        pass
def solve(x):
    return x
