"""Reading the base's weights one tensor at a time (``cogumi merge``'s input side).

Features
  * ``WeightDir``: a full-precision safetensors model dir; a tensor, a row range or raw byte chunks are
    read with plain file reads at the header's offsets (no mapping, so memory is only what is alive).
  * ``Dequantized4bitDir``: a bitsandbytes 4-bit checkpoint seen as full-precision tensors (packed
    weights dequantized with ``bitsandbytes.functional.dequantize_4bit``), for ``--target dequantized``.
  * ``open_weights`` picks one; ``is_quantized_dir`` says whether a dir holds quantized weights.

Failure modes: unreadable/truncated files and missing tensors are ``CogumiError`` naming the file; an
8-bit checkpoint or a dir without 4-bit tensors is refused where a 4-bit base is needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from cogumi.errors import CogumiError
from cogumi.lineage import (
    FLOAT_DTYPES, TensorEntry, quantization_findings, read_model_config, red_findings, scan_weight_files,
)

_ST_TO_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _torch_dtype(tag: str):
    import torch
    return getattr(torch, _ST_TO_TORCH[tag])


def _st_tag(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return {v: k for k, v in _ST_TO_TORCH.items()}[name]

def read_file_bytes(path: Path, start: int, nbytes: int):
    """``nbytes`` bytes of ``path`` from ``start`` into a fresh uint8 tensor (one copy, no mapping)."""
    import torch
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise CogumiError(f"{path}: truncated (ended {nbytes - got:,} bytes early at offset {start + got:,})")
            got += n
    return buf


class WeightDir:
    """A full-precision safetensors model dir, read one tensor (or row range, or raw chunk) at a time.

    Tensor data are read with plain file reads at the offsets of the safetensors header (parsed by
    ``lineage.scan_weight_files``). Not ``safe_open``: it maps the file and hands out tensors backed by the
    mapping, and every page touched stays resident while the file is open (an 8B shard: 5 GB); reading
    each tensor into its own buffer keeps memory to the tensors alive at the moment and lets the caller
    modify what it gets. Tests and the output checks read the same files back with ``safe_open``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        entries, findings = scan_weight_files(self.path)
        reds = red_findings(findings)
        if reds:
            raise CogumiError(f"{self.path}: unusable weights:\n  " + "\n  ".join(f.line() for f in reds))
        if not entries:
            raise CogumiError(f"{self.path}: no *.safetensors weights here (cogumi merge reads safetensors only; "
                              "convert *.bin checkpoints with transformers' save_pretrained first)")
        self.entries: dict[str, TensorEntry] = entries

    def names(self) -> list[str]:
        """Tensor names in on-disk order (file, then offset): the order that reads sequentially."""
        return [e.name for e in sorted(self.entries.values(), key=lambda e: (e.file, e.start))]

    def has(self, name: str) -> bool:
        return name in self.entries

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CogumiError(f"{self.path}: no tensor {name!r} in this model") from None

    def shape(self, name: str) -> list[int]:
        return list(self._entry(name).shape)

    def dtype_tag(self, name: str) -> str:
        return self._entry(name).dtype

    def nbytes(self, name: str) -> int:
        return self._entry(name).nbytes

    def get(self, name: str):
        e = self._entry(name)
        buf = read_file_bytes(self.path / e.file, e.start, e.nbytes)
        return buf.view(_torch_dtype(e.dtype)).reshape(e.shape)

    def rows(self, name: str, start: int, stop: int):
        e = self._entry(name)
        stop = min(stop, e.shape[0])
        row_bytes = e.nbytes // max(1, e.shape[0])
        buf = read_file_bytes(self.path / e.file, e.start + start * row_bytes, (stop - start) * row_bytes)
        return buf.view(_torch_dtype(e.dtype)).reshape([stop - start] + e.shape[1:])

    def passthrough(self, name: str) -> bool:
        """True when the stored bytes are already what the output needs (no decoding)."""
        return True

    def raw_chunks(self, name: str, chunk_bytes: int) -> Iterator:
        """The tensor's stored bytes in chunks (uint8 tensors, each a whole number of elements)."""
        e = self._entry(name)
        item = _torch_dtype(e.dtype).itemsize
        chunk_bytes = max(item, chunk_bytes - chunk_bytes % item)
        for off in range(0, e.nbytes, chunk_bytes):
            yield read_file_bytes(self.path / e.file, e.start + off, min(chunk_bytes, e.nbytes - off))

    def close(self) -> None:
        pass


