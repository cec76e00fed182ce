"""Peak memory of one piece of work inside a long-lived process (a pipeline stage, a merge).

``ru_maxrss`` is the process's peak since it started: in a pipeline, the merge stage would report what
training used hours before. Linux keeps a resettable high-water mark instead: writing ``5`` to
``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS (Linux >= 4.0), so the peak read at the end
is the peak of this piece of work alone (all threads; not child processes such as sandbox workers).
Where that file cannot be written, the process's lifetime peak is reported and says so. The reset is
process-wide: ``ru_maxrss`` and ``VmHWM`` read later count from the last reset (the merge benchmark's
per-process peak still covers the merge, which resets at its start, with everything resident then). GPU memory:
``torch.cuda``'s peak statistics, reset the same way, when a GPU is in use.

``with PeakMemory() as peak: ...`` then ``peak.as_dict()``:
``{"peak_rss_gib", "rss_scope": "this work" | "process lifetime", "start_rss_gib", "peak_gpu_gib"?}``: the
peak counts what was already resident when the work began (``start_rss_gib``: imported libraries, caches
of earlier work); the difference is what the work itself added at its peak.
"""

from __future__ import annotations

import resource
import sys


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _lifetime_peak_gib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20     # bytes on macOS, KiB on Linux


class PeakMemory:
    """Context manager measuring the peak RSS (and GPU memory) of the work inside it."""

    def __init__(self):
        self.scoped = False
        self.start_rss_gib: float | None = None      # resident when the work began (libraries, earlier caches)
        self.peak_rss_gib: float | None = None
        self.peak_gpu_gib: float | None = None

    def _cuda(self):
        torch = sys.modules.get("torch")        # only if something already imported it: never import torch here
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda
        return None

    def __enter__(self) -> "PeakMemory":
        rss = _status_kib("VmRSS")
        self.start_rss_gib = round(rss / 2**20, 3) if rss is not None else None
        self.scoped = _reset_hwm() and _status_kib("VmHWM") is not None
        cuda = self._cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        return self

    def read(self) -> dict:
        hwm = _status_kib("VmHWM") if self.scoped else None
        self.peak_rss_gib = round(hwm / 2**20, 3) if hwm is not None else round(_lifetime_peak_gib(), 3)
        cuda = self._cuda()
        if cuda is not None:
            self.peak_gpu_gib = round(cuda.max_memory_allocated() / 2**30, 3)
        return self.as_dict()

    def __exit__(self, *exc) -> None:
        self.read()

    def as_dict(self) -> dict:
        out = {"peak_rss_gib": self.peak_rss_gib, "rss_scope": "this work" if self.scoped else "process lifetime",
               "start_rss_gib": self.start_rss_gib}
        if self.peak_gpu_gib is not None:
            out["peak_gpu_gib"] = self.peak_gpu_gib
        return out


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_freed_buffers_to_the_os() -> bool:
    """Serve every allocation of 1 MiB or more from its own mapping, returned to the OS when freed.

    glibc raises its mmap threshold after the first large free, so later tensor buffers come from arenas
    that keep freed memory: peak RSS then counts buffers no longer in use (merge: +0.45 GB with 3 reader
    threads; CPU training: +1.6 GB, docs/benchmarks.md). One ``mallopt`` call; False off glibc."""
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20) == 1
    except (OSError, AttributeError):
        return False
