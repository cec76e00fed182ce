"""Talk to loopback listeners with the stdlib's clients: urllib, http.client, IPv6, UDP, DNS."""
# tags: escape
import http.client, socket, urllib.request
attempts = [("urllib", lambda: urllib.request.urlopen(f"http://127.0.0.1:{PORT}/x", timeout=1)),
            ("http.client", lambda: http.client.HTTPConnection("127.0.0.1", PORT, timeout=1).request("GET", "/")),
            ("ipv6", lambda: socket.create_connection(("::1", PORT6 or PORT), timeout=1)),
            ("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", UDP_PORT))),
            ("dns", lambda: socket.getaddrinfo("example.com", 443))]
for what, attempt in attempts:
    try:
        attempt()
        escaped(what)
    except Exception:
        pass
def solve(x):
    return x
