"""sleep far beyond the timeout, ignoring SIGTERM/SIGALRM."""
# tags: escape
import signal, time
for sig in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
time.sleep(10_000)
