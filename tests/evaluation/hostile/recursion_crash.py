"""sys.setrecursionlimit(10**9) then unbounded recursion through C (map), overflowing the C stack."""
# tags: escape
import sys
sys.setrecursionlimit(10**9)
def solve(x):
    return list(map(solve, [x]))
solve(0)
