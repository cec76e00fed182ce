"""raise an exception whose __str__ never returns (to hang the error reporting)."""
# tags: cheat
class Evil(Exception):
    def __str__(self):
        while True:
            pass
def solve(x):
    raise Evil()
