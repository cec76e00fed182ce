"""Speed settings: what ``cogumi train`` turns on for a device, chosen by measurement
(benchmarks/train_throughput.py; the numbers and the card are in docs/benchmarks.md).

Features
  * ``resolve_speed_settings(training, device)`` turns the config's auto/on/off knobs into concrete
    settings. On a CUDA GPU the defaults are: bf16; packing (TRL best-fit-decreasing packs, planned by
    ``cogumi.batching`` so that an optimizer step still covers the recipe's rows) read through
    variable-length attention, so packed rows never attend to each other; every micro-batch padded to one
    fixed token count; no activation checkpointing on cards with >= 70 GiB
    (a micro-batch of ``micro_batch_tokens`` tokens fits an 8B base without recomputation); each decoder
    layer compiled (``torch.compile``, where Triton is installed and nothing is recomputed), else Liger's
    RMSNorm/SwiGLU/RoPE kernels when installed; LoRA inputs without PEFT's fp32 round trip under
    autocast; the LoRA product added into the base output inside one GEMM; metrics read at log time
    (cogumi.sft); pinned non-blocking batch copies; fused AdamW. On a CPU: fp32, no packing, plain SDPA;
    activation checkpointing when one micro-batch's activations would pass ``CPU_ACTIVATIONS_GIB`` (needs
    the model's config); freed buffers returned to the OS and TRL's LM head in small tiles
    (``limit_cpu_memory``). Measured on one H100 (docs/benchmarks.md, baseline in the same run): user's
    recipe 1,466 -> these defaults 13,182 real tokens/s (8.99x; the same without compiling, with Liger:
    11,673); earlier steps: dense-mask SDPA packing 5,785, varlen without Liger 8,450, + Liger 9,943,
    + LoRA autocast inputs 11,342.
  * ``model_load_kwargs(settings)``: ``from_pretrained`` keyword arguments (dtype, attention). Registers
    the ``cogumi_varlen`` attention with transformers when it is chosen.
  * ``apply_model_speedups(model, settings)``: Liger kernels or compiled decoder layers and the LoRA
    patches on a loaded model (before PEFT wrapping).
  * ``trainer_speed_kwargs(settings, training, plan)``: SFTConfig keyword arguments (precision, packing,
    the batch plan's micro-batch, accumulation and pack length, checkpointing, optimizer, compile).
  * ``varlen_attention_forward``: the attention behind ``cogumi_varlen``. With TRL's padding-free
    batches (one row of concatenated sequences plus ``cu_seq_lens_q``) it runs each sequence causally on
    its own: PyTorch's built-in flash-attention varlen kernel on CUDA (``torch.nn.attention.varlen``),
    else one SDPA call per sequence. Anything else (padded batches, generation) goes to transformers'
    own SDPA path unchanged.

Why a hand-written attention function: transformers' SDPA path turns packed position_ids into a dense
block-diagonal mask, which is correct but computes every query/key pair of the whole packed row (no
causal or per-sequence skipping) on the slower masked kernel, and flash-attn (the usual varlen
kernel) is not installable on every machine. PyTorch ships the varlen kernel itself; this is the thin
adapter from transformers' attention interface to it.

Failure modes
  * Liger, Triton or the varlen kernel missing: settings degrade to plain kernels / eager layers /
    per-sequence SDPA (same results, slower); ``liger: on`` without liger-kernel installed is off
    (reported in ``SpeedSettings.notes``). A layer the compiler cannot handle runs eagerly, with a warning.
  * A padding-free batch with more than one row is refused (ValueError): it would mean the collator and
    the attention disagree on the layout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from dataclasses import asdict, dataclass, field

VARLEN_ATTENTION = "cogumi_varlen"

# Measured on one H100 80GB (docs/benchmarks.md): an 8B base with LoRA r=64 on the 7 projections and
# no activation checkpointing peaks well under 70 GiB at this many tokens per micro-batch.
BIG_GPU_GIB = 70
# On a CPU, activation checkpointing is on ("auto") when one micro-batch's activations would take more than
# this: SmolLM2-135M, batch 4 x 512 tokens, fp32 keeps ~3.9 GiB without it (docs/benchmarks.md, CPU memory).
CPU_ACTIVATIONS_GIB = 1.0
# TRL's fused LM head on a device without Triton folds each [tokens x vocab] tile with torch ops that make
# ~10 full-size temporaries: 4096 x 32768 fp32 tiles cost ~2 GB of peak memory on a CPU; these sizes ~0.15 GB.
CPU_LOGPROB_TILE_TOKENS = 1024
CPU_LOGPROB_TILE_VOCAB = 4096

# `cogumi train`'s defaults on one H100 80GB, Llama-3.1-8B shape (8.03B parameters), LoRA r=64 on the 7
# projections, the benchmark's length profile (docs/benchmarks.md, 2026-11-25 final run: 13,182 real
# tokens/s; without the compiled layers 10,444-12,561 on machines of that kind). `cogumi estimate` starts
# from it.
H100_TOKENS_PER_SECOND = 13182.0
H100_MEASURED_PARAMS = 8.03e9
MICRO_BATCH_TOKENS_NO_CKPT = 4096
MICRO_BATCH_TOKENS_CKPT = 16384


@dataclass
class SpeedSettings:
    device: str                     # "cuda" | "cpu" | "mps"
    dtype: str                      # torch dtype name for the base weights and compute
    packing: bool                   # pack rows into max_length sequences (no cross-row attention)
    gradient_checkpointing: bool
    use_liger: bool                 # Liger fused kernels (RMSNorm, SwiGLU, RoPE)
    optim: str                      # HF/TRL optim name
    attn_implementation: str        # "cogumi_varlen" | "sdpa" | "flash_attention_2" | "flex_attention" | "eager"
    torch_compile: bool
    tf32: bool
    micro_batch_tokens: int | None = None   # with packing: the most tokens a micro-batch may hold (memory budget)
    lora_autocast_inputs: bool = False      # under bf16/fp16 autocast, feed LoRA its input without an fp32 copy
    lora_fused_add: bool = False            # add scale * B(A(x)) into the base output inside one GEMM
    sync_free_metrics: bool = True          # per-micro-batch metrics read at log time, not with .item() (cogumi.sft)
    async_copies: bool = False              # batches copied to the GPU from pinned memory without a host sync
    fixed_shapes: bool = False              # with packing: every micro-batch padded to the same token count
    cpu_memory_limits: bool = False         # CPU: freed buffers to the OS, small LM-head tiles (limit_cpu_memory)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def detect_device() -> str:
    import torch
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def gpu_memory_gib() -> float | None:
    """Total memory of CUDA device 0 in GiB, or None without CUDA."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 2**30
    except Exception:   # a broken driver must not stop a CPU run
        pass
    return None


