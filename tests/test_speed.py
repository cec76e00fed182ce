"""Speed settings: device defaults, clean degradation, packed attention that never crosses rows."""

from __future__ import annotations

import pytest
import torch

from cogumi import speed
from cogumi.batching import plan_batches
from cogumi.config import TrainingConfig


def _cuda_settings(monkeypatch, *, gib: float | None, liger_installed: bool, triton_installed: bool = True,
                   **training):
    monkeypatch.setattr(speed, "gpu_memory_gib", lambda: gib)
    real = speed.has_module
    installed = {"liger_kernel": liger_installed, "triton": triton_installed}
    monkeypatch.setattr(speed, "has_module", lambda name: installed[name] if name in installed else real(name))
    return speed.resolve_speed_settings(TrainingConfig(**training), "cuda")


def test_cpu_defaults_are_plain():
    s = speed.resolve_speed_settings(TrainingConfig(), "cpu")
    assert (s.dtype, s.packing, s.attn_implementation, s.use_liger, s.optim) == \
        ("float32", False, "sdpa", False, "adamw_torch")
    assert not s.lora_autocast_inputs and s.micro_batch_tokens is None and not s.torch_compile


def test_big_gpu_defaults(monkeypatch):
    s = _cuda_settings(monkeypatch, gib=79.2, liger_installed=True)
    assert s.dtype == "bfloat16" and s.packing and s.attn_implementation == speed.VARLEN_ATTENTION
    assert not s.gradient_checkpointing and s.micro_batch_tokens == speed.MICRO_BATCH_TOKENS_NO_CKPT
    # the decoder layers compiled, and so no Liger (its kernels break the compiled graphs)
    assert s.torch_compile and not s.use_liger and not s.notes
    assert s.optim == "adamw_torch_fused" and s.lora_autocast_inputs
    # the batch plan decides the micro-batch (cogumi.batching); the kwargs carry it
    plan = plan_batches(s, TrainingConfig(), [300, 700, 1200, 2048] * 50)
    assert plan.micro_batch_tokens <= speed.MICRO_BATCH_TOKENS_NO_CKPT
    kw = speed.trainer_speed_kwargs(s, TrainingConfig(), plan)
    assert kw["packing"] and kw["packing_strategy"] == "bfd" and kw["bf16"] and not kw["gradient_checkpointing"]
    assert (kw["per_device_train_batch_size"], kw["gradient_accumulation_steps"]) == (1, plan.grad_accum)
    assert kw["max_length"] == plan.pack_length and kw["per_device_eval_batch_size"] == 1
    assert s.lora_fused_add and s.sync_free_metrics and s.async_copies and s.fixed_shapes
    assert kw["pad_to_multiple_of"] == plan.pack_length
    assert kw["dataloader_pin_memory"] and kw["accelerator_config"] == {"non_blocking": True}
    from trl import SFTConfig
    args = SFTConfig(output_dir="unused", report_to=[], bf16=False, use_cpu=True,
                     **{k: v for k, v in kw.items() if k not in ("bf16", "tf32", "optim")})
    assert args.accelerator_config.non_blocking


def test_liger_where_nothing_is_compiled(monkeypatch):
    """Without Triton (or with torch_compile off) the layers run eagerly and Liger's kernels are used;
    asking for both is allowed, with a note."""
    assert _cuda_settings(monkeypatch, gib=79.2, liger_installed=True, triton_installed=False).use_liger
    s = _cuda_settings(monkeypatch, gib=79.2, liger_installed=True, torch_compile="off")
    assert s.use_liger and not s.torch_compile
    s = _cuda_settings(monkeypatch, gib=79.2, liger_installed=True, liger="on", torch_compile="on")
    assert s.use_liger and s.torch_compile and any("split the compiled layers" in n for n in s.notes)
    assert not _cuda_settings(monkeypatch, gib=79.2, liger_installed=True, triton_installed=False).torch_compile


def test_smaller_gpu_recomputes_and_missing_liger_degrades(monkeypatch):
    s = _cuda_settings(monkeypatch, gib=40.0, liger_installed=False, liger="on")
    assert s.gradient_checkpointing and s.micro_batch_tokens == speed.MICRO_BATCH_TOKENS_CKPT
    assert not s.torch_compile                    # compiled layers measured without recomputation only
    assert not s.use_liger and any("liger" in n for n in s.notes)
    assert speed.apply_model_speedups(torch.nn.Linear(2, 2), s.__class__(**{**s.to_dict(),
                                                                           "lora_autocast_inputs": False, "lora_fused_add": False})) == []
    kw = speed.trainer_speed_kwargs(s, TrainingConfig(), plan_batches(s, TrainingConfig(), [500] * 64))
    assert kw["gradient_checkpointing_kwargs"] == {"use_reentrant": False}


