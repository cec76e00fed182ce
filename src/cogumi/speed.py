"""Speed settings: what ``cogumi train`` turns on for a device (chosen by measurement, see
benchmarks/train_throughput.py and docs/benchmarks.md).

``train.py`` asks ``resolve_speed_settings`` once and passes the result to the model loader and
SFTConfig. Optional accelerations (Liger kernels, flash attention) degrade cleanly when not installed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass


@dataclass
class SpeedSettings:
    device: str                     # "cuda" | "cpu" | "mps"
    dtype: str                      # torch dtype name for the base weights and compute
    packing: bool                   # pack rows into max_length sequences (no cross-row attention)
    gradient_checkpointing: bool
    use_liger: bool                 # Liger fused kernels (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE)
    optim: str                      # HF/TRL optim name
    attn_implementation: str        # "sdpa" | "flash_attention_2" | "flex_attention" | "eager"
    torch_compile: bool
    tf32: bool

    def to_dict(self) -> dict:
        return asdict(self)


def detect_device() -> str:
    import torch
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _choice(value: str, default: bool) -> bool:
    return default if value == "auto" else value == "on"


def resolve_speed_settings(training, device: str | None = None) -> SpeedSettings:
    """Turn a TrainingConfig's auto/on/off knobs into concrete settings for ``device``."""
    device = device or detect_device()
    gpu = device == "cuda"
    dtype = training.dtype if training.dtype != "auto" else ("bfloat16" if gpu else "float32")
    liger_ok = has_module("liger_kernel")
    use_liger = _choice(training.liger, gpu and liger_ok) and liger_ok
    attn = training.attn_implementation
    if attn == "auto":
        attn = "sdpa"
    optim = training.optim
    if optim == "auto":
        optim = "adamw_torch_fused" if gpu else "adamw_torch"
    return SpeedSettings(
        device=device, dtype=dtype,
        packing=_choice(training.packing, gpu),
        gradient_checkpointing=_choice(training.gradient_checkpointing, False),
        use_liger=use_liger, optim=optim, attn_implementation=attn,
        torch_compile=bool(training.torch_compile), tf32=gpu,
    )