_NVML_HANDLES: dict = {}


def gpu_utilization(device_index: int | None = None) -> float | None:
    """NVML's utilisation (percent of the last sample period with a kernel running) of the CUDA device this
    process uses, or None when it cannot be read.

    The NVML device is found by UUID, not by index: NVML counts devices in PCI order and sees every card of
    the host, while CUDA's index follows CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER, so index matching (what
    ``torch.cuda.utilization`` does) can report a neighbouring, idle card. No match: None, never another
    card's number."""
    try:
        import pynvml
        import torch
        idx = torch.cuda.current_device() if device_index is None else device_index
        if idx not in _NVML_HANDLES:
            pynvml.nvmlInit()
            want = str(torch.cuda.get_device_properties(idx).uuid).lower()
            _NVML_HANDLES[idx] = None
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                uuid = (uuid.decode() if isinstance(uuid, bytes) else str(uuid)).lower()
                if uuid.split("-", 1)[-1] == want or uuid == want:
                    _NVML_HANDLES[idx] = handle
                    break
        handle = _NVML_HANDLES[idx]
        return None if handle is None else float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:          # no pynvml, no driver, an NVML error: monitoring must not stop training
        return None


def _choice(value: str, default: bool) -> bool:
    return default if value == "auto" else value == "on"


