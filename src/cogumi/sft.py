"""TRL's SFTTrainer without host syncs in every micro-batch.

Features
  * ``trainer_class(sync_free=True)``: a subclass of ``trl.SFTTrainer`` that computes exactly the same loss
    (TRL's fused LM-head path: the same ops in the same order, so bitwise the same loss and gradients) but
    keeps the per-micro-batch metrics -- TRL's entropy, token accuracy and token count, HF's
    ``num_input_tokens_seen`` -- as device tensors and reads them once per logging step or checkpoint.
  * Why: TRL reads three values with ``.item()`` after every forward and HF one after every backward. Each
    read blocks the CPU until the GPU has drained its queue, so the next kernels start from an empty queue
    and the GPU waits on Python launch overhead twice per micro-batch. The values logged are the same.

Failure modes
  * Anything the fast path does not cover (evaluation, auxiliary MoE loss, a custom loss function, label
    smoothing, a loss type other than nll, sequence parallelism, ``return_outputs``) runs TRL's own
    ``compute_loss`` unchanged.
  * Fields this relies on (``outputs.log_probs/entropy/is_top1/label_mask`` of TRL's fused LM head,
    ``_metrics``, ``_total_train_tokens``): tests/test_sft_sync_free.py trains the same run with and
    without it and compares losses, adapters and logged metrics, so a TRL change that breaks them fails
    there, not silently in a user's run.
"""

from __future__ import annotations

from typing import Any


def trainer_class(sync_free: bool = True):
    from trl import SFTTrainer
    if not sync_free:
        return SFTTrainer
    return _sync_free_class(SFTTrainer)


_CLASS_CACHE: dict = {}


def _sync_free_class(base):
    if base in _CLASS_CACHE:
        return _CLASS_CACHE[base]
    import torch

    class SyncFreeSFTTrainer(base):
        """``trl.SFTTrainer`` with its per-micro-batch metrics read lazily (see the module docstring)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._cogumi_batches: list = []            # per micro-batch: [entropy sum, top-1 correct, valid]
            self._cogumi_train_tokens: Any = 0         # TRL's num_tokens since the last flush (int or tensor)
            self._cogumi_seen: Any = None              # HF's num_input_tokens_seen since the last flush

        def _fast_path(self, model, return_outputs: bool) -> bool:
            pc = getattr(self.accelerator, "parallelism_config", None)
            sp = bool(pc is not None and getattr(pc, "sp_enabled", False))
            return (not return_outputs and model.training and not getattr(self, "aux_loss_enabled", False)
                    and self.compute_loss_func is None and self.label_smoother is None
                    and getattr(self.args, "loss_type", "nll") == "nll" and not sp)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self._fast_path(model, return_outputs):
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            # TRL 1.16 SFTTrainer.compute_loss, nll branch, line for line
            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)
            per_token_loss = -outputs.log_probs
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            # metrics: kept on the device, read at the next log/checkpoint (_flush_metrics)
            self._cogumi_batches.append(torch.stack([outputs.entropy.detach().sum().double(),
                                                     outputs.is_top1.sum().double(),
                                                     outputs.label_mask.sum().double()]))
            if "attention_mask" in inputs:
                self._cogumi_train_tokens = self._cogumi_train_tokens + inputs["attention_mask"].sum()
            elif "position_ids" in inputs:
                self._cogumi_train_tokens = self._cogumi_train_tokens + int(inputs["position_ids"].size(1))
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
            return loss

        def _track_num_input_tokens(self, inputs):
            """HF's count of input tokens, summed on the device instead of read after every backward."""
            mode = self.args.include_num_input_tokens_seen
            if mode == "no":
                return
            name = getattr(self.model, "main_input_name", "input_ids")
            if name not in inputs:
                return super()._track_num_input_tokens(inputs)
            pad_id = getattr(self.processing_class, "pad_token_id", None)
            if mode == "non_padding" and "attention_mask" in inputs:
                n = inputs["attention_mask"].sum()
            elif mode == "non_padding" and pad_id is not None:
                n = (inputs[name] != pad_id).sum()
            else:
                n = inputs[name].numel()
            n = torch.as_tensor(n, device=self.args.device, dtype=torch.int64)
            self._cogumi_seen = n if self._cogumi_seen is None else self._cogumi_seen + n

        def _flush_metrics(self) -> None:
            if self._cogumi_seen is not None:
                seen = self._cogumi_seen.reshape(1)
                self._cogumi_seen = None
                self.state.num_input_tokens_seen += int(self.accelerator.gather(seen).sum().item())
            if self._cogumi_batches:
                stats = torch.stack(self._cogumi_batches)          # [k, 3]
                self._cogumi_batches = []
                k = stats.shape[0]
                stats = self.accelerator.gather(stats).reshape(-1, k, 3).sum(0).tolist()
                metrics = self._metrics["train"]
                for entropy_sum, correct, valid in stats:
                    metrics["entropy"].append(entropy_sum / valid if valid > 0 else 0.0)
                    metrics["mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)
            tokens = self._cogumi_train_tokens
            if isinstance(tokens, torch.Tensor) or tokens:
                self._cogumi_train_tokens = 0
                device = self.args.device
                tokens = torch.as_tensor(tokens, device=device, dtype=torch.int64).reshape(1)
                total = int(self.accelerator.gather(tokens).sum().item())
                self._total_train_tokens += total // getattr(self, "_tp_size", 1)
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

        def log(self, logs, start_time=None):
            self._flush_metrics()
            return super().log(logs, start_time)

        def _save_checkpoint(self, model, trial):
            self._flush_metrics()
            return super()._save_checkpoint(model, trial)

    _CLASS_CACHE[base] = SyncFreeSFTTrainer
    return SyncFreeSFTTrainer
