"""ctypes: call libc fork/kill/unlink directly, below Python's audit hooks."""
# tags: escape
import ctypes
libc = ctypes.CDLL(None)
if libc.unlink(SENTINEL.encode()) == 0:
    escaped("ctypes unlink")
if libc.kill(VICTIM_PID, 9) == 0:
    escaped("ctypes kill")
pid = libc.fork()
if pid == 0:
    libc.pause()
if pid > 0:
    escaped("ctypes fork")
