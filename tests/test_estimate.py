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


def test_gpu_plan_packs_to_the_recipes_steps(tmp_path, tiny_base, train_file):
    cfg = tiny_cfg(tiny_base, train_file, tmp_path, "training.max_steps=-1", "training.max_length=512")
    est = estimate(cfg, device="cuda")
    st = est["steps"]
    assert est["speed"]["packing"] is True and st["batch_unit"] == "packs" and st["packing_unit"] == "rows"
    assert st["per_epoch"] == st["recipe_steps_per_epoch"] == 5 and st["rows_per_step"] == 8
    # a step's packs hold the recipe's 8 rows (~60 tokens each): far fewer tokens than the 4096-token budget
    assert st["per_device_batch"] == 1 and st["pack_length"] < 4096
    packs = estimate(tiny_cfg(tiny_base, train_file, tmp_path, "training.max_steps=-1", "training.max_length=512",
                              "training.packing_unit=packs"), device="cuda")["steps"]
    # packs as the unit (the opt-in): 8 packs of 512 tokens a step, ~8 rows each -- the epoch in one step
    assert packs["packing_unit"] == "packs" and packs["pack_length"] == 512
    assert est["tokens"]["per_epoch"] / 512 <= packs["sequences_per_epoch"] < 10 and packs["per_epoch"] == 1


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cli_steps_with_packing_on_and_off_agree(tmp_path, tiny_base, device, capsys):
    """The acceptance check: the same data and batch settings give the same steps.total (+-10%) packed or not."""
    from cogumi.tiny import synthetic_instructions, write_jsonl
    data = write_jsonl(tmp_path / "rows.jsonl", synthetic_instructions(392, seed=11))
    totals = {}
    for packing in ("on", "off"):
        argv = ["estimate", str(CONFIG), "--json", "--device", device, "--set", f"base_model={tiny_base}",
                "--set", f"data.train={data}", "--set", "data.holdout=0", "--set", "training.max_steps=-1",
                "--set", "training.batch_size=8", "--set", "training.grad_accum=1",
                "--set", f"training.packing={packing}"]
        assert main(argv) == 0
        totals[packing] = json.loads(capsys.readouterr().out)["steps"]
    assert totals["off"]["total"] == 49 and totals["off"]["batch_unit"] == "rows"          # 392 rows / 8
    assert totals["on"]["batch_unit"] == "packs"
    assert abs(totals["on"]["total"] - totals["off"]["total"]) <= 0.1 * totals["off"]["total"]


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
    # the micro-batch is the plan's pack: 32 short rows a step need far less than the 4096-token budget
    assert mem["micro_batch_tokens"] == est["steps"]["pack_length"] < 4096 and 15 < mem["total_gib"] < 80
    cfg.training.packing_unit = "packs"                                   # 2 packs of 2048: the budget itself
    full = estimate(cfg, device="cuda", tokenizer=AutoTokenizer.from_pretrained(base))["memory"]
    assert full["micro_batch_tokens"] == 4096 and 20 < full["total_gib"] < 80
    assert full["activations_gib"] == pytest.approx(mem["activations_gib"] * 4096 / mem["micro_batch_tokens"], rel=0.02)


def test_cli_table_and_json(tmp_path, tiny_base, train_file, capsys):
    argv = ["estimate", str(CONFIG), "--set", f"base_model={tiny_base}", "--set", f"data.train={train_file}",
            "--tokens-per-second", "500", "--usd-per-hour", "2", "--device", "cuda"]
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


SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}


def _shape_only_base(tmp_path, config: dict) -> Path:
    from cogumi.tiny import build_tiny_tokenizer
    base = tmp_path / config["model_type"]
    base.mkdir()
    (base / "config.json").write_text(json.dumps(config))
    build_tiny_tokenizer().save_pretrained(base)
    return base


def test_cpu_plan_reports_cpu_memory_and_time_not_gpu_figures(tmp_path, train_file, capsys):
    """On a CPU (--device cpu, the default without a GPU): resident memory with the checkpointing the CPU run
    uses, a time from this CPU's probed speed, no GPU price; the SmolLM2 run of docs/benchmarks.md (r=16,
    batch 4 x 512) is estimated near its measured 1.5 GB peak."""
    base = _shape_only_base(tmp_path, SMOLLM2_CONFIG)
    argv = ["estimate", str(CONFIG), "--device", "cpu", "--set", f"base_model={base}", "--set",
            f"data.train={train_file}", "--set", "lora.r=16", "--set", "training.batch_size=4",
            "--set", "training.max_length=512", "--set", "training.max_steps=-1"]
    assert main(argv + ["--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    mem, time_ = est["memory"], est["time"]
    assert est["device"] == "cpu" and mem["kind"] == "cpu" and mem["gradient_checkpointing"]
    assert 1.0 <= mem["total_gib"] <= 2.5 and mem["weights_gib"] == pytest.approx(0.50, abs=0.02)   # fp32
    assert "this CPU" in time_["source"] and time_["tokens_per_second"] > 0 and time_["seconds"] > 0
    assert est["cost"]["usd"] is None
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "CPU memory" in table and "GPU memory" not in table and "0.00 h" not in table
    assert "--device cuda" in table and "tokens/s on this CPU" in table
