"""symlinks inside the work dir that point outside, then write through them."""
# tags: escape
import os
for target, link, name in ((WATCHED, "wlink", "wlink/pwned.txt"), (SENTINEL, "slink", "slink"),
                           ("/tmp", "tlink", f"tlink/cogumi-escape-{TOKEN}-symlink")):
    try:
        os.symlink(target, link)
    except Exception:
        pass
    try:
        open(name, "w").write("pwned")
        escaped("wrote through symlink " + name)
    except Exception:
        pass
try:
    print(open("slink").read())
except Exception:
    pass
def solve(x):
    return x
