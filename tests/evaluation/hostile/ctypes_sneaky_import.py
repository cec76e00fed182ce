"""load _ctypes without `import`: importlib machinery on the extension file (the audit guard must stop it)."""
# tags: guard
import glob, importlib.machinery, importlib.util, sys
for path in glob.glob(sys.base_prefix + "/lib/python3*/lib-dynload/_ctypes*.so"):
    try:
        loader = importlib.machinery.ExtensionFileLoader("_ctypes", path)
        spec = importlib.util.spec_from_file_location("_ctypes", path, loader=loader)
        mod = importlib.util.module_from_spec(spec)
        handle = mod.dlopen(None)
        escaped("dlopen via _ctypes")
    except Exception:
        pass
def solve(x):
    return x
