"""``cogumi estimate CONFIG``: steps, tokens, memory, time and cost of a run, computed from the config
and the data instead of guessed -- for a CUDA GPU or for this machine's CPU (``--device``, default: the
device this machine has).

Features
  * Rows: every row is read and validated exactly as ``cogumi train`` would (a bad file fails here, free).
  * Tokens: the rows are rendered with the base's chat template and tokenized (``cogumi.data.tokenize_rows``)
    -- all of them, or for a big file a seeded random sample of ``sample_rows`` rows scaled up (the output
    says which). Truncation / dropping by ``data.overlong`` is applied as in training.
  * Steps: the optimizer steps ``cogumi train`` will take on the target device, from the same batch plan
    training uses (``cogumi.batching``: with packing, TRL's own best-fit-decreasing packer, sized so a step
    covers the recipe's rows unless ``training.packing_unit: packs``), times ``processes`` for multi-GPU
    runs. The output states the unit, the rows per step and the recipe's own steps.
  * Memory, GPU: a rough peak for one GPU: base weights + LoRA params/grads/AdamW states + activations per
    micro-batch (with or without activation checkpointing) + a fixed CUDA/allocator overhead.
  * Memory, CPU: a rough peak resident size: weights in the CPU dtype (fp32), LoRA states, activations (with
    the checkpointing the CPU run will use), TRL's LM-head tiles on a CPU, and the process's own libraries
    (calibrated on SmolLM2-135M, docs/benchmarks.md).
  * Time and cost: real tokens / tokens-per-second, times $/hour. Tokens/s comes from ``--tokens-per-second``,
    else ``cost.tokens_per_second`` in the config, else -- GPU -- cogumi's measured H100 figure scaled by
    parameter count, or -- CPU -- this CPU's matrix-multiply speed, probed for a fraction of a second, times
    the share of it a LoRA step reaches (measured on SmolLM2-135M), over the step's FLOPs per token (source
    printed). A CPU run has no hourly price unless ``--usd-per-hour`` gives one.

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
        "kind": "gpu", "base_parameters": counts["base"], "lora_parameters": counts["lora"],
        "weights_gib": round(weights / GIB, 2), "lora_params_grads_adam_gib": round(lora_states / GIB, 2),
        "activations_gib": round(acts / GIB, 2), "overhead_gib": CUDA_OVERHEAD_GIB,
        "total_gib": round(total / GIB, 1), "micro_batch_tokens": micro_batch_tokens,
        "gradient_checkpointing": speed.gradient_checkpointing,
        "note": "rough: logits are chunked by TRL's fused LM head and not counted",
    }


# ---------------------------------------------------------------------------------------------
# a CPU run: resident memory and throughput
# ---------------------------------------------------------------------------------------------

# Measured on SmolLM2-135M (r=16, batch 4 x 512 tokens, fp32, checkpointing, cogumi.speed.limit_cpu_memory;
# docs/benchmarks.md, "CPU memory"): what the process holds besides weights, LoRA states, activations and
# LM-head tiles (torch, transformers, datasets, the tokenizer, the data).
CPU_PROCESS_GIB = 0.5
# The share of this CPU's probed fp32 matrix-multiply speed that a LoRA training step reaches, in real tokens:
# SmolLM2-135M, batch 4 x 512 (unpacked, padding included), checkpointing, 2 threads: 81.3 tokens/s x 0.81 GFLOP
# per token at a probed 193-221 GFLOP/s (docs/benchmarks.md, "CPU memory").
CPU_TRAIN_EFFICIENCY = 0.32


def cpu_memory_estimate(mc: dict, cfg: RunConfig, speed, micro_batch_tokens: int) -> dict:
    """Rough peak resident memory of ``cogumi train`` on a CPU (see the module docstring)."""
    from cogumi.speed import CPU_LOGPROB_TILE_TOKENS, CPU_LOGPROB_TILE_VOCAB
    dtype_bytes = DTYPE_BYTES.get(speed.dtype, 4)
    counts = parameter_counts(mc, cfg.lora.target_modules, cfg.lora.r)
    weights = counts["base"] * dtype_bytes
    lora_states = counts["lora"] * (4 + 4 + 8)
    acts = activation_bytes_per_token(mc, dtype_bytes, speed.gradient_checkpointing) * micro_batch_tokens
    # TRL's fused LM head folds [tokens x vocab] tiles with ~10 tile-sized fp32 temporaries on a CPU
    tile = min(micro_batch_tokens, CPU_LOGPROB_TILE_TOKENS) * min(_dims(mc)["vocab"], CPU_LOGPROB_TILE_VOCAB) * 4
    head = 10 * tile if speed.cpu_memory_limits else 10 * tile * 32     # without the limits: 4096 x 32768 tiles
    total = weights + lora_states + acts + head + CPU_PROCESS_GIB * GIB
    return {
        "kind": "cpu", "base_parameters": counts["base"], "lora_parameters": counts["lora"],
        "weights_gib": round(weights / GIB, 2), "lora_params_grads_adam_gib": round(lora_states / GIB, 2),
        "activations_gib": round(acts / GIB, 2), "lm_head_gib": round(head / GIB, 2),
        "overhead_gib": CPU_PROCESS_GIB, "total_gib": round(total / GIB, 1),
        "micro_batch_tokens": micro_batch_tokens, "gradient_checkpointing": speed.gradient_checkpointing,
        "note": "rough peak resident memory (RSS) of the training process",
    }


def matmul_params(mc: dict) -> int:
    """Parameters a token passes through as matrix multiplies: the decoder's projections and the LM head
    (the embedding is a lookup)."""
    d = _dims(mc)
    per_layer = 2 * d["h"] * d["q"] + 2 * d["h"] * d["kv"] + 3 * d["h"] * d["inter"]
    return d["layers"] * per_layer + d["vocab"] * d["h"]


_PROBED_GFLOPS: list[float] = []


def probe_cpu_gflops(seconds: float = 0.3) -> float:
    """This CPU's fp32 matrix-multiply speed with torch's current threads (measured once per process)."""
    if _PROBED_GFLOPS:
        return _PROBED_GFLOPS[0]
    import time

    import torch
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    _PROBED_GFLOPS.append(2 * 1024 ** 3 * n / (time.perf_counter() - t0) / 1e9)
    return _PROBED_GFLOPS[0]


def cpu_tokens_per_second(mc: dict, speed) -> tuple[float, str]:
    """Training tokens/s on this CPU: probed GFLOP/s x the measured efficiency / FLOPs per token (forward
    2N, input gradients 2N, recomputation 2N more with checkpointing; the frozen weights get no gradient)."""
    import torch
    gflops = probe_cpu_gflops()
    flops_per_token = (6 if speed.gradient_checkpointing else 4) * matmul_params(mc)
    tps = gflops * 1e9 * CPU_TRAIN_EFFICIENCY / flops_per_token
    return tps, (f"this CPU: {gflops:,.0f} GFLOP/s fp32 matmul probed with {torch.get_num_threads()} thread(s) x "
                 f"{CPU_TRAIN_EFFICIENCY:.0%} reached by a LoRA step (SmolLM2-135M, docs/benchmarks.md) / "
                 f"{flops_per_token / 1e9:.2f} GFLOP per token; rough")


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


TARGET_GPU_GIB = 80           # estimating on a machine without a GPU: plan for one H100 80GB


def target_speed_settings(training, device: str, model_config: dict | None = None):
    """The settings ``cogumi train`` will resolve on the target device. Estimating for CUDA on a machine
    without a GPU (a laptop planning the rented H100 run), the card-size choices are made for an 80 GB card."""
    from cogumi import speed as sp
    settings = sp.resolve_speed_settings(training, device, model_config=model_config)
    if device == "cuda" and sp.gpu_memory_gib() is None:
        if training.gradient_checkpointing == "auto":
            settings.gradient_checkpointing = TARGET_GPU_GIB < sp.BIG_GPU_GIB
        if settings.packing:
            settings.micro_batch_tokens = (sp.MICRO_BATCH_TOKENS_CKPT if settings.gradient_checkpointing
                                           else sp.MICRO_BATCH_TOKENS_NO_CKPT)
        settings.notes.append(f"no GPU on this machine: planned for one {TARGET_GPU_GIB} GB card")
    return settings


def estimate(cfg: RunConfig, *, tokens_per_second: float | None = None, usd_per_hour: float | None = None,
             device: str = "auto", processes: int = 1, sample_rows: int = SAMPLE_ROWS,
             sample_threshold: int = SAMPLE_THRESHOLD, tokenizer=None) -> dict:
    """Everything ``cogumi estimate`` prints, as a dict. ``device``: "cuda", "cpu", or "auto" (this machine's)."""
    from cogumi.batching import plan_batches
    from cogumi.data import load_rows, split_holdout, tokenize_rows
    from cogumi.speed import detect_device

    if device == "auto":
        device = detect_device()
    if device not in ("cuda", "cpu"):
        raise CogumiError(f"--device must be auto, cuda or cpu, got {device!r}")

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

    mc, shape_source = model_shape(cfg.base_model, cfg.base_revision)
    speed = target_speed_settings(t, device, mc)
    plan = plan_batches(speed, t, [len(x) for x in tok.input_ids], processes=processes, total_rows=rows_kept,
                        seed=t.seed)
    steps_per_epoch = plan.steps_per_epoch
    steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    tokens_total = round(tokens_epoch * steps / steps_per_epoch)

    if tokens_per_second is None:
        tokens_per_second = cfg.cost.tokens_per_second
        tps_source = "config cost.tokens_per_second"
        if tokens_per_second is None and device == "cpu":
            tokens_per_second, tps_source = cpu_tokens_per_second(mc, speed)
        elif tokens_per_second is None:
            base_params = parameter_counts(mc, cfg.lora.target_modules, cfg.lora.r)["base"]
            tokens_per_second, tps_source = default_tokens_per_second(base_params)
    else:
        tps_source = "--tokens-per-second"
    # a CPU run is priced only when asked (--usd-per-hour); the config's price is the GPU's
    usd = usd_per_hour if usd_per_hour is not None or device == "cpu" else cfg.cost.gpu_hourly_usd
    hours = tokens_total / tokens_per_second / 3600 / processes

    micro_tokens = plan.micro_batch_tokens or plan.per_device * t.max_length
    memory = (memory_estimate(mc, cfg, speed, micro_tokens) if device == "cuda"
              else cpu_memory_estimate(mc, cfg, speed, micro_tokens))
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
        "steps": {"total": steps, "per_epoch": steps_per_epoch, "per_device_batch": plan.per_device,
                  "grad_accum": plan.grad_accum, "global_batch": plan.per_device * plan.grad_accum * processes,
                  "batch_unit": "packs" if plan.packing else "rows", "sequences_per_epoch": plan.sequences,
                  "packing_unit": plan.unit, "pack_length": plan.pack_length,
                  "rows_per_step": round(plan.rows_per_step, 2), "recipe_rows_per_step": plan.recipe_rows_per_step,
                  "recipe_steps_per_epoch": plan.recipe_steps_per_epoch, "note": plan.note},
        "memory": {**memory, "shape_source": shape_source},
        "time": {"tokens_per_second": tokens_per_second, "source": tps_source, "hours": round(hours, 2),
                 "seconds": round(hours * 3600, 1)},
        "cost": {"usd_per_hour": usd, "gpus": processes if device == "cuda" else 0,
                 "usd": None if usd is None else round(hours * usd * processes, 2)},
    }


