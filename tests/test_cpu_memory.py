"""Training on a CPU keeps its peak memory to what is alive: activation checkpointing by the model's size,
freed buffers returned to the OS and TRL's LM head in small tiles (cogumi.speed.limit_cpu_memory)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cogumi.config import TrainingConfig
from cogumi.speed import resolve_speed_settings

SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3}
TINY = {"vocab_size": 431, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def test_cpu_recomputes_activations_when_a_micro_batch_would_hold_gigabytes():
    t = TrainingConfig(batch_size=4, max_length=512)
    assert resolve_speed_settings(t, "cpu", model_config=SMOLLM2).gradient_checkpointing      # ~3.9 GiB kept
    assert not resolve_speed_settings(t, "cpu", model_config=TINY).gradient_checkpointing      # ~6 MiB
    assert not resolve_speed_settings(t, "cpu").gradient_checkpointing                         # shape unknown
    off = TrainingConfig(batch_size=4, max_length=512, gradient_checkpointing="off")
    assert not resolve_speed_settings(off, "cpu", model_config=SMOLLM2).gradient_checkpointing
    s = resolve_speed_settings(t, "cpu")
    assert s.cpu_memory_limits and not resolve_speed_settings(t, "cuda").cpu_memory_limits


RUN = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, {tests!r})
    from trainer_support import tiny_config, tiny_trainer
    from cogumi.speed import resolve_speed_settings
    cfg = tiny_config({base!r}, {data!r}, {out!r}, "training.max_steps=2", "training.batch_size=16",
                      "training.grad_accum=1", "training.max_length=96", "lora.dropout=0.0", "training.save_steps=100",
                      "training.logging_steps=1")
    speed = resolve_speed_settings(cfg.training)
    speed.cpu_memory_limits = {limits}
    trainer = tiny_trainer({base!r}, cfg, speed=speed)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"before_kb": before, "peak_kb": peak,
                       "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}}))
""")


@pytest.fixture(scope="module")
def wide_vocab_base(tmp_path_factory) -> Path:
    """Two narrow layers under a 49K-token LM head: the logits dominate the memory, the compute is small."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cogumi.tiny import build_tiny_tokenizer
    out = tmp_path_factory.mktemp("wide") / "base"
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _peak(base: Path, data: Path, out: Path, limits: bool) -> dict:
    code = RUN.format(tests=str(Path(__file__).parent), base=str(base), data=str(data), out=str(out), limits=limits)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_cpu_limits_cut_the_peak_of_a_wide_vocabulary_and_keep_the_losses(tmp_path, wide_vocab_base):
    from cogumi.tiny import synthetic_instructions, write_jsonl
    data = write_jsonl(tmp_path / "rows.jsonl", synthetic_instructions(40, seed=2))
    limited = _peak(wide_vocab_base, data, tmp_path / "limited", True)
    plain = _peak(wide_vocab_base, data, tmp_path / "plain", False)
    grew = {k: (r["peak_kb"] - r["before_kb"]) / 2**20 for k, r in (("limited", limited), ("plain", plain))}
    # ~1,000 tokens a micro-batch: TRL's default tiles fold [1000 x 32768] fp32 logits with ~10 temporaries
    assert grew["plain"] > 0.8 and grew["limited"] < grew["plain"] / 3, grew
    assert limited["losses"] == pytest.approx(plain["losses"], rel=1e-5)        # the same arithmetic, tiled
