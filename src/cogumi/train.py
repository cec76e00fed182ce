"""``cogumi train``: Phase 1A/1B LoRA training with TRL's SFTTrainer and PEFT, on a full-precision base.

Features
  * Preflight before any weight loads: ``lineage.check_training_base`` refuses a quantized base (config or
    name); ``allow_quantized_base`` trains anyway (PEFT k-bit preparation), is shouted and recorded.
  * Data read, validated and tokenized before the model loads (``cogumi.data``): a bad row fails in seconds.
  * Speed knobs from ``cogumi.speed.resolve_speed_settings``: dtype, packing (TRL BFD packing, padding-free:
    rows never attend to each other -- flash-attention uses ``cu_seq_lens``, sdpa/eager get a block-diagonal
    mask that transformers builds from the packed ``position_ids``), gradient checkpointing, Liger, optimizer,
    attention implementation, torch.compile, TF32.
  * Checkpoints every ``save_steps`` under ``OUTPUT/checkpoints``; a checkpoint counts as complete only once
    its ``cogumi-complete`` marker is written (after HF finished saving it). ``--resume`` continues from the
    newest complete one (partial ones are removed) and ends with the same adapter as an uninterrupted run.
  * Monitoring: progress bar, TensorBoard (``OUTPUT/tensorboard``), ``OUTPUT/train_log.jsonl``; a NaN/Inf
    loss stops the run at the step it happens (``RedFlagError``, before it can be checkpointed); loss spikes
    and plateaus are warned about; GPU memory and utilisation are logged on CUDA.
  * Output: ``OUTPUT/adapter`` (PEFT adapter + tokenizer + ``cogumi.json``), written atomically by rank 0.
  * Distributed: works unchanged under ``accelerate launch`` / ``torchrun`` (DDP; global batch = batch_size x
    grad_accum x processes). Rank 0 reads and validates the data once and shares it through a datasets
    cache; manifests and logs are written once.

Fault injection for tests (environment): ``COGUMI_FAULT_KILL_AT_STEP=K`` SIGKILLs the process at the end of
optimizer step K; ``COGUMI_FAULT_NAN_AT_STEP=K`` poisons a LoRA weight with NaN before step K.

Failure modes: quantized base (RedFlagError, nothing loaded or written), bad data (DataError), an output dir
that already holds a finished adapter or an interrupted run without ``--resume`` (CogumiError), NaN/Inf loss
(RedFlagError naming the step).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from cogumi.config import RunConfig, load_run_config
from cogumi.errors import CogumiError, DataError, RedFlagError

COMPLETE_MARKER = "cogumi-complete"
CHECKPOINT_PREFIX = "checkpoint-"


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def _checkpoint_step(path: Path) -> int | None:
    if not path.is_dir() or not path.name.startswith(CHECKPOINT_PREFIX):
        return None
    tail = path.name[len(CHECKPOINT_PREFIX):]
    return int(tail) if tail.isdigit() else None


def list_checkpoints(checkpoint_root: Path) -> tuple[list[Path], list[Path]]:
    """(complete, partial) checkpoint dirs, oldest first."""
    if not checkpoint_root.exists():
        return [], []
    found = sorted((p for p in checkpoint_root.iterdir() if _checkpoint_step(p) is not None), key=_checkpoint_step)
    complete = [p for p in found if (p / COMPLETE_MARKER).exists()]
    partial = [p for p in found if not (p / COMPLETE_MARKER).exists()]
    return complete, partial


def newest_complete_checkpoint(checkpoint_root: Path) -> Path | None:
    complete, _ = list_checkpoints(checkpoint_root)
    return complete[-1] if complete else None


def rotate_complete_checkpoints(checkpoint_root: Path, limit: int | None) -> list[Path]:
    """Delete the oldest *complete* checkpoints beyond ``limit``, never the newest one.

    Done here, after the newest checkpoint's marker is written, instead of by HF (which rotates before cogumi
    can mark the new checkpoint complete: a kill in that window would leave no complete checkpoint at all).
    """
    if not limit or limit <= 0:
        return []
    complete, _ = list_checkpoints(checkpoint_root)
    doomed = complete[:-max(limit, 1)]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------------------------------------
# callbacks
# ---------------------------------------------------------------------------------------------

def _callbacks_module():
    from transformers import TrainerCallback
    return TrainerCallback


def _is_distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def make_callbacks(cfg: RunConfig, out: Path, log: Callable[[str], Any], *, prior_wall_s: float = 0.0) -> list:
    """Cogumi's monitoring, checkpoint-marker and fault-injection callbacks. ``prior_wall_s``: training time of
    the sessions before a resume (recorded in each checkpoint's marker)."""
    TrainerCallback = _callbacks_module()
    session_start = time.time()

    class CheckpointMarker(TrainerCallback):
        """Write the completeness marker after HF has saved a checkpoint (on every rank: barrier first)."""

        def on_save(self, args, state, control, **kwargs):
            if _is_distributed():
                import torch.distributed as dist
                dist.barrier()
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
                if ckpt.is_dir():
                    from cogumi.io import atomic_write_json
                    atomic_write_json(ckpt / COMPLETE_MARKER, {
                        "step": state.global_step, "time": time.time(),
                        "wall_s": round(prior_wall_s + time.time() - session_start, 3)})
                    rotate_complete_checkpoints(Path(args.output_dir), cfg.training.save_total_limit)

    class Monitor(TrainerCallback):
        """Red flags checked live, train_log.jsonl, GPU stats."""

        def __init__(self):
            self.trainer = None
            self.losses: list[float] = []
            self.best = math.inf
            self.since_best = 0
            self.warnings: list[str] = []
            self.log_path = out / "train_log.jsonl"
            self.t0 = time.time()

        def warn(self, msg: str):
            self.warnings.append(msg)
            log(f"warning: {msg}")

        def on_step_end(self, args, state, control, **kwargs):
            # Checked every optimizer step (before HF can checkpoint the step), not only at logging steps.
            import torch
            tr_loss = getattr(self.trainer, "_tr_loss", None)
            if not isinstance(tr_loss, torch.Tensor):
                return
            bad = torch.tensor([0.0 if bool(torch.isfinite(tr_loss).all()) else 1.0], device=tr_loss.device)
            if _is_distributed():
                import torch.distributed as dist
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item() > 0:
                last = f"{self.losses[-1]:.4f}" if self.losses else "none yet"
                raise RedFlagError(
                    f"training loss became NaN/Inf at step {state.global_step} (last logged loss: {last}, learning "
                    f"rate {cfg.training.learning_rate:g}); the run was stopped before this step was checkpointed. "
                    "Lower training.learning_rate, check the data, or resume from the last checkpoint with --resume.")

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs if logs is not None else {}
            loss = logs.get("loss")
            if loss is not None and not math.isfinite(loss):
                raise RedFlagError(f"training loss is {loss} at step {state.global_step}; stopped. "
                                   "Lower training.learning_rate or check the data.")
            self._gpu_stats(logs)
            if loss is not None:
                self._check_trend(loss, state.global_step)
            if state.is_world_process_zero:
                row = {"step": state.global_step, "epoch": state.epoch, "time_s": round(time.time() - self.t0, 3),
                       **{k: v for k, v in logs.items() if isinstance(v, (int, float, str))}}
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")

        def _check_trend(self, loss: float, step: int):
            t = cfg.training
            recent = self.losses[-10:]
            if len(recent) >= 3:
                mean = sum(recent) / len(recent)
                if t.loss_spike_factor > 0 and loss > t.loss_spike_factor * mean:
                    self.warn(f"loss spike at step {step}: {loss:.4f} is more than {t.loss_spike_factor:g}x the "
                              f"recent mean {mean:.4f}")
            self.losses.append(loss)
            if loss < self.best - 1e-4:
                self.best, self.since_best = loss, 0
            else:
                self.since_best += 1
                if t.plateau_steps and self.since_best == t.plateau_steps:
                    self.warn(f"loss has not improved for {t.plateau_steps} logged steps (best {self.best:.4f}, "
                              f"now {loss:.4f} at step {step}): a plateau; check the learning rate and data")

        @staticmethod
        def _gpu_stats(logs: dict):
            import torch
            if not torch.cuda.is_available():
                return
            logs["gpu_mem_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
            logs["gpu_mem_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 3)
            from cogumi.speed import gpu_utilization
            util = gpu_utilization()               # needs pynvml (the gpu extra); optional
            if util is not None:
                logs["gpu_utilization"] = util

    class FaultInjection(TrainerCallback):
        """Deterministic faults for tests: SIGKILL at a step, or NaN weights before a step."""

        def __init__(self):
            self.kill_at = int(os.environ.get("COGUMI_FAULT_KILL_AT_STEP", "0") or 0)
            self.nan_at = int(os.environ.get("COGUMI_FAULT_NAN_AT_STEP", "0") or 0)

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if self.nan_at and state.global_step + 1 == self.nan_at and model is not None:
                import torch
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if p.requires_grad:
                            p.fill_(float("nan"))
                            break

        def on_step_end(self, args, state, control, **kwargs):
            if self.kill_at and state.global_step == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    monitor = Monitor()
    callbacks = [CheckpointMarker(), monitor]
    if os.environ.get("COGUMI_FAULT_KILL_AT_STEP") or os.environ.get("COGUMI_FAULT_NAN_AT_STEP"):
        callbacks.append(FaultInjection())
    if "tensorboard" in cfg.report_to:
        from transformers.integrations import TensorBoardCallback
        tb = TensorBoardCallback()
        tb.logging_dir = str(out / "tensorboard")
        callbacks.append(tb)           # after Monitor, so GPU stats reach TensorBoard too
    return callbacks


# ---------------------------------------------------------------------------------------------
# model, trainer
# ---------------------------------------------------------------------------------------------

def lora_config(cfg: RunConfig):
    from peft import LoraConfig
    lc = cfg.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                      use_rslora=lc.use_rslora, bias="none", task_type="CAUSAL_LM")


def distributed_strategy(cfg: RunConfig, speed, base_cfg: dict | None, num_processes: int) -> str:
    """"single", "ddp" or "fsdp" (``training.distributed``; auto: FSDP when the base's weights take more than
    half of one GPU's memory, so they do not fit beside activations and optimizer state)."""
    if num_processes <= 1:
        return "single"
    choice = cfg.training.distributed
    if choice != "auto":
        return choice
    if speed.device != "cuda" or not base_cfg:
        return "ddp"
    from cogumi.estimate import DTYPE_BYTES, parameter_counts
    from cogumi.speed import gpu_memory_gib
    try:
        weights_gib = parameter_counts(base_cfg, cfg.lora.target_modules, cfg.lora.r)["base"] * \
            DTYPE_BYTES.get(speed.dtype, 2) / 2**30
    except KeyError:                      # not a decoder config we can size: keep the default
        return "ddp"
    mem = gpu_memory_gib()
    return "fsdp" if mem and weights_gib > 0.5 * mem else "ddp"


def sft_config(cfg: RunConfig, speed, plan, *, output_dir: Path, strategy: str = "single"):
    """SFTConfig for a run: cogumi's choices, then the speed settings and the batch plan
    (``speed.trainer_speed_kwargs``: precision, packing, micro-batch/accumulation/pack length from
    ``cogumi.batching.plan_batches``, checkpointing, optimizer, compile, TF32) on top."""
    from trl import SFTConfig

    from cogumi.speed import trainer_speed_kwargs
    t = cfg.training
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay, max_grad_norm=t.grad_clip,
        seed=t.seed, data_seed=t.seed, use_cpu=speed.device == "cpu",
        max_length=t.max_length,
        completion_only_loss=True,          # our completion_mask marks every assistant turn (+ end-of-turn)
        logging_steps=t.logging_steps, logging_first_step=True, logging_nan_inf_filter=False,
        include_num_input_tokens_seen="non_padding",
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=None,
        # ^ cogumi rotates itself, after the completeness marker (rotate_complete_checkpoints)
        eval_strategy="no",
        report_to=[r for r in cfg.report_to if r != "tensorboard"] or "none",
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
        dataloader_num_workers=0,
    )
    kwargs.update(trainer_speed_kwargs(speed, t, plan))
    if strategy == "fsdp":
        # FSDP2, full shard; FSDP's own activation checkpointing replaces the trainer's (which would add a
        # redundant all-gather in backward).
        recompute = bool(kwargs.get("gradient_checkpointing") or kwargs.get("activation_checkpointing"))
        for key in ("gradient_checkpointing", "activation_checkpointing"):
            if key in kwargs:
                kwargs[key] = False
        kwargs.setdefault("gradient_checkpointing", False)  # explicit: TRL's default is on
        kwargs.pop("gradient_checkpointing_kwargs", None)
        kwargs.pop("activation_checkpointing_kwargs", None)
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = {"version": 2, "reshard_after_forward": True, "activation_checkpointing": recompute,
                                 "state_dict_type": "FULL_STATE_DICT"}
    return SFTConfig(**kwargs)


def load_base_model(cfg: RunConfig, speed, *, quantized: bool = False):
    """The base in the resolved dtype. A pre-quantized (bnb) base -- allowed only with the override -- keeps its
    own quantization_config and is placed on this process's device at load time (bnb weights can't be moved)."""
    from transformers import AutoModelForCausalLM

    from cogumi.speed import model_load_kwargs
    kwargs: dict[str, Any] = model_load_kwargs(speed)
    if cfg.base_revision:
        kwargs["revision"] = cfg.base_revision
    if quantized:
        from accelerate import PartialState
        kwargs["device_map"] = {"": PartialState(cpu=speed.device == "cpu").device}
    return AutoModelForCausalLM.from_pretrained(cfg.base_model, **kwargs)


def build_trainer(cfg: RunConfig, *, model, tokenizer, train_dataset, speed, eval_dataset=None,
                  log: Callable[[str], Any] = print, callbacks: list | None = None, strategy: str | None = None,
                  prior_wall_s: float = 0.0):
    """The TRL SFTTrainer exactly as ``cogumi train`` runs it (the throughput benchmark calls this too).

    ``model`` is the plain base (PEFT wraps it here); ``train_dataset`` holds ``input_ids`` and
    ``completion_mask`` (``cogumi.data``). Monitoring callbacks are added unless ``callbacks`` is given.
    """
    from cogumi.sft import trainer_class
    from cogumi.speed import apply_model_speedups

    out = Path(cfg.output_dir)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=speed.gradient_checkpointing)
    else:
        apply_model_speedups(model, speed)       # Liger layer kernels, before PEFT wraps the model
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    from accelerate import PartialState

    from cogumi.batching import dataset_lengths, plan_batches
    processes = PartialState().num_processes
    if strategy is None:
        strategy = distributed_strategy(cfg, speed, model.config.to_dict(), processes)
    eval_longest = max(dataset_lengths(eval_dataset), default=0) if eval_dataset is not None else 0
    plan = plan_batches(speed, cfg.training, dataset_lengths(train_dataset), processes=processes,
                        seed=cfg.training.seed, min_pack_length=eval_longest)
    args = sft_config(cfg, speed, plan, output_dir=out / "checkpoints", strategy=strategy)
    from cogumi.data import PARALLEL_ROWS
    if len(train_dataset) > PARALLEL_ROWS:          # TRL's label building / packing maps, on big sets
        args.dataset_num_proc = min(8, os.cpu_count() or 1)
    if callbacks is None:
        callbacks = make_callbacks(cfg, out, log, prior_wall_s=prior_wall_s)
    trainer = trainer_class(speed.sync_free_metrics)(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, peft_config=lora_config(cfg), callbacks=callbacks)
    for cb in callbacks:
        if hasattr(cb, "trainer"):
            cb.trainer = trainer
    trainer.cogumi_batch_plan = plan            # recorded in the manifest
    return trainer


