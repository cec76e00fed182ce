"""raise the resource limits back to unlimited, then allocate."""
# tags: escape
import resource
for res in (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE, resource.RLIMIT_NPROC):
    try:
        resource.setrlimit(res, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        escaped("raised rlimit")
    except Exception:
        pass
def solve(x):
    return x
