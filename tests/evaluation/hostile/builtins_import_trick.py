"""reach os through __builtins__.__import__ and getattr strings, then os.system."""
# tags: escape
b = __builtins__ if isinstance(__builtins__, dict) else __builtins__.__dict__
o = b["__import__"]("o" + "s")
try:
    if getattr(o, "sys" + "tem")(f"touch /tmp/cogumi-escape-{TOKEN}-builtins") == 0:
        escaped("os.system via __import__")
except Exception:
    pass
try:
    getattr(o, "remove")(SENTINEL)
    escaped("remove via __import__")
except Exception:
    pass
def solve(x):
    return x