# ---------------------------------------------------------------------------------------------
# data, once per run
# ---------------------------------------------------------------------------------------------

def _prepare_data_once(cfg: RunConfig, tokenizer, out: Path, state):
    """Rank 0 reads/validates/tokenizes; other ranks load its result from a datasets cache under OUTPUT."""
    from cogumi.data import PreparedData, prepare_dataset
    if state.num_processes == 1:
        return prepare_dataset(cfg, tokenizer)
    import torch.distributed as dist
    from datasets import load_from_disk

    cache = out / ".prepared"
    status: list[Any] = [None]
    data = None
    if state.is_main_process:
        try:
            data = prepare_dataset(cfg, tokenizer)
            shutil.rmtree(cache, ignore_errors=True)
            data.train_dataset.save_to_disk(str(cache / "train"))
            if data.eval_dataset is not None:
                data.eval_dataset.save_to_disk(str(cache / "eval"))
            status = [{"ok": True, "stats": data.stats}]
        except CogumiError as e:
            status = [{"ok": False, "type": type(e).__name__, "message": str(e)}]
    dist.broadcast_object_list(status, src=0)
    info = status[0]
    if not info["ok"]:
        cls = {"DataError": DataError, "RedFlagError": RedFlagError}.get(info["type"], CogumiError)
        raise cls(info["message"])
    if data is None:
        eval_ds = load_from_disk(str(cache / "eval")) if (cache / "eval").exists() else None
        data = PreparedData(load_from_disk(str(cache / "train")), eval_ds, [], info["stats"])
    return data


