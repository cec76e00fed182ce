"""Run configs: the shipped configs mirror the user's plan; bad keys/types/files are one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from cogumi.config import ALL_LINEAR, load_run_config
from cogumi.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_phase1a_mirrors_the_users_plan():
    cfg = load_run_config(CONFIGS / "phase1a.yaml", check_files=False)
    assert cfg.base_model == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert cfg.phase == "1a" and cfg.allow_quantized_base is False
    assert cfg.data.train.endswith("train_600k.jsonl")
    lo, t = cfg.lora, cfg.training
    assert (lo.r, lo.alpha, lo.dropout) == (64, 16, 0.05)
    assert sorted(lo.target_modules) == sorted(ALL_LINEAR) and len(lo.target_modules) == 7
    assert (t.learning_rate, t.lr_scheduler, t.warmup_steps) == (2e-4, "cosine", 100)
    assert t.dtype == "bfloat16" and t.max_length == 2048
    assert t.batch_size * t.grad_accum == 32
    assert (t.grad_clip, t.save_steps, t.save_total_limit) == (1.0, 1000, 5)
    assert cfg.report_to == ["tensorboard"]


def test_phase1b_trains_the_failure_set_on_the_merged_phase1a_model():
    cfg = load_run_config(CONFIGS / "phase1b.yaml", check_files=False)
    assert cfg.phase == "1b"
    assert cfg.base_model == "runs/phase1a/merged"
    assert "failures" in cfg.data.train
    assert cfg.training.dtype == "bfloat16" and cfg.lora.r == 64


def test_tiny_config_loads_and_overrides_apply():
    cfg = load_run_config(CONFIGS / "tiny.yaml", ["training.max_steps=3", "lora.r=4", "data.overlong=drop"],
                          check_files=False)
    assert (cfg.training.max_steps, cfg.lora.r, cfg.data.overlong) == (3, 4, "drop")


@pytest.mark.parametrize("override, key", [
    ("training.max_stepz=3", "training.max_stepz"),
    ("training.batch_size=eight", "training.batch_size"),
    ("data.overlong=chop", "data.overlong"),
    ("lora.target_modules=q_proj", "lora.target_modules"),
])
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_run_config(CONFIGS / "tiny.yaml", [override], check_files=False)


def test_missing_files_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.train"):
        load_run_config(CONFIGS / "tiny.yaml", [f"base_model={tmp_path}", "data.train=./nope.jsonl"])


def test_yaml_on_off_are_read_as_the_knob_values(tmp_path):
    # YAML 1.1 turns a bare `on`/`off` into true/false; the auto/on/off knobs take them as meant.
    cfg = load_run_config(CONFIGS / "tiny.yaml", ["training.packing=on", "training.liger=off"], check_files=False)
    assert (cfg.training.packing, cfg.training.liger) == ("on", "off")
