"""Batched greedy generation for evaluation (the path `cogumi eval` uses).

Contract used by the rest of evaluation/:
  ``load_candidate(model, base=None) -> (model, tokenizer)``: a model dir / hub id, or an adapter dir
  (base + adapter applied unmerged), loaded in its own dtype -- never silently quantized.
  ``generate_completions(model, tokenizer, conversations, max_new_tokens, batch_size) -> list[str]``:
  ``conversations`` is a list of chat message lists; rendered with the tokenizer's chat template
  (add_generation_prompt), left-padded, greedy; returns only the new text, special tokens stripped.
"""

from __future__ import annotations

from pathlib import Path


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
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype="auto").to(device)
        m = PeftModel.from_pretrained(base_model, str(path)).eval()
        tok = AutoTokenizer.from_pretrained(str(path) if (path / "tokenizer_config.json").exists() else base)
    else:
        m = AutoModelForCausalLM.from_pretrained(model, dtype="auto").to(device).eval()
        tok = AutoTokenizer.from_pretrained(model)
    return m, tok


def generate_completions(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int = 512,
                         batch_size: int = 32) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    # Longest first: batches hold similar lengths, so less padding and the biggest batch fails first.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out: list[str] = [""] * len(texts)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        for i, row in zip(idx, new):
            out[i] = tokenizer.decode(row, skip_special_tokens=True)
    return out
