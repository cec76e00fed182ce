"""Training throughput, side by side in one process: A (the user's recipe) vs B (what `cogumi train`
runs by default on this device), on the same random-init model and the same synthetic rows.

  A: HF Trainer + PEFT LoRA, batch 2 x accumulation 8, pad to longest, gradient checkpointing, bf16
     (mirrors ../shared/perf/anchor_seed_recipe.py, the measured 1,393 tokens/s anchor).
  B: ``cogumi.train.build_trainer(cfg, model=..., tokenizer=..., train_dataset=..., speed=...)`` with
     ``resolve_speed_settings(cfg.training, device)`` and rows from ``cogumi.data.tokenize_rows``.

Prints real (non-pad) tokens/s, s/step, peak GPU memory, B/A, the fraction of the 4N limit, and a
packing parity check: B's per-row losses on a packed batch equal each row's loss run alone, changing one
row's tokens changes no other row's log-probs, and (control) naive packing does change them.

The model is Llama-3.1-8B-shaped (``--shape 8b``, random weights: throughput does not depend on their
values) and the rows are synthetic (lengths lognormal, median 350, sigma 0.9, clipped 32..2048, seeded),
written as instruction/response rows and rendered with a Llama-3-style chat template (cogumi's offline
tiny tokenizer: real tokenizer files cannot be fetched here; token ids differ, lengths are what count).

  python benchmarks/train_throughput.py --out train.json          # on one GPU
  python benchmarks/train_throughput.py --smoke                   # tiny model, CPU, seconds (CI)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"})
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False)
N_PARAMS_8B = 8.03e9
CARD_TFLOPS = 790e12          # measured 8192^3 bf16 matmul on this workplace's H100 (device KINDS.md)


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# synthetic rows
# ---------------------------------------------------------------------------------------------

def row_lengths(n: int, seed: int, median: float, sigma: float, lo: int, hi: int) -> list[int]:
    rng = random.Random(seed)
    return [int(min(hi, max(lo, math.exp(math.log(median) + sigma * rng.gauss(0, 1))))) for _ in range(n)]


def one_token_words(tokenizer) -> list[str]:
    """Words that are exactly one token with a leading space, so a row's length can be set in tokens."""
    words = sorted(t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2)
    return [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def synthetic_rows(lengths: list[int], tokenizer, seed: int) -> list[dict]:
    """instruction/response rows whose chat-rendered length is about the given number of tokens."""
    words = one_token_words(tokenizer)
    rng = random.Random(seed)
    probe = [{"role": "user", "content": "What"}, {"role": "assistant", "content": "What"}]
    rendered = tokenizer.apply_chat_template(probe, tokenize=False)
    overhead = len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) - 2
    rows = []
    for n in lengths:
        body = max(2, n - overhead)
        n_instr = max(1, body * 15 // 100)
        instr = " ".join(rng.choice(words) for _ in range(n_instr))
        resp = " ".join(rng.choice(words) for _ in range(body - n_instr))
        rows.append({"instruction": instr, "response": resp})
    return rows


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------

def build_model(shape: str, vocab: int, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    kw = dict(LLAMA_8B) if shape == "8b" else dict(TINY, vocab_size=vocab)
    cfg = LlamaConfig(**kw)
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    n = sum(p.numel() for p in model.parameters())
    log(f"model: {shape} {n / 1e9:.2f}B params, init {time.time() - t0:.1f}s on {device}")
    return model


class Meter:
    """Step times (device-synchronised) and real tokens per optimizer step, from a forward pre-hook."""

    def __init__(self, device: str):
        self.device, self.tokens, self.steps = device, 0, []
        self._t = self._tok0 = 0

    def count_collated(self, collator):
        """Wrap a collator: real (unpadded) tokens of every batch it builds, on the CPU, in order. The
        forward hook takes them in the same order (one forward per micro-batch), so padding added for
        fixed shapes is never counted and no device value is read."""
        import collections
        self.fifo = collections.deque()

        def collate(examples):
            self.fifo.append(sum(len(e["input_ids"]) for e in examples))
            return collator(examples)
        return collate

    def hook(self, module, args, kwargs):
        if getattr(self, "fifo", None):
            self.tokens += self.fifo.popleft()
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        if mask is not None:
            self.tokens += int(mask.sum())
        elif ids is not None:
            self.tokens += int(ids.numel())

    def sync(self):
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()

    def callback(self):
        from transformers import TrainerCallback
        meter = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                meter.sync()
                meter._t, meter._tok0 = time.perf_counter(), meter.tokens

            def on_step_end(self, args, state, control, **kw):
                meter.sync()
                meter.steps.append((time.perf_counter() - meter._t, meter.tokens - meter._tok0))
        return StepTimer()

    def summary(self, warmup: int, drop_last: bool = False) -> dict:
        measured = self.steps[warmup:len(self.steps) - drop_last] or self.steps
        dt = sum(t for t, _ in measured)
        tok = sum(n for _, n in measured)
        return {"steps_total": len(self.steps), "steps_measured": len(measured),
                "s_per_step": dt / max(1, len(measured)), "tokens_per_step": tok / max(1, len(measured)),
                "tokens_per_s": tok / dt if dt else 0.0,
                "step_times": [round(t, 3) for t, _ in self.steps], "step_tokens": [n for _, n in self.steps]}


def peak_gib(device: str) -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_peak(device: str):
    import torch
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------------------
# A: the user's recipe
# ---------------------------------------------------------------------------------------------

def run_recipe_a(model, token_rows: list[list[int]], pad_id: int, args, device: str) -> tuple[dict, object]:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Rows(Dataset):
        def __len__(self):
            return len(token_rows)

        def __getitem__(self, i):
            return {"input_ids": torch.tensor(token_rows[i])}

    def pad_collate(batch):
        longest = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        att = torch.zeros(len(batch), longest, dtype=torch.long)
        for j, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[j, :n], att[j, :n] = b["input_ids"], 1
        return {"input_ids": ids, "attention_mask": att, "labels": ids.masked_fill(att == 0, -100)}

    gpu = device == "cuda"
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    lcfg = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lcfg)
    meter = Meter(device)
    handle = peft_model.register_forward_pre_hook(meter.hook, with_kwargs=True)
    targs = TrainingArguments(
        output_dir=str(Path(args.workdir) / "a"), per_device_train_batch_size=2, gradient_accumulation_steps=8,
        max_steps=args.warmup + args.steps, learning_rate=2e-4, bf16=gpu, tf32=True if gpu else None,
        logging_steps=1000, save_strategy="no", report_to=[], dataloader_num_workers=2 if gpu else 0,
        gradient_checkpointing=True, remove_unused_columns=False, lr_scheduler_type="cosine", warmup_steps=1,
        seed=0, use_cpu=not gpu)
    reset_peak(device)
    trainer = Trainer(model=peft_model, args=targs, train_dataset=Rows(), data_collator=pad_collate,
                      callbacks=[meter.callback()])
    trainer.train()
    result = {"variant": "A", "recipe": "HF Trainer + PEFT, bs2 x acc8, pad-to-longest, grad ckpt, bf16",
              **meter.summary(args.warmup), "peak_gib": peak_gib(device)}
    handle.remove()
    del trainer
    base = peft_model.base_model.unload()      # LoRA layers out, base weights untouched
    base.gradient_checkpointing_disable()
    base.disable_input_require_grads()
    del peft_model
    reset_peak(device)
    return result, base


# ---------------------------------------------------------------------------------------------
# B: what `cogumi train` runs
# ---------------------------------------------------------------------------------------------

def make_run_config(args, smoke: bool, overrides: list[str] | None = None):
    from cogumi.config import RunConfig
    cfg = RunConfig(base_model="synthetic-8b-shaped", output_dir=str(Path(args.workdir) / "b"),
                    data=None, report_to=[])
    from cogumi.config import DataConfig
    cfg.data = DataConfig(train="synthetic.jsonl")
    t = cfg.training
    t.max_steps = args.warmup + args.steps
    t.max_length = args.max_length
    t.save_steps = 10**9
    t.logging_steps = 4                  # a few logged steps, to see the GPU memory/utilisation fields
    t.warmup_steps = 1
    if smoke:
        t.packing = "on"                 # exercise the packed path on CPU too
        t.batch_size, t.grad_accum = 2, 2
    import dataclasses

    import yaml

    from cogumi.config import ConfigError, TrainingConfig, from_dict
    changed = {}
    for item in overrides or []:
        key, _, value = item.partition("=")
        changed[key] = yaml.safe_load(value)
    try:                                 # the config's own types and coercions (YAML's on/off -> "on"/"off")
        cfg.training = from_dict(TrainingConfig, {**dataclasses.asdict(t), **changed}, prefix="training.",
                                 source="--set/--ablate")
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    return cfg


def build_b_trainer(cfg, model, tokenizer, dataset, speed):
    """cogumi.train.build_trainer: the trainer, batch plan included, exactly as `cogumi train` builds it."""
    from cogumi.train import build_trainer
    return build_trainer(cfg, model=model, tokenizer=tokenizer, train_dataset=dataset, speed=speed), \
        "cogumi.train.build_trainer"


def prepare_b_model(model, speed):
    """What cogumi's loader does on top of from_pretrained: the attention and the fused kernels."""
    from cogumi.speed import model_load_kwargs
    kw = model_load_kwargs(speed)               # registers cogumi_varlen when chosen
    model.set_attn_implementation(kw["attn_implementation"])
    # build_trainer applies the rest (Liger kernels, LoRA autocast inputs) itself, as `cogumi train` does
    return (["attn:" + kw["attn_implementation"]] + (["liger:rope,rms_norm,swiglu"] if speed.use_liger else [])
            + (["lora:autocast-inputs"] if speed.lora_autocast_inputs else [])
            + (["lora:fused-add"] if speed.lora_fused_add else [])
            + (["compile:decoder-layers"] if speed.torch_compile else []))


def run_cogumi_b(model, tokenizer, dataset, args, device: str, smoke: bool, overrides: list[str] | None = None,
                 speed_overrides: dict | None = None, name: str = "B") -> tuple[dict, object]:
    from cogumi.speed import resolve_speed_settings
    cfg = make_run_config(args, smoke, overrides)
    profile = bool(getattr(args, "profile", None)) and name == "B"
    if profile:
        cfg.training.max_steps += 1        # one more step, profiled, left out of the timing
    speed = resolve_speed_settings(cfg.training, device)
    for key, value in (speed_overrides or {}).items():
        if not hasattr(speed, key):
            raise SystemExit(f"--ablate: SpeedSettings has no field {key!r}")
        setattr(speed, key, value)
    applied = prepare_b_model(model, speed)
    log(f"B speed settings: {json.dumps(speed.to_dict())} applied={applied}")
    trainer, built_by = build_b_trainer(cfg, model, tokenizer, dataset, speed)
    meter = Meter(device)
    handle = trainer.model.register_forward_pre_hook(meter.hook, with_kwargs=True)
    trainer.add_callback(meter.callback())
    trainer.data_collator = meter.count_collated(trainer.data_collator)
    if profile:
        trainer.add_callback(profile_last_step(cfg.training.max_steps, device, args.profile))
    reset_peak(device)
    trainer.train()
    plan = trainer.cogumi_batch_plan
    log(f"{name} batches: {plan.describe()}")
    result = {"variant": name, "built_by": built_by, "speed": speed.to_dict(), "applied": applied,
              "per_device_batch": plan.per_device, "grad_accum": plan.grad_accum, "batch_plan": plan.to_dict(),
              "overrides": (overrides or []) + [f"speed.{k}={v}" for k, v in (speed_overrides or {}).items()],
              **meter.summary(args.warmup, drop_last=profile),
              "peak_gib": peak_gib(device),
              "logged": [{k: v for k, v in h.items() if k in ("step", "loss", "gpu_mem_allocated_gb",
                                                                "gpu_mem_reserved_gb", "gpu_utilization")}
                         for h in trainer.state.log_history if "loss" in h]}
    handle.remove()
    return result, trainer


def device_busy(prof) -> dict:
    """How much of the profiled span the GPU was running a kernel (union of kernel intervals)."""
    from torch.autograd import DeviceType
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    if not spans:
        return {"kernels": 0}
    busy, (cur_s, cur_e) = 0.0, spans[0]
    gaps = []
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append(s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = spans[-1][1] - spans[0][0]
    gaps.sort(reverse=True)
    return {"kernels": len(spans), "span_ms": round(span / 1e3, 1), "busy_ms": round(busy / 1e3, 1),
            "busy_fraction": round(busy / span, 4), "gaps_over_1ms": sum(g > 1e3 for g in gaps),
            "idle_in_gaps_over_1ms_ms": round(sum(g for g in gaps if g > 1e3) / 1e3, 1),
            "largest_gaps_ms": [round(g / 1e3, 2) for g in gaps[:8]]}


def profile_last_step(total_steps: int, device: str, out_path: str):
    """A callback that runs torch.profiler over the last optimizer step and writes the kernel table
    (device time per op, top 40) to ``out_path``: where B's time goes, for the next speed-up."""
    import torch
    from transformers import TrainerCallback

    class LastStepProfiler(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == total_steps - 1:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if device == "cuda":
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is None:
                return
            if device == "cuda":
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            avg = self.prof.key_averages()
            sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
            table = avg.table(sort_by=sort, row_limit=40, max_name_column_width=70)
            cpu_table = avg.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
            busy = device_busy(self.prof)
            Path(out_path).write_text(f"{json.dumps(busy)}\n\n{table}\n\nby CPU time:\n{cpu_table}")
            log(f"profile of the last step: device busy {json.dumps(busy)}")
            log("top kernels:\n" + "\n".join(table.splitlines()[:24]))
            log("top CPU ops:\n" + "\n".join(cpu_table.splitlines()[:16]))
            self.prof = None
    return LastStepProfiler()


# ---------------------------------------------------------------------------------------------
# parity: packing must not let rows attend to each other
# ---------------------------------------------------------------------------------------------

def _token_logprobs(model, batch: dict):
    """Per-token log-probs of the next-token labels ([T-1]) and the label mask."""
    import torch
    try:
        out = model(**batch, fused_lm_head=True)
        return out.log_probs[0].float(), out.label_mask[0]
    except TypeError:                     # no TRL fused head on this model: plain logits
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, :-1].float()
        tgt = labels[0, 1:]
        lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[:, None])[:, 0]
        mask = tgt != -100
        return lp.masked_fill(~mask, 0), mask


def release_b(trainer, device: str):
    """The base model back from B's trainer: LoRA layers and TRL's fused-head patch removed."""
    model = trainer.model.base_model.unload()
    model.__dict__.pop("forward", None)
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    for layer in compiled:                 # a torch_compile variant compiled the layers in place
        layer._compiled_call_impl = None
    if compiled:
        import torch
        torch._dynamo.reset()              # the next variant compiles afresh, within the recompile limit
    del trainer
    reset_peak(device)
    return model


def parse_ablation(spec: str) -> tuple[list[str], dict]:
    """'liger=off,micro=6144,speed.lora_autocast_inputs=false' -> (['liger=off'], {speed overrides})."""
    import yaml
    overrides, speed = [], {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, _, value = item.partition("=")
        if key == "micro":
            speed["micro_batch_tokens"] = int(value)
        elif key.startswith("speed."):
            speed[key[len("speed."):]] = yaml.safe_load(value)
        else:
            overrides.append(item)
    return overrides, speed


def packing_parity(trainer, device: str, tolerance: float, max_rows: int = 8) -> dict:
    """Per-row losses of one packed batch (B's collator, B's model) vs the same rows run alone."""
    import torch
    model = trainer.model
    model.eval()
    ds = trainer.train_dataset
    if "seq_lengths" not in ds.column_names:
        return {"checked": False, "reason": "B does not pack rows (no seq_lengths in the prepared dataset)"}
    head = ds.select(range(min(len(ds), 64)))["seq_lengths"]
    example = ds[max(range(len(head)), key=lambda i: len(head[i]))]      # the pack holding the most rows
    batch = trainer.data_collator([example])
    batch = {k: (v.to(model.device) if hasattr(v, "to") else v) for k, v in batch.items()}
    cu = batch["cu_seq_lens_q"].tolist()
    segments = [(s, e) for s, e in zip(cu[:-1], cu[1:]) if e - s > 1][:max_rows]   # 1-token segments: padding

    def row_losses(lp, mask, spans, offset_by_start=True):
        out = []
        for s, e in spans:
            a, b = (s, e - 1) if offset_by_start else (0, e - s - 1)
            n = mask[a:b].sum().clamp(min=1)
            out.append(float(-(lp[a:b]).sum() / n))
        return out

    with torch.no_grad():
        lp, mask = _token_logprobs(model, batch)
        packed = row_losses(lp, mask, segments)
        alone = []
        for s, e in segments:
            single = {"input_ids": batch["input_ids"][:, s:e], "labels": batch["labels"][:, s:e]}
            lps, ms = _token_logprobs(model, single)
            alone.append(row_losses(lps, ms, [(0, e - s)])[0])
        # isolation: new tokens in row 0 must not move any later row's log-probs. Both runs back to back, so
        # they take the same path (with compiled layers the calls above may have left a newer graph, whose
        # kernels round differently from the first run's)
        lp_first = lp
        lp, _ = _token_logprobs(model, batch)
        changed = dict(batch)
        ids = batch["input_ids"].clone()
        s0, e0 = segments[0]
        g = torch.Generator(device="cpu").manual_seed(1)
        vocab = int(ids.max()) + 1
        ids[0, s0 + 1:e0] = torch.randint(0, vocab, (e0 - s0 - 1,), generator=g).to(ids.device)
        changed["input_ids"] = ids
        lp2, _ = _token_logprobs(model, changed)
        rest = slice(segments[1][0], segments[-1][1] - 1) if len(segments) > 1 else slice(0, 0)
        isolation = float((lp2[rest] - lp[rest]).abs().max()) if len(segments) > 1 else 0.0
        same_batch_again = float((lp[rest] - lp_first[rest]).abs().max()) if len(segments) > 1 else 0.0
        # control: the same packed row with positions 0..T-1 and no boundaries (naive packing)
        naive = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
        lpn, mn = _token_logprobs(model, naive)
        naive_losses = row_losses(lpn, mn, segments)
    model.train()
    diff = max(abs(a - b) for a, b in zip(packed, alone))
    naive_diff = max(abs(a - b) for a, b in zip(naive_losses, alone))
    naive_tok = float((lpn[rest] - lp[rest]).abs().max()) if len(segments) > 1 else 0.0
    ok = diff <= tolerance and isolation <= tolerance
    return {"checked": True, "rows": len(segments), "row_lengths": [e - s for s, e in segments],
            "packed_row_losses": [round(x, 5) for x in packed], "alone_row_losses": [round(x, 5) for x in alone],
            "max_abs_row_loss_diff": diff, "isolation_max_abs_logprob_change": isolation,
            "same_batch_rerun_max_abs_logprob_diff": same_batch_again,
            "control_naive_packing_max_abs_row_loss_diff": naive_diff,
            "control_naive_packing_max_abs_logprob_diff": naive_tok,
            "tolerance": tolerance, "passed": ok}


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps (CI)")
    p.add_argument("--shape", choices=["8b", "tiny"], default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--variants", default="A,B", help="A, B or A,B")
    p.add_argument("--warmup", type=int, default=None, help="optimizer steps left out of the timing")
    p.add_argument("--steps", type=int, default=None, help="measured optimizer steps")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--micro-tokens", type=int, default=None, help="override B's micro-batch token budget")
    p.add_argument("--set", action="append", help="override a training.* key for B, e.g. --set liger=off")
    p.add_argument("--ablate", action="append", default=[],
                   help="extra B variants before B, e.g. 'liger=off,micro=6144,grad_accum=1' (Liger patches "
                        "transformers globally: list variants without it first)")
    p.add_argument("--ablate-after", action="append", default=[],
                   help="extra B variants after B (and its parity check): those that patch transformers with "
                        "Liger when B does not")
    p.add_argument("--parity-only", action="store_true", help="build B, check packing parity, no timing")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--profile", default=None, help="profile B's last step; write the kernel table to this file")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    import torch
    smoke = args.smoke
    device = args.device or ("cpu" if smoke else ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = args.shape or ("tiny" if smoke else "8b")
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    args.steps = args.steps if args.steps is not None else (2 if smoke else 6)
    args.max_length = args.max_length or (128 if smoke else 2048)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="cogumi-bench-")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    import peft
    import transformers
    from cogumi.data import tokenize_rows
    from cogumi.tiny import build_tiny_tokenizer
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "shape": shape}
    for mod in ("trl", "datasets", "accelerate", "liger_kernel"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:
            info[mod] = "absent"
    log(json.dumps(info))

    tokenizer = build_tiny_tokenizer()
    n_rows = args.rows or (48 if smoke else 1600)
    lengths = row_lengths(n_rows, seed=0, median=40 if smoke else 350, sigma=0.9, lo=16 if smoke else 32,
                          hi=args.max_length)
    rows = synthetic_rows(lengths, tokenizer, seed=0)
    t0 = time.time()
    tok = tokenize_rows(rows, tokenizer, args.max_length, "truncate")
    log(f"rows: {len(rows)} synthetic, tokenized in {time.time() - t0:.1f}s: {tok.stats['tokens']} tokens, "
        f"median {sorted(map(len, tok.input_ids))[len(tok.input_ids) // 2]}, mean {tok.stats['tokens'] / len(tok.input_ids):.0f}")

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(shape, len(tokenizer), device, dtype)
    results = {"info": info, "rows": {"n": len(rows), "tokens": tok.stats["tokens"]}}
    variants = [v.strip().upper() for v in args.variants.split(",")]

    if "A" in variants and not args.parity_only:
        results["A"], model = run_recipe_a(model, tok.input_ids, tokenizer.pad_token_id, args, device)
        log(f"A: {json.dumps({k: v for k, v in results['A'].items() if k not in ('step_times', 'step_tokens')})}")
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    results["ablations"] = []

    def run_ablations(model, specs):
        for spec in ([] if args.parity_only else specs):
            overrides, speed_overrides = parse_ablation(spec)
            try:
                r, trainer = run_cogumi_b(model, tokenizer, tok.to_dataset(), args, device, smoke, overrides,
                                          speed_overrides, name=f"B[{spec}]")
                model = release_b(trainer, device)
                del trainer
            except Exception as e:          # an OOM or a failing option is a result too
                import traceback
                traceback.print_exc()
                r = {"variant": f"B[{spec}]", "error": f"{type(e).__name__}: {str(e)[:300]}",
                     "peak_gib": peak_gib(device)}
                reset_peak(device)
            results["ablations"].append(r)
            shown = {k: v for k, v in r.items() if k not in ("step_times", "step_tokens", "speed", "logged")}
            log(f"ablation: {json.dumps(shown)}")
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=2))
        return model

    model = run_ablations(model, args.ablate)
    if "B" in variants:
        if args.parity_only:
            args.steps, args.warmup = 1, 0
        results["B"], trainer = run_cogumi_b(model, tokenizer, tok.to_dataset(), args, device, smoke,
                                             args.set, {"micro_batch_tokens": args.micro_tokens} if args.micro_tokens else None)
        log(f"B: {json.dumps({k: v for k, v in results['B'].items() if k not in ('step_times', 'step_tokens', 'speed')})}")
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        results["parity"] = packing_parity(trainer, device, tol)
        log(f"parity-json: {json.dumps(results['parity'])}")
        if args.ablate_after and not args.parity_only:
            run_ablations(release_b(trainer, device), args.ablate_after)
    if "A" in results and "B" in results and results["A"]["tokens_per_s"]:
        results["B_over_A"] = results["B"]["tokens_per_s"] / results["A"]["tokens_per_s"]
    if "B" in results and shape == "8b":
        limit = CARD_TFLOPS / (4 * N_PARAMS_8B)
        results["limit_4N_tokens_per_s"] = limit
        results["B_fraction_of_4N_limit"] = results["B"]["tokens_per_s"] / limit
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    if "parity" in results and results["parity"].get("checked") and not results["parity"]["passed"]:
        log("PARITY FAILED: packed rows do not match rows run alone")
        return 1
    return 0


def print_table(results: dict) -> None:
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)
    log("\n| variant | s/step | tokens/step | real tokens/s | peak GiB |")
    log("|---|---|---|---|---|")
    for r in [results.get("A")] + results.get("ablations", []) + [results.get("B")]:
        if r and "error" in r:
            log(f"| {r['variant']} | error: {r['error'][:80]} | | | {fmt(r.get('peak_gib'), '.1f')} |")
        elif r:
            log(f"| {r['variant']} | {r['s_per_step']:.2f} | {r['tokens_per_step']:,.0f} | {r['tokens_per_s']:,.0f} | "
                f"{fmt(r['peak_gib'], '.1f')} |")
    if "B_over_A" in results:
        log(f"B/A = {results['B_over_A']:.2f}x")
    if "B_fraction_of_4N_limit" in results:
        log(f"B = {100 * results['B_fraction_of_4N_limit']:.1f}% of the 4N limit "
            f"({results['limit_4N_tokens_per_s']:,.0f} tokens/s)")
    par = results.get("parity")
    if par and par.get("checked"):
        log(f"parity: {'PASS' if par['passed'] else 'FAIL'}: max row-loss diff {par['max_abs_row_loss_diff']:.2e}, "
            f"isolation {par['isolation_max_abs_logprob_change']:.2e} (tol {par['tolerance']:.0e}); control naive "
            f"packing: row-loss diff {par['control_naive_packing_max_abs_row_loss_diff']:.2e}, "
            f"log-prob diff {par['control_naive_packing_max_abs_logprob_diff']:.2e}")


if __name__ == "__main__":
    sys.exit(main())