def resolve_speed_settings(training, device: str | None = None, model_config: dict | None = None) -> SpeedSettings:
    """Turn a TrainingConfig's auto/on/off knobs into concrete settings for ``device``. ``model_config``
    (the base's config.json) lets a CPU run decide activation checkpointing by the model's size."""
    device = device or detect_device()
    gpu = device == "cuda"
    notes: list[str] = []
    dtype = training.dtype if training.dtype != "auto" else ("bfloat16" if gpu else "float32")
    mem = gpu_memory_gib() if gpu else None
    big_gpu = mem is not None and mem >= BIG_GPU_GIB
    if gpu:
        recompute = not big_gpu
    else:
        recompute = cpu_activations_gib(model_config, training, dtype) > CPU_ACTIVATIONS_GIB
    ckpt = _choice(training.gradient_checkpointing, recompute)
    # measured on an H100 without activation checkpointing only; recomputed layers stay eager unless asked
    compile_layers = _choice(training.torch_compile, gpu and has_module("triton") and not ckpt)
    liger_ok = has_module("liger_kernel")
    # Liger's kernels and the compiled layers do not mix: dynamo cannot trace Liger's Triton launches, so
    # each layer falls apart into small graphs (H100, 8B: 11,949 tokens/s with both, 13,144 compiled
    # without Liger, 12,561 Liger without compiling; docs/benchmarks.md). The compiler fuses the same ops.
    use_liger = _choice(training.liger, gpu and liger_ok and not compile_layers)
    if use_liger and not liger_ok:
        notes.append("liger requested but liger-kernel is not installed: plain kernels")
        use_liger = False
    if use_liger and compile_layers:
        notes.append("liger with torch_compile: Liger's kernels split the compiled layers (measured slower)")
    packing = _choice(training.packing, gpu)
    attn = training.attn_implementation
    if attn == "auto":
        attn = VARLEN_ATTENTION if packing else "sdpa"
    optim = training.optim
    if optim == "auto":
        optim = "adamw_torch_fused" if gpu else "adamw_torch"
    micro = None
    if packing and gpu:
        micro = MICRO_BATCH_TOKENS_CKPT if ckpt else MICRO_BATCH_TOKENS_NO_CKPT
    return SpeedSettings(
        device=device, dtype=dtype, packing=packing, gradient_checkpointing=ckpt,
        use_liger=use_liger, optim=optim, attn_implementation=attn,
        torch_compile=compile_layers, tf32=gpu, micro_batch_tokens=micro, notes=notes,
        lora_autocast_inputs=gpu and dtype in ("bfloat16", "float16"),
        lora_fused_add=gpu, async_copies=gpu, fixed_shapes=gpu and packing,
        cpu_memory_limits=device == "cpu",
    )


def cpu_activations_gib(model_config: dict | None, training, dtype: str) -> float:
    """GiB of activations one unpacked micro-batch (``batch_size x max_length`` tokens) keeps for backward
    without recomputation; 0 when the model's shape is unknown."""
    if not model_config:
        return 0.0
    from cogumi.estimate import DTYPE_BYTES, activation_bytes_per_token
    try:
        per_token = activation_bytes_per_token(model_config, DTYPE_BYTES.get(dtype, 4), False)
    except (KeyError, TypeError):          # not a decoder config we can size
        return 0.0
    return per_token * training.batch_size * training.max_length / 2**30


# ---------------------------------------------------------------------------------------------
# what the trainer and the model loader take
# ---------------------------------------------------------------------------------------------

