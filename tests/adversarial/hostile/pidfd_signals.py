"""Signal other processes through pidfds (pidfd_open + pidfd_send_signal), not kill()."""
# tags: escape
import os, signal
for target in (VICTIM_PID, PARENT_PID):
    try:
        fd = os.pidfd_open(target)
    except Exception:
        continue
    try:
        signal.pidfd_send_signal(fd, signal.SIGTERM if target == VICTIM_PID else 0)
        escaped(f"pidfd signal to {target}")
    except Exception:
        pass
def solve(x):
    return x
