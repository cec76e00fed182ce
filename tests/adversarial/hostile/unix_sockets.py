"""Reach a listener through AF_UNIX (a path socket and an abstract one): seccomp allows AF_UNIX."""
# tags: escape
import socket
for what, address in (("path", UNIX_PATH), ("abstract", "\0" + UNIX_ABSTRACT)):
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1)
        s.connect(address)
        s.sendall(("hello " + SECRET_NAME).encode())
        escaped("unix " + what)
    except Exception:
        pass
try:
    a, b = socket.socketpair()
    a.sendall(b"local only")
    b.recv(10)
except Exception:
    pass
def solve(x):
    return x