def trainer_speed_kwargs(settings: SpeedSettings, training, plan) -> dict:
    """Keyword arguments for ``trl.SFTConfig`` that carry the speed settings and the batch plan
    (``cogumi.batching.plan_batches``: micro-batch, accumulation, pack length)."""
    kw = {
        "bf16": settings.dtype == "bfloat16",
        "fp16": settings.dtype == "float16",
        "per_device_train_batch_size": plan.per_device,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "optim": settings.optim,
        "torch_compile": False,           # compiled per decoder layer instead (apply_model_speedups)
        "packing": plan.packing,
        "dataloader_pin_memory": settings.device == "cuda",
    }
    if plan.packing:
        # best-fit decreasing: whole rows into packs of the plan's length (>= the longest row, so no row is cut
        # or split across packs); TRL then feeds the packs padding-free (one row + cu_seq_lens), which
        # cogumi_varlen attention reads. Evaluation batches hold as many packs as training micro-batches.
        kw["packing_strategy"] = "bfd"
        kw["max_length"] = plan.pack_length
        kw["per_device_eval_batch_size"] = plan.per_device
    if plan.packing and settings.fixed_shapes:
        # one token count for every micro-batch (its packs fill ~99.8% of it): every kernel and allocation
        # sees one shape for the whole run instead of new ones each micro-batch (+5.8% on an H100,
        # docs/benchmarks.md; it also lets torch.compile keep one graph). Padding tokens are one-token
        # sequences of their own, unlabeled.
        kw["pad_to_multiple_of"] = plan.micro_batch_tokens
    if settings.async_copies:
        # a blocking host-to-device copy waits for the GPU's whole queue: once per tensor of every
        # micro-batch, so each micro-batch would start on an idle GPU behind Python's kernel launches
        kw["dataloader_pin_memory"] = True
        kw["accelerator_config"] = {"non_blocking": True}
    if settings.gradient_checkpointing:
        kw["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if settings.tf32:
        kw["tf32"] = True
    return kw


def model_load_kwargs(settings: SpeedSettings) -> dict:
    """Keyword arguments for ``AutoModelForCausalLM.from_pretrained`` (registers cogumi_varlen)."""
    import torch
    if settings.attn_implementation == VARLEN_ATTENTION:
        register_varlen_attention()
    return {"dtype": getattr(torch, settings.dtype), "attn_implementation": settings.attn_implementation}


def apply_model_speedups(model, settings: SpeedSettings) -> list[str]:
    """Speed-ups on a loaded model (call before PEFT wraps it). Returns what was applied.

    * Liger's RoPE, RMSNorm and SwiGLU kernels. Its fused linear cross-entropy is left off: TRL's
      SFTTrainer already computes the loss with its own fused LM head (chunked, never materialising the
      128K-vocab logits) and refuses Liger's.
    * LoRA inputs under autocast (``lora_autocast_inputs``): PEFT keeps adapter weights in fp32 and, before
      each of the 7 adapters of a layer, copies the bf16 activation to fp32 (then dropout in fp32, then
      autocast casts it back to bf16 for the matmul). Under autocast that round trip changes nothing but
      costs several full-size copies per projection; it is skipped, only while autocast is on.
    """
    applied = []
    if settings.cpu_memory_limits:
        applied += limit_cpu_memory()
    if settings.use_liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
        applied += ["liger:rope", "liger:rms_norm", "liger:swiglu"]
    if settings.torch_compile:
        applied.append(f"compile:{compile_decoder_layers(model)}-layers")
    if (settings.lora_autocast_inputs or settings.lora_fused_add) and has_module("peft"):
        install_lora_patches(model, autocast_inputs=settings.lora_autocast_inputs,
                             fused_add=settings.lora_fused_add)
        applied += (["lora:autocast-inputs"] * settings.lora_autocast_inputs
                    + ["lora:fused-add"] * settings.lora_fused_add)
    return applied


def limit_cpu_memory() -> list[str]:
    """Keep a CPU training run's peak memory to what is alive (docs/benchmarks.md: SmolLM2-135M, r=16,
    batch 4 x 512: 9.7 GB -> 1.5 GB with these and activation checkpointing). Returns what was applied.

    * glibc serves every allocation of 1 MiB or more from its own mapping, returned to the OS when freed.
      By default glibc raises its mmap threshold after the first large free, so later activation buffers come
      from arenas that keep freed memory: +1.6 GB of peak RSS in that run, none of it in use. (One
      ``mallopt`` call; a no-op off glibc.)
    * TRL's fused LM head scores the vocabulary in smaller tiles (``CPU_LOGPROB_TILE_*``): without Triton
      each tile is folded by torch ops with ~10 tile-sized temporaries. Same arithmetic (an online
      log-sum-exp over tiles), smaller working set. Module-level sizes of TRL's kernel, read at call time;
      when a TRL version renames them nothing is patched (the result says so)."""
    from cogumi.memory import return_freed_buffers_to_the_os
    applied = ["cpu:mmap-threshold-1MiB"] if return_freed_buffers_to_the_os() else []
    try:
        import trl.kernels.chunked_logprob as kernel
        import trl.trainer.utils as trl_utils
    except ImportError:
        return applied
    if hasattr(kernel, "TOKEN_CHUNK_SIZE") and hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        kernel.TOKEN_CHUNK_SIZE = min(kernel.TOKEN_CHUNK_SIZE, CPU_LOGPROB_TILE_TOKENS)
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = min(trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, CPU_LOGPROB_TILE_VOCAB)
        applied.append(f"cpu:logprob-tiles-{kernel.TOKEN_CHUNK_SIZE}x{trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE}")
    return applied


def decoder_layers(model) -> list:
    """The decoder layers of a causal LM (plain or PEFT-wrapped)."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = m.get_decoder() if hasattr(m, "get_decoder") else getattr(m, "model", m)
    return list(getattr(decoder, "layers", []))


def compile_decoder_layers(model) -> int:
    """``torch.compile`` every decoder layer in place (regional compilation, ``training.torch_compile``).

    The layers share one code path, so one compiled graph serves all of them (compile time of one layer,
    not of the model); within a layer the norms, rotary embedding, SwiGLU, residual adds, LoRA dropout and
    scaling become a few fused kernels instead of hundreds of small launches, which is what limits an 8B
    LoRA step on an H100 (docs/benchmarks.md). Packed attention stays outside the graph (it is opaque to
    the compiler: its sequence boundaries change every micro-batch). Compiling is lazy: the first forward
    pays it (~17 s for an 8B model on an H100). Should the compiler fail on some layer's code (another
    torch or transformers version), that code runs eagerly with a warning instead of stopping the run."""
    import torch
    torch._dynamo.config.suppress_errors = True
    torch._dynamo.reset()      # a second training run in this process (Phase 1B) starts within the recompile limit
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def uncompiled():
    """A context in which compiled code runs eagerly (nothing changes where nothing is compiled): the
    held-out evaluation after training, whose other shapes and no-grad mode would otherwise recompile the
    layers' graph several times for a few batches."""
    import torch
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def install_lora_patches(model, *, autocast_inputs: bool = True, fused_add: bool = False) -> None:
    """Patch the LoRA layers PEFT will inject into ``model``: at its decoder's first forward (PEFT wraps
    the model after this call, before training starts) every LoRA layer found gets the chosen patches
    (``skip_lora_input_casts``, ``fuse_lora_add``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    state: dict = {}

    def hook(module, args, kwargs):
        found = skip_lora_input_casts(module) if autocast_inputs else 0
        if fused_add:
            found = max(found, fuse_lora_add(module))
        if found:
            state["handle"].remove()

    state["handle"] = decoder.register_forward_pre_hook(hook, with_kwargs=True)


def skip_lora_input_casts(root) -> int:
    """Give every LoRA layer under ``root`` an input cast that is a no-op under autocast. Returns how many."""
    import torch
    from peft.tuners.lora import LoraLayer

    patched = 0
    for module in root.modules():
        if not isinstance(module, LoraLayer) or getattr(module, "_cogumi_autocast_inputs", False):
            continue
        original = module._cast_input_dtype

        def cast(x, dtype, _original=original):
            if (x is not None and dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)
                    and torch.is_autocast_enabled(x.device.type)):
                return x
            return _original(x, dtype)

        module._cast_input_dtype = cast
        module._cogumi_autocast_inputs = True
        patched += 1
    return patched


def fuse_lora_add(root) -> int:
    """Give every plain LoRA Linear under ``root`` a forward that adds ``scale * B(A(dropout(x)))`` into the
    base layer's output inside one GEMM (``addmm_`` with alpha = scale). Returns how many were patched.

    PEFT computes ``result + lora_B(h) * scaling``: the full-size B output is written, read and rewritten
    by the multiply, then read again with ``result`` by the add -- and in backward the multiply costs one
    more full-size pass. For gate/up (14,336 wide) that is most of LoRA's memory traffic. Same function,
    same dropout draws (same RNG calls in the same order); the sum is accumulated in fp32 inside the GEMM,
    so in bf16 it is at least as exact as PEFT's. Anything else -- several active adapters, DoRA or
    another variant, a LoRA bias, a non-Linear base (4-bit), a merged or disabled adapter, extra
    arguments -- goes to PEFT's own forward. Written here because PEFT has no fused LoRA-add path."""
    import types

    from peft.tuners.lora import Linear as LoraLinear

    patched = 0
    for module in root.modules():
        if not isinstance(module, LoraLinear) or getattr(module, "_cogumi_fused_add", False):
            continue
        module._cogumi_peft_forward = module.forward
        # one function bound to each module (not a closure per module): torch.compile then traces it once
        module.forward = types.MethodType(_fused_lora_forward, module)
        module._cogumi_fused_add = True
        patched += 1
    return patched


