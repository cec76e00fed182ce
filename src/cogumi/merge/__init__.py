"""``cogumi merge``: merge a LoRA adapter into its base, streaming, atomically, and checked.

Features
  * Streaming: tensors are read one at a time from the base's safetensors shards (plain reads at the
    header's offsets), the LoRA delta is added in fp32 (``W + scale * B @ A``, in row blocks) and cast
    back to the base dtype, and each tensor is appended to its output shard as soon as it is done. Up to
    4 output shards go through their own read/merge/write pipelines at once (``merge_jobs``). Peak
    memory is a 512 MiB read-ahead/write-behind budget plus the tensors being merged, not the model (8B:
    1.0 GiB instead of 16.6; as fast as copying the shards: docs/benchmarks.md).
  * Every LoRA variant PEFT writes for Llama-family models: any target linear, LoRA on embeddings /
    lm_head, ``rank_pattern`` / ``alpha_pattern`` (matched with PEFT's own ``get_pattern_key``),
    ``use_rslora``, ``modules_to_save`` copies, saved ``base_layer`` embeddings and trainable tokens.
  * Base check: the base's fingerprint must match the adapter's manifest (or the adapter_config base);
    an adapter trained on a quantized base merged into full-precision weights is the incident. Both are
    refused unless ``--force``, which is recorded in the manifest.
  * Merge targets for 4-bit-trained adapters: ``original`` (the bf16 weights), ``dequantized`` (the
    NF4 weights the adapter actually trained against, dequantized with bitsandbytes), ``auto`` (measure
    both on held-out rows: loss, and top-1 agreement with the adapter applied on the 4-bit base; keep
    the lower loss).
  * Fidelity check (default on): on probe prompts, logits of the merged model as written vs the base
    with the adapter applied unmerged: max |delta logit|, top-1 agreement, KL. Run layer by layer, so it
    keeps the streaming memory bound.
  * Output: a standard HF model dir (sharded safetensors + index, config.json in the base dtype without
    quantization_config, generation_config, tokenizer, cogumi.json kind "merged"), written to a temporary
    dir beside ``--out`` and renamed when complete; free disk checked first; never overwrites without
    ``--overwrite``; NaN/Inf, dtype, size and expected-tensor checks on the result.

Failure modes (each one ``CogumiError`` message): missing/invalid adapter, unsupported LoRA variant
(DoRA, LoRA bias, aLoRA, ...), adapter tensors whose shapes do not fit the base, wrong or quantized base
(``RedFlagError`` unless --force), not enough disk, NaN/Inf produced, fidelity beyond tolerance.

Test hook: ``COGUMI_TEST_KILL_AFTER_SHARDS=N`` SIGKILLs the process after N output shards are written
(used by the crash test; never set it otherwise).

Modules (each does one thing)
  * ``weights``    reading the base (full precision, or a bitsandbytes 4-bit checkpoint dequantized)
  * ``adapter``    the LoRA adapter, and the base with it applied (merged or not)
  * ``writer``     the streaming shard writer (parallel read/merge/write pipelines, one byte budget)
  * ``layerwise``  the model run one decoder layer at a time
  * ``fidelity``   merged-as-written vs base + adapter unmerged
  * ``targets``    which base to merge into (original / dequantized / auto) and the base checks
  * ``run``        ``merge_adapter``: all of the above end to end, and the manifest
"""

from cogumi.merge.adapter import (
    ADAPTER_PREFIX, Adapter, AdaptedWeights, AdapterTensors, LoraModule, check_adapter_fits, load_adapter, lora_scale,
)
from cogumi.merge.fidelity import (
    FIDELITY_KL_MAX, FIDELITY_KL_REL, FIDELITY_MIN_CONFIDENT, FIDELITY_TOP1_MIN, compare_logits, fidelity_check,
    fidelity_passed, load_tokenizer, probe_rows,
)
from cogumi.merge.layerwise import LayerwiseModel, Stream, compute_device, exact_fp32
from cogumi.merge.run import merge_adapter, merge_command
from cogumi.merge.targets import TARGETS, MergePlan, holdout_rows, measure_targets, plan_merge
from cogumi.merge.weights import (
    Dequantized4bitDir, WeightDir, is_quantized_dir, open_weights, read_file_bytes,
)
from cogumi.merge.writer import (
    DEFAULT_MAX_SHARD_BYTES, INFLIGHT_BYTES, OutShard, OutTensor, SafetensorsStreamWriter, merge_jobs, plan_shards,
    write_merged_shards,
)

__all__ = [
    "ADAPTER_PREFIX",
    "Adapter",
    "AdaptedWeights",
    "AdapterTensors",
    "LoraModule",
    "check_adapter_fits",
    "load_adapter",
    "lora_scale",
    "FIDELITY_KL_MAX",
    "FIDELITY_KL_REL",
    "FIDELITY_MIN_CONFIDENT",
    "FIDELITY_TOP1_MIN",
    "compare_logits",
    "fidelity_check",
    "fidelity_passed",
    "load_tokenizer",
    "probe_rows",
    "LayerwiseModel",
    "Stream",
    "compute_device",
    "exact_fp32",
    "merge_adapter",
    "merge_command",
    "TARGETS",
    "MergePlan",
    "holdout_rows",
    "measure_targets",
    "plan_merge",
    "Dequantized4bitDir",
    "WeightDir",
    "is_quantized_dir",
    "open_weights",
    "read_file_bytes",
    "DEFAULT_MAX_SHARD_BYTES",
    "INFLIGHT_BYTES",
    "OutShard",
    "OutTensor",
    "SafetensorsStreamWriter",
    "merge_jobs",
    "plan_shards",
    "write_merged_shards",
]
