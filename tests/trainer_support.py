"""What `cogumi train` builds, on the tiny base: one place for the tests that look inside the trainer."""

from __future__ import annotations

from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def tiny_config(tiny_base: Path, train_file: Path, output_dir: Path, *overrides: str):
    """configs/tiny.yaml on ``tiny_base`` and ``train_file``, with ``key=value`` overrides."""
    from cogumi.config import load_run_config
    return load_run_config(CONFIG, [f"base_model={tiny_base}", f"data.train={train_file}",
                                    f"output_dir={output_dir}", *overrides])


def tiny_trainer(tiny_base: Path, cfg, *, speed=None, seed: int = 0):
    """cogumi's trainer for ``cfg``: tokenizer, prepared rows, the model loaded with the speed settings
    (resolved from ``cfg`` unless given), ``build_trainer``; the model's random LoRA init seeded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cogumi.data import prepare_dataset
    from cogumi.speed import model_load_kwargs, resolve_speed_settings
    from cogumi.train import build_trainer

    speed = speed if speed is not None else resolve_speed_settings(cfg.training)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    data = prepare_dataset(cfg, tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, **model_load_kwargs(speed))
    return build_trainer(cfg, model=model, tokenizer=tok, train_dataset=data.train_dataset, speed=speed,
                         callbacks=[])
