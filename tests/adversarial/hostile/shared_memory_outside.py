"""Create POSIX shared memory, FIFOs and semaphores (they live in /dev/shm and /tmp, outside the work dir)."""
# tags: escape
import os
try:
    from multiprocessing import shared_memory
    seg = shared_memory.SharedMemory(name=f"cogumi-escape-{TOKEN}-shm", create=True, size=4096)
    escaped("shared memory segment")
except Exception:
    pass
try:
    import _posixshmem
    _posixshmem.shm_open(f"/cogumi-escape-{TOKEN}-raw", os.O_CREAT | os.O_RDWR, 0o600)
    escaped("shm_open")
except Exception:
    pass
try:
    os.mkfifo(f"/tmp/cogumi-escape-{TOKEN}-fifo")
    escaped("fifo in /tmp")
except Exception:
    pass
try:
    import multiprocessing.synchronize as ms
    ms.Lock(ctx=__import__("multiprocessing").get_context("fork"))
    escaped("posix semaphore")
except Exception:
    pass
def solve(x):
    return x
