"""Offline tiny Llama-architecture models, tokenizers and synthetic tasks (tests and the demo).

Nothing here touches the network. ``build_tiny_base`` writes a directory laid out exactly like a real
Hugging Face checkpoint (config.json, generation_config.json, model.safetensors(.index.json) shards,
tokenizer.json + tokenizer_config.json with a Llama-3-style chat template), so every code path that
loads ``meta-llama/Meta-Llama-3.1-8B-Instruct`` loads this too.

The synthetic tasks are in the real benchmarks' own formats:
  * GSM8K-style: ``{"question", "answer"}`` with the answer ending in ``#### N``;
  * MBPP-style: ``{"task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list"}``;
  * HumanEval-style: ``{"task_id", "prompt", "canonical_solution", "test", "entry_point"}``.
They are easy enough that a tiny model learns them in seconds on a CPU, so numbers visibly move.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]

# A Llama-3-style chat template (the header/eot structure of Llama 3.1, without its tool-calling
# preamble). Training and evaluation both render through tokenizer.apply_chat_template, so whatever
# template a base ships is the one used everywhere.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# ---------------------------------------------------------------------------------------------
# synthetic tasks
# ---------------------------------------------------------------------------------------------

_OPS = {"plus": ("+", lambda a, b: a + b), "minus": ("-", lambda a, b: a - b), "times": ("*", lambda a, b: a * b)}


def gsm8k_item(a: int, b: int, op: str = "plus") -> dict:
    sym, fn = _OPS[op]
    c = fn(a, b)
    return {
        "question": f"Tom has {a} apples. What is {a} {op} {b}?",
        "answer": f"{a} {sym} {b} = <<{a}{sym}{b}={c}>>{c}\n#### {c}",
    }


def synthetic_gsm8k(split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """GSM8K-style items. ``train`` and ``test`` use disjoint operand pairs (no leakage)."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng = random.Random(1234)
    rng.shuffle(pairs)
    chosen = pairs[:30] if split == "test" else pairs[30:]
    rows = [gsm8k_item(a, b, "plus") for a, b in chosen]
    if n is not None:
        rows = random.Random(seed).sample(rows, min(n, len(rows)))
    return rows


_MBPP_FUNCS = [
    ("add_{k}", "returns x plus {k}", "x + {k}"),
    ("mul_{k}", "returns x times {k}", "x * {k}"),
    ("sub_{k}", "returns x minus {k}", "x - {k}"),
]


def mbpp_item(task_id: int, kind: int, k: int) -> dict:
    name_t, desc_t, expr_t = _MBPP_FUNCS[kind]
    name, desc, expr = name_t.format(k=k), desc_t.format(k=k), expr_t.format(k=k)
    fn = {0: lambda x: x + k, 1: lambda x: x * k, 2: lambda x: x - k}[kind]
    return {
        "task_id": task_id,
        "text": f"Write a function {name}(x) that {desc}.",
        "code": f"def {name}(x):\n    return {expr}",
        "test_list": [f"assert {name}({x}) == {fn(x)}" for x in (1, 2, 5)],
        "test_setup_code": "",
        "challenge_test_list": [],
    }


