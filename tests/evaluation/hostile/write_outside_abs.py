"""write into a watched directory and over a sentinel file by absolute path."""
# tags: escape
import os
for attempt in (lambda: open(os.path.join(WATCHED, "pwned.txt"), "w").write("pwned"),
                lambda: open(SENTINEL, "a").write("pwned"),
                lambda: os.truncate(SENTINEL, 0),
                lambda: open(f"/tmp/cogumi-escape-{TOKEN}-abs", "w").write("pwned"),
                lambda: os.open(f"/tmp/cogumi-escape-{TOKEN}-osopen", os.O_CREAT | os.O_WRONLY)):
    try:
        attempt()
        escaped("wrote outside")
    except Exception:
        pass
def solve(x):
    return x