def _step_text(st: dict, processes: int) -> str:
    if st["batch_unit"] == "rows":
        return (f"global batch {st['per_device_batch']} x {st['grad_accum']} x {processes} = "
                f"{st['global_batch']} rows")
    return (f"a step: {st['grad_accum']} x {processes} micro-batch(es) of {st['per_device_batch']} pack(s) of "
            f"<= {st['pack_length']:,} tokens, {st['rows_per_step']:g} rows on average (recipe "
            f"{st['recipe_rows_per_step']}; packing unit: {st['packing_unit']})")


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _memory_line(m: dict) -> tuple[str, str]:
    parts = (f"weights {m['weights_gib']}, LoRA+Adam {m['lora_params_grads_adam_gib']}, activations "
             f"{m['activations_gib']} for {m['micro_batch_tokens']:,} tokens/micro-batch"
             f"{' with checkpointing' if m['gradient_checkpointing'] else ''}")
    if m["kind"] == "cpu":
        return "CPU memory", (f"~{m['total_gib']} GiB peak resident ({parts}, LM-head tiles {m['lm_head_gib']}, "
                              f"process {m['overhead_gib']}; rough)")
    return "GPU memory", f"~{m['total_gib']} GiB per GPU ({parts}, overhead {m['overhead_gib']})"


