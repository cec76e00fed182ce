"""Evaluation generation throughput: the user's loop (one prompt at a time, greedy ``model.generate``)
vs plain batched ``generate`` vs the path ``cogumi eval`` uses (``generate_completions``), on the same
model and prompts: 64 prompts of 200 tokens, 128 new tokens forced (``min_new_tokens``), greedy.

The model is Llama-3.1-8B-shaped with random weights (``--shape 8b``); the tokenizer is a word-level one
with the full 128,256-token vocabulary and Llama 3's special-token ids (built offline), so every id the
model emits decodes and answers can be compared as text.

Reports new tokens/s for each path, cogumi/loop, and the agreement of cogumi's batched answers with the
one-at-a-time answers on the prompts the loop ran (the loop is ~30 tokens/s on an H100, so it runs on
``--loop-prompts`` prompts only; its rate does not depend on how many). cogumi's first call includes the
one-time compilation of the decode step; it is timed and reported separately from the steady state.

  python benchmarks/generate_throughput.py --out gen.json     # on one GPU
  python benchmarks/generate_throughput.py --smoke            # tiny model, CPU, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import LLAMA_8B, TINY, log  # noqa: E402  (same model shapes as the training benchmark)

LLAMA3_SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
                   128007: "<|end_header_id|>", 128009: "<|eot_id|>", 128004: "<|finetune_right_pad_id|>"}


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over the model's whole vocabulary: id i is the word 'w<i>', except Llama 3's
    special tokens (at their Llama 3 ids in a 128K vocabulary, else at the top) and the role names."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from cogumi.tiny import LLAMA3_CHAT_TEMPLATE

    names = list(LLAMA3_SPECIALS.values())
    if vocab_size > max(LLAMA3_SPECIALS):
        specials = dict(LLAMA3_SPECIALS)
    else:
        specials = {vocab_size - len(names) + k: s for k, s in enumerate(names)}
    words = {i: f"w{i}" for i in range(vocab_size)}
    words.update(specials)
    words.update({200: "user", 201: "assistant", 202: "system"})
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in words.items()}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(specials.values()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>")
    # Llama 3's template with spaces around every special token, so a whitespace split finds each one
    fast.chat_template = (LLAMA3_CHAT_TEMPLATE
                          .replace("'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'",
                                   "' <|start_header_id|> ' + message['role'] + ' <|end_header_id|> '")
                          .replace("'<|eot_id|>'", "' <|eot_id|> '")
                          .replace("'<|start_header_id|>assistant<|end_header_id|>\\n\\n'",
                                   "' <|start_header_id|> assistant <|end_header_id|> '"))
    return fast


def make_conversations(tokenizer, n: int, prompt_tokens: int, vocab: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    from cogumi.evaluation.generate import render_prompts
    overhead = len(render_prompts(tokenizer, [[{"role": "user", "content": "w1"}]])[0]) - 1
    lo, hi = 210, min(vocab - 10, 100000)
    return [[{"role": "user", "content": " ".join(f"w{rng.randrange(lo, hi)}"
                                                  for _ in range(prompt_tokens - overhead))}] for _ in range(n)]


def sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def user_loop(model, tokenizer, conversations, max_new: int, device: str) -> tuple[list[str], float, int]:
    """The user's benchmark loop: one prompt at a time, plain greedy generate."""
    import torch
    outs, new_tokens = [], 0
    sync(device)
    t0 = time.perf_counter()
    for conv in conversations:
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        new = gen[0, enc["input_ids"].shape[1]:]
        new_tokens += int(new.numel())
        outs.append(tokenizer.decode(new, skip_special_tokens=True))
    sync(device)
    return outs, time.perf_counter() - t0, new_tokens


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def agreement(a: list[str], b: list[str]) -> dict:
    exact = sum(x == y for x, y in zip(a, b))
    prefix = []
    for x, y in zip(a, b):
        xs, ys = x.split(), y.split()
        k = 0
        while k < min(len(xs), len(ys)) and xs[k] == ys[k]:
            k += 1
        prefix.append(k / max(1, max(len(xs), len(ys))))
    return {"n": len(a), "identical": exact, "mean_common_prefix_fraction": sum(prefix) / max(1, len(prefix))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--shape", choices=["8b", "small", "tiny"], default=None,
                   help="small: 4 layers of width 1024 with the full 128K vocabulary (agreement checks)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="float32 (TF32 off) makes greedy answers comparable across batch shapes")
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--loop-prompts", type=int, default=None, help="prompts the one-at-a-time loop runs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig
    from cogumi.evaluation.generate import generate_completions

    smoke = args.smoke
    device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    shape = args.shape or ("tiny" if smoke else "8b")
    n = args.prompts or (8 if smoke else 64)
    prompt_tokens = args.prompt_tokens or (24 if smoke else 200)
    new_tokens = args.new_tokens or (8 if smoke else 128)
    n_loop = min(n, args.loop_prompts or (4 if smoke else 6))
    vocab = 512 if shape == "tiny" else LLAMA_8B["vocab_size"]
    dtype_name = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if dtype_name == "float32" and device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "shape": shape,
            "prompts": n, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "loop_prompts": n_loop,
            "batch_size": args.batch_size, "dtype": dtype_name}
    log(json.dumps(info))

    tok = word_tokenizer(vocab)
    convs = make_conversations(tok, n, prompt_tokens, vocab, seed=0)
    kw = dict(LLAMA_8B) if shape == "8b" else dict(TINY, vocab_size=vocab) if shape == "tiny" else \
        dict(LLAMA_8B, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4)
    cfg = LlamaConfig(**kw, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    results: dict = {"info": info}

    user_loop(model, tok, convs[:1], 4, device)          # one-time CUDA/cuBLAS start-up, not the loop's cost
    loop_out, loop_s, loop_tok = user_loop(model, tok, convs[:n_loop], new_tokens, device)
    results["loop"] = {"prompts": n_loop, "seconds": loop_s, "new_tokens": loop_tok, "tokens_per_s": loop_tok / loop_s}
    log(f"loop: {json.dumps(results['loop'])}")

    def run(static):
        return generate_completions(model, tok, convs, max_new_tokens=new_tokens, batch_size=args.batch_size,
                                    static_cache=static, min_new_tokens=new_tokens)

    total_new = n * new_tokens
    plain_out, plain_s = timed(lambda: run(False), device)
    results["plain_batched"] = {"seconds": plain_s, "tokens_per_s": total_new / plain_s}
    log(f"plain batched generate: {json.dumps(results['plain_batched'])}")
    first_out, first_s = timed(lambda: run("auto"), device)
    steady_out, steady_s = timed(lambda: run("auto"), device)
    results["cogumi"] = {"first_call_seconds_incl_compile": first_s, "seconds": steady_s,
                         "tokens_per_s": total_new / steady_s, "first_call_tokens_per_s": total_new / first_s,
                         "path": "static cache + compiled decode" if device == "cuda" else "plain (CPU)"}
    log(f"cogumi generate_completions: {json.dumps(results['cogumi'])}")
    results["cogumi_over_loop"] = results["cogumi"]["tokens_per_s"] / results["loop"]["tokens_per_s"]
    results["agreement_cogumi_vs_loop"] = agreement(steady_out[:n_loop], loop_out)
    results["agreement_plain_batched_vs_loop"] = agreement(plain_out[:n_loop], loop_out)
    results["agreement_cogumi_vs_plain_batched"] = agreement(steady_out, plain_out)
    results["cogumi_repeatable"] = first_out == steady_out
    log("\n| path | new tokens/s |\n|---|---|")
    log(f"| user's loop (one prompt at a time, {n_loop} prompts) | {results['loop']['tokens_per_s']:,.1f} |")
    log(f"| plain batched generate (batch {args.batch_size}) | {results['plain_batched']['tokens_per_s']:,.0f} |")
    log(f"| cogumi generate_completions, steady | {results['cogumi']['tokens_per_s']:,.0f} |")
    log(f"| cogumi generate_completions, first call incl. compile ({first_s:.1f}s) | "
        f"{results['cogumi']['first_call_tokens_per_s']:,.0f} |")
    log(f"cogumi/loop = {results['cogumi_over_loop']:.0f}x; agreement with one-at-a-time: "
        f"{json.dumps(results['agreement_cogumi_vs_loop'])}; vs plain batched: "
        f"{json.dumps(results['agreement_cogumi_vs_plain_batched'])}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
