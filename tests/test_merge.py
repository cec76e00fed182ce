"""cogumi merge on the tiny model: exactness against PEFT for every LoRA variant, base checks, 4-bit
targets, fidelity check, atomicity (kill -9), and the benchmark's smoke run.

Adapters are made with PEFT itself (get_peft_model, random non-zero B, save_pretrained); "base + adapter"
is PeftModel applied unmerged, logits from transformers. Nothing here knows cogumi's internals."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogumi.errors import CogumiError, RedFlagError

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REPO = Path(__file__).resolve().parents[1]
# token ids include 5, 7, 9 (the trainable tokens below) and span the vocabulary
PROBE_IDS = torch.tensor([[1, 5, 7, 9, 40, 80, 120, 160, 200, 240, 280, 320, 360, 400, 11, 13],
                          [9, 300, 7, 250, 5, 17, 99, 3, 42, 420, 8, 64, 128, 256, 33, 2]])


def make_adapter(base: Path, out: Path, *, quantized: bool = False, seed: int = 1, **lora) -> Path:
    """A PEFT LoRA adapter on ``base`` with random non-zero B (and perturbed modules_to_save / tokens)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    kw = {"device_map": "cpu"} if quantized else {"dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(str(base), **kw)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.05)
            elif "trainable_tokens_delta" in name:
                p.normal_(0, 0.5)
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(str(out))
    return out


def logits_pair(base: Path, adapter: Path, merged: Path, dtype=torch.float32, base_kwargs=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base_model = AutoModelForCausalLM.from_pretrained(str(base), **(base_kwargs or {"dtype": dtype}))
    ref = PeftModel.from_pretrained(base_model, str(adapter)).eval()
    got = AutoModelForCausalLM.from_pretrained(str(merged), dtype=dtype).eval()
    with torch.no_grad():
        return ref(PROBE_IDS).logits.float(), got(PROBE_IDS).logits.float()


VARIANTS = {
    "plain": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR),
    "rslora_patterns": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL_LINEAR,
                            rank_pattern={"v_proj": 4, "layers.1.self_attn.q_proj": 2},
                            alpha_pattern={"down_proj": 3, "layers.0.mlp.up_proj": 40}),
    "embeddings_and_saved_modules": dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                                         modules_to_save=["lm_head"]),
    "trainable_tokens": dict(r=4, lora_alpha=8, target_modules=["v_proj"], trainable_token_indices=[5, 7, 9]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_merged_equals_base_plus_adapter_fp32(variant, tiny_base_fp32, tmp_path):
    from cogumi.merge import merge_adapter
    adapter = make_adapter(tiny_base_fp32, tmp_path / "adapter", **VARIANTS[variant])
    manifest = merge_adapter(adapter, tmp_path / "merged", log=lambda *_: None)
    ref, got = logits_pair(tiny_base_fp32, adapter, tmp_path / "merged")
    assert (ref - got).abs().max().item() < 1e-4
    assert torch.equal(ref.argmax(-1), got.argmax(-1))
    # the adapter really changed the model (a merge that dropped it would fail this)
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(tiny_base_fp32), dtype=torch.float32)(PROBE_IDS).logits
    assert (plain - got).abs().max().item() > 1e-3
    assert manifest["fidelity"]["passed"] and manifest["fidelity"]["max_abs_logit_diff"] < 1e-4


