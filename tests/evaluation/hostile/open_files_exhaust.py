"""exhaust file descriptors, then try to keep going."""
# tags: escape
fds = []
try:
    while True:
        fds.append(open(__import__("os").devnull))
except OSError:
    pass
def solve(x):
    return x
