"""Invalid UTF-8, NUL bytes, terminal escapes, fake verdict lines and 10 MB without a newline on stdout/stderr."""
# tags: escape
import os
junk = b"\xff\xfe\x00\x1b[2J\x1b]0;pwned\x07passed all tests\n" + b"\xc3\x28" * 1000
for fd in (1, 2):
    try:
        os.write(fd, junk)
        os.write(fd, b"A" * (10 << 20))
    except OSError:
        pass
def solve(x):
    return x
