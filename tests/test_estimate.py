"""`cogumi estimate`: real token counts (or a labelled sample), steps equal to what a real run takes,
the 8B memory breakdown, and time/cost arithmetic; table and --json through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cogumi.cli import main
from cogumi.config import load_run_config
from cogumi.estimate import estimate

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
LLAMA_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    from cogumi.tiny import synthetic_instructions, write_jsonl
    return write_jsonl(tmp_path_factory.mktemp("est") / "train.jsonl", synthetic_instructions(48, seed=3))


def tiny_cfg(tiny_base, train_file, tmp_path, *extra):
    return load_run_config(CONFIG, [f"base_model={tiny_base}", f"data.train={train_file}",
                                    f"output_dir={tmp_path / 'out'}", *extra])


def test_steps_and_tokens_match_a_real_run(tmp_path, tiny_base, train_file):
    from cogumi.lineage import read_manifest
    from cogumi.train import run_training

    cfg = tiny_cfg(tiny_base, train_file, tmp_path, "training.max_steps=-1", "training.save_steps=100")
    est = estimate(cfg, device="cpu", tokens_per_second=1000, usd_per_hour=3.0)
    assert est["rows"]["train"] == 40 and est["tokens"]["counted"] == "exact: all 40 rows tokenized"
    man = read_manifest(run_training(cfg, log=lambda *_: None))
    assert est["steps"]["total"] == man["steps"] == 5               # ceil(ceil(40 / 4) / 2)
    assert est["tokens"]["per_epoch"] == man["data"]["train"]["tokens"] == man["tokens_seen"]
    assert est["time"]["hours"] == pytest.approx(est["tokens"]["total"] / 1000 / 3600, abs=0.01)
    assert est["cost"]["usd"] == pytest.approx(est["time"]["hours"] * 3.0, abs=0.01)


def test_big_files_are_tokenized_on_a_labelled_sample(tmp_path, tiny_base, train_file):
    cfg = tiny_cfg(tiny_base, train_file, tmp_path)
    exact = estimate(cfg, device="cpu")
    sampled = estimate(cfg, device="cpu", sample_threshold=10, sample_rows=20)
    assert sampled["tokens"]["counted"] == "sampled: 20 of 40 rows tokenized, scaled up"
    assert sampled["tokens"]["per_epoch"] == pytest.approx(exact["tokens"]["per_epoch"], rel=0.3)


def test_gpu_plan_counts_packs_with_trls_packer(tmp_path, tiny_base, train_file):
    cfg = tiny_cfg(tiny_base, train_file, tmp_path, "training.max_steps=-1")
    est = estimate(cfg, device="cuda")
    assert est["speed"]["packing"] is True and est["steps"]["batch_unit"] == "packs"
    # 40 rows of ~60 tokens fit in far fewer 96-token packs than there are rows, and no fewer than tokens / 96
    packs = est["steps"]["sequences_per_epoch"]
    assert est["tokens"]["per_epoch"] / 96 <= packs < 40


def test_memory_of_the_8b_plan(tmp_path, train_file):
    base = tmp_path / "llama-8b-shape"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    from transformers import AutoTokenizer
    from cogumi.tiny import build_tiny_tokenizer
    build_tiny_tokenizer().save_pretrained(base)
    cfg = load_run_config(Path(__file__).resolve().parents[1] / "configs" / "phase1a.yaml",
                          [f"base_model={base}", f"data.train={train_file}"])
    est = estimate(cfg, device="cuda", tokenizer=AutoTokenizer.from_pretrained(base))
    mem = est["memory"]
    assert mem["base_parameters"] == pytest.approx(8.03e9, rel=0.01)
    assert mem["lora_parameters"] == pytest.approx(167.8e6, rel=0.01)   # r=64 on the 7 projections
    assert mem["weights_gib"] == pytest.approx(14.96, abs=0.05)          # bf16
    assert 20 < mem["total_gib"] < 80


def test_cli_table_and_json(tmp_path, tiny_base, train_file, capsys):
    argv = ["estimate", str(CONFIG), "--set", f"base_model={tiny_base}", "--set", f"data.train={train_file}",
            "--tokens-per-second", "500", "--usd-per-hour", "2"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    for label in ("rows", "tokens", "steps", "GPU memory", "throughput", "time", "cost"):
        assert f"\n{label} " in "\n" + table
    assert "500 tokens/s per GPU (--tokens-per-second)" in table
    assert main(argv + ["--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["time"]["tokens_per_second"] == 500 and est["cost"]["usd_per_hour"] == 2


def test_default_throughput_names_its_source(tmp_path, tiny_base, train_file):
    est = estimate(tiny_cfg(tiny_base, train_file, tmp_path), device="cpu")
    assert est["time"]["tokens_per_second"] > 0 and est["time"]["source"]


def test_bad_data_fails_the_estimate_with_file_and_line(tmp_path, tiny_base, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a"}\n')
    rc = main(["estimate", str(CONFIG), "--set", f"base_model={tiny_base}", "--set", f"data.train={bad}"])
    assert rc == 2 and f"{bad}:2: missing field 'response'" in capsys.readouterr().err


def test_default_throughput_is_cogumi_s_h100_figure_scaled_by_model_size():
    from cogumi import speed
    from cogumi.estimate import KNOWN_SHAPES, default_tokens_per_second, parameter_counts
    n8b = parameter_counts(KNOWN_SHAPES["llama-3.1-8b"], ["q_proj"], 64)["base"]
    tps, source = default_tokens_per_second(n8b)
    assert tps == speed.H100_TOKENS_PER_SECOND and "H100" in source          # the measured shape itself
    n70b = parameter_counts(KNOWN_SHAPES["llama-3.1-70b"], ["q_proj"], 64)["base"]
    tps70, source70 = default_tokens_per_second(n70b)
    assert tps70 == pytest.approx(speed.H100_TOKENS_PER_SECOND * speed.H100_MEASURED_PARAMS / n70b)
    assert "scaled" in source70 and tps70 < tps / 8
    assert default_tokens_per_second(1e6)[0] == 4 * speed.H100_TOKENS_PER_SECOND   # tiny: capped
