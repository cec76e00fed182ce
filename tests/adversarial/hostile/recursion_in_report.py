"""Huge recursion limit, then an exception whose __str__ recurses without end: crash the harness's report."""
# tags: escape
import sys
sys.setrecursionlimit(10**7)
class Evil(Exception):
    def __str__(self):
        return str(Evil())
def solve(x):
    raise Evil()
