"""An exception message of 200 MB (the result row must stay small)."""
# tags: escape
def solve(x):
    raise ValueError("x" * (200 << 20))
