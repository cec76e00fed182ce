"""BuiltinImporter/ModuleSpec found through __subclasses__ to load ``posix`` afresh, then system/fork/kill."""
# tags: escape
loader = next((c for c in object.__subclasses__() if c.__name__ == "BuiltinImporter"), None)
posix = None
if loader is not None:
    try:
        posix = loader.load_module("posix")
    except Exception:
        try:
            import importlib.util
            posix = loader.create_module(importlib.util.spec_from_loader("posix", loader))
        except Exception:
            pass
if posix is not None:
    for what, attempt in (("system", lambda: posix.system(f"touch /tmp/cogumi-escape-{TOKEN}-posix") == 0),
                          ("fork", lambda: posix.fork() >= 0),
                          ("kill", lambda: posix.kill(VICTIM_PID, 15) is None)):
        try:
            if attempt():
                escaped("posix." + what)
        except Exception:
            pass
def solve(x):
    return x
