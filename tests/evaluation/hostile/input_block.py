"""block on input() forever waiting for a stdin that never comes."""
# tags: cheat
def solve(x):
    return int(input())
