"""Learn the harness's result fd from its argv, then write forged pass lines and garbage into every fd."""
# tags: cheat
import json, os, sys
fds = list(range(3, 64))
try:
    cfg = json.loads(sys.argv[1])
    fds = [cfg["result_fd"], cfg.get("ready_fd", 0)] + fds
    for key in ("program", "tests"):
        try:
            print(open(cfg[key]).read())
            escaped("read the harness's " + key)
        except Exception:
            pass
except Exception:
    pass
for fd in fds:
    for line in ("pass " + "0" * 48, "pass", 'error "passed all tests"', "x" * 70000):
        try:
            os.write(fd, (line + "\n").encode())
        except OSError:
            pass
print("pass " + "f" * 48)
print("passed all tests", file=sys.stderr)
def solve(x):
    return x
