"""raise KeyboardInterrupt / GeneratorExit (BaseException, not Exception) from the solution."""
# tags: cheat
def solve(x):
    raise KeyboardInterrupt