def synthetic_mbpp(split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """MBPP-style items; like real MBPP, test ids are 11-510 and train ids 601+ (disjoint)."""
    combos = [(kind, k) for kind in range(3) for k in range(1, 10)]
    rng = random.Random(99)
    rng.shuffle(combos)
    if split == "test":
        rows = [mbpp_item(11 + i, kind, k) for i, (kind, k) in enumerate(combos[:10])]
    else:
        rows = [mbpp_item(601 + i, kind, k) for i, (kind, k) in enumerate(combos[10:])]
    if n is not None:
        rows = random.Random(seed).sample(rows, min(n, len(rows)))
    return rows


def synthetic_humaneval(n: int | None = None, seed: int = 0) -> list[dict]:
    rows = []
    for i, (kind, k) in enumerate([(0, 2), (1, 3), (2, 4), (0, 7), (1, 5), (2, 1)]):
        item = mbpp_item(0, kind, k)
        name = item["code"].split("(")[0][4:]
        body = item["code"].split("\n", 1)[1]
        rows.append({
            "task_id": f"HumanEval/{i}",
            "prompt": f'def {name}(x):\n    """Return {item["text"].split(" that returns ")[1]}"""\n',
            "canonical_solution": body + "\n",
            "test": "def check(candidate):\n" + "".join(
                "    " + t.replace(f"{name}(", "candidate(") + "\n" for t in item["test_list"]),
            "entry_point": name,
        })
    if n is not None:
        rows = random.Random(seed).sample(rows, min(n, len(rows)))
    return rows


def mbpp_instruction(item: dict) -> str:
    return f"{item['text']} Your code should pass this test:\n{item['test_list'][0]}"


def synthetic_instructions(n: int = 200, seed: int = 0) -> list[dict]:
    """The demo's Phase 1A set, ``{instruction, response}`` rows like the user's 600K file.

    Drawn from the *train* splits only, so evaluation on the test splits is clean.
    """
    rng = random.Random(seed)
    gsm = synthetic_gsm8k("train")
    mbpp = synthetic_mbpp("train")
    rows = []
    for i in range(n):
        if i % 2 == 0:
            item = rng.choice(gsm)
            rows.append({"instruction": item["question"], "response": item["answer"]})
        else:
            item = rng.choice(mbpp)
            rows.append({"instruction": mbpp_instruction(item), "response": f"```python\n{item['code']}\n```"})
    return rows


# ---------------------------------------------------------------------------------------------
# tokenizer and model
# ---------------------------------------------------------------------------------------------

def _tokenizer_corpus() -> list[str]:
    corpus = []
    for item in synthetic_gsm8k("train") + synthetic_gsm8k("test"):
        corpus += [item["question"], item["answer"]]
    for item in synthetic_mbpp("train") + synthetic_mbpp("test"):
        corpus += [mbpp_instruction(item), item["code"]] + item["test_list"]
    corpus += ["```python\n", "def check(candidate):\n    assert", "system user assistant Write a function"]
    corpus += ["The quick brown fox jumps over the lazy dog. Explain, summarize and answer questions."] * 3
    return corpus


def build_tiny_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer with Llama 3's special tokens, trained offline on synthetic text
    (``corpus``: these texts instead of this module's tasks; with a vocabulary big enough every word of
    them becomes one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=LLAMA3_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus if corpus is not None else _tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
        model_max_length=2048, padding_side="right",
    )
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    return fast


def build_tiny_base(out_dir: str | Path, *, seed: int = 0, dtype: str = "bfloat16", hidden_size: int = 64,
                    num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                    max_shard_size: str | None = None, name: str = "cogumi-tiny-llama",
                    corpus: list[str] | None = None, vocab_size: int = 4096) -> Path:
    """Write a tiny Llama checkpoint + tokenizer to ``out_dir`` (created) and return its path.

    ``max_shard_size`` (e.g. ``"100KB"``) forces several safetensors shards with an index, like a real
    8B checkpoint. ``corpus``: train the tokenizer on these texts (up to ``vocab_size`` tokens) instead of
    this module's synthetic tasks. Deterministic for a given seed and corpus.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(vocab_size, corpus) if corpus is not None else build_tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=tok.convert_tokens_to_ids("<|begin_of_text|>"),
        eos_token_id=[tok.convert_tokens_to_ids("<|end_of_text|>"), tok.convert_tokens_to_ids("<|eot_id|>")],
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.config.name_or_path = name
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        do_sample=False)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    tok.save_pretrained(out)
    return out


def quantized_config_like_unsloth(base_config: dict) -> dict:
    """A config.json as bnb-4bit repos ship it (used to build the incident's base in tests)."""
    cfg = dict(base_config)
    cfg["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_use_double_quant": True,
    }
    return cfg


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
