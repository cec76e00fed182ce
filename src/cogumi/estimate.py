"""``cogumi estimate CONFIG``: steps, tokens, GPU memory, time and cost of a run, computed from the config
and the data instead of guessed.

Features
  * Rows: every row is read and validated exactly as ``cogumi train`` would (a bad file fails here, free).
  * Tokens: the rows are rendered with the base's chat template and tokenized (``cogumi.data.tokenize_rows``)
    -- all of them, or for a big file a seeded random sample of ``sample_rows`` rows scaled up (the output
    says which). Truncation / dropping by ``data.overlong`` is applied as in training.
  * Steps: the optimizer steps ``cogumi train`` will take on the target device (default: one CUDA GPU,
    using ``cogumi.speed`` -- with packing, rows are packed by TRL's own best-fit-decreasing packer and
    counted as packs), times ``processes`` for multi-GPU runs.
  * Memory: a rough peak for one GPU: base weights + LoRA params/grads/AdamW states + activations per
    micro-batch (with or without activation checkpointing) + a fixed CUDA/allocator overhead.
  * Time and cost: real tokens / tokens-per-second, times $/hour. Tokens/s comes from ``--tokens-per-second``,
    else ``cost.tokens_per_second`` in the config, else cogumi's measured H100 figure scaled by parameter
    count (source printed).

Failure modes: bad data -> DataError (file and line); a base whose config.json cannot be read offline and is
not a known shape -> CogumiError asking for a local dir.
"""

from __future__ import annotations

import json
import math
import random

from cogumi.config import RunConfig, load_run_config
from cogumi.errors import CogumiError

# Tokens/s when neither the command line nor the config gives one. The measured anchor in
# ../shared/perf/README.md: the user's own recipe (HF Trainer, batch 2 x accumulation 8, pad-to-longest,
# gradient checkpointing, bf16) on one H100 80GB, Llama-3.1-8B shape, LoRA r=64 on 7 projections.
# cogumi's own defaults are faster; `benchmarks/train_throughput.py` measures them (docs/benchmarks.md), and
# ``cogumi.speed.H100_TOKENS_PER_SECOND`` (scaled by parameter count) is used instead.
ANCHOR_TOKENS_PER_SECOND = 1393.0
ANCHOR_SOURCE = "shared/perf anchor: the user's recipe on one H100 80GB (1,393 real tokens/s)"

SAMPLE_THRESHOLD = 20_000      # files with more rows than this are tokenized on a sample
SAMPLE_ROWS = 4_000
GIB = 2 ** 30
CUDA_OVERHEAD_GIB = 2.0        # CUDA context + allocator fragmentation, roughly

