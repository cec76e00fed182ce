"""A directory tree 2000 levels deep and 5000 files, to choke the harness's cleanup."""
# tags: escape
import os
start = os.getcwd()
try:
    for i in range(2000):
        os.mkdir("d")
        os.chdir("d")
except Exception:
    pass
os.chdir(start)
try:
    os.mkdir("many")
    for i in range(5000):
        open(f"many/f{i}", "w").close()
except Exception:
    pass
def solve(x):
    return x