# ---------------------------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------------------------

def _loss_summary(log_history: list[dict]) -> dict:
    losses = [h["loss"] for h in log_history if "loss" in h and isinstance(h["loss"], (int, float))]
    if not losses:
        return {"first": None, "last": None, "min": None, "logged": 0}
    return {"first": losses[0], "last": losses[-1], "min": min(losses), "logged": len(losses)}


def _base_lineage(base: str) -> dict | None:
    """The base's own manifest (Phase 1B trains on a merged Phase 1A dir), summarized."""
    from cogumi.lineage import is_local, read_manifest
    if not is_local(base):
        return None
    try:
        man = read_manifest(base)
    except CogumiError:
        return {"error": "unreadable cogumi.json"}
    if not man:
        return None
    # Everything lineage checks read (kind, parents, target, forced, red flags, quantized lineage, ...),
    # without the bulky records that belong to the base's own run.
    bulky = ("config", "libraries", "data", "speed", "eval", "resolved_config")
    return {k: v for k, v in man.items() if k not in bulky}


def build_manifest(cfg: RunConfig, *, base_cfg: dict, findings, speed, data_stats: dict, trainer,
                   wall_time_s: float, resumed_from: str | None, monitor_warnings: list[str],
                   eval_metrics: dict | None) -> dict:
    from dataclasses import asdict

    from cogumi.lineage import base_record, library_versions, red_findings
    base = base_record(cfg.base_model, base_cfg, revision=cfg.base_revision, findings=findings)
    lineage = _base_lineage(cfg.base_model)
    if lineage:
        base["lineage"] = lineage
    state = trainer.state
    reds = red_findings(findings)
    return {
        "kind": "adapter",
        "phase": cfg.phase,
        "base": base,
        "parents": {"base": {"id": base["id"], "path": base["path"], "fingerprint": base["fingerprint"]}},
        "allow_quantized_base": bool(cfg.allow_quantized_base),
        "quantized_base_override_used": bool(cfg.allow_quantized_base and reds),
        "red_flags": [asdict(f) for f in reds],
        "data": data_stats,
        "config": cfg.to_dict(),
        "speed": speed.to_dict(),
        "libraries": library_versions(),
        "world_size": trainer.args.world_size,
        "distributed": "fsdp" if trainer.args.fsdp else ("ddp" if trainer.args.world_size > 1 else "single"),
        "per_device_batch_size": trainer.args.per_device_train_batch_size,
        "grad_accum": trainer.args.gradient_accumulation_steps,
        "global_batch_size": (trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
                              * trainer.args.world_size),
        # unit ("rows": packed steps follow the recipe's rows; "packs"), rows per step, steps per epoch
        "batch_plan": trainer.cogumi_batch_plan.to_dict() if hasattr(trainer, "cogumi_batch_plan") else None,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "epochs": state.epoch,
        "tokens_seen": int(state.num_input_tokens_seen),
        "losses": _loss_summary(state.log_history),
        "eval": eval_metrics,
        "warnings": monitor_warnings,
        "resumed_from": resumed_from,
        "wall_time_s": round(wall_time_s, 3),         # all sessions of the run, resumed ones included
    }


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def preflight_base(cfg: RunConfig, log: Callable[[str], Any] = print):
    """Refuse a quantized base before any weight loads (``lineage`` owns the rules).

    A hub id whose *name* marks a quantized upload (``unsloth/...-bnb-4bit``) is refused before its config.json
    is even fetched, so the refusal works offline too; then the config itself is checked, then the weights'
    values (a 4-bit model dequantized and saved as bf16: ``cogumi.lowbit``, a few MB of reads for 8B).
    """
    from cogumi.lineage import check_training_base, quantization_findings, red_findings
    name_reds = red_findings(quantization_findings({}, cfg.base_model))
    if name_reds and not cfg.allow_quantized_base:
        raise RedFlagError("refusing to train on a quantized base:\n  " + "\n  ".join(f.line() for f in name_reds) +
                           "\n(Override with allow_quantized_base: true only if you know why; it is recorded.)")
    result = check_training_base(cfg.base_model, cfg.base_revision, allow_quantized=cfg.allow_quantized_base,
                                 log=log)
    _check_base_has_weights(cfg.base_model)
    return result


