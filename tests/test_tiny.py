"""The offline tiny model is a faithful stand-in for a real checkpoint."""

from __future__ import annotations

import json

from cogumi.lineage import fingerprint
from cogumi.tiny import build_tiny_base, synthetic_gsm8k, synthetic_mbpp


def test_tiny_base_loads_like_a_real_checkpoint(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((tiny_base / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (tiny_base / "model.safetensors.index.json").exists()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == len(tok)


def test_build_is_deterministic(tmp_path, tiny_base_fp32):
    again = build_tiny_base(tmp_path / "again", dtype="float32")
    assert fingerprint(again) == fingerprint(tiny_base_fp32)


def test_synthetic_splits_are_disjoint():
    train_q = {r["question"] for r in synthetic_gsm8k("train")}
    test_q = {r["question"] for r in synthetic_gsm8k("test")}
    assert train_q and test_q and not train_q & test_q
    train_ids = {r["task_id"] for r in synthetic_mbpp("train")}
    test_ids = {r["task_id"] for r in synthetic_mbpp("test")}
    assert not train_ids & test_ids
    assert not {r["text"] for r in synthetic_mbpp("train")} & {r["text"] for r in synthetic_mbpp("test")}
