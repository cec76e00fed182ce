"""sockets through _socket directly, urllib and a raw AF_PACKET socket."""
# tags: escape
for attempt in ("import _socket; s = _socket.socket(2, 1); s.connect(('127.0.0.1', PORT))",
                "import urllib.request; urllib.request.urlopen('http://127.0.0.1:%d/' % PORT, timeout=1)",
                "import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)",
                "import socket; socket.getaddrinfo('example.com', 80)"):
    try:
        exec(attempt)
        escaped(attempt)
    except Exception:
        pass
def solve(x):
    return x