# Shapes of well-known bases, for estimating offline (no config.json reachable).
KNOWN_SHAPES = {
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-3.1-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def default_tokens_per_second(base_params: float | None = None) -> tuple[float, str]:
    """cogumi's measured H100 throughput for the 8B shape, scaled by parameter count for other bases (a LoRA
    step costs ~4N FLOPs per token; the scale is kept within 0.05..4 -- small models are not compute-bound)."""
    from cogumi import speed
    measured = getattr(speed, "H100_TOKENS_PER_SECOND", None)
    if not measured:
        return ANCHOR_TOKENS_PER_SECOND, ANCHOR_SOURCE
    source = f"docs/benchmarks.md: cogumi train on one H100, 8B shape ({measured:,.0f} tokens/s)"
    if not base_params:
        return float(measured), source
    scale = min(4.0, max(0.05, speed.H100_MEASURED_PARAMS / base_params))
    if abs(scale - 1) < 0.02:
        return float(measured), source
    return float(measured) * scale, f"{source}, scaled x{scale:.2f} for {base_params / 1e9:.2f}B parameters"


# ---------------------------------------------------------------------------------------------
# model shape and memory
# ---------------------------------------------------------------------------------------------

def model_shape(base: str, revision: str | None = None) -> tuple[dict, str]:
    """The base's config.json (local or hub), else a known shape by name; (config, source)."""
    from cogumi.lineage import read_model_config
    try:
        return read_model_config(base, revision), "config.json"
    except CogumiError as e:
        key = base.lower().replace("meta-llama-", "llama-")
        for name, shape in KNOWN_SHAPES.items():
            if name in key:
                return dict(shape), f"known shape '{name}' (config.json not reachable offline)"
        raise CogumiError(f"{base}: cannot read its config.json ({e}); pass a local model dir as base_model") from None


def _dims(mc: dict) -> dict:
    h = mc["hidden_size"]
    heads = mc.get("num_attention_heads", 1)
    head_dim = mc.get("head_dim") or h // heads
    kv = mc.get("num_key_value_heads", heads) * head_dim
    return {"h": h, "q": heads * head_dim, "kv": kv, "inter": mc["intermediate_size"],
            "layers": mc["num_hidden_layers"], "vocab": mc["vocab_size"]}


def parameter_counts(mc: dict, target_modules: list[str], r: int) -> dict:
    d = _dims(mc)
    h, q, kv, inter = d["h"], d["q"], d["kv"], d["inter"]
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * h
    embed = d["vocab"] * h
    head = 0 if mc.get("tie_word_embeddings") else d["vocab"] * h
    total = d["layers"] * per_layer + embed + head + h
    lora = d["layers"] * sum(r * (i + o) for name, (i, o) in shapes.items() if name in target_modules)
    return {"base": total, "lora": lora}


def activation_bytes_per_token(mc: dict, dtype_bytes: int, checkpointing: bool) -> float:
    """Rough bytes kept for backward per token. Per decoder layer without recomputation (elements): the
    residual stream and norm outputs (~6h), q/k/v and the attention output (q + 2kv + h), LoRA dropout copies
    of projection inputs (~6h + inter), and the MLP's gate/up/act/product (4 x inter). With checkpointing only
    each layer's input is kept, plus one layer's worth during its recomputation."""
    d = _dims(mc)
    per_layer = 13 * d["h"] + d["q"] + 2 * d["kv"] + 5 * d["inter"]
    if checkpointing:
        return dtype_bytes * (d["layers"] * d["h"] + per_layer)
    return dtype_bytes * d["layers"] * per_layer


def memory_estimate(mc: dict, cfg: RunConfig, speed, micro_batch_tokens: int) -> dict:
    dtype_bytes = DTYPE_BYTES.get(speed.dtype, 2)
    counts = parameter_counts(mc, cfg.lora.target_modules, cfg.lora.r)
    weights = counts["base"] * dtype_bytes
    lora_states = counts["lora"] * (4 + 4 + 8)      # fp32 params + grads + AdamW m and v
    acts = activation_bytes_per_token(mc, dtype_bytes, speed.gradient_checkpointing) * micro_batch_tokens
    total = weights + lora_states + acts + CUDA_OVERHEAD_GIB * GIB
    return {
        "base_parameters": counts["base"], "lora_parameters": counts["lora"],
        "weights_gib": round(weights / GIB, 2), "lora_params_grads_adam_gib": round(lora_states / GIB, 2),
        "activations_gib": round(acts / GIB, 2), "overhead_gib": CUDA_OVERHEAD_GIB,
        "total_gib": round(total / GIB, 1), "micro_batch_tokens": micro_batch_tokens,
        "gradient_checkpointing": speed.gradient_checkpointing,
        "note": "rough: logits are chunked by TRL's fused LM head and not counted",
    }


# ---------------------------------------------------------------------------------------------
# tokens and steps
# ---------------------------------------------------------------------------------------------

def _load_tokenizer(cfg: RunConfig):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(cfg.base_model, revision=cfg.base_revision)
    except Exception as e:
        raise CogumiError(f"{cfg.base_model}: cannot load its tokenizer ({type(e).__name__}: {e}); "
                          "estimate tokenizes the data with the base's own tokenizer -- pass a local dir") from None


def count_packs(lengths: list[int], max_length: int) -> int:
    """Packs TRL's best-fit-decreasing packer makes of these row lengths (the real packer)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    if not lengths:
        return 0
    ds = Dataset.from_dict({"input_ids": [[0] * n for n in lengths]})
    return len(pack_dataset(ds, max_length, "bfd"))


TARGET_GPU_GIB = 80           # estimating on a machine without a GPU: plan for one H100 80GB


def target_speed_settings(training, device: str):
    """The settings ``cogumi train`` will resolve on the target device. Estimating for CUDA on a machine
    without a GPU (a laptop planning the rented H100 run), the card-size choices are made for an 80 GB card."""
    from cogumi import speed as sp
    settings = sp.resolve_speed_settings(training, device)
    if device == "cuda" and sp.gpu_memory_gib() is None:
        if training.gradient_checkpointing == "auto":
            settings.gradient_checkpointing = TARGET_GPU_GIB < sp.BIG_GPU_GIB
        if settings.packing:
            settings.micro_batch_tokens = (sp.MICRO_BATCH_TOKENS_CKPT if settings.gradient_checkpointing
                                           else sp.MICRO_BATCH_TOKENS_NO_CKPT)
        settings.notes.append(f"no GPU on this machine: planned for one {TARGET_GPU_GIB} GB card")
    return settings


def estimate(cfg: RunConfig, *, tokens_per_second: float | None = None, usd_per_hour: float | None = None,
             device: str = "cuda", processes: int = 1, sample_rows: int = SAMPLE_ROWS,
             sample_threshold: int = SAMPLE_THRESHOLD, tokenizer=None) -> dict:
    """Everything ``cogumi estimate`` prints, as a dict."""
    from cogumi.data import load_rows, split_holdout, tokenize_rows
    from cogumi.speed import batch_plan

    t, d = cfg.training, cfg.data
    loaded = load_rows(d.train, split=d.split, system_prompt=d.system_prompt)
    train_idx, _ = split_holdout(len(loaded.rows), min(d.holdout, max(len(loaded.rows) - 1, 0)), t.seed)
    n_train = len(train_idx)
    sampled = n_train > sample_threshold
    idx = sorted(random.Random(t.seed).sample(train_idx, sample_rows)) if sampled else train_idx
    tokenizer = tokenizer or _load_tokenizer(cfg)
    tok = tokenize_rows([loaded.messages[i] for i in idx], tokenizer, t.max_length, d.overlong, source=d.train)
    scale = n_train / max(len(idx), 1)
    s = tok.stats
    rows_kept = round(s["kept"] * scale)
    tokens_epoch = round(s["tokens"] * scale)

    speed = target_speed_settings(t, device)
    per_device, accum = batch_plan(speed, t)
    if speed.packing:
        sequences = math.ceil(count_packs([len(x) for x in tok.input_ids], t.max_length) * scale)
        unit = "packs"
    else:
        sequences, unit = rows_kept, "rows"
    batches = math.ceil(sequences / (per_device * processes))
    steps_per_epoch = max(batches // accum + int(batches % accum > 0), 1)
    steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    tokens_total = round(tokens_epoch * steps / steps_per_epoch)

    mc, shape_source = model_shape(cfg.base_model, cfg.base_revision)
    if tokens_per_second is None:
        tokens_per_second = cfg.cost.tokens_per_second
        tps_source = "config cost.tokens_per_second"
        if tokens_per_second is None:
            base_params = parameter_counts(mc, cfg.lora.target_modules, cfg.lora.r)["base"]
            tokens_per_second, tps_source = default_tokens_per_second(base_params)
    else:
        tps_source = "--tokens-per-second"
    usd = usd_per_hour if usd_per_hour is not None else cfg.cost.gpu_hourly_usd
    hours = tokens_total / tokens_per_second / 3600 / processes

    micro_tokens = per_device * t.max_length
    memory = memory_estimate(mc, cfg, speed, micro_tokens)
    return {
        "config": {"base_model": cfg.base_model, "data": d.train, "max_length": t.max_length, "epochs": t.epochs,
                   "max_steps": t.max_steps},
        "device": device, "processes": processes, "speed": speed.to_dict(),
        "rows": {"read": len(loaded.rows), "held_out": len(loaded.rows) - n_train, "train": n_train,
                 "kept": rows_kept, "overlong": round(s["overlong"] * scale), "truncated": round(s["truncated"] * scale),
                 "dropped": round((s["dropped_overlong"] + s["dropped_no_loss_tokens"]) * scale),
                 "duplicates": loaded.duplicates},
        "tokens": {"per_epoch": tokens_epoch, "loss_per_epoch": round(s["loss_tokens"] * scale),
                   "mean_per_row": round(s["tokens"] / max(s["kept"], 1), 1), "total": tokens_total,
                   "counted": (f"sampled: {len(idx)} of {n_train} rows tokenized, scaled up" if sampled
                               else f"exact: all {n_train} rows tokenized")},
        "steps": {"total": steps, "per_epoch": steps_per_epoch, "per_device_batch": per_device,
                  "grad_accum": accum, "global_batch": per_device * accum * processes, "batch_unit": unit,
                  "sequences_per_epoch": sequences},
        "memory": {**memory, "shape_source": shape_source},
        "time": {"tokens_per_second": tokens_per_second, "source": tps_source, "hours": round(hours, 2)},
        "cost": {"usd_per_hour": usd, "gpus": processes, "usd": round(hours * usd * processes, 2)},
    }


def format_table(est: dict) -> str:
    r, tk, st, m, tm, c = est["rows"], est["tokens"], est["steps"], est["memory"], est["time"], est["cost"]
    lines = [
        ("base", est["config"]["base_model"]),
        ("data", est["config"]["data"]),
        ("rows", f"{r['read']:,} read, {r['held_out']:,} held out, {r['kept']:,} trained "
                 f"({r['truncated']:,} truncated, {r['dropped']:,} dropped, {r['duplicates']:,} duplicates)"),
        ("tokens", f"{tk['per_epoch']:,} per epoch ({tk['loss_per_epoch']:,} on assistant turns), "
                   f"{tk['total']:,} in the run; {tk['counted']}"),
        ("steps", f"{st['total']:,} ({st['per_epoch']:,} per epoch; global batch {st['per_device_batch']} x "
                  f"{st['grad_accum']} x {est['processes']} = {st['global_batch']} {st['batch_unit']})"),
        ("GPU memory", f"~{m['total_gib']} GiB per GPU (weights {m['weights_gib']}, LoRA+Adam "
                       f"{m['lora_params_grads_adam_gib']}, activations {m['activations_gib']} for "
                       f"{m['micro_batch_tokens']:,} tokens/micro-batch"
                       f"{' with checkpointing' if m['gradient_checkpointing'] else ''}, overhead {m['overhead_gib']})"),
        ("throughput", f"{tm['tokens_per_second']:,.0f} tokens/s per GPU ({tm['source']})"),
        ("time", f"{tm['hours']:.2f} h"),
        ("cost", f"${c['usd']:,.2f} at ${c['usd_per_hour']}/h x {c['gpus']} GPU(s)"),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def estimate_command(config: str, overrides: list[str] | None = None, tokens_per_second: float | None = None,
                     usd_per_hour: float | None = None, as_json: bool = False) -> int:
    cfg = load_run_config(config, overrides)
    if tokens_per_second is not None and tokens_per_second <= 0:
        raise CogumiError("--tokens-per-second must be > 0")
    est = estimate(cfg, tokens_per_second=tokens_per_second, usd_per_hour=usd_per_hour)
    print(json.dumps(est, indent=2) if as_json else format_table(est))
    return 0