def _fused_lora_forward(self, x, *args, **kwargs):
    import torch
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (args or kwargs or name is None or self.disable_adapters or self.merged or name not in self.lora_A
            or name in getattr(self, "lora_variant", {}) or type(self.base_layer) is not torch.nn.Linear
            or self.lora_B[name].bias is not None):
        return self._cogumi_peft_forward(x, *args, **kwargs)
    result = self.base_layer(x)
    lora_a = self.lora_A[name]
    h = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))
    return add_scaled_product_(result, h.to(result.dtype), self.lora_B[name].weight.t().to(result.dtype),
                               self.scaling[name])


def add_scaled_product_(result, h, b, scale: float):
    """``result + scale * (h @ b)``, in place in one GEMM where autograd allows it cheaply.

    In place only on a tensor that is not an autograd view (an in-place op on a view makes autograd
    rebuild the base's gradient with extra full-size copies); a Linear's 2-D/3-D output is not one.
    3-D: ``baddbmm_`` with ``b`` broadcast over the batch (a stride-0 expand, no copy). Under torch.compile
    the plain expression: the compiler fuses the scale and the add itself (and ``_is_view`` would split
    its graph)."""
    import torch
    if (torch.compiler.is_compiling() or result._is_view() or not result.is_contiguous()
            or result.dim() not in (2, 3)):
        return result + (h @ b) * scale
    if result.dim() == 2:
        return result.addmm_(h, b, alpha=scale)
    return result.baddbmm_(h, b.expand(result.shape[0], *b.shape), alpha=scale)


