"""Weights that went through 4-bit quantization and back, told from the values (cogumi.lowbit): caught
for every 4-bit format the real quantizers make (bitsandbytes NF4/FP4 with and without double quantization,
GGUF Q4_0/Q4_1 via gguf's own quantizer, SmolLM2's Q4_1), after saving in bf16 and under a neutral name;
never on bf16 checkpoints, fresh or trained; and acted on by `cogumi verify`, `cogumi train` and
`cogumi merge`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cogumi.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def roundtrip(src: Path, dst: Path, quantize) -> Path:
    """``src`` with every linear weight quantized and dequantized by ``quantize``, saved in its own dtype
    with no quantization metadata (a copy of the config and tokenizer as they were)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(str(f))
        for name, w in tensors.items():
            if w.ndim == 2 and "embed" not in name and "lm_head" not in name:
                tensors[name] = quantize(w.float().contiguous()).to(w.dtype)
        save_file(tensors, str(f), metadata={"format": "pt"})
    return dst


def bnb(quant_type: str, double_quant: bool, blocksize: int = 64):
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    def run(w):
        q, state = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
        return dequantize_4bit(q, state)
    return run


def gguf(kind: str):
    from gguf import GGMLQuantizationType, quants
    qtype = getattr(GGMLQuantizationType, kind)
    return lambda w: torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), qtype), qtype).copy())


FOUR_BIT = {"nf4": (lambda: bnb("nf4", False), "nf4"), "nf4-double-quant": (lambda: bnb("nf4", True), "nf4"),
            "nf4-blocksize-128": (lambda: bnb("nf4", False, 128), "nf4"), "fp4": (lambda: bnb("fp4", False), "fp4"),
            "gguf-q4_0": (lambda: gguf("Q4_0"), "grid"), "gguf-q4_1": (lambda: gguf("Q4_1"), "grid")}


@pytest.fixture(scope="module")
def nf4_roundtrip(tiny_base, tmp_path_factory) -> Path:
    """The acceptance case: a tiny bf16 base through bitsandbytes NF4 and back, saved in bf16 without any
    quantization metadata, under a name that says nothing."""
    pytest.importorskip("bitsandbytes")
    return roundtrip(tiny_base, tmp_path_factory.mktemp("rt") / "plain-base", bnb("nf4", True))


@pytest.mark.parametrize("kind", sorted(FOUR_BIT))
def test_every_4bit_format_is_caught_after_saving_in_bf16(kind, tiny_base, tmp_path):
    from cogumi.lowbit import lowbit_findings
    pytest.importorskip("bitsandbytes" if "f4" in kind else "gguf")
    make, fmt = FOUR_BIT[kind]
    model = roundtrip(tiny_base, tmp_path / "model", make())
    assert json.loads((model / "config.json").read_text()).get("quantization_config") is None
    findings, stats = lowbit_findings(model)
    assert [f.level for f in findings] == ["red"] and findings[0].code == "quantized-weights"
    assert stats.matrices == 16 and len(stats.low_matrices) == 14        # every linear; not embed / lm_head
    assert stats.block_share > 0.8 and stats.median_levels <= 16 and stats.format == fmt
    assert "4-bit-like" in findings[0].message and "<= 16 distinct values" in findings[0].message


@pytest.mark.parametrize("kind", ["Q5_0", "Q8_0"])
def test_wider_formats_are_not_called_4bit(kind, tiny_base, tmp_path):
    """5-bit (32 levels per block) and 8-bit are outside what the statistic claims to see."""
    from cogumi.lowbit import lowbit_findings
    pytest.importorskip("gguf")
    findings, stats = lowbit_findings(roundtrip(tiny_base, tmp_path / "model", gguf(kind)))
    assert [f.level for f in findings] == ["ok"] and not stats.low_matrices


def test_smollm2_a_real_q4_1_model_is_caught(smollm2):
    from cogumi.lowbit import lowbit_findings
    findings, stats = lowbit_findings(smollm2)
    assert findings[0].level == "red" and stats.format == "grid"
    assert stats.matrix_share > 0.95 and stats.block_share > 0.95
    assert stats.bytes_read < 4 * 2**20                 # sampled, not read: the checkpoint is 270 MB


