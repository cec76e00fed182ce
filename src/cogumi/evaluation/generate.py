"""Batched greedy generation for evaluation (the path `cogumi eval` uses).

Contract used by the rest of evaluation/:
  ``load_candidate(model, base=None) -> (model, tokenizer)``: a model dir / hub id, or an adapter dir
  (base + adapter applied unmerged), loaded in its own dtype -- never silently quantized.
  ``generate(model, tokenizer, conversations, max_new_tokens, batch_size, stop=None) -> list[Generation]``:
  ``conversations`` is a list of chat message lists; rendered with the tokenizer's chat template
  (add_generation_prompt), left-padded, greedy; each ``Generation`` holds only the new text (special tokens
  stripped, cut before the first stop sequence) and why it ended: ``"eos"``, ``"stop"`` (a stop sequence)
  or ``"length"`` (``max_new_tokens`` reached: the answer is truncated).
  ``generate_completions(...) -> list[str]``: the texts alone.

Features
  * Prompts sorted longest first and batched, so batches hold similar lengths and the biggest batch
    (the one that could run out of memory) runs first.
  * On CUDA (``static_cache="auto"``): a static KV cache of one fixed shape for every batch (prompts
    left-padded to one width, the last batch filled up with copies of a prompt whose outputs are thrown
    away), so the one-token decode step is compiled once (transformers' own compiled call:
    torch.compile + CUDA graphs) and replayed. The greedy loop around it is a short one here
    (``_greedy_static``): ``model.generate`` spends more time per token in Python (logits processors,
    stopping checks that synchronise with the GPU every token) than the compiled step takes on an H100.
    It is used only when the generation config asks for nothing but greedy decoding (no repetition
    penalty, bad words, ...); otherwise ``model.generate`` with a static cache. Measured in
    benchmarks/generate_throughput.py (docs/benchmarks.md).
  * Greedy decoding everywhere: batching changes no answer beyond the floating-point noise of the device
    (tests/test_generate.py checks batched == one-at-a-time exactly on the tiny fp32 model).
  * Stop sequences (``stop``: one list for every conversation, or one list per conversation): a row stops
    as soon as its NEW text contains one (transformers' ``StopStringCriteria``, which matches strings
    across token boundaries, applied to the generated tokens only -- text that merely ends the prompt, like
    a chat template's newline, never counts); the text is cut before it. Conversations with different stop
    lists are generated in separate batches.

Failure modes
  * If the compiled static-cache path raises (an unsupported model or PEFT layer, a compiler error), the
    batch is generated again the plain way and a warning says so: slower, same answers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

PROMPT_WIDTH_MULTIPLE = 64


@dataclass
class Generation:
    text: str            # the new text, special tokens stripped, cut before the first stop sequence
    finish_reason: str   # "eos" | "stop" | "length" (hit max_new_tokens: truncated)


def _refuse_lying_dtype(model: str) -> None:
    """dtype="auto" follows config.json: a config that declares float16 over bf16 weights would silently
    cast them (and float16 can overflow where bf16 does not). A local dir must agree with its weights."""
    from cogumi.errors import CogumiError
    from cogumi.lineage import config_dtype_mismatch, read_model_config
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        return
    mismatch = config_dtype_mismatch(path, read_model_config(str(path)))
    if mismatch is not None:
        raise CogumiError(f"{mismatch.message}; refusing to load it in the wrong dtype -> {mismatch.fix}")


def load_candidate(model: str, base: str | None = None, *, device: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cogumi.lineage import read_manifest

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(model)
    if (path / "adapter_config.json").exists():
        from peft import PeftModel
        import json
        if base is None:
            man = read_manifest(path) or {}
            base = (man.get("base") or {}).get("path") or (man.get("base") or {}).get("id") or \
                json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        _refuse_lying_dtype(base)
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype="auto").to(device)
        m = PeftModel.from_pretrained(base_model, str(path)).eval()
        tok = AutoTokenizer.from_pretrained(str(path) if (path / "tokenizer_config.json").exists() else base)
    else:
        _refuse_lying_dtype(model)
        m = AutoModelForCausalLM.from_pretrained(model, dtype="auto").to(device).eval()
        tok = AutoTokenizer.from_pretrained(model)
    return m, tok


def render_prompts(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """Token ids of each conversation's generation prompt (the chat template adds BOS itself)."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _left_pad(rows: list[list[int]], width: int, pad_id: int, device):
    import torch
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        if r:
            ids[j, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[j, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _round_up(n: int, k: int) -> int:
    return ((n + k - 1) // k) * k


def generate_completions(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int = 512,
                         batch_size: int = 32, static_cache: bool | str = "auto", stop=None,
                         **generate_kwargs) -> list[str]:
    """Greedy completions for ``conversations``, in their order (the texts of ``generate``)."""
    return [g.text for g in generate(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, static_cache=static_cache, stop=stop, **generate_kwargs)]


def generate(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int = 512, batch_size: int = 32,
             static_cache: bool | str = "auto", stop=None, **generate_kwargs) -> list[Generation]:
    """Greedy generations for ``conversations``, in their order. ``stop``: a list of stop sequences for
    all, or one list per conversation. ``generate_kwargs`` go to ``model.generate`` (e.g.
    ``min_new_tokens`` for fixed-length benchmarks)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not conversations:
        return []
    prompts = render_prompts(tokenizer, conversations)
    device = next(model.parameters()).device
    fast = (device.type == "cuda") if static_cache == "auto" else bool(static_cache)
    batch_size = max(1, min(batch_size, len(prompts)))
    width = _round_up(max(len(p) for p in prompts), PROMPT_WIDTH_MULTIPLE)   # one shape for every batch
    # what decoding stops on (the generation config's end-of-sequence ids); text after it is not the answer
    eos = set(_eos_ids(model)) or ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    out: list[Generation | None] = [None] * len(prompts)
    for stops, group in _stop_groups(stop, len(prompts)).items():
        criteria = _stop_criteria(tokenizer, stops) if stops else None
        order = sorted(group, key=lambda i: -len(prompts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = [prompts[i] for i in idx]
            if fast:        # one shape for every batch: one compilation, replayed
                rows = rows + [rows[-1]] * (batch_size - len(rows))
                ids, mask = _left_pad(rows, width, tokenizer.pad_token_id, device)
            else:
                ids, mask = _left_pad(rows, max(len(r) for r in rows), tokenizer.pad_token_id, device)
            new = _generate(model, ids, mask, max_new_tokens, tokenizer.pad_token_id, fast, generate_kwargs,
                            criteria)
            for i, row in zip(idx, new):
                out[i] = _finished(tokenizer, row.tolist(), stops, eos, max_new_tokens)
    return out


def _stop_groups(stop, n: int) -> dict[tuple[str, ...], list[int]]:
    """Conversation indexes grouped by their stop sequences (one batch never mixes two lists)."""
    if not stop:
        per_row = [()] * n
    elif all(isinstance(s, str) for s in stop):
        per_row = [tuple(stop)] * n
    else:
        if len(stop) != n:
            raise ValueError(f"{n} conversations but {len(stop)} stop lists")
        per_row = [tuple(s or ()) for s in stop]
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, stops in enumerate(per_row):
        groups.setdefault(tuple(s for s in stops if s), []).append(i)
    return groups


def _stop_criteria(tokenizer, stops: tuple[str, ...]):
    """transformers' StopStringCriteria: finds a stop string however the tokens split it."""
    from transformers import StopStringCriteria
    return StopStringCriteria(tokenizer, list(stops))


def _finished(tokenizer, row: list[int], stops: tuple[str, ...], eos: set[int], max_new_tokens: int) -> Generation:
    from cogumi.evaluation.finish import trim_at_stop
    end = next((k + 1 for k, t in enumerate(row) if t in eos), None)
    real = row[:end] if end is not None else row
    text, stopped = trim_at_stop(tokenizer.decode(real, skip_special_tokens=True), stops)
    if stopped:
        reason = "stop"
    elif end is not None:
        reason = "eos"
    elif len(row) >= max_new_tokens:
        reason = "length"
    else:   # ended early without end-of-sequence: only a stop criterion does that
        reason = "stop"
    return Generation(text, reason)


class _AfterColumn:
    """A stopping criterion for ``model.generate``: ``criteria`` applied to the tokens after column
    ``start`` -- the generated ones, since left padding starts every row's new tokens there."""

    def __init__(self, criteria, start: int):
        self.criteria, self.start = criteria, start

    def __call__(self, input_ids, scores, **kwargs):
        return self.criteria(input_ids[:, self.start:], scores)


def _generate(model, ids, mask, max_new_tokens: int, pad_id: int, fast: bool, generate_kwargs: dict,
              stop=None):
    import torch
    from transformers import StoppingCriteriaList
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, **generate_kwargs)
    if stop is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_AfterColumn(stop, ids.shape[1])])
    with torch.inference_mode():
        if fast and _plain_greedy(model, generate_kwargs):
            try:
                with decode_attention(model):
                    return _greedy_static(model, ids, mask, max_new_tokens, pad_id,
                                          int(generate_kwargs.get("min_new_tokens") or 0),
                                          stop)
            except Exception as e:   # an unsupported model/cache/compiler: the library's loop instead
                warnings.warn(f"cogumi's static greedy loop failed ({type(e).__name__}: {e}); "
                              "using model.generate with a static cache")
        if fast:
            try:
                gen = model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **kwargs)
                return gen[:, ids.shape[1]:]
            except Exception as e:   # compiler/static-cache trouble must not cost the evaluation
                warnings.warn(f"static-cache generation failed ({type(e).__name__}: {e}); "
                              "generating this batch the plain way")
        gen = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return gen[:, ids.shape[1]:]


