"""Running a Llama-family model one decoder layer at a time (the fidelity check and ``--target auto``).

Features
  * ``LayerwiseModel``: the model on the meta device; each decoder layer gets real fp32 weights from a
    ``Stream``, runs on every probe row and is dropped, so memory is one layer plus the hidden states.
    Several streams (merged, base + unmerged LoRA, base alone) share one read of each layer.
  * ``exact_fp32``: full-precision fp32 matmuls for the comparison (no TF32).

Failure modes: a model type outside ``LLAMA_FAMILY`` is a ``CogumiError`` (merge with --no-fidelity).
"""

from __future__ import annotations

import contextlib
import copy
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cogumi.errors import CogumiError
from cogumi.lineage import LLAMA_FAMILY
from cogumi.merge.adapter import LoraModule


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
