"""Destroy a file outside by truncating it: os.truncate, r+ open, O_TRUNC, pathlib, io.open, shutil.copy."""
# tags: escape
import io, os, pathlib, shutil
open("empty", "w").close()
for what, attempt in (("os.truncate", lambda: os.truncate(SENTINEL, 0)),
                      ("r+", lambda: open(SENTINEL, "r+").truncate(0)),
                      ("O_TRUNC", lambda: os.close(os.open(SENTINEL, os.O_WRONLY | os.O_TRUNC))),
                      ("pathlib", lambda: pathlib.Path(SENTINEL).write_text("")),
                      ("io.open", lambda: io.open(SENTINEL, "wb").close()),
                      ("shutil.copy", lambda: shutil.copyfile("empty", SENTINEL))):
    try:
        attempt()
        escaped(what)
    except Exception:
        pass
def solve(x):
    return x