def test_explicit_knobs_win(monkeypatch):
    s = _cuda_settings(monkeypatch, gib=79.2, liger_installed=True, packing="off", liger="off", gradient_checkpointing="on",
                       attn_implementation="eager", optim="adamw_torch")
    assert (s.packing, s.use_liger, s.gradient_checkpointing, s.attn_implementation, s.optim) == \
        (False, False, True, "eager", "adamw_torch")
    plan = plan_batches(s, TrainingConfig(batch_size=3, grad_accum=5), [100] * 30)
    assert (plan.per_device, plan.grad_accum, plan.steps_per_epoch) == (3, 5, 2)


def test_flash_varlen_is_not_trusted_without_cuda():
    assert speed.check_flash_varlen() is False or torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# packed attention
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_varlen_model():
    from transformers import AutoModelForCausalLM, LlamaConfig
    speed.register_varlen_attention()
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=speed.VARLEN_ATTENTION,
                                            dtype=torch.float32).eval()


def _pack(rows):
    ids = torch.cat(rows)[None]
    pos = torch.cat([torch.arange(len(r)) for r in rows])[None]
    cu, longest = speed.cu_seqlens_from_position_ids(pos)
    return ids, pos, {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def test_packed_rows_equal_rows_alone(tiny_varlen_model):
    m = tiny_varlen_model
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 300, (n,), generator=g) for n in (7, 12, 5)]
    ids, pos, cu = _pack(rows)
    assert cu["cu_seq_lens_q"].tolist() == [0, 7, 19, 24] and cu["max_length_q"] == 12
    with torch.no_grad():
        alone = torch.cat([m(input_ids=r[None]).logits[0] for r in rows])
        packed = m(input_ids=ids, position_ids=pos, **cu).logits[0]
        from_positions = m(input_ids=ids, position_ids=pos).logits[0]     # boundaries read off position_ids
        naive = m(input_ids=ids).logits[0]                                # one long sequence: crosses rows
    assert torch.allclose(packed, alone, atol=1e-5)
    assert torch.allclose(from_positions, alone, atol=1e-5)
    assert not torch.allclose(naive[7:], alone[7:], atol=1e-3)


def test_changing_one_row_moves_no_other_row(tiny_varlen_model):
    m = tiny_varlen_model
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 300, (n,), generator=g) for n in (9, 6, 11)]
    ids, pos, cu = _pack(rows)
    changed = ids.clone()
    changed[0, 1:9] = torch.randint(0, 300, (8,), generator=g)
    with torch.no_grad():
        a = m(input_ids=ids, position_ids=pos, **cu).logits[0, 9:]
        b = m(input_ids=changed, position_ids=pos, **cu).logits[0, 9:]
    assert torch.equal(a, b)


def test_padded_batches_still_use_sdpa_semantics(tiny_varlen_model):
    from transformers import AutoModelForCausalLM
    m = tiny_varlen_model
    ref = AutoModelForCausalLM.from_config(m.config, attn_implementation="sdpa", dtype=torch.float32).eval()
    ref.load_state_dict(m.state_dict())
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        assert torch.allclose(m(input_ids=x, attention_mask=mask).logits, ref(input_ids=x, attention_mask=mask).logits,
                              atol=1e-6)


def test_padding_free_batch_must_be_one_row(tiny_varlen_model):
    q = torch.randn(2, 4, 6, 8)
    kv = torch.randn(2, 2, 6, 8)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="one row"):
        speed.varlen_attention_forward(None, q, kv, kv, None, cu_seq_lens_q=cu, max_length_q=3)


# ---------------------------------------------------------------------------------------------
# LoRA inputs under autocast
# ---------------------------------------------------------------------------------------------