def _check_base_has_weights(base: str) -> None:
    from cogumi.lineage import is_local, weight_files
    if not is_local(base):
        return
    base_dir = Path(base).expanduser()
    if base_dir.is_dir() and not weight_files(base_dir):
        raise CogumiError(f"{base_dir}: no weight files (*.safetensors or *.bin) in the base model directory; "
                          "copy the model's weights there or point base_model at a complete model")


def check_tokenizer_fits_model(tokenizer, base_cfg: dict, base: str) -> None:
    """Refuse a tokenizer whose ids run past the model's embedding (added tokens without resized embeddings)."""
    vocab_size = base_cfg.get("vocab_size") or (base_cfg.get("text_config") or {}).get("vocab_size")
    if not isinstance(vocab_size, int):
        return
    n_tokens = len(tokenizer)
    if n_tokens > vocab_size:
        where = Path(base).expanduser()
        raise CogumiError(f"tokenizer of {where} ({where / 'tokenizer.json'}) has {n_tokens} tokens but the model's "
                          f"{where / 'config.json'} says vocab_size {vocab_size}: token ids past the embedding's end. "
                          "Use the tokenizer that belongs to this model, or resize the model's embeddings first.")


def _check_output_dir(out: Path, resume: bool, log) -> Path | None:
    adapter = out / "adapter"
    if adapter.exists():
        if resume:
            log(f"{adapter} already exists: this run finished; nothing to resume")
            return adapter
        raise CogumiError(f"{adapter} already exists: a finished run lives in {out}. Choose a new output_dir "
                          "(--set output_dir=...) or delete the old one.")
    if not resume and list_checkpoints(out / "checkpoints")[0]:
        raise CogumiError(f"{out} holds checkpoints of an interrupted run; pass --resume to continue it, "
                          "or choose a new output_dir")
    return None


