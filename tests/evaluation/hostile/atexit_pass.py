"""register an atexit hook that prints a pass and exits 0, then crash."""
# tags: cheat
import atexit, os
atexit.register(lambda: (print("passed"), os._exit(0)))
def solve(x):
    return x
raise SystemExit(0)
