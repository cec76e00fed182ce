"""The GPU benchmarks stay runnable: their --smoke modes run both sides on the tiny model on CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _import(name):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def test_train_throughput_smoke(tmp_path):
    bench = _import("train_throughput")
    out = tmp_path / "train.json"
    assert bench.main(["--smoke", "--rows", "40", "--out", str(out), "--workdir", str(tmp_path / "w")]) == 0
    r = json.loads(out.read_text())
    assert r["A"]["tokens_per_s"] > 0 and r["B"]["tokens_per_s"] > 0 and r["B_over_A"] > 0
    assert r["B"]["built_by"] == "cogumi.train.build_trainer"
    assert r["B"]["speed"]["packing"] and r["B"]["speed"]["attn_implementation"] == "cogumi_varlen"
    par = r["parity"]
    assert par["checked"] and par["passed"] and par["rows"] >= 2
    assert par["isolation_max_abs_logprob_change"] == 0.0
    # the control shows the check has teeth: naive packing does move the losses
    assert par["control_naive_packing_max_abs_row_loss_diff"] > 10 * par["tolerance"]


def test_generate_throughput_smoke(tmp_path):
    bench = _import("generate_throughput")
    out = tmp_path / "gen.json"
    assert bench.main(["--smoke", "--prompts", "6", "--loop-prompts", "6", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["loop"]["tokens_per_s"] > 0 and r["cogumi"]["tokens_per_s"] > 0
    assert r["agreement_cogumi_vs_loop"] == {"n": 6, "identical": 6, "mean_common_prefix_fraction": 1.0}
    assert r["cogumi_repeatable"]


def test_synthetic_rows_follow_the_requested_lengths():
    bench = _import("train_throughput")
    from cogumi.data import tokenize_rows
    from cogumi.tiny import build_tiny_tokenizer
    tok = build_tiny_tokenizer()
    lengths = bench.row_lengths(30, seed=0, median=60, sigma=0.9, lo=20, hi=200)
    assert lengths == bench.row_lengths(30, seed=0, median=60, sigma=0.9, lo=20, hi=200)
    rows = bench.synthetic_rows(lengths, tok, seed=0)
    got = [len(ids) for ids in tokenize_rows(rows, tok, 512, "truncate").input_ids]
    assert all(abs(g - n) <= 2 for g, n in zip(got, lengths)), list(zip(got, lengths))
