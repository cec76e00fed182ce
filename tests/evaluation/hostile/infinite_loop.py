"""infinite loop inside the function under test."""
# tags: cheat
def solve(x):
    while True:
        x += 1
