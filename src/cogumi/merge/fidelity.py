"""The merge's fidelity check: the merged model as written vs the base with the adapter unmerged.

Features
  * ``fidelity_check``: logits on probe prompts (chat-templated) of three streams -- merged, base +
    unmerged LoRA, base alone -- compared as max |delta logit|, top-1 agreement (overall and where the
    unmerged model is confident) and KL; the base alone gives the scale of the LoRA's own effect.
  * ``fidelity_passed``: the tolerance (KL absolute or relative to the LoRA's effect, confident top-1).

Failure modes: none of its own; a failed check is reported in the result (``passed: False``) and the
caller decides (``cogumi merge`` refuses unless --force).
"""

from __future__ import annotations

import time
from pathlib import Path

from cogumi.merge.adapter import Adapter, AdaptedWeights
from cogumi.merge.layerwise import LayerwiseModel, Stream
from cogumi.merge.weights import WeightDir

# Fidelity tolerance (merged as written vs base + adapter unmerged, fp32 compute). bf16 rounding of the
# merged weights moves logits by ~1e-3..1e-2 on real models; a wrong scale, a missed module or a wrong
# base moves them by orders of magnitude more.
FIDELITY_KL_MAX = 1e-3                # mean KL(unmerged || merged) per token (nats) that always passes
FIDELITY_KL_REL = 0.05                # ... or at most this fraction of the LoRA's own effect (KL unmerged || base)
FIDELITY_TOP1_MIN = 0.99              # top-1 agreement where the unmerged model is confident (p >= 0.5)
FIDELITY_MIN_CONFIDENT = 10           # ... checked when at least this many probe positions are confident
PROBE_MAX_TOKENS = 32

PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                                 "clips in May. How many clips did Natalia sell altogether?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a function add_3(x) that returns x plus 3."}],
]
PROBE_TEXTS = ["The quick brown fox jumps over the lazy dog. def fib(n):\n    if n < 2:\n        return n\n    return"]


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