# Keys that change what the adapter becomes: a resumed run must use the same values as the run it continues.
RESUME_KEYS = ("base_model", "base_revision", "data", "lora", "training.epochs", "training.max_steps",
               "training.batch_size", "training.grad_accum", "training.learning_rate", "training.lr_scheduler",
               "training.warmup_steps", "training.weight_decay", "training.max_length", "training.grad_clip",
               "training.seed", "training.dtype", "training.packing", "training.packing_unit", "training.distributed")


def _lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def check_resume_matches(out: Path, cfg: RunConfig) -> None:
    """Refuse to resume with a config that differs from the interrupted run's in a key that matters."""
    saved = out / "resolved_config.yaml"
    if not saved.exists():
        return
    old, new = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}, cfg.to_dict()
    changed = [f"{k}: {_lookup(old, k)!r} -> {_lookup(new, k)!r}" for k in RESUME_KEYS
               if _lookup(old, k) != _lookup(new, k)]
    if changed:
        raise CogumiError(f"--resume with a config that differs from the interrupted run in {out}:\n  " +
                          "\n  ".join(changed) + "\nResume with the same config, or start a new output_dir.")


def check_resume_data(out: Path, stats: dict) -> None:
    state_path = out / "run_state.json"
    if not state_path.exists():
        return
    old = json.loads(state_path.read_text(encoding="utf-8")).get("data_sha256")
    new = [f.get("sha256") for f in stats["files"]]
    if old != new:
        raise DataError(f"--resume: the data changed since the interrupted run in {out} (file hashes differ); "
                        "resuming would train on a different row order. Restore the data or start a new output_dir.")


