"""`cogumi compare`: paired comparison of two eval runs on the same items with the exact McNemar test."""

import json

import pytest

from cogumi.cli import main
from cogumi.evaluation.commands import compare_runs
from cogumi.evaluation.runner import run_eval
from cogumi.evaluation.stats import mcnemar_exact
from cogumi.tiny import synthetic_gsm8k, write_jsonl


def predictions(path, rows, right):
    return write_jsonl(path, [{"task_id": str(i), "completion": r["answer"] if right(i) else "#### 99999"}
                              for i, r in enumerate(rows)])


@pytest.fixture
def runs(tmp_path):
    rows = synthetic_gsm8k("test")
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    ref = predictions(tmp_path / "gpt4.jsonl", rows, lambda i: i % 3 != 0)

    def run(name, right, n=None):
        cand = predictions(tmp_path / f"{name}.jsonl", rows, right)
        run_eval(str(cand), tasks=["gsm8k"], out=tmp_path / name, n=n, data={"gsm8k": str(gsm)},
                 reference=str(ref), log=lambda m: None)
        return tmp_path / name
    return run


def test_fixed_vs_corrupted(runs, capsys):
    fixed = runs("fixed", lambda i: i < 20 or i == 29)        # 21 right
    corrupted = runs("corrupted", lambda i: i < 5 or i == 29)   # 6 right, a subset of the fixed model's
    result = compare_runs(fixed, corrupted)
    o = result["overall"]
    assert (result["matched"], result["only_a"], result["only_b"], result["prompt_mismatches"]) == (30, 0, 0, 0)
    assert (o["paired"], o["a_correct"], o["b_correct"], o["a_only_right"], o["b_only_right"]) == (30, 21, 6, 15, 0)
    assert o["p_value"] == pytest.approx(2 * 0.5 ** 15)
    assert result["tasks"]["gsm8k"]["p_value"] == o["p_value"]
    # outcomes against the reference moved, e.g. ties (both right) became losses
    assert o["outcome_moves"]["tie->loss"] > 0

    assert main(["compare", str(fixed), str(corrupted)]) == 0
    out = capsys.readouterr().out
    assert "matched 30 items" in out and "gsm8k" in out and "overall" in out
    assert main(["compare", str(fixed / "results.jsonl"), str(corrupted), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"]["a_only_right"] == 15


def test_partial_overlap_and_infra_exclusion(runs, tmp_path):
    a = runs("a", lambda i: i % 2 == 0)
    b = runs("b", lambda i: i % 2 == 1, n=12)
    rows = [json.loads(x) for x in (a / "results.jsonl").read_text().splitlines()]
    shared = {r["task_id"] for r in (json.loads(x) for x in (b / "results.jsonl").read_text().splitlines())}
    victim = next(r for r in rows if r["task_id"] in shared)
    victim.update(correct=None, infra_error="sandbox: starved timeout")
    write_jsonl(a / "results.jsonl", rows)
    result = compare_runs(a, b)
    assert (result["matched"], result["only_a"], result["only_b"]) == (12, 18, 0)
    o = result["overall"]
    assert (o["paired"], o["excluded_infra"]) == (11, 1)
    assert o["p_value"] == mcnemar_exact(o["a_only_right"], o["b_only_right"])
    assert o["a_only_right"] + o["b_only_right"] == 11     # opposite parities: every pair is discordant


def test_no_common_items_is_an_error(runs, tmp_path, capsys):
    a = runs("a", lambda i: True)
    other = tmp_path / "other"
    other.mkdir()
    write_jsonl(other / "results.jsonl", [{"task": "mbpp", "task_id": "11", "correct": True}])
    assert main(["compare", str(a), str(other)]) == 2
    assert "no item in common" in capsys.readouterr().err
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 2
    assert "no results here" in capsys.readouterr().err
