"""open TCP and UDP sockets to a listener on loopback."""
# tags: escape
import socket
try:
    s = socket.create_connection(("127.0.0.1", PORT), timeout=1)
    s.sendall(b"pwned")
    escaped("tcp connect")
except Exception:
    pass
try:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b"pwned", ("127.0.0.1", UDP_PORT))
    escaped("udp send")
except Exception:
    pass
try:
    srv = socket.socket()
    srv.bind(("0.0.0.0", 0))
    srv.listen()
    escaped("listen")
except Exception:
    pass
def solve(x):
    return x
