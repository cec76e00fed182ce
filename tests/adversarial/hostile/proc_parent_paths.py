"""The parent and victim through /proc: root/ and cwd/ links, fd/, task/*/environ, mem, and .. walks."""
# tags: escape
import os
found = []
for pid in (PARENT_PID, VICTIM_PID):
    for path in (f"/proc/{pid}/root{SENTINEL}", f"/proc/{pid}/cwd", f"/proc/{pid}/task/{pid}/environ",
                 f"/proc/self/../{pid}/environ", f"/proc/thread-self/../../{pid}/environ",
                 f"/proc/{pid}/cmdline", f"/proc/{pid}/maps"):
        try:
            if os.path.isdir(path):
                found.append(os.listdir(path))
                escaped("listed " + path)
            else:
                data = open(path, "rb").read()
                found.append(data[:50])
                escaped("read " + path)
        except Exception:
            pass
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                open(f"/proc/{pid}/fd/{fd}", "rb").read(10)
                escaped(f"read /proc/{pid}/fd/{fd}")
            except Exception:
                pass
    except Exception:
        pass
    try:
        with open(f"/proc/{pid}/mem", "rb") as mem:
            mem.read(1)
        escaped(f"read /proc/{pid}/mem")
    except Exception:
        pass
def solve(x):
    return x
