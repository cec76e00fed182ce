"""The LoRA adapter as ``cogumi merge`` reads it, and the base with the adapter applied.

Features
  * ``load_adapter``: a PEFT adapter dir classified into LoRA pairs (linear and embedding), whole-tensor
    replacements (``modules_to_save``, saved ``base_layer`` weights) and trainable-token rows; scales
    exactly as PEFT computes them (``rank_pattern`` / ``alpha_pattern`` via PEFT's own matcher, rsLoRA).
  * ``AdaptedWeights``: the base's tensors with those changes applied and, when merging, the LoRA delta
    added in fp32 in cache-sized row blocks (each block checked for NaN/Inf).
  * ``check_adapter_fits``: every tensor the adapter changes exists in the base with a fitting shape.

Failure modes (``CogumiError``): no adapter_config.json / weights, an unsupported variant (DoRA, LoRA
bias, aLoRA, ...), a rank that disagrees with the config, an incomplete A/B pair, shapes that do not fit
the base; NaN/Inf produced by a merge is a ``RedFlagError``.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from cogumi.errors import CogumiError, RedFlagError
from cogumi.lineage import all_finite, fingerprint, read_json_file, read_manifest, unsupported_lora_options
from cogumi.merge.weights import _torch_dtype

ADAPTER_PREFIX = "base_model.model."
ROW_BLOCK_ELEMENTS = 2**20             # fp32 elements per block of rows when adding a delta (4 MiB: stays in cache)


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


def _nonfinite_error(name: str) -> RedFlagError:
    return RedFlagError(f"merge produced NaN/Inf in {name}; the adapter or the base holds non-finite values "
                        "(check both with `cogumi verify`)")