def _marker_wall_s(checkpoint: Path) -> float:
    try:
        return float(json.loads((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8")).get("wall_s", 0.0))
    except (OSError, ValueError, TypeError):
        return 0.0


# How a full disk shows through torch.save / safetensors / HF, when it is not a plain OSError(ENOSPC).
DISK_FULL_SIGNS = ("no space left", "unexpected pos", "file write failed", "storagefull", "disk quota")
NEARLY_FULL_BYTES = 16 << 20


def disk_full_error(exc: BaseException, out: Path) -> CogumiError | None:
    """A CogumiError when ``exc`` (or an exception it chains from) was caused by a full disk under ``out``."""
    import errno
    seen: set[int] = set()
    cause: BaseException | None = exc
    says_full = False
    while cause is not None and id(cause) not in seen and not says_full:
        seen.add(id(cause))
        says_full = (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)) or \
            any(sign in str(cause).lower() for sign in DISK_FULL_SIGNS)
        cause = cause.__cause__ or cause.__context__
    if not says_full:
        try:
            if shutil.disk_usage(out).free > NEARLY_FULL_BYTES:
                return None
        except OSError:
            return None
    return CogumiError(f"disk full while writing under {out} (no space left on device: {type(exc).__name__}); "
                       "the newest complete checkpoint is kept: free space and run again with --resume",
                       exit_code=1)


def checkpoint_is_final(checkpoint: Path) -> bool:
    """True when the checkpoint's own trainer_state.json says it reached the run's planned last step."""
    try:
        st = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    step, planned = st.get("global_step"), st.get("max_steps")
    return isinstance(step, int) and isinstance(planned, int) and planned > 0 and step >= planned


def load_final_checkpoint(trainer, checkpoint: Path) -> None:
    """Put the checkpoint's adapter weights and trainer state (steps, tokens, log history) into ``trainer``."""
    from transformers import TrainerState
    trainer._load_from_checkpoint(str(checkpoint))      # HF's own loader (PEFT adapter aware)
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


def _truncate_train_log(path: Path, step: int) -> None:
    """On resume, drop log rows after the checkpoint's step (they will be logged again)."""
    if not path.exists():
        return
    from cogumi.io import atomic_write_text
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue            # a line cut by kill -9
    atomic_write_text(path, "".join(l + "\n" for l in keep))


def run_training(cfg: RunConfig, *, resume: bool = False, log: Callable[[str], Any] = print) -> Path:
    """Train a LoRA adapter as ``cfg`` says; returns ``OUTPUT/adapter``."""
    from accelerate import PartialState

    from cogumi.io import atomic_dir, atomic_write_json, atomic_write_text
    from cogumi.lineage import red_findings, write_manifest
    from cogumi.speed import resolve_speed_settings

    out = Path(cfg.output_dir).expanduser().resolve()
    cfg.output_dir = str(out)
    speed = resolve_speed_settings(cfg.training)
    state = PartialState(cpu=speed.device == "cpu")
    main = state.is_main_process
    say = log if main else (lambda *_: None)

    done = _check_output_dir(out, resume, say)
    if done is not None:
        return done

    base_cfg, findings = preflight_base(cfg, log=say)
    speed = resolve_speed_settings(cfg.training, speed.device, model_config=base_cfg)   # sized by the model
    # load as k-bit only for a base stored quantized; weights that merely went through 4-bit are plain bf16
    quantized = any(f.code != "quantized-weights" for f in red_findings(findings))

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model, revision=cfg.base_revision)
    check_tokenizer_fits_model(tokenizer, base_cfg, cfg.base_model)

    if resume:
        check_resume_matches(out, cfg)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "resolved_config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    data = _prepare_data_once(cfg, tokenizer, out, state)
    if resume:
        check_resume_data(out, data.stats)
    if main:
        for line in data.summary_lines():
            say(line)
        data.write_holdout(out / "holdout.jsonl")
        atomic_write_json(out / "run_state.json", {"data_sha256": [f.get("sha256") for f in data.stats["files"]]})

    resume_from = None
    ckpt_root = out / "checkpoints"
    if resume:
        if main:
            for partial in list_checkpoints(ckpt_root)[1]:
                say(f"resume: removing incomplete checkpoint {partial.name} (no {COMPLETE_MARKER} marker)")
                shutil.rmtree(partial, ignore_errors=True)
        state.wait_for_everyone()
        resume_from = newest_complete_checkpoint(ckpt_root)
        if resume_from is None:
            say(f"resume: no complete checkpoint in {ckpt_root}; starting from the beginning")
        else:
            say(f"resume: continuing from {resume_from.name}")
            if main:
                _truncate_train_log(out / "train_log.jsonl", _checkpoint_step(resume_from))
    elif main:
        (out / "train_log.jsonl").unlink(missing_ok=True)

    prior_wall = _marker_wall_s(resume_from) if resume_from else 0.0
    strategy = distributed_strategy(cfg, speed, base_cfg, state.num_processes)
    model = load_base_model(cfg, speed, quantized=quantized)
    trainer = build_trainer(cfg, model=model, tokenizer=tokenizer, train_dataset=data.train_dataset, speed=speed,
                            eval_dataset=data.eval_dataset, log=say, strategy=strategy, prior_wall_s=prior_wall)
    say(f"train: base {cfg.base_model} ({speed.dtype} on {speed.device}, {state.num_processes} process(es)); "
        f"packing {'on' if trainer.cogumi_batch_plan.packing else 'off'}, attention {speed.attn_implementation}"
        + (f", {strategy.upper()}" if strategy != "single" else ""))
    say(f"train: batches: {trainer.cogumi_batch_plan.describe()}")
    monitor = next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "Monitor")
    t0 = time.time()
    if resume_from is not None and checkpoint_is_final(resume_from):
        # Killed after the final checkpoint but before the adapter was written: HF's train() would take one
        # more optimizer step past max_steps. Load the final checkpoint's weights and state instead.
        say(f"resume: {resume_from.name} is the final step; writing the adapter from it without training")
        load_final_checkpoint(trainer, resume_from)
    else:
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except CogumiError:
            raise
        except Exception as e:
            full = disk_full_error(e, out)
            if full is None:
                raise
            raise full from e
    wall = prior_wall + time.time() - t0
    eval_metrics = None
    if data.eval_dataset is not None:
        from cogumi.speed import uncompiled
        with uncompiled():
            eval_metrics = trainer.evaluate()

    adapter_dir = out / "adapter"
    # Under FSDP the LoRA weights are sharded: gather them (a collective, every rank) before rank 0 saves.
    full_state = trainer.accelerator.get_state_dict(trainer.model) if strategy == "fsdp" else None
    if main:
        manifest = build_manifest(cfg, base_cfg=base_cfg, findings=findings, speed=speed, data_stats=data.stats,
                                  trainer=trainer, wall_time_s=wall,
                                  resumed_from=resume_from.name if resume_from else None,
                                  monitor_warnings=monitor.warnings, eval_metrics=eval_metrics)
        with atomic_dir(adapter_dir) as tmp:
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            unwrapped.save_pretrained(str(tmp), state_dict=full_state) if full_state is not None \
                else unwrapped.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            write_manifest(tmp, manifest)
        shutil.rmtree(out / ".prepared", ignore_errors=True)
        losses = manifest["losses"]
        say(f"train: done in {wall:.1f}s, {manifest['steps']} steps, {manifest['tokens_seen']} tokens; loss "
            f"{losses['first']} -> {losses['last']} (min {losses['min']})")
        say(f"adapter: {adapter_dir}")
    state.wait_for_everyone()
    return adapter_dir


def train_command(config: str, overrides: list[str] | None = None, resume: bool = False,
                  allow_quantized_base: bool = False) -> int:
    cfg = load_run_config(config, overrides)
    if allow_quantized_base:
        cfg.allow_quantized_base = True
    run_training(cfg, resume=resume)
    return 0