DECODE_ATTENTION = "cogumi_decode"


def decode_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """SDPA for one new token per row with grouped-query attention, without copying the cache.

    transformers' SDPA path repeats every key/value head of the whole (static) cache to the number of query
    heads when it runs compiled (``repeat_kv``: for Llama-3.1-8B at batch 64 and a 384-token cache, ~13 GB
    of copies per generated token, more than the 16 GB of weights the step must read). Here the query heads
    that share a key/value head are laid along the query-length axis instead (a view), so attention reads
    the cache once. Prompts (several tokens) go to transformers' SDPA unchanged."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n_rep = query.shape[1] // key.shape[1]
    mask_ok = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
    if query.shape[2] != 1 or n_rep == 1 or not mask_ok or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    b, h, _, d = query.shape
    out = F.scaled_dot_product_attention(query.reshape(b, h // n_rep, n_rep, d), key, value,
                                         attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


def _register_decode_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(DECODE_ATTENTION, decode_attention_forward)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


class decode_attention:
    """Context manager: a model on SDPA decodes with ``cogumi_decode`` attention, then gets SDPA back."""

    def __init__(self, model):
        self.core = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.previous = getattr(self.core.config, "_attn_implementation", None)

    def __enter__(self):
        if self.previous == "sdpa" and hasattr(self.core, "set_attn_implementation"):
            _register_decode_attention()
            self.core.set_attn_implementation(DECODE_ATTENTION)
        return self

    def __exit__(self, *exc):
        if self.previous == "sdpa" and self.core.config._attn_implementation == DECODE_ATTENTION:
            self.core.set_attn_implementation("sdpa")
        return False


# generation-config fields that add logits processing beyond plain greedy; any of them set -> model.generate
_PROCESSOR_FIELDS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
                     "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                     "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None,
                     "min_length": 0, "exponential_decay_length_penalty": None, "forced_decoder_ids": None}


def _plain_greedy(model, generate_kwargs: dict) -> bool:
    if set(generate_kwargs) - {"min_new_tokens"}:
        return False
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return False
    for name, neutral in _PROCESSOR_FIELDS.items():
        value = getattr(gc, name, neutral)
        if value not in (neutral, None) and not (name == "repetition_penalty" and value == 1.0):
            return False
    return True


def _eos_ids(model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _greedy_static(model, ids, mask, max_new_tokens: int, pad_id: int, min_new_tokens: int = 0, stop=None):
    """Greedy decoding with a static KV cache and a compiled one-token step; the same tokens as
    ``model.generate(do_sample=False)`` (new tokens only; pad after a row's end-of-sequence token).
    ``stop(new_tokens, None) -> bool per row``: rows for which it is true are finished too (stop sequences).

    The GPU is asked whether every row has finished only every ``CHECK_EVERY`` tokens, so the host runs
    ahead of the device instead of waiting for it after each token.
    """
    import inspect

    import torch
    from transformers import StaticCache

    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(core.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    batch, width = ids.shape
    total = width + max_new_tokens
    cache = StaticCache(config=core.config, max_cache_len=total)
    full_mask = torch.cat([mask, mask.new_ones(batch, max_new_tokens)], dim=1)   # future slots: causal mask
    n_real = mask.sum(-1, keepdim=True)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache_positions = torch.arange(total, device=ids.device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    step = core.get_compiled_call(None) if ids.is_cuda and hasattr(core, "get_compiled_call") else core.__call__
    eos = torch.tensor(_eos_ids(core), device=ids.device, dtype=torch.long)

    out = core(input_ids=ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
               cache_position=cache_positions[:width], **{cache_kw: cache}, **extra)
    logits = out.logits[:, -1]
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=ids.device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=ids.device)
    for t in range(max_new_tokens):
        scores = logits.float()
        if t < min_new_tokens and eos.numel():
            scores[:, eos] = float("-inf")
        nxt = torch.where(unfinished, scores.argmax(-1), torch.full_like(unfinished, pad_id, dtype=torch.long))
        tokens[:, t] = nxt
        if eos.numel():
            unfinished &= ~torch.isin(nxt, eos)
        if stop is not None:
            unfinished &= ~stop(tokens[:, :t + 1], None)
        if t == max_new_tokens - 1 or ((t + 1) % CHECK_EVERY == 0 and not bool(unfinished.any())):
            return tokens[:, :t + 1]
        out = step(input_ids=nxt[:, None], attention_mask=full_mask, position_ids=n_real + t, use_cache=True,
                   cache_position=cache_positions[width + t:width + t + 1].clone(), **{cache_kw: cache}, **extra)
        logits = out.logits[:, -1]
    return tokens


CHECK_EVERY = 16
