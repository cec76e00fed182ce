"""spawn long-lived children through subprocess, os.system, os.posix_spawn, os.exec*."""
# tags: escape
import os, subprocess, sys
for attempt in (lambda: subprocess.Popen(["sleep", "10000", TOKEN]),
                lambda: os.system("sleep 10000 " + TOKEN + " &") == 0 or 1 / 0,
                lambda: os.posix_spawn("/bin/sleep", ["sleep", "10000", TOKEN], {}),
                lambda: os.spawnv(os.P_NOWAIT, "/bin/sleep", ["sleep", "10000", TOKEN])):
    try:
        attempt()
        escaped("spawned a process")
    except Exception:
        pass
os.execv("/bin/sleep", ["sleep", "10000", TOKEN])