class Dequantized4bitDir:
    """A bitsandbytes 4-bit checkpoint (as ``save_pretrained`` writes it) seen as full-precision tensors:
    packed weights come back dequantized with ``bitsandbytes.functional.dequantize_4bit`` in their
    original dtype; other tensors (embeddings, norms, lm_head) as stored."""

    def __init__(self, path: str | os.PathLike):
        self.raw = WeightDir(path)
        self.path = self.raw.path
        self._aux: dict[str, list[str]] = {}
        for name in self.raw.entries:
            if ".quant_state.bitsandbytes__" in name:
                weight = name.split(".quant_state.")[0]
                self._aux[weight] = [n for n in self.raw.entries if n.startswith(weight + ".")]
        if any(n.endswith(".SCB") for n in self.raw.entries):
            raise CogumiError(f"{self.path}: an 8-bit (LLM.int8) checkpoint; only 4-bit (NF4/FP4) bases can be "
                              "dequantized. Use --target original with the full-precision base.")
        if not self._aux:
            raise CogumiError(f"{self.path}: no bitsandbytes 4-bit weights here (no *.quant_state.bitsandbytes__* "
                              "tensors); --target dequantized needs the 4-bit base the adapter was trained on")
        self._states: dict[str, Any] = {}
        aux_names = {n for names in self._aux.values() for n in names}
        self._names = [n for n in self.raw.names() if n not in aux_names]

    def _state(self, name: str):
        if name not in self._states:
            import torch
            from bitsandbytes.functional import QuantState
            qs = {n[len(name) + 1:]: self.raw.get(n) for n in self._aux[name]}
            self._states[name] = QuantState.from_dict(qs, device=torch.device("cpu"))
        return self._states[name]

    def names(self) -> list[str]:
        return list(self._names)

    def has(self, name: str) -> bool:
        return name in self._aux or (self.raw.has(name) and name in self._names)

    def shape(self, name: str) -> list[int]:
        return list(self._state(name).shape) if name in self._aux else self.raw.shape(name)

    def dtype_tag(self, name: str) -> str:
        return _st_tag(self._state(name).dtype) if name in self._aux else self.raw.dtype_tag(name)

    def nbytes(self, name: str) -> int:
        if name not in self._aux:
            return self.raw.nbytes(name)
        n = 1
        for d in self.shape(name):
            n *= d
        return n * _torch_dtype(self.dtype_tag(name)).itemsize

    def get(self, name: str):
        if name not in self._aux:
            return self.raw.get(name)
        from bitsandbytes.functional import dequantize_4bit
        return dequantize_4bit(self.raw.get(name), self._state(name))

    def rows(self, name: str, start: int, stop: int):
        return self.get(name)[start:stop] if name in self._aux else self.raw.rows(name, start, stop)

    def passthrough(self, name: str) -> bool:
        return name not in self._aux

    def raw_chunks(self, name: str, chunk_bytes: int) -> Iterator:
        return self.raw.raw_chunks(name, chunk_bytes)

    def close(self) -> None:
        self.raw.close()


def open_weights(path: Path):
    """WeightDir for a full-precision dir, Dequantized4bitDir for a bitsandbytes 4-bit one."""
    entries, _ = scan_weight_files(path)
    if any(".quant_state.bitsandbytes__" in n for n in entries):
        return Dequantized4bitDir(path)
    return WeightDir(path)


def is_quantized_dir(path: Path, cfg: dict | None = None) -> bool:
    cfg = cfg if cfg is not None else read_model_config(str(path))
    if red_findings(quantization_findings(cfg, path.name)):
        return True
    entries, _ = scan_weight_files(path)
    return any(e.dtype not in FLOAT_DTYPES for n, e in entries.items() if n.endswith(".weight"))
