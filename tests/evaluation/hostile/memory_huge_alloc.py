"""one allocation of a terabyte."""
# tags: escape
big = bytearray(10**12)
def solve(x):
    return x * 2