@pytest.fixture(scope="module")
def bf16_merge(tiny_base, tmp_path_factory):
    from cogumi.merge import merge_adapter
    d = tmp_path_factory.mktemp("bf16merge")
    adapter = make_adapter(tiny_base, d / "adapter", r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    manifest = merge_adapter(adapter, d / "merged", max_shard_bytes=100_000, log=lambda *_: None)
    return adapter, d / "merged", manifest


def test_bf16_merge_layout_and_top1(bf16_merge, tiny_base):
    from cogumi.lineage import fingerprint
    adapter, merged, manifest = bf16_merge
    ref, got = logits_pair(tiny_base, adapter, merged)
    assert torch.equal(ref.argmax(-1), got.argmax(-1))             # bf16: 100% top-1 on the probes
    files = sorted(p.name for p in merged.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 2 and "model.safetensors.index.json" in files
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "cogumi.json"):
        assert name in files
    assert not [f for f in merged.parent.iterdir() if ".partial-" in f.name]
    cfg = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    man = json.loads((merged / "cogumi.json").read_text())
    assert man["kind"] == "merged" and man["target"] == "original" and man["forced"] is False
    assert man["parents"]["base"]["fingerprint"] == fingerprint(tiny_base)
    assert man["parents"]["adapter"]["fingerprint"] == fingerprint(adapter)
    assert man["fidelity"]["passed"] and man["fidelity"]["top1_agreement"] >= 0.95
    assert man == {**manifest, "cogumi_version": man["cogumi_version"], "created": man["created"]}


def test_merged_tensors_equal_peft_merge_and_unload(bf16_merge, tiny_base, tmp_path):
    """Tensor for tensor against PEFT's own merge (bf16 weights: equal within one rounding step)."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    adapter, merged, _ = bf16_merge
    peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.bfloat16),
                                            str(adapter)).merge_and_unload().state_dict()
    index = json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"]
    for name, fname in index.items():
        with safe_open(str(merged / fname), framework="pt") as f:
            ours = f.get_tensor(name)
        assert ours.dtype == torch.bfloat16 and ours.shape == peft_merged[name].shape
        diff = (ours.float() - peft_merged[name].float()).abs()
        assert diff.max().item() <= 2 ** -7 * max(1.0, peft_merged[name].float().abs().max().item()), name


def test_refuses_variants_it_cannot_merge_exactly(tiny_base_fp32, tmp_path):
    from cogumi.merge import merge_adapter
    dora = make_adapter(tiny_base_fp32, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(CogumiError, match="DoRA"):
        merge_adapter(dora, tmp_path / "out", log=lambda *_: None)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg.update(use_dora=False, brand_new_option={"x": 1})
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CogumiError, match="brand_new_option"):
        merge_adapter(dora, tmp_path / "out", log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_wrong_base_refused_unless_forced(tiny_base, tiny_base_fp32, tmp_path):
    from cogumi.merge import merge_adapter
    from cogumi.verify import verify_command
    adapter = make_adapter(tiny_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(RedFlagError, match="not the base the adapter was trained on"):
        merge_adapter(adapter, tmp_path / "out", base=str(tiny_base_fp32), log=lambda *_: None)
    assert not (tmp_path / "out").exists()
    man = merge_adapter(adapter, tmp_path / "out", base=str(tiny_base_fp32), force=True, log=lambda *_: None)
    assert man["forced"] is True and man["red_flags"][0]["code"] == "base-mismatch"
    assert verify_command(str(tmp_path / "out")) == 1          # a forced merge stays flagged downstream
    with pytest.raises(CogumiError, match="already exists"):
        merge_adapter(adapter, tmp_path / "out", log=lambda *_: None)
    man2 = merge_adapter(adapter, tmp_path / "out", overwrite=True, log=lambda *_: None)
    assert man2["forced"] is False and json.loads((tmp_path / "out" / "cogumi.json").read_text())["forced"] is False


def test_adapter_that_does_not_fit_the_base(tiny_base, tmp_path):
    from safetensors.torch import load_file, save_file

    from cogumi.merge import merge_adapter
    adapter = make_adapter(tiny_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    path = adapter / "adapter_model.safetensors"
    sd = load_file(str(path))
    key = next(k for k in sd if "lora_B" in k)
    sd[key] = sd[key][:10]
    save_file(sd, str(path))
    with pytest.raises(CogumiError, match="does not fit base"):
        merge_adapter(adapter, tmp_path / "out", base=str(tiny_base), force=True, log=lambda *_: None)


def test_nan_in_adapter_fails_and_writes_nothing(tiny_base, tmp_path):
    from safetensors.torch import load_file, save_file

    from cogumi.merge import merge_adapter
    adapter = make_adapter(tiny_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    path = adapter / "adapter_model.safetensors"
    sd = load_file(str(path))
    key = next(k for k in sd if "lora_B" in k)
    sd[key][0, 0] = float("nan")
    save_file(sd, str(path))
    with pytest.raises(RedFlagError, match="NaN/Inf"):
        merge_adapter(adapter, tmp_path / "out", log=lambda *_: None)
    assert list(tmp_path.iterdir()) == [adapter]


def test_fidelity_failure_and_disk_check_fail_cleanly(bf16_merge, tmp_path, monkeypatch):
    import cogumi.merge as merge
    import cogumi.merge.fidelity as fidelity
    import cogumi.merge.run as merge_run
    adapter, _, _ = bf16_merge
    monkeypatch.setattr(fidelity, "FIDELITY_KL_MAX", -1.0)         # an unreachable tolerance
    monkeypatch.setattr(fidelity, "FIDELITY_KL_REL", -1.0)
    with pytest.raises(RedFlagError, match="fidelity"):
        merge.merge_adapter(adapter, tmp_path / "out", log=lambda *_: None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    monkeypatch.setattr(merge_run, "_free_bytes", lambda path: 1000)
    with pytest.raises(CogumiError, match="not enough disk"):
        merge.merge_adapter(adapter, tmp_path / "out", log=lambda *_: None)


def test_fidelity_check_catches_a_merge_that_dropped_the_adapter(bf16_merge, tiny_base):
    from cogumi.merge import LayerwiseModel, WeightDir, fidelity_check, load_adapter, load_tokenizer, probe_rows
    adapter, _, _ = bf16_merge
    model = LayerwiseModel(tiny_base)
    rows = probe_rows(load_tokenizer(tiny_base), model.vocab)
    # "merged" = the untouched base: what a merge that silently skipped every module would write
    result = fidelity_check(model, WeightDir(tiny_base), WeightDir(tiny_base), load_adapter(adapter), rows)
    assert result["passed"] is False
    assert result["kl_mean"] == pytest.approx(result["lora_effect"]["kl_mean"])


@pytest.mark.parametrize("device", ["cpu", "cpu-prefetch", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_layerwise_model_matches_transformers(device, tiny_base_fp32):
    """The hand-run layer loop (used by the fidelity check and --target auto) equals the real model."""
    from transformers import AutoModelForCausalLM

    from cogumi.merge import LayerwiseModel, Stream, WeightDir
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rows = [PROBE_IDS[0].tolist(), PROBE_IDS[1].tolist()[:9]]
    model = LayerwiseModel(tiny_base_fp32, device=device.split("-")[0])
    model.prefetch = device != "cpu"            # the GPU path's read-ahead threads, exercised on the CPU too
    got = model.logits([Stream("base", WeightDir(tiny_base_fp32))], rows)["base"].cpu()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base_fp32), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.cat([model(torch.tensor([r])).logits[0] for r in rows])
    assert (ref - got).abs().max().item() < 1e-4


def test_kill_9_mid_merge_leaves_nothing_that_loads(bf16_merge, tmp_path):
    adapter, _, _ = bf16_merge
    out = tmp_path / "merged"
    code = ("import sys; from cogumi.merge import merge_adapter; "
            "merge_adapter(sys.argv[1], sys.argv[2], max_shard_bytes=100_000, fidelity=False)")
    env = {**os.environ, "COGUMI_TEST_KILL_AFTER_SHARDS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(adapter), str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    written = re.findall(r"wrote (model-\d{5}-of-(\d{5}))", proc.stdout)
    assert len(written) == 1 and int(written[0][1]) > 1            # killed after one shard of several, mid-merge
    assert not out.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.partial-")]
    assert len(partial) == 1 and not (partial[0] / "cogumi.json").exists()
    from cogumi.verify import verify_path
    with pytest.raises(CogumiError):                               # the leftover is not a model either
        verify_path(partial[0])


# ---------------------------------------------------------------------------------------------
# adapters trained on a 4-bit base (the incident)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nf4(tiny_base, tmp_path_factory):
    """An NF4 copy of the tiny base (bitsandbytes on CPU), an adapter made on it, held-out rows."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from cogumi.tiny import synthetic_instructions, write_jsonl
    d = tmp_path_factory.mktemp("nf4")
    q = AutoModelForCausalLM.from_pretrained(
        str(tiny_base), device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True))
    q.save_pretrained(str(d / "base4"))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_base / f, d / "base4" / f)
    adapter = make_adapter(d / "base4", d / "adapter", quantized=True, r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    write_jsonl(d / "holdout.jsonl", synthetic_instructions(8, seed=3))
    return d / "base4", adapter, d / "holdout.jsonl"


def test_4bit_adapter_naive_merge_is_refused_unless_forced(nf4, tiny_base, tmp_path):
    from cogumi.merge import merge_adapter
    from cogumi.verify import verify_command
    base4, adapter, _ = nf4
    with pytest.raises(RedFlagError, match="trained on a quantized base"):
        merge_adapter(adapter, tmp_path / "naive", base=str(tiny_base), log=lambda *_: None)
    with pytest.raises(RedFlagError, match="is quantized"):           # never merge into the 4-bit model itself
        merge_adapter(adapter, tmp_path / "naive", force=True, log=lambda *_: None)
    man = merge_adapter(adapter, tmp_path / "naive", base=str(tiny_base), force=True, log=lambda *_: None)
    assert man["forced"] and man["lineage_quantized"] and man["target"] == "original"
    assert any(f["code"] == "base-is-original" for f in man["findings"])
    assert verify_command(str(tmp_path / "naive")) == 1


def test_dequantized_target_merges_into_the_nf4_weights(nf4, tmp_path):
    from bitsandbytes.functional import dequantize_4bit
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from cogumi.merge import merge_adapter
    from cogumi.verify import verify_command
    base4, adapter, _ = nf4
    man = merge_adapter(adapter, tmp_path / "deq", target="dequantized", log=lambda *_: None)
    assert man["target"] == "dequantized" and not man["forced"] and man["fidelity"]["passed"]
    # merged q_proj == bf16(dequantize_4bit(W) + scale * B @ A), from bitsandbytes and PEFT directly
    q4 = AutoModelForCausalLM.from_pretrained(str(base4), device_map="cpu")
    lin = q4.model.layers[0].self_attn.q_proj
    w = dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    want = (w + 2.0 * b @ a).to(torch.bfloat16)
    with safe_open(str(tmp_path / "deq" / "model.safetensors"), framework="pt") as f:
        got = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert (got.float() - want.float()).abs().max().item() <= 2 ** -7 * want.float().abs().max().item()
    cfg = json.loads((tmp_path / "deq" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    assert verify_command(str(tmp_path / "deq")) == 0                # handled knowingly: a warning, not red


def test_auto_target_measures_both_and_keeps_the_lower_loss(nf4, tiny_base, tmp_path):
    from cogumi.merge import merge_adapter
    base4, adapter, holdout = nf4
    with pytest.raises(CogumiError, match="pass --base"):
        merge_adapter(adapter, tmp_path / "auto", target="auto", holdout=holdout, log=lambda *_: None)
    man = merge_adapter(adapter, tmp_path / "auto", target="auto", base=str(tiny_base), holdout=holdout,
                        log=lambda *_: None)
    auto = man["auto"]
    losses = {k: auto[k]["loss"] for k in ("original", "dequantized")}
    assert man["target"] == min(losses, key=losses.get) == auto["chosen"]
    assert auto["tokens_scored"] > 0 and auto["dequantized"]["top1_agreement_with_4bit"] >= 0.95
    assert 0 <= auto["original"]["top1_agreement_with_4bit"] <= 1
    assert man["target_requested"] == "auto" and not man["forced"] and man["fidelity"]["passed"]


def test_4bit_reference_stream_matches_peft_on_bitsandbytes(nf4, tiny_base):
    """The 'adapter on the 4-bit base' that --target auto compares against is what PEFT computes on the
    real bitsandbytes 4-bit model (up to its bf16 compute)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cogumi.merge import AdaptedWeights, Dequantized4bitDir, LayerwiseModel, Stream, compare_logits, load_adapter
    base4, adapter, _ = nf4
    ad = load_adapter(adapter)
    rows = [PROBE_IDS[0].tolist(), PROBE_IDS[1].tolist()]
    ours = LayerwiseModel(tiny_base, device="cpu").logits(
        [Stream("ref", AdaptedWeights(Dequantized4bitDir(base4), ad, merge=False), ad.loras)], rows)["ref"]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base4), device_map="cpu"),
                                     str(adapter)).eval()
    with torch.no_grad():
        ref = torch.cat([peft(torch.tensor([r])).logits[0].float() for r in rows])
    cmp = compare_logits(ref, ours)
    assert cmp["top1_agreement"] >= 0.9 and cmp["kl_mean"] < 1e-4


# ---------------------------------------------------------------------------------------------

def test_cli_merge_and_benchmark_smoke(tmp_path):
    """benchmarks/merge.py --smoke: cogumi's CLI merge and PEFT's merge_and_unload agree, both beat nothing."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "merge.py"), "--smoke", "--variants",
                           "copy,cogumi,peft-cpu", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    by = {v["variant"]: v for v in res["variants"]}
    assert set(by) == {"copy", "cogumi", "peft-cpu"} and all(v["rc"] == 0 for v in by.values())
    assert by["cogumi"]["fidelity"]["passed"] and 0 < by["cogumi"]["peak_rss_gib"] < 2
    assert res["checks"]["cogumi_vs_peft-cpu"]["max_abs_diff"] == 0.0
    assert res["checks"]["cogumi_vs_base"]["fraction_differing"] > 0.5
    assert "| cogumi |" in proc.stdout


def test_an_fsync_failure_fails_the_merge_and_leaves_nothing(bf16_merge, tmp_path, monkeypatch):
    """Shards are fsynced on a background thread; its error (ENOSPC surfacing at fsync) must still fail
    the merge, with nothing at --out and no temporary beside it."""
    import errno
    import os

    import cogumi.merge as merge_mod
    adapter, _, _ = bf16_merge

    real_close = merge_mod.SafetensorsStreamWriter.close

    def close(self):
        real_close(self)
        if self.path.name.startswith("model-00002"):
            raise OSError(errno.ENOSPC, "No space left on device")   # as fsync reports it

    monkeypatch.setattr(merge_mod.SafetensorsStreamWriter, "close", close)
    out = tmp_path / "merged"
    with pytest.raises(OSError) as err:
        merge_mod.merge_adapter(adapter, out, max_shard_bytes=100_000, fidelity=False, log=lambda *_: None)
    assert err.value.errno == errno.ENOSPC
    assert not out.exists() and os.listdir(tmp_path) == []


def _shard_bytes(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.glob("*.safetensors"))}


def test_shards_merged_in_parallel_are_byte_identical_to_one_at_a_time(bf16_merge, tmp_path, monkeypatch):
    """COGUMI_MERGE_JOBS=3: three shard pipelines at once share one byte budget and write the same
    files, byte for byte, as the one-at-a-time merge; the manifest says how many ran at once."""
    import cogumi.merge as merge_mod
    adapter, _, _ = bf16_merge
    outs = {}
    for jobs in (1, 3):
        monkeypatch.setenv("COGUMI_MERGE_JOBS", str(jobs))
        manifest = merge_mod.merge_adapter(adapter, tmp_path / f"jobs{jobs}", max_shard_bytes=100_000,
                                           fidelity=False, inflight_bytes=200_000, log=lambda *_: None)
        assert manifest["output"]["merge_jobs"] == jobs
        outs[jobs] = _shard_bytes(tmp_path / f"jobs{jobs}")
    assert len(outs[1]) >= 3 and outs[3] == outs[1]


def test_a_failing_shard_stops_every_parallel_pipeline_and_leaves_nothing(tiny_base, tmp_path, monkeypatch):
    """NaN in a tensor of the last shard while other shards are being merged: the merge fails with the
    NaN message (not an internal 'stopped'), no merge thread outlives it, nothing is left at --out."""
    import threading

    from safetensors.torch import load_file, save_file

    from cogumi.merge import merge_adapter
    adapter = make_adapter(tiny_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["down_proj"])
    path = adapter / "adapter_model.safetensors"
    sd = load_file(str(path))
    key = max(k for k in sd if "lora_B" in k)             # the last layer's down_proj: the last shard
    sd[key][0, 0] = float("nan")
    save_file(sd, str(path))
    monkeypatch.setenv("COGUMI_MERGE_JOBS", "4")
    with pytest.raises(RedFlagError, match=r"NaN/Inf in model\.layers\.\d+\.mlp\.down_proj"):
        merge_adapter(adapter, tmp_path / "out", max_shard_bytes=100_000, fidelity=False, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert not [t.name for t in threading.enumerate() if t.name.startswith("cogumi-merge")]


def test_merge_jobs_setting(monkeypatch):
    from cogumi.merge import merge_jobs
    monkeypatch.setenv("COGUMI_MERGE_JOBS", "8")
    assert merge_jobs(4) == 4 and merge_jobs(1) == 1
    monkeypatch.setenv("COGUMI_MERGE_JOBS", "two")
    with pytest.raises(CogumiError, match="COGUMI_MERGE_JOBS='two'"):
        merge_jobs(4)
    monkeypatch.delenv("COGUMI_MERGE_JOBS")
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert merge_jobs(4) == 1                            # one core: one shard at a time
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert merge_jobs(4) == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert merge_jobs(4) == 4 and merge_jobs(2) == 2


def test_fidelity_check_after_training_turned_tf32_on(bf16_merge, tmp_path):
    """In the pipeline a merge follows training in one process; training turns TF32 on through torch's
    new per-backend API (transformers' tf32=True), after which torch refuses the legacy precision getter.
    The fidelity check must still force full fp32 and then put the training setting back."""
    import torch

    from cogumi.merge import exact_fp32, merge_adapter
    adapter, _, _ = bf16_merge
    before = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    torch.backends.fp32_precision = "tf32"
    try:
        with exact_fp32():
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        manifest = merge_adapter(adapter, tmp_path / "merged", max_shard_bytes=100_000, log=lambda *_: None)
        assert manifest["fidelity"]["passed"]
    finally:
        torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_merged_model_honours_the_umask(tiny_base, tmp_path, umask):
    """A serving container or a colleague must be able to read a merged model (mkstemp/mkdtemp alone
    would make it 0600/0700); under a stricter umask the stricter modes hold."""
    import stat

    from cogumi.merge import merge_adapter
    adapter = make_adapter(tiny_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    old = os.umask(umask)
    try:
        merge_adapter(adapter, tmp_path / "merged", max_shard_bytes=100_000, fidelity=False, log=lambda *_: None)
    finally:
        os.umask(old)
    merged = tmp_path / "merged"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [merged, *merged.iterdir()]}
    assert modes.pop("merged") == 0o777 & ~umask
    assert {"cogumi.json", "config.json", "model.safetensors.index.json"} <= set(modes)
    assert any(n.endswith(".safetensors") for n in modes) and any(n.startswith("tokenizer") for n in modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_the_manifest_reports_the_merges_own_peak_memory(tiny_base, tmp_path):
    """In a pipeline, training ran in the same process first: the merge must not report training's peak."""
    import resource

    from cogumi.merge import merge_adapter
    adapter = make_adapter(tiny_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    earlier = bytearray(b"\x01") * (600 * 2**20)      # a heavy step before the merge (training, say): resident
    del earlier
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20      # the process's peak so far
    manifest = merge_adapter(adapter, tmp_path / "merged", fidelity=False, log=lambda *_: None)
    if manifest["rss_scope"] != "this work":
        pytest.skip("this kernel cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    assert manifest["peak_rss_gib"] < before - 0.4
    assert manifest["start_rss_gib"] <= manifest["peak_rss_gib"]
