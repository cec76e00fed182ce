"""The red-flag rules in cogumi.lineage that merge and verify share."""

from __future__ import annotations

import json
import struct

import pytest

from cogumi import lineage
from cogumi.errors import CogumiError, RedFlagError

LLAMA_31_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "tie_word_embeddings": False, "dtype": "bfloat16"}


def test_expected_parameter_count_of_llama_31_8b():
    assert lineage.expected_parameter_count(LLAMA_31_8B) == 8_030_261_248
    names = lineage.expected_tensor_names(LLAMA_31_8B)
    assert len(names) == 3 + 32 * 9 and "lm_head.weight" in names
    assert lineage.expected_parameter_count({"model_type": "gpt2"}) is None


@pytest.mark.parametrize("name,quantized", [
    ("unsloth/meta-llama-3.1-8b-instruct-unsloth-bnb-4bit", True), ("TheBloke/Llama-2-7B-GPTQ", True),
    ("some/model-AWQ", True), ("x/llama-3-8b-nf4", True), ("meta-llama/Meta-Llama-3.1-8B-Instruct", False),
    ("/data/models/llama-3.1-8b-instruct", False)])
def test_quantized_names(name, quantized):
    assert bool(lineage.quantized_name(name)) == quantized


def test_recorded_base_prefers_the_manifest():
    cfg = {"base_model_name_or_path": "meta-llama/Meta-Llama-3.1-8B-Instruct"}
    assert lineage.recorded_base(cfg, None)["source"] == "adapter_config.json"
    assert not lineage.recorded_base(cfg, None)["quantized"]
    manifest = {"kind": "adapter", "base": {"id": "/models/base4", "quantized": True, "fingerprint": "sha256-quick:ab"}}
    rec = lineage.recorded_base(cfg, manifest)
    assert rec["quantized"] and rec["fingerprint"] == "sha256-quick:ab" and rec["source"] == "cogumi.json"
    reds = lineage.adapter_lineage_findings(lineage.Path("/a"), cfg, manifest)
    assert [f.code for f in reds] == ["quantized-lineage"] and "--target auto" in reds[0].fix


def test_lineage_carries_forward_forced_and_quantized():
    adapter_on_4bit = {"kind": "adapter", "base": {"id": "x-bnb-4bit", "quantized": True}}
    forced = {"kind": "merged", "forced": True, "lineage_quantized": True,
              "red_flags": [{"message": "trained on a quantized base"}],
              "parents": {"adapter": {"lineage": adapter_on_4bit}}}
    codes = [f.code for f in lineage.manifest_lineage_findings(forced, "m")]
    assert "forced-merge" in codes
    measured = {**forced, "forced": False, "target": "dequantized"}
    found = lineage.manifest_lineage_findings(measured, "m")
    assert [f.level for f in found] == ["warn"]
    # a Phase 1B adapter trained on the forced merge inherits the red flag
    phase_1b = {"kind": "adapter", "base": {"id": "m", "quantized": False, "lineage": forced}}
    assert "forced-merge" in [f.code for f in lineage.manifest_lineage_findings(phase_1b, "1b")]


def test_unsupported_lora_options():
    ok = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_dora": False, "bias": "none", "lora_bias": False,
          "megatron_core": "megatron.core", "loftq_config": {}, "target_parameters": None, "init_lora_weights": True}
    assert lineage.unsupported_lora_options(ok) == []
    assert "DoRA" in lineage.unsupported_lora_options({**ok, "use_dora": True})[0]
    assert "bias" in lineage.unsupported_lora_options({**ok, "bias": "all"})[0]
    assert "unknown option" in lineage.unsupported_lora_options({**ok, "new_thing": 3})[0]
    assert "LoRA adapters only" in lineage.unsupported_lora_options({"peft_type": "IA3"})[0]


def test_scan_weight_files_finds_truncation_and_bad_headers(tmp_path):
    import torch
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(100, 100)}, str(tmp_path / "model.safetensors"))
    entries, findings = lineage.scan_weight_files(tmp_path)
    assert list(entries) == ["a"] and entries["a"].nbytes == 40_000 and findings == []
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    _, findings = lineage.scan_weight_files(tmp_path)
    assert [f.code for f in findings] == ["truncated-file"]
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!")
    _, findings = lineage.scan_weight_files(tmp_path)
    assert [f.code for f in findings] == ["corrupt-file"]


def test_check_training_base_refuses_quantized(tiny_base, tmp_path):
    from cogumi.tiny import quantized_config_like_unsloth
    q = tmp_path / "q"
    q.mkdir()
    (q / "config.json").write_text(json.dumps(quantized_config_like_unsloth(json.loads((tiny_base / "config.json").read_text()))))
    with pytest.raises(RedFlagError, match="quantized"):
        lineage.check_training_base(str(q))
    _, findings = lineage.check_training_base(str(q), allow_quantized=True, log=lambda *_: None)
    assert lineage.red_findings(findings)
    with pytest.raises(CogumiError):
        lineage.read_model_config(str(tmp_path / "nothing-here"))
