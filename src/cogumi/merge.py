"""``cogumi merge``: merge a LoRA adapter into its base, streaming, atomically, and checked.

Features
  * Streaming: tensors are read one at a time from the base's safetensors shards (plain reads at the
    header's offsets), the LoRA delta is added in fp32 (``W + scale * B @ A``, in row blocks) and cast
    back to the base dtype, and each tensor is appended to its output shard as soon as it is done. Up to
    4 output shards go through their own read/merge/write pipelines at once (``merge_jobs``). Peak
    memory is a 512 MiB read-ahead/write-behind budget plus the tensors being merged, not the model (8B:
    1.0 GiB instead of 16.6; as fast as copying the shards: docs/benchmarks.md).
  * Every LoRA variant PEFT writes for Llama-family models: any target linear, LoRA on embeddings /
    lm_head, ``rank_pattern`` / ``alpha_pattern`` (matched with PEFT's own ``get_pattern_key``),
    ``use_rslora``, ``modules_to_save`` copies, saved ``base_layer`` embeddings and trainable tokens.
  * Base check: the base's fingerprint must match the adapter's manifest (or the adapter_config base);
    an adapter trained on a quantized base merged into full-precision weights is the incident. Both are
    refused unless ``--force``, which is recorded in the manifest.
  * Merge targets for 4-bit-trained adapters: ``original`` (the bf16 weights), ``dequantized`` (the
    NF4 weights the adapter actually trained against, dequantized with bitsandbytes), ``auto`` (measure
    both on held-out rows: loss, and top-1 agreement with the adapter applied on the 4-bit base; keep
    the lower loss).
  * Fidelity check (default on): on probe prompts, logits of the merged model as written vs the base
    with the adapter applied unmerged: max |delta logit|, top-1 agreement, KL. Run layer by layer, so it
    keeps the streaming memory bound.
  * Output: a standard HF model dir (sharded safetensors + index, config.json in the base dtype without
    quantization_config, generation_config, tokenizer, cogumi.json kind "merged"), written to a temporary
    dir beside ``--out`` and renamed when complete; free disk checked first; never overwrites without
    ``--overwrite``; NaN/Inf, dtype, size and expected-tensor checks on the result.

Failure modes (each one ``CogumiError`` message): missing/invalid adapter, unsupported LoRA variant
(DoRA, LoRA bias, aLoRA, ...), adapter tensors whose shapes do not fit the base, wrong or quantized base
(``RedFlagError`` unless --force), not enough disk, NaN/Inf produced, fidelity beyond tolerance.

Test hook: ``COGUMI_TEST_KILL_AFTER_SHARDS=N`` SIGKILLs the process after N output shards are written
(used by the crash test; never set it otherwise).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import queue
import resource
import shutil
import signal
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from cogumi.errors import CogumiError, RedFlagError
from cogumi.lineage import (
    FLOAT_DTYPES, all_finite, INDEX_NAME, LLAMA_FAMILY, Finding, TensorEntry, adapter_lineage_findings, base_match_findings,
    fingerprint, human_bytes, library_versions, quantization_findings, read_json_file,
    read_manifest, read_model_config, recorded_base, red_findings, resolve_model_dir, scan_weight_files,
    unsupported_lora_options, weights_findings, write_manifest,
)

TARGETS = ("original", "dequantized", "auto")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt")
ADAPTER_PREFIX = "base_model.model."
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
INFLIGHT_BYTES = 512 * 2**20          # read-ahead + write-behind budget of the streaming merge (all shards)
MAX_MERGE_JOBS = 4                     # output shards merged at once, at most one per core (an 8B model has 4;
                                       # 2 cores, 3 GB in 3 shards: 2 at once cut the merge from 11.7 s to 7.4 s)
M_MMAP_THRESHOLD = -3                  # glibc mallopt parameter
ROW_BLOCK_ELEMENTS = 2**20             # fp32 elements per block of rows when adding a delta (4 MiB: stays in cache)

# Fidelity tolerance (merged as written vs base + adapter unmerged, fp32 compute). bf16 rounding of the
# merged weights moves logits by ~1e-3..1e-2 on real models; a wrong scale, a missed module or a wrong
# base moves them by orders of magnitude more.
FIDELITY_KL_MAX = 1e-3                # mean KL(unmerged || merged) per token (nats) that always passes
FIDELITY_KL_REL = 0.05                # ... or at most this fraction of the LoRA's own effect (KL unmerged || base)
FIDELITY_TOP1_MIN = 0.99              # top-1 agreement where the unmerged model is confident (p >= 0.5)
FIDELITY_MIN_CONFIDENT = 10           # ... checked when at least this many probe positions are confident
AUTO_MAX_ROWS = 32                    # held-out rows --target auto scores
AUTO_MAX_TOKENS = 256                 # tokens per held-out row
PROBE_MAX_TOKENS = 32

PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                                 "clips in May. How many clips did Natalia sell altogether?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a function add_3(x) that returns x plus 3."}],
]
PROBE_TEXTS = ["The quick brown fox jumps over the lazy dog. def fib(n):\n    if n < 2:\n        return n\n    return"]

_ST_TO_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _torch_dtype(tag: str):
    import torch
    return getattr(torch, _ST_TO_TORCH[tag])


def _st_tag(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return {v: k for k, v in _ST_TO_TORCH.items()}[name]


# ---------------------------------------------------------------------------------------------
# reading base weights, one tensor at a time
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------

@dataclass
class LoraModule:
    """One LoRA pair applied to the base tensor ``weight``: delta = scale * B @ A (linear) or
    scale * (B @ A)^T (embedding, where PEFT stores A as (r, vocab) and B as (dim, r))."""
    weight: str
    kind: str                     # "linear" | "embedding"
    a_name: str
    b_name: str
    r: int
    alpha: float
    scale: float
    source: "AdapterTensors" = field(repr=False)

    def tensors(self):
        return self.source.get(self.a_name).float(), self.source.get(self.b_name).float()

    def add_delta_(self, w, row_start: int = 0, ab=None):
        """Add the delta for rows [row_start, row_start + len(w)) to fp32 ``w`` in place (``ab``: the
        already-read (A, B), else they are read)."""
        a, b = ab if ab is not None else self.tensors()
        stop = row_start + w.shape[0]
        if self.kind == "linear":
            w.addmm_(b[row_start:stop], a, alpha=self.scale)
        else:  # (B @ A[:, rows])^T == A[:, rows]^T @ B^T
            w.addmm_(a[:, row_start:stop].T, b.T, alpha=self.scale)
        return w


class AdapterTensors:
    """The adapter's tensors, read one at a time (an r=64 adapter on an 8B model is 670 MB in fp32).

    Each read opens the file afresh and copies the tensor out: a held-open ``safe_open`` keeps every
    page it has touched resident, which over a whole merge is the whole adapter."""

    def __init__(self, path: Path):
        self.path = path
        self.file = path / "adapter_model.safetensors"
        binf = path / "adapter_model.bin"
        self._dict = None
        if self.file.exists():
            from safetensors import safe_open
            try:
                with safe_open(str(self.file), framework="pt") as f:
                    self.names = list(f.keys())
                    self._shapes = {n: list(f.get_slice(n).get_shape()) for n in self.names}
            except Exception as e:
                raise CogumiError(f"{self.file}: unreadable ({type(e).__name__}: {e}); re-copy the adapter") from None
        elif binf.exists():
            import torch
            try:
                self._dict = torch.load(binf, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CogumiError(f"{binf}: unreadable ({type(e).__name__}: {e})") from None
            self.names = list(self._dict)
            self._shapes = {n: list(t.shape) for n, t in self._dict.items()}
        else:
            raise CogumiError(f"{path}: no adapter_model.safetensors (or .bin); is this a PEFT adapter directory?")

    def get(self, name: str):
        if self._dict is not None:
            return self._dict[name]
        from safetensors import safe_open
        with safe_open(str(self.file), framework="pt") as f:
            return f.get_tensor(name).clone()

    def shape(self, name: str) -> list[int]:
        return self._shapes[name]


@dataclass
class Adapter:
    path: Path
    config: dict
    manifest: dict | None
    tensors: AdapterTensors
    loras: dict[str, LoraModule]                  # base weight name -> LoRA
    replacements: dict[str, str]                  # base tensor name -> adapter tensor name (modules_to_save, ...)
    token_rows: dict[str, tuple[list[int], str]]  # base weight name -> (row indices, adapter tensor name)

    def fingerprint(self) -> str:
        return fingerprint(self.path)

    def summary(self) -> dict:
        c = self.config
        return {"r": c.get("r"), "lora_alpha": c.get("lora_alpha"), "use_rslora": bool(c.get("use_rslora")),
                "rank_pattern": c.get("rank_pattern") or {}, "alpha_pattern": c.get("alpha_pattern") or {},
                "target_modules": c.get("target_modules"), "modules_to_save": c.get("modules_to_save"),
                "lora_modules": len(self.loras), "replaced_tensors": sorted(self.replacements),
                "trainable_token_tensors": sorted(self.token_rows)}


def _pattern_value(patterns: dict, module: str, default):
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key   # PEFT's own matching, so patterns mean what they meant there
    return patterns.get(get_pattern_key(list(patterns), module), default)


def lora_scale(cfg: dict, module: str) -> tuple[int, float, float]:
    """(r, alpha, scale) of one module exactly as PEFT computes it: patterns, then rsLoRA or alpha/r."""
    r = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8)))
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, alpha, scale


def _token_indices(cfg: dict, module: str) -> list[int] | None:
    spec = cfg.get("trainable_token_indices")
    if spec is None:
        return None
    if isinstance(spec, list):
        return [int(i) for i in spec]
    import re
    for key, idx in spec.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return [int(i) for i in idx]
    return None


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read and classify a PEFT LoRA adapter dir; refuse anything cogumi cannot merge exactly."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CogumiError(f"{path}: no such adapter directory")
    cfg_path = path / "adapter_config.json"
    if not cfg_path.exists():
        raise CogumiError(f"{path}: no adapter_config.json; is this a PEFT adapter directory? "
                          "(A merged model dir needs no merge.)")
    cfg = read_json_file(cfg_path, "adapter_config.json")
    problems = unsupported_lora_options(cfg)
    if problems:
        raise CogumiError(f"{cfg_path}: cogumi merge cannot merge this adapter exactly:\n  " + "\n  ".join(problems)
                          + "\nUse the adapter unmerged (PEFT) instead, or retrain as a plain LoRA.")
    manifest = read_manifest(path)
    tensors = AdapterTensors(path)
    loras: dict[str, LoraModule] = {}
    replacements: dict[str, str] = {}
    token_rows: dict[str, tuple[list[int], str]] = {}
    pairs: dict[str, dict[str, str]] = {}
    for full in tensors.names:
        key = full[len(ADAPTER_PREFIX):] if full.startswith(ADAPTER_PREFIX) else full
        for marker, kind, part in ((".lora_A.weight", "linear", "A"), (".lora_B.weight", "linear", "B"),
                                   (".lora_embedding_A", "embedding", "A"), (".lora_embedding_B", "embedding", "B")):
            if key.endswith(marker):
                module = key[: -len(marker)]
                pairs.setdefault(module, {"kind": kind})[part] = full
                break
        else:
            if key.endswith(".lora_magnitude_vector") or ".lora_B.bias" in key or ".lora_A.bias" in key:
                raise CogumiError(f"{path}: tensor {full} is a DoRA/LoRA-bias parameter; cogumi merge refuses "
                                  "variants it cannot merge exactly")
            if key.endswith(".token_adapter.trainable_tokens_delta"):
                module = key[: -len(".token_adapter.trainable_tokens_delta")]
                idx = _token_indices(cfg, module)
                if idx is None:
                    raise CogumiError(f"{path}: trainable tokens for {module} but adapter_config.json's "
                                      "trainable_token_indices does not name them")
                token_rows[module + ".weight"] = (idx, full)
            elif ".base_layer." in key:
                replacements[key.replace(".base_layer.", ".")] = full
            elif ".lora_" in key:
                raise CogumiError(f"{path}: unrecognized LoRA tensor {full}; refusing to guess how to merge it")
            else:  # modules_to_save: the trained copy of the whole module
                replacements[key] = full
    for module, p in pairs.items():
        if "A" not in p or "B" not in p:
            raise CogumiError(f"{path}: {module} has only one of its LoRA A/B tensors; the adapter is incomplete")
        r, alpha, scale = lora_scale(cfg, module)
        a_shape = tensors.shape(p["A"])
        if a_shape[0] != r:
            raise CogumiError(f"{path}: {module}: lora_A has rank {a_shape[0]} but adapter_config.json "
                              f"(r / rank_pattern) says {r}; refusing a merge with the wrong scale")
        loras[module + ".weight"] = LoraModule(module + ".weight", p["kind"], p["A"], p["B"], r, alpha, scale, tensors)
    both = set(loras) & set(token_rows)
    if both:
        raise CogumiError(f"{path}: {sorted(both)[0]} has both LoRA and trainable tokens; their order is ambiguous")
    if not loras and not replacements and not token_rows:
        raise CogumiError(f"{path}: the adapter holds no LoRA tensors")
    return Adapter(path, cfg, manifest, tensors, loras, replacements, token_rows)


# ---------------------------------------------------------------------------------------------
# base + adapter, merged or not
# ---------------------------------------------------------------------------------------------

class AdaptedWeights:
    """The base's tensors with the adapter's whole-tensor changes applied (modules_to_save copies, saved
    base_layer weights, trainable token rows) and, when ``merge``, the LoRA deltas added in fp32 and
    cast back to the base dtype -- exactly the tensors ``cogumi merge`` writes."""

    def __init__(self, base, adapter: Adapter, *, merge: bool):
        self.base, self.adapter, self.merge = base, adapter, merge
        self._local = threading.local()     # one reusable fp32 block per thread

    def _block(self, n: int):
        import torch
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < n:
            buf = self._local.buf = torch.empty(max(n, ROW_BLOCK_ELEMENTS), dtype=torch.float32)
        return buf

    def names(self) -> list[str]:
        return self.base.names()

    def has(self, name: str) -> bool:
        return self.base.has(name)

    def shape(self, name: str) -> list[int]:
        return self.base.shape(name)

    def dtype_tag(self, name: str) -> str:
        return self.base.dtype_tag(name)

    def nbytes(self, name: str) -> int:
        return self.base.nbytes(name)

    def passthrough(self, name: str) -> bool:
        """The adapter does not touch ``name`` and the base stores it as the output needs it."""
        a = self.adapter
        return (name not in a.loras and name not in a.replacements and name not in a.token_rows
                and self.base.passthrough(name))

    def raw_chunks(self, name: str, chunk_bytes: int) -> Iterator:
        return self.base.raw_chunks(name, chunk_bytes)

    def read(self, name: str):
        """The base tensor (or its replacement) before the adapter's per-row and LoRA changes."""
        rep = self.adapter.replacements.get(name)
        if rep is None:
            return self.base.get(name)
        return self.adapter.tensors.get(rep).to(_torch_dtype(self.base.dtype_tag(name)), copy=True)

    def adapt(self, name: str, t, row_start: int = 0, *, check_finite: bool = False):
        """Apply trainable-token rows and (when merging) the LoRA delta to ``t`` = rows of ``name``;
        ``check_finite``: raise ``RedFlagError`` if the result holds NaN/Inf."""
        tok = self.adapter.token_rows.get(name)
        if tok is not None:
            idx, tname = tok
            values = self.adapter.tensors.get(tname)
            for j, row in enumerate(idx):
                if row_start <= row < row_start + t.shape[0]:
                    t[row - row_start] = values[j].to(t.dtype)
        lora = self.adapter.loras.get(name) if self.merge else None
        if lora is None:
            if check_finite and not all_finite(t):
                raise _nonfinite_error(name)
            return t
        if not t.is_floating_point():
            raise CogumiError(f"{name}: cannot add a LoRA delta to a {t.dtype} tensor")
        row = max(1, t[0].numel())
        block = max(1, ROW_BLOCK_ELEMENTS // row)
        ab = lora.tensors()
        buf = self._block(block * row)
        for i in range(0, t.shape[0], block):
            rows = t[i:i + block]
            # a preallocated, cache-sized fp32 block: convert, add the delta, convert back (3x faster on
            # CPU than a fresh fp32 copy of the whole tensor); the finite check reads the block from cache
            w = buf[:rows.numel()].view(rows.shape).copy_(rows)
            lora.add_delta_(w, row_start + i, ab)
            rows.copy_(w)
            if check_finite and not all_finite(rows):
                raise _nonfinite_error(name)
        return t

    def get(self, name: str):
        return self.adapt(name, self.read(name))

    def rows(self, name: str, start: int, stop: int):
        rep = self.adapter.replacements.get(name)
        if rep is not None:
            t = self.adapter.tensors.get(rep)[start:stop].to(_torch_dtype(self.base.dtype_tag(name)), copy=True)
        else:
            t = self.base.rows(name, start, stop)
        return self.adapt(name, t, start)


def check_adapter_fits(adapter: Adapter, base) -> None:
    """Every tensor the adapter changes exists in the base with a shape its LoRA pair fits."""
    problems = []
    for name, lora in adapter.loras.items():
        if not base.has(name):
            problems.append(f"the adapter changes {name}, which the base does not have")
            continue
        out_f, in_f = base.shape(name)
        a, b = adapter.tensors.shape(lora.a_name), adapter.tensors.shape(lora.b_name)
        want_a, want_b = ([lora.r, in_f], [out_f, lora.r]) if lora.kind == "linear" else ([lora.r, out_f], [in_f, lora.r])
        if a != want_a or b != want_b:
            problems.append(f"{name} is {base.shape(name)} in the base but the adapter's A/B are {a}/{b}")
    for name, rep in adapter.replacements.items():
        if not base.has(name):
            problems.append(f"the adapter replaces {name}, which the base does not have")
        elif adapter.tensors.shape(rep) != base.shape(name):
            problems.append(f"{name} is {base.shape(name)} in the base but {adapter.tensors.shape(rep)} in the adapter "
                            "(a resized vocabulary?)")
    for name, (idx, tname) in adapter.token_rows.items():
        if not base.has(name):
            problems.append(f"the adapter's trainable tokens change {name}, which the base does not have")
        elif max(idx) >= base.shape(name)[0]:
            problems.append(f"trainable token {max(idx)} is beyond {name}'s {base.shape(name)[0]} rows")
    if problems:
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise CogumiError(f"adapter {adapter.path} does not fit base {base.path}:\n  " + "\n  ".join(problems[:8])
                          + more + "\nPass --base with the model the adapter was trained on.")


# ---------------------------------------------------------------------------------------------
# writing safetensors one tensor at a time
# ---------------------------------------------------------------------------------------------

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


def _nonfinite_error(name: str) -> RedFlagError:
    return RedFlagError(f"merge produced NaN/Inf in {name}; the adapter or the base holds non-finite values "
                        "(check both with `cogumi verify`)")


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


def _return_freed_buffers_to_the_os() -> None:
    """Serve every allocation of 1 MiB or more with its own mapping, returned to the OS when freed.

    glibc raises its mmap threshold after the first large free, so later tensor buffers come from
    per-thread arenas that keep freed memory: with several reader threads that is +0.45 GB of peak RSS
    (3 GB merge, 3 shards at once), none of it in use. A fixed threshold (one ``mallopt`` call; glibc
    only, a no-op elsewhere) keeps peak memory to the buffers alive, at no measured cost in speed."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


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
    _return_freed_buffers_to_the_os()
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


# ---------------------------------------------------------------------------------------------
# running the model layer by layer (fidelity check and --target auto)
# ---------------------------------------------------------------------------------------------

class _UnmergedLora:
    """Forward hook body: base linear output + scale * (x A^T) B^T (PEFT's LoRA Linear forward at
    inference, dropout off). Hand-written instead of PEFT's LoraModel because PEFT injects adapters into
    a whole instantiated model, which is exactly the memory the layer-by-layer check avoids."""

    def __init__(self, a, b, scale):
        self.a, self.b, self.scale = a, b, scale

    def __call__(self, module, inputs, output):
        x = inputs[0]
        return output + (x @ self.a.T) @ self.b.T * self.scale


@dataclass
class Stream:
    """One way of computing the model: where its weights come from, and which LoRAs run unmerged."""
    name: str
    weights: Any                          # .get(name) / .rows(name, a, b) / .has(name)
    loras: dict[str, LoraModule] | None = None


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls in full precision for the duration (TF32 would blur the comparison on a GPU).

    Through torch's per-backend ``fp32_precision`` setting where it exists (torch >= 2.9): training
    turns TF32 on with it (transformers' ``tf32=True``), and once it is used torch refuses the legacy
    ``get_float32_matmul_precision`` -- a merge after training in one process (the pipeline) failed so."""
    import torch
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        get, full = (lambda: matmul.fp32_precision), "ieee"

        def put(value):
            matmul.fp32_precision = value
    else:
        get, put, full = torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, "highest"
    before = get()
    put(full)
    try:
        yield
    finally:
        put(before)


def compute_device() -> str:
    """Where the layer-by-layer check runs: the GPU when there is one (COGUMI_MERGE_DEVICE overrides)."""
    import torch
    want = os.environ.get("COGUMI_MERGE_DEVICE")
    if want:
        return want
    return "cuda" if torch.cuda.is_available() else "cpu"


class LayerwiseModel:
    """A Llama-family causal LM run one decoder layer at a time with transformers' own modules.

    The model is instantiated on the meta device (no memory); each decoder layer is copied, given real
    fp32 weights from a stream, run on every row, and dropped. Streams that share a weights object share
    one read of each layer. Embedding rows and the lm_head (in vocabulary chunks) are computed directly,
    so the largest thing in memory is one layer in fp32 plus the hidden states of the rows. On a GPU the
    compute runs there and the next layer is read from disk while the current one runs.
    """

    def __init__(self, model_dir: Path, device: str | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained(str(model_dir))
        if getattr(config, "model_type", None) not in LLAMA_FAMILY:
            raise CogumiError(f"{model_dir}: the layer-by-layer check supports {sorted(LLAMA_FAMILY)} models, not "
                              f"{config.model_type!r}; pass --no-fidelity to merge without it")
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            skel = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        self.device = torch.device(device or compute_device())
        # read the next layer while this one runs -- only where compute is off the CPU (on the CPU a
        # second layer in flight would double the memory the check holds)
        self.prefetch = self.device.type != "cpu"
        self.config = skel.config
        self.skel = skel
        decoder = skel.model
        self.layers = decoder.layers
        self.prefix = "model.layers."
        self.embed_name = "model.embed_tokens.weight"
        self.norm_name = "model.norm.weight"
        self.head_name = "lm_head.weight"
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        with torch.device(self.device):
            self.rotary = type(decoder.rotary_emb)(config=self.config)
        self.vocab = int(self.config.vocab_size)
        self.layer_keys = list(self.layers[0].state_dict().keys())

    def _f32(self, t):
        import torch
        return t.to(self.device, non_blocking=False).to(torch.float32)

    def _head(self, weights) -> str:
        return self.head_name if (weights.has(self.head_name) or not self.tied) else self.embed_name

    def _lora_tensors(self, lora: LoraModule):
        a, b = lora.tensors()
        return a.to(self.device), b.to(self.device)

    def _embed(self, s: Stream, rows: list[list[int]]):
        import torch
        # only the rows the probes use (the whole table is 1 GB for an 8B model)
        used = sorted({i for ids in rows for i in ids})
        where = {tok: j for j, tok in enumerate(used)}
        table = torch.cat([s.weights.rows(self.embed_name, tok, tok + 1) for tok in used])
        out = []
        lora = (s.loras or {}).get(self.embed_name)
        a = b = None
        if lora is not None:
            a, b = self._lora_tensors(lora)
        for ids in rows:
            idx = torch.tensor(ids, dtype=torch.long)
            h = self._f32(table[torch.tensor([where[i] for i in ids], dtype=torch.long)])
            if lora is not None:
                h = h + (a[:, idx.to(self.device)].T @ b.T) * lora.scale
            out.append(h)
        return out

    def _layer_weights(self, weights, li: int, readers=None) -> dict:
        names = {k: self.prefix + f"{li}." + k for k in self.layer_keys}
        if readers is None:
            return {k: weights.get(n) for k, n in names.items()}
        futures = {k: readers.submit(weights.get, n) for k, n in names.items()}
        return {k: f.result() for k, f in futures.items()}

    def hidden(self, streams: list[Stream], rows: list[list[int]]):
        """Final-norm hidden states of every row, per stream: {stream name: (tokens, hidden) fp32}."""
        import torch
        groups: dict[int, list[Stream]] = {}
        for s in streams:
            groups.setdefault(id(s.weights), []).append(s)
        steps = [(li, group) for li in range(len(self.layers)) for group in groups.values()]
        pool = ThreadPoolExecutor(1) if self.prefetch else None
        readers = ThreadPoolExecutor(4) if pool else None     # a layer's tensors read in parallel
        try:
            with torch.no_grad(), exact_fp32():
                hs = {s.name: self._embed(s, rows) for s in streams}
                first = hs[streams[0].name]
                pos = [torch.arange(len(ids), device=self.device).unsqueeze(0) for ids in rows]
                pe = [self.rotary(first[i].unsqueeze(0), pos[i]) for i in range(len(rows))]
                # one unpadded row at a time under SDPA: no mask means causal attention (is_causal), which is
                # what transformers' create_causal_mask returns here too -- and the same across its versions
                masks = [None] * len(rows)
                pending = pool.submit(self._layer_weights, steps[0][1][0].weights, steps[0][0], readers) if pool else None
                for n, (li, group) in enumerate(steps):
                    raw = pending.result() if pool else self._layer_weights(group[0].weights, li)
                    if pool and n + 1 < len(steps):
                        pending = pool.submit(self._layer_weights, steps[n + 1][1][0].weights, steps[n + 1][0],
                                              readers)
                    sd = {k: self._f32(raw.pop(k)) for k in list(raw)}
                    for s in group:
                        layer = copy.deepcopy(self.layers[li])
                        layer.load_state_dict(sd, assign=True, strict=True)
                        self._attach_loras(layer, li, s)
                        for i in range(len(rows)):
                            out = layer(hs[s.name][i].unsqueeze(0), attention_mask=masks[i], position_ids=pos[i],
                                        position_embeddings=pe[i])
                            out = out[0] if isinstance(out, tuple) else out
                            hs[s.name][i] = out[0]
                        del layer
                    del sd
                final = {}
                for s in streams:
                    norm = copy.deepcopy(self.skel.model.norm)
                    norm.load_state_dict({"weight": self._f32(s.weights.get(self.norm_name))}, assign=True)
                    final[s.name] = norm(torch.cat(hs[s.name], dim=0))
                return final
        finally:
            if pool:
                pool.shutdown(wait=True)
                readers.shutdown(wait=True)

    def _attach_loras(self, layer, li: int, s: Stream) -> None:
        prefix = self.prefix + f"{li}."
        for name, lora in (s.loras or {}).items():
            if not name.startswith(prefix):
                continue
            if lora.kind != "linear":
                raise CogumiError(f"internal: embedding LoRA on {name} inside a decoder layer")
            module = layer.get_submodule(name[len(prefix):-len(".weight")])
            a, b = self._lora_tensors(lora)
            module.register_forward_hook(_UnmergedLora(a, b, lora.scale))

    def logit_chunks(self, streams: list[Stream], final: dict, chunk: int = 16384) -> Iterator[tuple[int, dict]]:
        """(vocab start, {stream: logits[:, start:start+chunk]}) over the whole vocabulary."""
        import torch
        with torch.no_grad(), exact_fp32():
            loras = {s.name: (s.loras or {}).get(self._head(s.weights)) for s in streams}
            lora_ab = {n: (self._lora_tensors(l) if l is not None else None) for n, l in loras.items()}
            for v0 in range(0, self.vocab, chunk):
                v1 = min(self.vocab, v0 + chunk)
                out = {}
                for s in streams:
                    w = self._f32(s.weights.rows(self._head(s.weights), v0, v1))
                    logits = final[s.name] @ w.T
                    if lora_ab[s.name] is not None:
                        a, b = lora_ab[s.name]
                        logits += (final[s.name] @ a.T) @ b[v0:v1].T * loras[s.name].scale
                    out[s.name] = logits
                yield v0, out

    def logits(self, streams: list[Stream], rows: list[list[int]]) -> dict:
        """Full logits {stream: (tokens, vocab)} on the CPU: for a few probe rows only."""
        import torch
        final = self.hidden(streams, rows)
        parts: dict[str, list] = {s.name: [] for s in streams}
        for _, chunk in self.logit_chunks(streams, final):
            for k, v in chunk.items():
                parts[k].append(v.cpu())
        return {k: torch.cat(v, dim=1) for k, v in parts.items()}


def compare_logits(ref, other) -> dict:
    """max |delta|, top-1 agreement and KL(ref || other) per token, over all positions."""
    import torch
    lp_ref = torch.log_softmax(ref.double(), dim=-1)
    lp_other = torch.log_softmax(other.double(), dim=-1)
    kl = (lp_ref.exp() * (lp_ref - lp_other)).sum(-1)
    agree = ref.argmax(-1) == other.argmax(-1)
    confident = lp_ref.max(-1).values.exp() >= 0.5
    return {"max_abs_logit_diff": float((ref - other).abs().max()),
            "top1_agreement": float(agree.float().mean()),
            "confident_positions": int(confident.sum()),
            "top1_agreement_confident": float(agree[confident].float().mean()) if confident.any() else None,
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "finite": bool(torch.isfinite(other).all())}


def load_tokenizer(*dirs: Path):
    from transformers import AutoTokenizer
    for d in dirs:
        if d is not None and (Path(d) / "tokenizer_config.json").exists():
            try:
                return AutoTokenizer.from_pretrained(str(d))
            except Exception:
                continue
    return None


def probe_rows(tokenizer, vocab: int) -> list[list[int]]:
    """Token ids of the probe prompts (chat-templated where the tokenizer has a template)."""
    rows: list[list[int]] = []
    if tokenizer is not None:
        for conv in PROBE_CONVERSATIONS:
            if getattr(tokenizer, "chat_template", None):
                ids = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            else:
                ids = tokenizer(conv[-1]["content"])["input_ids"]
            rows.append(list(ids)[:PROBE_MAX_TOKENS])
        for text in PROBE_TEXTS:
            rows.append(tokenizer(text)["input_ids"][:PROBE_MAX_TOKENS])
    else:
        import torch
        g = torch.Generator().manual_seed(0)
        rows = [torch.randint(0, vocab, (PROBE_MAX_TOKENS,), generator=g).tolist() for _ in range(3)]
    return [r for r in rows if len(r) >= 2]


def fidelity_check(model: LayerwiseModel, merged: WeightDir, target, adapter: Adapter, rows: list[list[int]]) -> dict:
    """Merged weights as written vs the target base with the adapter applied unmerged (and the base alone,
    for scale: how much the LoRA modules move the logits at all)."""
    t0 = time.time()
    unmerged = AdaptedWeights(target, adapter, merge=False)
    streams = [Stream("merged", merged), Stream("unmerged", unmerged, adapter.loras), Stream("base", unmerged)]
    logits = model.logits(streams, rows)
    result = compare_logits(logits["unmerged"], logits["merged"])
    effect = compare_logits(logits["unmerged"], logits["base"])
    result.update({
        "probes": len(rows), "tokens": int(logits["merged"].shape[0]),
        "lora_effect": {"max_abs_logit_diff": effect["max_abs_logit_diff"], "kl_mean": effect["kl_mean"],
                        "top1_changed": 1.0 - effect["top1_agreement"]},
        "tolerance": {"kl_mean_max": FIDELITY_KL_MAX, "kl_relative_to_lora_effect_max": FIDELITY_KL_REL,
                      "top1_agreement_confident_min": FIDELITY_TOP1_MIN},
        "compared": "merged model as written vs base + adapter applied unmerged, fp32 compute, layer by layer",
    })
    result["passed"] = fidelity_passed(result)
    result["wall_s"] = round(time.time() - t0, 2)
    return result


def fidelity_passed(r: dict) -> bool:
    """bf16 rounding of the merged weights moves logits a little (more on random-init models, whose
    near-uniform outputs flip top-1 on noise); a wrong merge moves them by a good part of the adapter's
    own effect, and flips positions where the model is confident."""
    kl_ok = r["kl_mean"] <= FIDELITY_KL_MAX or r["kl_mean"] <= FIDELITY_KL_REL * r["lora_effect"]["kl_mean"]
    top1_ok = (r["confident_positions"] < FIDELITY_MIN_CONFIDENT
               or r["top1_agreement_confident"] >= FIDELITY_TOP1_MIN)
    return bool(r["finite"] and kl_ok and top1_ok)


def holdout_rows(path: Path, tokenizer, *, max_rows: int = AUTO_MAX_ROWS, max_tokens: int = AUTO_MAX_TOKENS):
    """(token ids, assistant-token mask) of held-out rows, rendered exactly as training renders them."""
    from cogumi.data import RowProblem, encode_messages, row_to_messages
    from cogumi.io import read_jsonl
    rows = []
    for i, row in enumerate(read_jsonl(path)[:max_rows], start=1):
        try:
            messages, _ = row_to_messages(row)
        except RowProblem as e:
            raise CogumiError(f"{path}: row {i}: {e}") from None
        ids, mask = encode_messages(messages, tokenizer)
        ids, mask = ids[:max_tokens], mask[:max_tokens]
        if sum(mask[1:]) > 0:
            rows.append((ids, mask))
    if not rows:
        raise CogumiError(f"{path}: no usable held-out rows (each needs an assistant answer within "
                          f"{max_tokens} tokens)")
    return rows


def measure_targets(model: LayerwiseModel, original, quantized, adapter: Adapter, rows) -> dict:
    """--target auto: held-out loss of each merge candidate (as it would be written) and its top-1
    agreement with the adapter applied on the 4-bit base (dequantized weights + unmerged LoRA, what the
    adapter was trained and validated against)."""
    import torch
    t0 = time.time()
    streams = [Stream("reference_4bit_plus_adapter", AdaptedWeights(quantized, adapter, merge=False), adapter.loras),
               Stream("dequantized", AdaptedWeights(quantized, adapter, merge=True)),
               Stream("original", AdaptedWeights(original, adapter, merge=True))]
    ids = [r[0] for r in rows]
    final = model.hidden(streams, ids)
    # positions t predicting token t+1 where t+1 is an assistant token
    targets, select = [], []
    for tok, mask in rows:
        targets += tok[1:] + [0]
        select += [bool(m) for m in mask[1:]] + [False]
    dev = model.device
    targets_t = torch.tensor(targets, device=dev)
    sel = torch.tensor(select, device=dev)
    n = len(targets)
    stats = {s.name: {"lse": torch.full((n,), -math.inf, dtype=torch.float64, device=dev),
                      "best": torch.full((n,), -math.inf, device=dev),
                      "arg": torch.zeros(n, dtype=torch.long, device=dev),
                      "target": torch.zeros(n, dtype=torch.float64, device=dev)} for s in streams}
    for v0, chunk in model.logit_chunks(streams, final):
        for name, logits in chunk.items():
            st = stats[name]
            st["lse"] = torch.logaddexp(st["lse"], torch.logsumexp(logits.double(), dim=-1))
            best, arg = logits.max(dim=-1)
            better = best > st["best"]
            st["best"] = torch.where(better, best, st["best"])
            st["arg"] = torch.where(better, arg + v0, st["arg"])
            inside = (targets_t >= v0) & (targets_t < v0 + logits.shape[1])
            if inside.any():
                st["target"][inside] = logits[inside, targets_t[inside] - v0].double()
    ref = stats[streams[0].name]
    out: dict[str, Any] = {"rows": len(rows), "tokens_scored": int(sel.sum())}
    for s in streams:
        st = stats[s.name]
        nll = (st["lse"] - st["target"])[sel]
        out[s.name] = {"loss": float(nll.mean()),
                       "token_accuracy": float((st["arg"][sel] == targets_t[sel]).float().mean()),
                       "top1_agreement_with_4bit": float((st["arg"][sel] == ref["arg"][sel]).float().mean())}
    out["wall_s"] = round(time.time() - t0, 2)
    return out


# ---------------------------------------------------------------------------------------------
# choosing the merge base and checking it
# ---------------------------------------------------------------------------------------------

@dataclass
class MergePlan:
    target: str                     # "original" | "dequantized"
    requested: str
    base_dir: Path                  # the dir whose weights are merged into
    original_dir: Path | None       # bf16 original (auto / original)
    quantized_dir: Path | None      # the 4-bit base the adapter trained on (dequantized / auto)
    findings: list[Finding]
    reason: str


def _resolve(id_or_path: str, what: str) -> Path:
    try:
        return resolve_model_dir(id_or_path)
    except CogumiError as e:
        raise CogumiError(f"{what}: {e}") from None


def _original_likeness(original: Path, quantized: Path, limit: int = 3) -> Finding:
    """Is ``original`` the full-precision model that ``quantized`` was made from? NF4 weights are within
    ~10% (relative Frobenius error) of their originals; another model is ~140% away."""
    import torch
    orig, q = WeightDir(original), Dequantized4bitDir(quantized)
    packed = [n for n in q.names() if n in q._aux][:limit]
    worst = 0.0
    for name in packed:
        if not orig.has(name) or orig.shape(name) != q.shape(name):
            return Finding("red", "base-not-original", f"{original} has no {name} of shape {q.shape(name)}, so it is "
                           f"not the full-precision original of {quantized}", "pass --base with the bf16 original")
        a, b = orig.get(name).float(), q.get(name).float()
        worst = max(worst, float(torch.linalg.norm(a - b) / torch.linalg.norm(a).clamp_min(1e-12)))
    if worst > 0.3:
        return Finding("red", "base-not-original",
                       f"{original} is not the original of the 4-bit base {quantized}: dequantized weights differ "
                       f"from it by {worst:.0%} (NF4 rounding is ~10%)", "pass --base with the bf16 original")
    return Finding("ok", "base-is-original", f"{original} is the full-precision original of {quantized} "
                   f"(NF4 relative error {worst:.1%})")


def plan_merge(adapter: Adapter, *, base: str | None, target: str, log) -> MergePlan:
    rec = recorded_base(adapter.config, adapter.manifest)
    lineage = adapter_lineage_findings(adapter.path, adapter.config, adapter.manifest)
    quant_lineage = bool(rec["quantized"])
    recorded = rec.get("path") or rec.get("id")
    if target not in TARGETS:
        raise CogumiError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")

    if target in ("dequantized", "auto") and not quant_lineage:
        if target == "dequantized":
            raise CogumiError(f"--target dequantized is for adapters trained on a 4-bit base; {adapter.path} was "
                              f"trained on {rec.get('id')} (full precision). Use --target original.")
        log("merge: --target auto: the adapter was trained on a full-precision base, so there is nothing to "
            "choose; merging into the original weights")
        plan = plan_merge(adapter, base=base, target="original", log=log)
        plan.requested, plan.reason = "auto", "adapter trained on a full-precision base"
        return plan

    if target == "original":
        base_id = base or recorded
        if not base_id:
            raise CogumiError(f"{adapter.path}: the adapter records no base model; pass --base")
        base_dir = _resolve(base_id, "--base" if base else "the adapter's recorded base")
        if is_quantized_dir(base_dir):
            raise RedFlagError(
                f"{base_dir} is quantized; --target original merges into full-precision weights and cogumi never "
                "writes a merge into a quantized model (PEFT would re-quantize the merged weights). "
                + ("Pass --base with the bf16 original, or use --target auto to measure both targets."
                   if quant_lineage else "Pass --base with the full-precision base."))
        findings: list[Finding] = []
        if quant_lineage:
            findings += lineage      # the incident: red unless --force
            qdir = Path(rec["path"]) if rec.get("path") and Path(rec["path"]).is_dir() else None
            if qdir is not None and any(".quant_state.bitsandbytes__" in n for n in scan_weight_files(qdir)[0]):
                findings.append(_original_likeness(base_dir, qdir))
        else:
            findings += base_match_findings(rec, base_dir, base_label=base_id) + lineage
        return MergePlan("original", "original", base_dir, base_dir, None, findings,
                         "requested" if not quant_lineage else "requested (naive merge of a 4-bit-trained adapter)")

    # dequantized / auto, adapter trained on a 4-bit base
    qdir_id = base if (target == "dequantized" and base) else recorded
    if not qdir_id:
        raise CogumiError(f"{adapter.path}: the adapter records no base; cannot find the 4-bit base it trained on")
    qdir = _resolve(qdir_id, "the adapter's recorded 4-bit base")
    if not any(".quant_state.bitsandbytes__" in n for n in scan_weight_files(qdir)[0]):
        raise CogumiError(f"{qdir}: not a bitsandbytes 4-bit checkpoint; --target {target} dequantizes the 4-bit base "
                          "the adapter was trained on (a local dir saved with save_pretrained)")
    findings = base_match_findings(rec, qdir, base_label=str(qdir))
    findings.append(Finding("warn", "quantized-lineage",
                            f"adapter {adapter.path} was trained on the 4-bit base {rec.get('id')}; --target {target} "
                            + ("merges into its dequantized weights (what the adapter trained against)"
                               if target == "dequantized" else "measures which merge target is better"),
                            "prefer retraining on the full-precision base; compare the result before shipping"))
    if target == "dequantized":
        return MergePlan("dequantized", "dequantized", qdir, None, qdir, findings, "requested")
    if not base:
        raise CogumiError(f"--target auto compares merging into the 4-bit base's dequantized weights with merging "
                          f"into the full-precision original: pass --base with the bf16 original of {rec.get('id')}")
    orig = _resolve(base, "--base")
    if is_quantized_dir(orig):
        raise CogumiError(f"--base {orig} is quantized; --target auto needs the full-precision original")
    findings.append(_original_likeness(orig, qdir))
    return MergePlan("auto", "auto", qdir, orig, qdir, findings, "measured")


# ---------------------------------------------------------------------------------------------
# the merge
# ---------------------------------------------------------------------------------------------

def _free_bytes(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _output_config(base_dir: Path, dtype_tag: str) -> dict:
    cfg = read_model_config(str(base_dir))
    cfg.pop("quantization_config", None)
    name = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(dtype_tag, "bfloat16")
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    cfg["dtype"] = name
    return cfg


def _copy_side_files(out: Path, base_dir: Path, adapter_dir: Path, original_dir: Path | None) -> None:
    for d in (original_dir, base_dir):
        if d is not None and (d / "generation_config.json").exists():
            shutil.copy2(d / "generation_config.json", out / "generation_config.json")
            break
    tok_dir = next((d for d in (adapter_dir, original_dir, base_dir)
                    if d is not None and (d / "tokenizer_config.json").exists()), None)
    if tok_dir is not None:
        for name in TOKENIZER_FILES:
            if (tok_dir / name).exists():
                shutil.copy2(tok_dir / name, out / name)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def merge_adapter(adapter: str | os.PathLike, out: str | os.PathLike, *, base: str | None = None,
                  target: str = "original", holdout: str | os.PathLike | None = None, overwrite: bool = False,
                  force: bool = False, fidelity: bool = True, log: Callable[[str], Any] = print,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, inflight_bytes: int = INFLIGHT_BYTES) -> dict:
    """Merge ``adapter`` into its base and write a HF model dir at ``out``; returns the manifest."""
    from cogumi.io import atomic_dir
    t_start = time.time()
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise CogumiError(f"{out} already exists; pass --overwrite to replace it")
    ad = load_adapter(adapter)
    t_adapter = time.time()
    plan = plan_merge(ad, base=base, target=target, log=log)
    t_plan = time.time()

    reds = red_findings(plan.findings)
    for f in plan.findings:
        log(f"merge: {f.line()}")
    if reds and not force:
        raise RedFlagError("refusing to merge:\n  " + "\n  ".join(f.line() for f in reds)
                           + "\n(--force merges anyway and records it in the manifest.)")
    if reds:
        log("!" * 78)
        log("!! --force: MERGING DESPITE RED FLAGS (recorded in cogumi.json):")
        for f in reds:
            log("!! " + f.line())
        log("!" * 78)

    auto_numbers = None
    chosen = plan.target
    if plan.target == "auto":
        hpath = Path(holdout) if holdout else ad.path.parent / "holdout.jsonl"
        if not hpath.exists():
            raise CogumiError(f"--target auto scores both merge targets on held-out rows: {hpath} does not exist. "
                              "Pass --holdout FILE (JSONL rows in the training data's shape).")
        tokenizer = load_tokenizer(ad.path, plan.original_dir, plan.quantized_dir)
        if tokenizer is None:
            raise CogumiError("--target auto needs a tokenizer (in the adapter or base dir) to score held-out rows")
        rows = holdout_rows(hpath, tokenizer)
        log(f"merge: --target auto: scoring both targets on {len(rows)} held-out rows of {hpath}")
        model = LayerwiseModel(plan.original_dir)
        original, quantized = WeightDir(plan.original_dir), Dequantized4bitDir(plan.quantized_dir)
        check_adapter_fits(ad, original)
        check_adapter_fits(ad, quantized)
        auto_numbers = measure_targets(model, original, quantized, ad, rows)
        auto_numbers["holdout"] = str(hpath)
        chosen = min(("dequantized", "original"), key=lambda k: auto_numbers[k]["loss"])
        auto_numbers["chosen"] = chosen
        for k in ("reference_4bit_plus_adapter", "dequantized", "original"):
            v = auto_numbers[k]
            log(f"merge: auto: {k:28s} loss {v['loss']:.4f}  token acc {v['token_accuracy']:.3f}  "
                f"top-1 agreement with 4-bit+adapter {v['top1_agreement_with_4bit']:.3f}")
        log(f"merge: auto: keeping '{chosen}' (lower held-out loss)")
        plan.reason = f"--target auto: lower held-out loss ({auto_numbers[chosen]['loss']:.4f})"
        plan.base_dir = plan.quantized_dir if chosen == "dequantized" else plan.original_dir

    source = Dequantized4bitDir(plan.base_dir) if chosen == "dequantized" else WeightDir(plan.base_dir)
    check_adapter_fits(ad, source)
    weights = AdaptedWeights(source, ad, merge=True)
    shards = plan_shards(weights, max_shard_bytes)
    total = sum(s.nbytes for s in shards)
    free = _free_bytes(out.parent)
    if free < total + 64 * 2**20:
        raise CogumiError(f"not enough disk for the merged model at {out.parent}: need {human_bytes(total)}, "
                          f"{human_bytes(free)} free. Free space or choose another --out.")
    float_tags = [t.dtype for s in shards for t in s.tensors if t.dtype in FLOAT_DTYPES]
    out_tag = max(set(float_tags), key=float_tags.count)
    log(f"merge: {ad.path} -> {out} (target '{chosen}', base {plan.base_dir}); {len(ad.loras)} LoRA modules, "
        f"{len(ad.replacements)} replaced tensors; {human_bytes(total)} in {len(shards)} shard(s), {out_tag}")

    base_fp = fingerprint(plan.base_dir)
    timings = {"prepare": round(time.time() - t_start, 2),
               "prepare_parts": {"read_adapter": round(t_adapter - t_start, 2),
                                 "plan_and_checks": round(t_plan - t_adapter, 2),
                                 "open_base_and_fingerprint": round(time.time() - t_plan, 2)}}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        t_merge = time.time()
        stats = write_merged_shards(weights, shards, tmp, log=log, inflight_bytes=inflight_bytes)
        merge_s = time.time() - t_merge
        timings["merge"] = round(merge_s, 2)
        t_checks = time.time()
        if len(shards) > 1:
            from cogumi.io import atomic_write_json
            atomic_write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total},
                                                 "weight_map": {t.name: s.file for s in shards for t in s.tensors}})
        out_cfg = _output_config(plan.original_dir if chosen == "original" and plan.original_dir else plan.base_dir,
                                 out_tag)
        (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2) + "\n", encoding="utf-8")
        _copy_side_files(tmp, plan.base_dir, ad.path, plan.original_dir)

        # output checks: the same rules `cogumi verify` applies (NaN/Inf were checked per tensor above)
        entries, file_findings = scan_weight_files(tmp)
        out_findings = file_findings + weights_findings(tmp, out_cfg, entries)
        want = {t.name for s in shards for t in s.tensors}
        if set(entries) != want:
            out_findings.append(Finding("red", "missing-tensors", f"output tensors differ from the base's: "
                                        f"{sorted(want ^ set(entries))[:3]}"))
        if red_findings(out_findings):
            raise RedFlagError("the merged output failed its checks:\n  "
                               + "\n  ".join(f.line() for f in red_findings(out_findings)))

        timings["output_checks"] = round(time.time() - t_checks, 2)
        if auto_numbers:
            timings["auto"] = auto_numbers["wall_s"]
        fid: dict[str, Any] = {"skipped": True}
        if fidelity:
            model = LayerwiseModel(tmp)
            rows = probe_rows(load_tokenizer(tmp), model.vocab)
            merged_view = WeightDir(tmp)
            fid = fidelity_check(model, merged_view, source, ad, rows)
            merged_view.close()
            timings["fidelity"] = fid["wall_s"]
            conf = fid["top1_agreement_confident"]
            summary = (f"max |delta logit| {fid['max_abs_logit_diff']:.3g}, KL {fid['kl_mean']:.3g}, top-1 agreement "
                       f"{fid['top1_agreement']:.4f} ({'n/a' if conf is None else f'{conf:.4f}'} on "
                       f"{fid['confident_positions']} confident positions); the LoRA's own effect: max |delta logit| "
                       f"{fid['lora_effect']['max_abs_logit_diff']:.3g}, KL {fid['lora_effect']['kl_mean']:.3g}")
            log(f"merge: fidelity ({fid['probes']} probes, {fid['tokens']} tokens, {fid['wall_s']}s): {summary} -> "
                f"{'ok' if fid['passed'] else 'FAILED'}")
            if not fid["passed"]:
                f = Finding("red", "fidelity", f"merged model differs from base + adapter beyond tolerance ({summary}; "
                            f"tolerance: KL <= {FIDELITY_KL_MAX} or <= {FIDELITY_KL_REL:.0%} of the LoRA's effect, "
                            f"confident top-1 >= {FIDELITY_TOP1_MIN})",
                            "report this with the adapter_config.json; use the adapter unmerged meanwhile")
                if not force:
                    raise RedFlagError("merge failed its fidelity check: " + f.line())
                reds.append(f)

        manifest = {
            "kind": "merged",
            "parents": {
                "base": {"id": str(plan.base_dir), "path": str(plan.base_dir), "fingerprint": base_fp,
                         "dequantized_from_4bit": chosen == "dequantized"},
                "adapter": {"path": str(ad.path.resolve()), "fingerprint": ad.fingerprint(),
                            "lineage": _adapter_lineage(ad)},
                **({"original": {"path": str(plan.original_dir), "fingerprint": fingerprint(plan.original_dir)}}
                   if plan.original_dir and plan.original_dir != plan.base_dir else {}),
            },
            "target": chosen, "target_requested": plan.requested, "target_reason": plan.reason,
            "lineage_quantized": bool(recorded_base(ad.config, ad.manifest)["quantized"]),
            "forced": bool(force and reds), "force_flag": bool(force),
            "red_flags": [asdict(f) for f in reds],
            "findings": [asdict(f) for f in plan.findings],
            "auto": auto_numbers, "fidelity": fid,
            "adapter": ad.summary(),
            "output": {"dtype": out_tag, "bytes": total, "shards": len(shards), "tensors": stats["tensors"],
                       "lora_modules_merged": stats["lora_modules_merged"], "merge_jobs": stats["jobs"]},
            "libraries": library_versions(),
            "merge_wall_s": round(merge_s, 2), "wall_s": round(time.time() - t_start, 2), "timings_s": timings,
            "peak_rss_gib": round(_peak_rss_gib(), 3),
        }
        write_manifest(tmp, manifest)
    log(f"merged model: {out} ({human_bytes(total)}, {out_tag}, target '{chosen}'{', FORCED' if manifest['forced'] else ''}); "
        f"{manifest['wall_s']:.1f}s, peak RSS {manifest['peak_rss_gib']:.2f} GiB")
    return manifest


def _adapter_lineage(ad: Adapter) -> dict | None:
    if not ad.manifest:
        return {"kind": "adapter", "base": {"id": ad.config.get("base_model_name_or_path"),
                                            "quantized": recorded_base(ad.config, None)["quantized"]}}
    keep = ("kind", "phase", "created", "base", "allow_quantized_base", "quantized_base_override_used", "red_flags")
    return {k: ad.manifest[k] for k in keep if k in ad.manifest}


def merge_command(adapter: str, *, out: str, base: str | None = None, target: str = "original",
                  holdout: str | None = None, overwrite: bool = False, force: bool = False,
                  fidelity: bool = True) -> int:
    merge_adapter(adapter, out, base=base, target=target, holdout=holdout, overwrite=overwrite, force=force,
                  fidelity=fidelity)
    return 0
