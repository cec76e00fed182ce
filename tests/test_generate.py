"""Batched evaluation generation gives the same greedy answers as one prompt at a time; stop sequences end
a row's generation and cut its text; finish reasons (eos / stop / length)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_base_fp32):
    from cogumi.evaluation.generate import load_candidate
    return load_candidate(str(tiny_base_fp32), device="cpu")


def _conversations():
    from cogumi.tiny import synthetic_gsm8k, synthetic_mbpp, mbpp_instruction
    convs = [[{"role": "user", "content": item["question"]}] for item in synthetic_gsm8k("test", n=4)]
    convs += [[{"role": "user", "content": mbpp_instruction(item)}] for item in synthetic_mbpp("test", n=3)]
    convs.append([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 plus 3?"}])
    return convs


def test_batched_greedy_equals_one_at_a_time(model_and_tokenizer):
    from cogumi.evaluation.generate import generate_completions, render_prompts
    model, tok = model_and_tokenizer
    convs = _conversations()
    lengths = {len(p) for p in render_prompts(tok, convs)}
    assert len(lengths) > 2, "the prompts must differ in length, so batching pads"
    singles = [generate_completions(model, tok, [c], max_new_tokens=12, batch_size=1)[0] for c in convs]
    batched = generate_completions(model, tok, convs, max_new_tokens=12, batch_size=3)
    assert batched == singles
    assert any(s.strip() for s in singles), "the tiny model must produce some text for the check to mean anything"


def test_static_cache_path_matches_plain_and_keeps_order(model_and_tokenizer):
    """The fixed-shape path (one prompt width, last batch filled with copies) changes no answer."""
    from cogumi.evaluation.generate import generate_completions
    model, tok = model_and_tokenizer
    convs = _conversations()
    plain = generate_completions(model, tok, convs, max_new_tokens=8, batch_size=3, static_cache=False)
    fixed = generate_completions(model, tok, convs, max_new_tokens=8, batch_size=3, static_cache=True)
    assert fixed == plain
    reversed_out = generate_completions(model, tok, convs[::-1], max_new_tokens=8, batch_size=3, static_cache=False)
    assert reversed_out == plain[::-1]


def test_min_new_tokens_passes_through(model_and_tokenizer):
    from cogumi.evaluation.generate import generate_completions
    model, tok = model_and_tokenizer
    out = generate_completions(model, tok, _conversations()[:2], max_new_tokens=6, batch_size=2, min_new_tokens=6)
    assert len(out) == 2
    assert generate_completions(model, tok, [], max_new_tokens=4) == []


def test_static_greedy_loop_equals_model_generate(model_and_tokenizer):
    """cogumi's short greedy loop gives token for token what model.generate gives (incl. min_new_tokens,
    early end-of-sequence and left padding)."""
    import torch
    from cogumi.evaluation.generate import _greedy_static, _left_pad, render_prompts
    model, tok = model_and_tokenizer
    prompts = render_prompts(tok, _conversations())
    ids, mask = _left_pad(prompts, max(map(len, prompts)) + 3, tok.pad_token_id, "cpu")
    with torch.inference_mode():
        for min_new in (0, 10):
            ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                 pad_token_id=tok.pad_token_id, min_new_tokens=min_new)[:, ids.shape[1]:]
            ours = _greedy_static(model, ids, mask, 10, tok.pad_token_id, min_new)
            assert ours.shape[1] <= 10
            width = max(ref.shape[1], ours.shape[1])
            pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=tok.pad_token_id)  # noqa: E731
            assert torch.equal(pad(ours), pad(ref))


def test_decode_attention_matches_sdpa_for_grouped_query_heads():
    """One-token attention over a padded cache: the GQA view path equals transformers' SDPA."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from cogumi.evaluation.generate import decode_attention_forward

    class Attn(torch.nn.Module):
        num_key_value_groups = 4
        is_causal = True

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 1, 16, generator=g)
    k, v = torch.randn(3, 2, 10, 16, generator=g), torch.randn(3, 2, 10, 16, generator=g)
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., :4] = False          # left padding of row 0
    mask[1, ..., 7:] = False          # cache slots not written yet
    ours, _ = decode_attention_forward(Attn(), q, k, v, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(Attn(), q, k, v, mask, scaling=0.25)
    assert ours.shape == ref.shape == (3, 1, 8, 16)
    assert torch.allclose(ours, ref, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# stop sequences and finish reasons
# ---------------------------------------------------------------------------------------------

def _ascii_stop(text: str) -> str:
    """A 3-character ASCII stop string from the middle of ``text`` (the model's own output)."""
    for start in range(3, len(text) - 3):
        piece = text[start:start + 3]
        if piece.isascii() and piece.strip() == piece and piece.strip():
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("static_cache", [False, True])
def test_stop_sequence_cuts_that_row_and_no_other(model_and_tokenizer, static_cache):
    from cogumi.evaluation.generate import generate
    model, tok = model_and_tokenizer
    convs = _conversations()
    plain = generate(model, tok, convs, max_new_tokens=16, batch_size=3, static_cache=static_cache)
    k = max(range(len(convs)), key=lambda i: len(plain[i].text))
    stop = _ascii_stop(plain[k].text)
    stops = [[stop] if i == k else [] for i in range(len(convs))]
    cut = generate(model, tok, convs, max_new_tokens=16, batch_size=3, static_cache=static_cache, stop=stops)
    assert cut[k].text == plain[k].text[:plain[k].text.find(stop)]
    assert cut[k].finish_reason == "stop"
    assert [g for i, g in enumerate(cut) if i != k] == [g for i, g in enumerate(plain) if i != k]
    assert {g.finish_reason for i, g in enumerate(plain) if len(g.text) and g.finish_reason != "eos"} <= {"length"}


def test_generation_ends_at_the_stop(model_and_tokenizer):
    """The stop ends decoding (fewer forward passes), not just the returned text."""
    from cogumi.evaluation.generate import generate
    model, tok = model_and_tokenizer
    conv = [_conversations()[0]]
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        plain = generate(model, tok, conv, max_new_tokens=24, static_cache=False)[0]
        n_plain = len(calls)
        calls.clear()
        stopped = generate(model, tok, conv, max_new_tokens=24, static_cache=False, stop=[_ascii_stop(plain.text)])[0]
    finally:
        hook.remove()
    assert stopped.finish_reason == "stop" and len(calls) < n_plain


def test_text_ending_the_prompt_is_not_a_stop(model_and_tokenizer):
    """A stop string that the chat template's generation prompt ends with never matches there."""
    from cogumi.evaluation.generate import generate
    model, tok = model_and_tokenizer
    conv = [_conversations()[1]]
    prompt_text = tok.apply_chat_template(conv[0], tokenize=False, add_generation_prompt=True)
    tail = prompt_text[-4:]
    plain = generate(model, tok, conv, max_new_tokens=10)[0]
    assert tail not in plain.text
    assert generate(model, tok, conv, max_new_tokens=10, stop=[tail])[0] == plain


@pytest.mark.parametrize("static_cache", [False, True])
def test_finish_reasons_eos_and_length(model_and_tokenizer, static_cache):
    import torch
    from cogumi.evaluation.generate import generate, render_prompts
    model, tok = model_and_tokenizer
    convs = _conversations()[:3]
    short = generate(model, tok, convs, max_new_tokens=3, batch_size=3, static_cache=static_cache)
    assert [g.finish_reason for g in short] == ["length"] * 3          # the tiny model never ends this soon
    with torch.inference_mode():
        first = int(model(torch.tensor([render_prompts(tok, convs[:1])[0]])).logits[0, -1].argmax())
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = first             # row 0's first token now ends its answer
    try:
        ended = generate(model, tok, convs, max_new_tokens=3, batch_size=3, static_cache=static_cache)
    finally:
        model.generation_config.eos_token_id = saved
    assert ended[0].finish_reason == "eos" and short[0].text.startswith(ended[0].text)
    for after, before in zip(ended[1:], short[1:]):     # other rows change only where they emit that token too
        assert after == before or (after.finish_reason == "eos" and before.text.startswith(after.text))