def test_lora_inputs_skip_fp32_copy_only_under_autocast():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    fast = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    plain.load_state_dict(fast.state_dict())
    speed.install_lora_patches(fast, autocast_inputs=True, fused_add=False)
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(1)
    fast = get_peft_model(fast, lcfg)
    torch.manual_seed(1)
    plain = get_peft_model(plain, lcfg)
    x = torch.randint(0, 200, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fast(input_ids=x).logits, plain(input_ids=x).logits
    assert sum(getattr(m, "_cogumi_autocast_inputs", False) for m in fast.modules()) == 6
    assert torch.equal(a, b)
    # outside autocast PEFT's own fp32 cast still applies (no dtype error, same result)
    assert torch.equal(fast(input_ids=x).logits, plain(input_ids=x).logits)


def _lora_pair(dropout: float, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    fast = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    plain.load_state_dict(fast.state_dict())
    speed.install_lora_patches(fast, autocast_inputs=False, fused_add=True)
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(1)
    fast = get_peft_model(fast, lcfg)
    torch.manual_seed(1)
    plain = get_peft_model(plain, lcfg)
    return fast, plain


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_lora_add_equals_peft_forward_and_backward(batch):
    """Same loss and same LoRA gradients as PEFT's forward, with dropout on (same RNG draws)."""
    fast, plain = _lora_pair(dropout=0.3)
    x = torch.randint(0, 200, (batch, 12))
    losses, grads = [], []
    for m in (fast, plain):
        m.train()
        torch.manual_seed(5)
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert sum(getattr(m, "_cogumi_fused_add", False) for m in fast.modules()) == 14
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


def test_fused_lora_add_falls_back_to_peft_when_disabled_or_merged():
    fast, plain = _lora_pair(dropout=0.0)
    fast.eval(), plain.eval()
    x = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        assert torch.allclose(fast(input_ids=x).logits, plain(input_ids=x).logits, atol=1e-5)
        with fast.disable_adapter(), plain.disable_adapter():
            assert torch.equal(fast(input_ids=x).logits, plain(input_ids=x).logits)
        ref = plain(input_ids=x).logits
        fast.merge_adapter()
        assert torch.allclose(fast(input_ids=x).logits, ref, atol=1e-5)


def test_add_scaled_product_never_modifies_a_view_in_place():
    base = torch.randn(4, 6)
    view = base[:, :3]
    out = speed.add_scaled_product_(view, torch.ones(4, 2), torch.ones(2, 3), 0.5)
    assert torch.equal(out, view + 1.0) and out.data_ptr() != view.data_ptr()
    r = torch.zeros(2, 4, 3)
    assert speed.add_scaled_product_(r, torch.ones(2, 4, 2), torch.ones(2, 3), 2.0) is r and torch.all(r == 4.0)


def test_gpu_utilization_reads_the_nvml_device_with_this_device_s_uuid(monkeypatch):
    """NVML index 0 is another (idle) card; the card CUDA calls 0 is NVML's index 1: match by UUID."""
    import sys
    import types

    class Rates:
        def __init__(self, gpu):
            self.gpu = gpu

    cards = [("GPU-aaaa-0000", 0), ("GPU-bbbb-1111", 93)]
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: len(cards),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUUID=lambda h: cards[h][0].encode(),
        nvmlDeviceGetUtilizationRates=lambda h: Rates(cards[h][1]))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(speed, "_NVML_HANDLES", {})
    uuid = {"value": "bbbb-1111"}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=uuid["value"]))
    assert speed.gpu_utilization() == 93.0
    monkeypatch.setattr(speed, "_NVML_HANDLES", {})
    uuid["value"] = "cccc-2222"                       # no NVML device is this card: nothing, not card 0's 0%
    assert speed.gpu_utilization() is None
    monkeypatch.delitem(sys.modules, "pynvml")
    monkeypatch.setattr(speed, "_NVML_HANDLES", {})
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "pynvml"
                        else real_import(name, *a, **k))
    assert speed.gpu_utilization() is None            # without pynvml: None, no exception


def test_uncompiled_runs_compiled_code_eagerly():
    """What the held-out evaluation after a compiled training run relies on: inside ``uncompiled`` a
    compiled module runs without compiling anything (no new graphs for the evaluation's shapes)."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    class Block(torch.nn.Module):              # user code (dynamo does not compile torch's own modules as such)
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.proj(x)) + x

    torch._dynamo.reset()
    module = Block()
    module.compile(backend=counting_backend)
    module(torch.randn(2, 4))
    assert len(graphs) == 1
    with torch.no_grad(), speed.uncompiled():
        out = module(torch.randn(5, 4))                 # new shape and grad mode: would recompile
    assert len(graphs) == 1 and out.shape == (5, 4)
    with torch.no_grad():
        module(torch.randn(5, 4))
    assert len(graphs) == 2                             # the control: outside it does recompile