# ---------------------------------------------------------------------------------------------
# variable-length attention (the cogumi_varlen implementation)
# ---------------------------------------------------------------------------------------------

def register_varlen_attention() -> str:
    """Register ``cogumi_varlen`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    check_flash_varlen()          # on CUDA: trust the fused kernel only after a forward/backward check
    return VARLEN_ATTENTION


def _varlen_mask(*args, **kwargs):
    """No mask for unpadded inputs (packed rows are separated by cu_seq_lens, plain rows are causal);
    transformers' SDPA mask for padded batches (generation, unpacked evaluation)."""
    from transformers.masking_utils import sdpa_mask
    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def cu_seqlens_from_position_ids(position_ids):
    """Sequence boundaries of a packed row whose positions restart at 0 for every sequence."""
    import torch
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int(cu.diff().max())


def _is_packed(position_ids) -> bool:
    return position_ids is not None and position_ids.shape[0] == 1 and bool((position_ids[0, 1:] == 0).any())


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers attention-interface function. query: [B, Hq, T, D], key/value: [B, Hkv, T, D];
    returns ([B, T, Hq, D], None) like the other implementations."""
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    position_ids = kwargs.get("position_ids")
    if cu is None and attention_mask is None and query.shape[2] > 1 and _is_packed(position_ids):
        cu, max_len = cu_seqlens_from_position_ids(position_ids)
    if cu is None or query.shape[2] == 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"cogumi_varlen: a padding-free batch must be one row, got {query.shape[0]}")
    if key.shape[2] != query.shape[2]:
        raise ValueError("cogumi_varlen: packed attention with a KV cache is not supported")
    cu = cu.to(device=query.device, dtype=torch_int32())
    if max_len is None:
        max_len = int(cu.diff().max())
    q = query[0].transpose(0, 1)          # [T, Hq, D]
    k = key[0].transpose(0, 1)            # [T, Hkv, D]
    v = value[0].transpose(0, 1)
    n_rep = q.shape[1] // k.shape[1]
    if q.is_cuda and dropout == 0.0 and flash_varlen_available():
        out = _opaque(_flash_varlen)(q, k, v, cu, int(max_len), scaling, n_rep)
    else:
        out = _opaque(_per_sequence_sdpa)(q, k, v, cu, scaling, dropout, n_rep)
    return out.unsqueeze(0), None


_OPAQUE: dict = {}


def _opaque(fn):
    """``fn`` hidden from torch.compile (run eagerly between compiled graphs); unchanged without compile."""
    if fn not in _OPAQUE:
        import torch
        _OPAQUE[fn] = torch.compiler.disable(fn, recursive=True)
    return _OPAQUE[fn]


def torch_int32():
    import torch
    return torch.int32


_VARLEN_SIG: dict | None = None
_VARLEN_OK: bool | None = None


def flash_varlen_available() -> bool:
    """PyTorch's built-in varlen flash attention (torch >= 2.10), checked once on CUDA (forward and
    backward against per-sequence SDPA) before it is trusted; see ``check_flash_varlen``."""
    global _VARLEN_SIG
    if _VARLEN_SIG is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
            _VARLEN_SIG = dict(inspect.signature(varlen_attn).parameters)
        except Exception:
            _VARLEN_SIG = {}
    return bool(_VARLEN_SIG) and _VARLEN_OK is not False


def check_flash_varlen() -> bool:
    """Run the varlen kernel once on a small packed input (GQA, causal, three sequences) and compare output
    and gradients with per-sequence SDPA. A failure (missing backward, an API change) turns it off, so
    training falls back to per-sequence SDPA instead of crashing hours in."""
    global _VARLEN_OK
    if _VARLEN_OK is not None:
        return _VARLEN_OK
    import torch
    if not torch.cuda.is_available() or not flash_varlen_available():
        _VARLEN_OK = False
        return False
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        shape = lambda h: (40, h, 64)   # noqa: E731
        q, k, v = (torch.randn(shape(h), device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for h in (4, 2, 2))
        cu = torch.tensor([0, 7, 25, 40], device="cuda", dtype=torch.int32)
        out = _flash_varlen(q, k, v, cu, 18, 64 ** -0.5, 2)
        ref = _per_sequence_sdpa(q, k, v, cu, 64 ** -0.5, 0.0, 2)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
        rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-6))  # noqa: E731
        _VARLEN_OK = rel(out, ref) < 2e-2 and all(rel(a, b) < 5e-2 for a, b in zip(grads, ref_grads))
    except Exception:
        _VARLEN_OK = False
    return _VARLEN_OK


def _flash_varlen(q, k, v, cu, max_len, scaling, n_rep):
    from torch.nn.attention.varlen import varlen_attn
    params = _VARLEN_SIG or {}
    kw = {}
    if "window_size" in params:          # torch >= 2.11: causal is window (-1, 0)
        kw["window_size"] = (-1, 0)
    else:                                # torch 2.10
        kw["is_causal"] = True
    if scaling is not None:
        if "scale" in params:
            kw["scale"] = scaling
        elif abs(scaling - q.shape[-1] ** -0.5) > 1e-9:
            return _per_sequence_sdpa(q, k, v, cu, scaling, 0.0, n_rep)
    if n_rep > 1:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


def _per_sequence_sdpa(q, k, v, cu, scaling, dropout, n_rep):
    """Reference / fallback: one causal SDPA call per packed sequence. [T, H, D] in and out."""
    import torch
    import torch.nn.functional as F
    bounds = cu.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:
            continue
        qs = q[s:e].transpose(0, 1).unsqueeze(0)
        ks = k[s:e].transpose(0, 1).unsqueeze(0)
        vs = v[s:e].transpose(0, 1).unsqueeze(0)
        if n_rep > 1:
            ks = ks.repeat_interleave(n_rep, dim=1)
            vs = vs.repeat_interleave(n_rep, dim=1)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling, dropout_p=dropout)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, dim=0)
