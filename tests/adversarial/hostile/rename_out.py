"""Move files out of a watched directory into the work dir (rename, replace, shutil.move), and hardlink in."""
# tags: escape
import os, shutil
for what, attempt in (("rename", lambda: os.rename(WATCHED + "/keep.txt", "stolen1")),
                      ("replace", lambda: os.replace(WATCHED + "/subdir/nested.txt", "stolen2")),
                      ("shutil.move", lambda: shutil.move(WATCHED + "/subdir", "stolen3")),
                      ("rename in", lambda: (open("mine", "w").write("x"), os.rename("mine", WATCHED + "/mine"))),
                      ("link", lambda: os.link(SENTINEL, "sentinel-link"))):
    try:
        attempt()
        escaped(what)
    except Exception:
        pass
def solve(x):
    return x
