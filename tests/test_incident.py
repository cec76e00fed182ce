"""The incident reproduced on the tiny model: a LoRA trained on an NF4 copy of the base, merged naively
into bf16 (forced) and with --target auto, next to one trained on the full-precision base."""

from __future__ import annotations

import math

import pytest

from cogumi.incident import BF16_CLOTHES


@pytest.fixture(scope="module")
def incident(tmp_path_factory):
    from cogumi.incident import reproduce_incident
    lines: list[str] = []
    result = reproduce_incident(tmp_path_factory.mktemp("incident"), log=lines.append)
    return result, "\n".join(lines)


def test_table_has_every_variant_with_real_scores(incident):
    result, printed = incident
    rows = {r["model"]: r for r in result["table"]}
    assert len(rows) == 6 and "| model | held-out loss |" in printed
    assert all(math.isfinite(r["loss"]) and 0 <= r["token_accuracy"] <= 1 and r["tokens"] > 0 for r in rows.values())
    base = rows["base model, no adapter"]
    trained = [r for name, r in rows.items() if name not in ("base model, no adapter", BF16_CLOTHES)]
    assert all(r["loss"] < base["loss"] for r in trained)           # both trainings learned something


def test_verify_flags_the_naive_path_and_not_the_measured_one(incident):
    result, printed = incident
    verdicts = result["verify"]
    naive = verdicts["naive merge into bf16 (--target original --force)"]
    assert naive["exit_code"] == 1 and "merged with --force" in naive["red_flags"][0]
    assert "trained on a quantized base" in naive["red_flags"][0]
    assert verdicts["4-bit base + adapter, unmerged (as trained)"]["exit_code"] == 1
    assert verdicts["trained on the bf16 base, merged"]["exit_code"] == 0
    auto_label = next(k for k in verdicts if k.startswith("--target auto"))
    assert verdicts[auto_label]["exit_code"] == 0 and verdicts[auto_label]["warnings"]
    assert result["naive_forced"] is True and "RED FLAG" in printed
    # the same 4-bit weights in bf16 clothes: caught from the values, no metadata needed
    clothes = verdicts[BF16_CLOTHES]
    assert clothes["exit_code"] == 1 and "went through 4-bit quantization" in clothes["red_flags"][0]
    assert "NF4 codebook" in clothes["red_flags"][0]


def test_auto_kept_the_target_with_the_lower_loss(incident):
    result, _ = incident
    auto = result["auto"]
    kept = min(("original", "dequantized"), key=lambda k: auto[k]["loss"])
    assert auto["chosen"] == kept and f"kept '{kept}'" in " ".join(r["model"] for r in result["table"])
    assert auto["dequantized"]["top1_agreement_with_4bit"] >= auto["original"]["top1_agreement_with_4bit"]
    assert all(f["passed"] for f in result["merged_fidelity"].values())
