"""escape the work dir with relative .. paths and chdir."""
# tags: escape
import os
for path in ("../escape.txt", "../../escape.txt", f"../../cogumi-escape-{TOKEN}-dotdot",
             f"../../../tmp/cogumi-escape-{TOKEN}-dotdot3"):
    try:
        open(path, "w").write("pwned")
        escaped("wrote " + path)
    except Exception:
        pass
try:
    os.chdir("/tmp")
    open(f"cogumi-escape-{TOKEN}-chdir", "w").write("pwned")
    escaped("chdir write")
except Exception:
    pass
try:
    os.makedirs(f"/tmp/cogumi-escape-{TOKEN}-dir/sub")
    escaped("mkdir outside")
except Exception:
    pass
def solve(x):
    return x
