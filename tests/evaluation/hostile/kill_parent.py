"""kill the parent, a victim process and its group; probe kill(-1)."""
# tags: escape
import os, signal
for what, attempt in (("victim", lambda: os.kill(VICTIM_PID, signal.SIGKILL)),
                      ("victim group", lambda: os.killpg(os.getpgid(VICTIM_PID), signal.SIGKILL)),
                      ("parent", lambda: os.kill(PARENT_PID, 0)),
                      ("ppid", lambda: os.kill(os.getppid(), signal.SIGSTOP) if os.getppid() > 1 else None),
                      ("everyone (probe)", lambda: os.kill(-1, 0))):
    try:
        attempt()
        if what != "ppid":
            escaped("could signal " + what)
    except Exception:
        pass
def solve(x):
    return x