def format_table(est: dict) -> str:
    r, tk, st, m, tm, c = est["rows"], est["tokens"], est["steps"], est["memory"], est["time"], est["cost"]
    cpu = est["device"] == "cpu"
    if c["usd"] is None:
        cost = "- (a run on this machine's CPU; --usd-per-hour prices it; the GPU plan: --device cuda)"
    else:
        cost = f"${c['usd']:,.2f} at ${c['usd_per_hour']}/h" + ("" if cpu else f" x {c['gpus']} GPU(s)")
    lines = [
        ("base", est["config"]["base_model"]),
        ("data", est["config"]["data"]),
        ("device", "this machine's CPU (no GPU here; --device cuda plans the GPU run)" if cpu else
         "CUDA GPU" + (f" ({'; '.join(est['speed']['notes'])})" if est["speed"]["notes"] else "")),
        ("rows", f"{r['read']:,} read, {r['held_out']:,} held out, {r['kept']:,} trained "
                 f"({r['truncated']:,} truncated, {r['dropped']:,} dropped, {r['duplicates']:,} duplicates)"),
        ("tokens", f"{tk['per_epoch']:,} per epoch ({tk['loss_per_epoch']:,} on assistant turns), "
                   f"{tk['total']:,} in the run; {tk['counted']}"),
        ("steps", f"{st['total']:,} ({st['per_epoch']:,} per epoch; the unpacked recipe: "
                  f"{st['recipe_steps_per_epoch']:,}); {_step_text(st, est['processes'])}"
                  + (f"; {st['note']}" if st["note"] else "")),
        _memory_line(m),
        ("throughput", f"{tm['tokens_per_second']:,.0f} tokens/s {'on this CPU' if cpu else 'per GPU'} "
                       f"({tm['source']})"),
        ("time", _duration(tm["seconds"])),
        ("cost", cost),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def estimate_command(config: str, overrides: list[str] | None = None, tokens_per_second: float | None = None,
                     usd_per_hour: float | None = None, as_json: bool = False, device: str = "auto") -> int:
    cfg = load_run_config(config, overrides)
    if tokens_per_second is not None and tokens_per_second <= 0:
        raise CogumiError("--tokens-per-second must be > 0")
    est = estimate(cfg, tokens_per_second=tokens_per_second, usd_per_hour=usd_per_hour, device=device)
    print(json.dumps(est, indent=2) if as_json else format_table(est))
    return 0