def test_bf16_checkpoints_fresh_sparse_or_constant_are_clean(tiny_base, tiny_base_fp32, tmp_path):
    from cogumi.lowbit import lowbit_findings
    for model in (tiny_base, tiny_base_fp32):
        findings, stats = lowbit_findings(model)
        assert [f.level for f in findings] == ["ok"] and stats.block_share == 0 and stats.median_levels >= 30

    def prune_or_flatten(w):
        w = w.clone()
        w[torch.rand_like(w) < 0.6] = 0            # 60% unstructured sparsity: few nonzero per block
        w[: w.shape[0] // 4] = 0.5                  # constant rows (one level): no evidence either way
        return w
    findings, stats = lowbit_findings(roundtrip(tiny_base, tmp_path / "sparse", prune_or_flatten))
    assert [f.level for f in findings] == ["ok"], findings[0].message


def test_a_fully_trained_bf16_model_is_clean(tiny_base, tmp_path):
    """Every weight moved by a few optimizer steps (no LoRA): still continuous values."""
    from transformers import AutoModelForCausalLM

    from cogumi.lowbit import lowbit_findings
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "trained")
    findings, _ = lowbit_findings(tmp_path / "trained")
    assert [f.level for f in findings] == ["ok"]


def test_verify_exits_1_naming_the_statistic(nf4_roundtrip, capsys):
    code = main(["verify", str(nf4_roundtrip)])
    cap = capsys.readouterr()
    assert code == 1
    assert "went through 4-bit quantization" in cap.out and "NF4 codebook" in cap.out
    assert "14 of 16 weight matrices are 4-bit-like" in cap.out and "sampled 32-value blocks" in cap.out
    assert cap.err.count("error:") == 1


def test_verify_of_a_fresh_base_is_clean_and_says_it_looked(tiny_base, capsys):
    assert main(["verify", str(tiny_base)]) == 0
    assert "no 4-bit levels in the weights" in capsys.readouterr().out


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    from cogumi.tiny import synthetic_instructions, write_jsonl
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", synthetic_instructions(32, seed=0))


def train_argv(base, data, out, *extra) -> list[str]:
    return ["train", str(CONFIG), "--set", f"base_model={base}", "--set", f"data.train={data}",
            "--set", f"output_dir={out}", "--set", "training.max_steps=2", "--set", "training.save_steps=2", *extra]


def test_train_refuses_it_before_loading_any_weights(nf4_roundtrip, train_file, tmp_path, capsys, monkeypatch):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("model weights were loaded")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    rc = main(train_argv(nf4_roundtrip, train_file, tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: refusing to train on a quantized base")
    assert "4-bit-like" in err and "NF4 codebook" in err and "--allow-quantized-base" in err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def override_adapter(nf4_roundtrip, train_file, tmp_path_factory) -> Path:
    """A LoRA knowingly trained on the round-tripped base (--allow-quantized-base): what a test model run
    on SmolLM2 looks like."""
    out = tmp_path_factory.mktemp("override") / "out"
    assert main(train_argv(nf4_roundtrip, train_file, out, "--allow-quantized-base")) == 0
    return out / "adapter"


def test_the_override_trains_plainly_and_records_the_statistic(override_adapter):
    man = json.loads((override_adapter / "cogumi.json").read_text())
    assert man["quantized_base_override_used"] is True
    assert "4-bit-like" in man["base"]["weights_4bit"]
    assert [f["code"] for f in man["red_flags"]] == ["quantized-weights"]
    assert man["red_flags"][0]["measured"]["format"] == "nf4"
    # loaded as the plain bf16 model it is (no k-bit preparation): the adapter's tensors are bf16/fp32 LoRA
    assert (override_adapter / "adapter_model.safetensors").exists()


def test_merge_onto_it_is_faithful_but_carries_the_lineage(override_adapter, nf4_roundtrip, tmp_path, capsys):
    from cogumi.merge import merge_adapter
    manifest = merge_adapter(override_adapter, tmp_path / "merged", fidelity=False, log=lambda *_: None)
    assert manifest["weights_4bit_accepted"] is True and manifest["parents"]["base"]["weights_4bit"]
    code = main(["verify", str(tmp_path / "merged")])
    out = capsys.readouterr().out
    assert code == 0 and "comes from a base whose weights went through 4-bit" in out


def test_merge_of_a_foreign_adapter_onto_it_is_refused(nf4_roundtrip, tmp_path):
    """An adapter with no record of being trained on those weights: the base is a red flag for merge."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cogumi.errors import RedFlagError
    from cogumi.merge import merge_adapter
    model = AutoModelForCausalLM.from_pretrained(str(nf4_roundtrip), dtype=torch.bfloat16)
    get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "adapter"))
    with pytest.raises(RedFlagError, match="went through 4-bit quantization"):
        merge_adapter(tmp_path / "adapter", tmp_path / "merged", base=str(nf4_roundtrip), fidelity=False,
                      log=lambda *_: None)
    assert not (tmp_path / "merged").exists()
