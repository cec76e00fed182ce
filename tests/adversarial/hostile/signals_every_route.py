"""Signal the victim by every route: kill, killpg, a negative pid, SIGSTOP; probe the parent; kill(0) its own group."""
# tags: escape
import os, signal
routes = [("kill TERM", lambda: os.kill(VICTIM_PID, signal.SIGTERM)),
          ("kill STOP", lambda: os.kill(VICTIM_PID, signal.SIGSTOP)),
          ("kill USR1", lambda: os.kill(VICTIM_PID, signal.SIGUSR1)),
          ("killpg INT", lambda: os.killpg(VICTIM_PID, signal.SIGINT)),
          ("kill -pgid HUP", lambda: os.kill(-VICTIM_PID, signal.SIGHUP)),
          ("parent probe", lambda: os.kill(PARENT_PID, 0))]
for what, attempt in routes:
    try:
        attempt()
        escaped(what)
    except Exception:
        pass
try:
    os.kill(0, signal.SIGWINCH)    # its own group: allowed, harmless, and must not reach anyone else
except Exception:
    pass
def solve(x):
    return x
