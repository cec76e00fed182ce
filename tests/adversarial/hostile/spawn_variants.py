"""Every other way to start a process: posix_spawn, spawnv, pty.fork, forkpty, ProcessPool, execv."""
# tags: escape
import os, sys
attempts = [("posix_spawn", lambda: os.posix_spawn("/bin/touch", ["touch", f"/tmp/cogumi-escape-{TOKEN}-ps"], {})),
            ("spawnv", lambda: os.spawnv(os.P_NOWAIT, "/bin/sleep", ["sleep", "100"])),
            ("pty.fork", lambda: __import__("pty").fork()),
            ("forkpty", lambda: os.forkpty()),
            ("ProcessPool", lambda: __import__("concurrent.futures").futures.ProcessPoolExecutor(2).submit(os.getpid).result(5)),
            ("register_at_fork+fork", lambda: (os.register_at_fork(after_in_child=lambda: None), os.fork()))]
for what, attempt in attempts:
    try:
        result = attempt()
        if result == 0 or (isinstance(result, tuple) and result[0] == 0):
            os._exit(0)
        escaped(what)
    except Exception:
        pass
try:
    os.execv(sys.executable, [sys.executable, "-c", "raise SystemExit(0)"])
except Exception:
    pass
def solve(x):
    return x
