"""cogumi verify: exit 0 on a good merge, 1 on red flags (the incident's base, quantization_config,
truncation, NaN, wrong base, size), 2 on unusable input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cogumi.cli import main

INCIDENT_BASE = "unsloth/meta-llama-3.1-8b-instruct-unsloth-bnb-4bit"


@pytest.fixture(scope="module")
def adapter_and_merge(tiny_base, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cogumi.merge import merge_adapter
    d = tmp_path_factory.mktemp("verify")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.bfloat16)
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pm.save_pretrained(str(d / "adapter"))
    merge_adapter(d / "adapter", d / "merged", max_shard_bytes=100_000, log=lambda *_: None)
    return d / "adapter", d / "merged"


def run(capsys, *args) -> tuple[int, str]:
    code = main(["verify", *map(str, args)])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_good_merge_and_adapter_are_clean(adapter_and_merge, tiny_base, capsys):
    adapter, merged = adapter_and_merge
    code, out = run(capsys, merged)
    assert code == 0 and "clean" in out and "merged by cogumi" in out
    code, out = run(capsys, adapter, "--base", tiny_base)
    assert code == 0 and "matches the adapter's recorded base" in out
    code, out = run(capsys, merged, "--json")
    report = json.loads(out)
    assert report["exit_code"] == 0 and report["usable"] and {f["level"] for f in report["findings"]} == {"ok"}


def test_adapter_trained_on_the_incident_base_is_red(adapter_and_merge, tmp_path, capsys):
    adapter = copy_dir(adapter_and_merge[0], tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = INCIDENT_BASE
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    code, out = run(capsys, adapter)
    assert code == 1
    line = next(l for l in out.splitlines() if l.startswith("[RED FLAG]"))
    assert INCIDENT_BASE in line and "bnb-4bit" in line and "->" in line      # names it, says what to do


def test_model_dir_with_quantization_config_is_red(tiny_base, tmp_path, capsys):
    from cogumi.tiny import quantized_config_like_unsloth
    model = copy_dir(tiny_base, tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(quantized_config_like_unsloth(cfg)))
    code, out = run(capsys, model)
    assert code == 1 and "quantization_config" in out


def test_garbage_and_missing_are_unusable(tmp_path, capsys):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "weights.bin").write_bytes(bytes(range(256)) * 40)
    (garbage / "notes.txt").write_text("hello")
    code, out = run(capsys, garbage)
    assert code == 2 and out.startswith("error: ") and "Traceback" not in out
    code, _ = run(capsys, tmp_path / "nope")
    assert code == 2
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    code, out = run(capsys, tmp_path / "broken")
    assert code == 2 and "config.json" in out
    code, out = run(capsys, garbage, "--json")
    assert code == 2 and json.loads(out)["usable"] is False


def test_truncated_missing_and_nan_shards_are_red(adapter_and_merge, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    merged = adapter_and_merge[1]
    shards = sorted(p.name for p in merged.glob("*.safetensors"))

    truncated = copy_dir(merged, tmp_path / "truncated")
    data = (truncated / shards[0]).read_bytes()
    (truncated / shards[0]).write_bytes(data[: len(data) // 2])
    code, out = run(capsys, truncated)
    assert code == 1 and "truncated" in out

    missing = copy_dir(merged, tmp_path / "missing")
    (missing / shards[-1]).unlink()
    code, out = run(capsys, missing)
    assert code == 1 and "missing" in out

    nan = copy_dir(merged, tmp_path / "nan")
    sd = load_file(str(nan / shards[0]))
    key = next(iter(sd))
    sd[key].view(-1)[0] = float("nan")
    save_file(sd, str(nan / shards[0]), metadata={"format": "pt"})
    code, out = run(capsys, nan)
    assert code == 1 and "NaN/Inf" in out and key in out


def test_size_and_dtype_rules(tiny_base, tmp_path, capsys):
    """config says float32, weights are bf16: half the bytes the config implies (the 8B-under-10GB rule)."""
    from cogumi.lineage import expected_parameter_count, scan_weight_files
    model = copy_dir(tiny_base, tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    entries, _ = scan_weight_files(model)
    assert expected_parameter_count(cfg) == sum(e.numel for e in entries.values())
    cfg["dtype"] = "float32"
    (model / "config.json").write_text(json.dumps(cfg))
    code, out = run(capsys, model)
    assert code == 1 and "should take about" in out and "dtype float32" in out


def test_adapter_against_the_wrong_base(adapter_and_merge, tiny_base_fp32, capsys):
    code, out = run(capsys, adapter_and_merge[0], "--base", tiny_base_fp32)
    assert code == 1 and "not the base the adapter was trained on" in out


def test_adapter_with_unsupported_variant_is_a_warning(adapter_and_merge, tmp_path, capsys):
    adapter = copy_dir(adapter_and_merge[0], tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    code, out = run(capsys, adapter)
    assert code == 0 and "DoRA" in out and "[warning]" in out
