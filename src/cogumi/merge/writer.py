"""Writing the merged model: output shards streamed tensor by tensor through parallel pipelines.

Features
  * ``plan_shards``: the output tensors in the base's on-disk order, cut into shards.
  * ``SafetensorsStreamWriter``: one safetensors file written tensor by tensor (the header first).
  * ``write_merged_shards``: up to ``merge_jobs`` shards at once, each with a reader thread (untouched
    tensors as raw byte chunks), the merging thread (LoRA delta + finite check) and a writer thread; the
    bytes in flight over all of them bounded by one budget; every shard fsynced before it returns.

Failure modes: the first real error of any shard stops all of them (the others raise ``_Stopped``);
an fsync error (ENOSPC, EIO) fails the merge. Test hook: ``COGUMI_TEST_KILL_AFTER_SHARDS=N`` SIGKILLs the
process after N output shards are written (the crash test; never set it otherwise).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cogumi.errors import CogumiError
from cogumi.lineage import FLOAT_DTYPES, all_finite, human_bytes
from cogumi.memory import return_freed_buffers_to_the_os
from cogumi.merge.adapter import AdaptedWeights, _nonfinite_error
from cogumi.merge.weights import _st_tag, _torch_dtype

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
INFLIGHT_BYTES = 512 * 2**20          # read-ahead + write-behind budget of the streaming merge (all shards)
MAX_MERGE_JOBS = 4                     # output shards merged at once, at most one per core (an 8B model has 4;
                                       # 2 cores, 3 GB in 3 shards: 2 at once cut the merge from 11.7 s to 7.4 s)


@dataclass
class OutTensor:
    name: str
    dtype: str          # safetensors tag
    shape: list[int]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                    "BOOL": 1}[self.dtype]


@dataclass
class OutShard:
    file: str
    tensors: list[OutTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(weights, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[OutShard]:
    """Output tensors in the base's on-disk order, cut into shards of at most ``max_shard_bytes``."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for name in weights.names():
        t = OutTensor(name, weights.dtype_tag(name), weights.shape(name))
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if len(groups) == 1:
        return [OutShard("model.safetensors", groups[0])]
    n = len(groups)
    return [OutShard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


class SafetensorsStreamWriter:
    """Writes one safetensors file tensor by tensor (or chunk by chunk).

    Hand-written because safetensors' ``save_file`` takes the whole shard as a dict of tensors in memory
    (5 GB for an 8B shard). The format is simple and fixed: an 8-byte little-endian header length, a JSON
    header (name -> dtype, shape, data_offsets; padded with spaces to 8 bytes), then the raw bytes in
    header order. The shapes are known before merging, so the header goes first and each tensor is
    appended as it is produced. The output checks and the tests read the files back with safetensors.
    """

    def __init__(self, path: Path, tensors: list[OutTensor]):
        self.path, self.tensors, self._next, self._pos = path, tensors, 0, 0
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._f = open(path, "wb", buffering=0)
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._next < len(self.tensors) and self.tensors[self._next].nbytes == 0:
            self._next += 1

    def write_bytes(self, name: str, data) -> None:
        """Append ``data`` (a uint8 tensor) to tensor ``name``; tensors must come in header order."""
        if self._next >= len(self.tensors) or self.tensors[self._next].name != name:
            want = self.tensors[self._next].name if self._next < len(self.tensors) else "nothing"
            raise CogumiError(f"internal: {self.path.name}: expected {want}, got {name}")
        view = memoryview(data.numpy())
        while view:
            n = self._f.write(view)
            view = view[n:]
        self._pos += data.numel()
        if self._pos > self.tensors[self._next].nbytes:
            raise CogumiError(f"internal: {self.path.name}: {name} got more bytes than its shape holds")
        if self._pos == self.tensors[self._next].nbytes:
            self._next, self._pos = self._next + 1, 0
            self._skip_empty()

    def write(self, name: str, tensor) -> None:
        import torch
        want = self.tensors[self._next] if self._next < len(self.tensors) else None
        if want is None or name != want.name or _st_tag(tensor.dtype) != want.dtype or list(tensor.shape) != want.shape:
            raise CogumiError(f"internal: {self.path.name}: expected {want}, got {name} {tensor.dtype} "
                              f"{list(tensor.shape)}")
        if tensor.numel():
            self.write_bytes(name, tensor.contiguous().reshape(-1).view(torch.uint8))

    def close(self) -> None:
        if self._next != len(self.tensors):
            raise CogumiError(f"internal: {self.path.name}: {len(self.tensors) - self._next} tensor(s) not written")
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        self._f.close()


class _ByteBudget:
    """Bounds the bytes held by tensors between reading and writing (one oversized tensor may pass alone)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()
        self.failed = False

    def acquire(self, n: int) -> None:
        with self.cond:
            while self.used and self.used + n > self.limit and not self.failed:
                self.cond.wait(0.5)
            self.used += n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()


class _Stopped(Exception):
    """Another shard's pipeline failed; this one stopped early (its partial shard is abandoned)."""

def merge_jobs(n_shards: int) -> int:
    """How many output shards are merged at once (``COGUMI_MERGE_JOBS`` overrides).

    Each shard has its own reader, merging thread and writer, so several sequential reads and writes
    are in flight (one stream leaves the disk idle while it merges, and Linux serialises buffered
    writes to one file) and the arithmetic runs beside the I/O of the other shards."""
    raw = os.environ.get("COGUMI_MERGE_JOBS", "").strip()
    if raw:
        try:
            jobs = int(raw)
        except ValueError:
            raise CogumiError(f"COGUMI_MERGE_JOBS={raw!r}: expected a whole number of shards to merge at "
                              "once") from None
    else:
        jobs = min(MAX_MERGE_JOBS, os.cpu_count() or 1)
    return max(1, min(jobs, n_shards))


@contextlib.contextmanager
def _intra_op_threads(jobs: int):
    """Split torch's intra-op threads between ``jobs`` concurrent merging threads (no oversubscription)."""
    import torch
    before = torch.get_num_threads()
    if jobs > 1:
        torch.set_num_threads(max(1, before // jobs))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_shard(weights: AdaptedWeights, shard: OutShard, path: Path, budget: _ByteBudget, chunk_bytes: int,
                 finish: Callable[[SafetensorsStreamWriter], Any]) -> int:
    """One output shard through three overlapping stages: a reader thread fetches ahead (tensors the
    adapter changes whole; untouched ones as raw byte chunks, never decoded), the calling thread adds the
    LoRA deltas (torch releases the GIL) and checks every value for NaN/Inf, and a writer thread appends
    to the file, then hands it to ``finish`` (fsync and close). Returns the LoRA modules merged."""
    read_q: queue.Queue = queue.Queue()
    write_q: queue.Queue = queue.Queue()
    errors: list[BaseException] = []

    def reader():
        try:
            for t in shard.tensors:
                if weights.passthrough(t.name):
                    for chunk in weights.raw_chunks(t.name, chunk_bytes):
                        budget.acquire(chunk.numel())
                        if budget.failed:
                            return
                        read_q.put((t, "raw", chunk))
                else:
                    budget.acquire(t.nbytes)
                    if budget.failed:
                        return
                    read_q.put((t, "tensor", weights.read(t.name)))
        except BaseException as e:  # handed to the merging thread
            read_q.put(e)
        finally:
            read_q.put(None)

    def writer():
        out, finished = None, False
        try:
            out = SafetensorsStreamWriter(path, shard.tensors)
            while True:
                item = write_q.get()
                if item is None:
                    finished = True
                    break
                t, kind, payload, held = item
                if kind == "raw":
                    out.write_bytes(t.name, payload)
                else:
                    out.write(t.name, payload)
                del payload, item
                budget.release(held)
            if budget.failed:                # the merge stopped: leave the partial shard as it is
                out.abort()
                return
            finish(out)
        except BaseException as e:
            errors.append(e)
            budget.fail()
            if out is not None:
                out.abort()
            while not finished and write_q.get() is not None:     # drain until the merging thread's end marker
                pass

    threads = [threading.Thread(target=reader, daemon=True, name=f"cogumi-merge-read-{path.name}"),
               threading.Thread(target=writer, daemon=True, name=f"cogumi-merge-write-{path.name}")]
    for th in threads:
        th.start()
    merged = 0
    try:
        while True:
            item = read_q.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            if errors:
                raise errors[0]
            if budget.failed:
                raise _Stopped()
            t, kind, payload = item
            held = payload.numel() if kind == "raw" else t.nbytes
            if kind == "raw":
                if t.dtype in FLOAT_DTYPES and not all_finite(payload.view(_torch_dtype(t.dtype))):
                    raise _nonfinite_error(t.name)
            else:
                payload = weights.adapt(t.name, payload, check_finite=True)
                merged += t.name in weights.adapter.loras
            write_q.put((t, kind, payload, held))
            del payload, item
    except BaseException:
        budget.fail()
        write_q.put(None)
        for th in threads:
            th.join(timeout=5)
        raise
    write_q.put(None)
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    if budget.failed:
        raise _Stopped()
    return merged


def write_merged_shards(weights: AdaptedWeights, shards: list[OutShard], out_dir: Path, *,
                        log: Callable[[str], Any] = print, inflight_bytes: int = INFLIGHT_BYTES,
                        jobs: int | None = None) -> dict:
    """Stream every tensor through ``weights`` (merge=True) into ``shards`` under ``out_dir``.

    ``jobs`` shards (default ``merge_jobs``) go through their own pipelines at once (``_write_shard``);
    the bytes held between reading and writing, over all of them, are bounded by ``inflight_bytes``.
    Each finished shard is fsynced and closed on a background thread, so the disk's write-back of one
    shard overlaps the work on the next; every fsync has returned (and its error failed the merge)
    before this function returns, so the output is renamed into place only when it is on disk.
    """
    import concurrent.futures as cf
    jobs = merge_jobs(len(shards)) if jobs is None else max(1, min(jobs, len(shards)))
    return_freed_buffers_to_the_os()
    kill_after = int(os.environ.get("COGUMI_TEST_KILL_AFTER_SHARDS", "0") or 0)
    budget = _ByteBudget(inflight_bytes)
    chunk_bytes = max(1 << 20, inflight_bytes // (8 * jobs))
    syncer = ThreadPoolExecutor(1, thread_name_prefix="cogumi-merge-fsync")
    synced: list = []
    written = 0

    def finisher(si: int):
        def finish(out: SafetensorsStreamWriter) -> None:
            def sync_close():
                nonlocal written
                out.close()
                written += 1                    # only the one fsync thread counts
                log(f"merge: wrote {shards[si].file} ({human_bytes(shards[si].nbytes)}, "
                    f"{len(shards[si].tensors)} tensors)")
                if kill_after and written >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            synced.append(syncer.submit(sync_close))
        return finish

    futures: list = []
    try:
        with _intra_op_threads(jobs), ThreadPoolExecutor(jobs, thread_name_prefix="cogumi-merge-shard") as pool:
            futures = [pool.submit(_write_shard, weights, shard, out_dir / shard.file, budget, chunk_bytes,
                                   finisher(si)) for si, shard in enumerate(shards)]
            cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
            if any(f.done() and not f.cancelled() and f.exception() for f in futures):
                budget.fail()
                for f in futures:
                    f.cancel()
    except BaseException:                       # Ctrl-C: stop every pipeline before leaving
        budget.fail()
        raise
    finally:
        syncer.shutdown(wait=True)
    failures = [f.exception() for f in futures if not f.cancelled() and f.exception()]
    if failures:                        # the shard that failed, not one that stopped because of it
        raise next((e for e in failures if not isinstance(e, _Stopped)), failures[0])
    for f in synced:
        f.result()                      # an fsync's error (ENOSPC, EIO) fails the merge
    return {"lora_modules_merged": sum(f.result() for f in futures), "jobs": jobs,
            "tensors": sum(len(s.tensors) for s in shards), "bytes": sum(s.nbytes for s in shards)}
