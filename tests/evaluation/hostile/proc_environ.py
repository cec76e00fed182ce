"""read other processes' environments through /proc (the parent's, init's, every pid)."""
# tags: escape
import os
leaks = []
for pid in [PARENT_PID, os.getppid(), 1, "self/..", *os.listdir("/proc")] if os.path.isdir("/proc") else [PARENT_PID, 1]:
    try:
        data = open(f"/proc/{pid}/environ", "rb").read()
        if SECRET_NAME.encode() in data:
            leaks.append(data)
            escaped(f"secret from /proc/{pid}/environ")
    except Exception:
        pass
raise ValueError("leak: " + repr(leaks))
