"""faulthandler timers and aborts: dump_traceback_later(exit=True) fires during the tests."""
# tags: escape
import faulthandler, sys
faulthandler.dump_traceback_later(0.05, exit=True, file=sys.stdout)
def solve(x):
    import time
    time.sleep(0.5)
    return 2 * x
