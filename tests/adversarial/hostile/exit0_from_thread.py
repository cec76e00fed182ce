"""A daemon thread that calls os._exit(0) while the tests run (an exit code of 0 is not a pass)."""
# tags: cheat
import os, threading, time
def bail():
    time.sleep(0.01)
    os._exit(0)
threading.Thread(target=bail, daemon=True).start()
def solve(x):
    time.sleep(0.2)
    return 2 * x
