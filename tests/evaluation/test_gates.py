"""Gates: the shipped Phase 1A bands, pass / fail / red flag / small-n warnings, validation, CLI exit codes."""

import json
from pathlib import Path

import pytest

from cogumi.cli import main
from cogumi.errors import ConfigError
from cogumi.evaluation.gates import check_gates, load_criteria, parse_criteria

PHASE1A = Path(__file__).resolve().parents[2] / "configs" / "criteria" / "phase1a.yaml"


def summary(gsm=(5, 35, 10), he=(12, 8, 5), mbpp=(12, 8, 5), infra=0) -> dict:
    """An exact-judge summary where every tie is both right (a strong reference)."""
    def task(w, t, l, extra=0):
        return {"n": w + t + l + extra, "wins": w, "ties": t, "losses": l, "judged": w + t + l,
                "ties_both_right": t, "ties_both_wrong": 0, "infra_errors": extra, "correct": w + t,
                "checked": w + t + l, "reference_correct": t + l, "reference_accuracy": (t + l) / (w + t + l)}
    return {"judge": {"kind": "exact"}, "reference": "openai:gpt-4",
            "tasks": {"gsm8k": task(*gsm), "humaneval": task(*he), "mbpp": task(*mbpp, extra=infra)}}


def write_run(tmp_path, s) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(s))
    return run


def test_phase1a_encodes_the_users_bands():
    c = load_criteria(PHASE1A)
    rules = {r.name: r for r in c.rules + c.red_flags}
    assert (rules["gsm8k_ties"].metric, rules["gsm8k_ties"].expected, rules["gsm8k_ties"].min) == \
        ("tie_rate", (0.60, 0.80), 0.60)
    assert rules["code_wins"].tasks == ["humaneval", "mbpp"]
    assert (rules["code_wins"].metric, rules["code_wins"].expected) == ("win_rate", (0.40, 0.56))
    assert (rules["gsm8k_ties_collapsed"].min, rules["code_wins_collapsed"].min) == (0.50, 0.30)
    assert {r.name for r in c.red_flags} == {"gsm8k_ties_collapsed", "code_wins_collapsed", "looping"}
    # what the bands assume of GPT-4, and absolute floors per task
    assert c.reference_assumes == "GPT-4" and c.reference_floor["gsm8k"] >= 0.8
    floors = {r.tasks[0]: r.min for r in c.rules if r.metric == "accuracy"}
    assert set(floors) == {"gsm8k", "humaneval", "mbpp"} and all(0 < v < 1 for v in floors.values())
    looping = rules["looping"]
    assert looping.metric == "truncated_rate" and looping.above_base is not None


def test_healthy_model_passes_with_small_n_warnings():
    r = check_gates(summary(), PHASE1A)
    assert r.passed and not r.red_flags
    code = next(x for x in r.rows if x.name == "code_wins")
    assert (code.k, code.n) == (24, 50) and code.value == pytest.approx(0.48)   # pooled humaneval + mbpp
    assert any("n=50 is too small for this band" in w for w in r.warnings)


def test_large_n_has_no_small_n_warning():
    r = check_gates(summary(gsm=(50, 350, 100), he=(120, 80, 50), mbpp=(120, 80, 50)), PHASE1A)
    assert r.passed and not any("too small" in w for w in r.warnings)


def test_corrupted_model_triggers_both_red_flags():
    # The incident: GSM8K ties 28%, code wins 12%.
    r = check_gates(summary(gsm=(5, 14, 31), he=(3, 8, 14), mbpp=(3, 8, 14)), PHASE1A)
    assert not r.passed
    assert {x.name for x in r.red_flags} == {"gsm8k_ties_collapsed", "code_wins_collapsed"}


def test_below_band_but_above_red_flag_fails_without_stop():
    r = check_gates(summary(gsm=(5, 27, 18)), PHASE1A)   # 54% ties
    assert not r.passed and not r.red_flags
    row = next(x for x in r.rows if x.name == "gsm8k_ties")
    assert row.status == "fail" and "below 60%" in row.reason


def test_above_band_warns_but_passes_and_infra_is_reported():
    r = check_gates(summary(gsm=(2, 45, 3), infra=3), PHASE1A)   # 90% ties
    assert r.passed
    assert any("above the expected band" in w for w in r.warnings)
    assert sum("infrastructure errors" in w for w in r.warnings) == 1


def test_missing_task_fails_the_criterion_and_is_unknown_for_red_flags():
    s = summary()
    del s["tasks"]["humaneval"]
    r = check_gates(s, PHASE1A)
    code = next(x for x in r.rows if x.name == "code_wins")
    flag = next(x for x in r.rows if x.name == "code_wins_collapsed")
    assert code.status == "fail" and "humaneval" in code.reason
    assert flag.status == "unknown" and not r.red_flags and not r.passed


@pytest.mark.parametrize("raw,needle", [
    ({"criteria": [{"name": "x", "tasks": ["gsm8k"], "metric": "tie_rate", "minn": 0.5}]}, "unknown key 'minn'"),
    ({"critera": []}, "unknown top-level key 'critera'"),
    ({"criteria": [{"name": "x", "tasks": ["gsm8k"], "metric": "ties", "min": 0.5}]}, "unknown metric 'ties'"),
    ({"criteria": [{"name": "x", "tasks": ["gsm8k"], "metric": "tie_rate", "min": 60}]}, "between 0 and 1"),
    ({"criteria": [{"name": "x", "tasks": ["gsm8k"], "metric": "tie_rate"}]}, "at least one of min, max"),
    ({"criteria": [{"name": "x", "tasks": ["gsm8k"], "metric": "tie_rate", "expected": [0.8, 0.6]}]}, "above high"),
    ({"criteria": [{"tasks": ["gsm8k"], "metric": "tie_rate", "min": 0.1}]}, "missing key 'name'"),
    ({"criteria": [{"name": "x", "tasks": [], "metric": "tie_rate", "min": 0.1}]}, "tasks"),
    ({"criteria": [{"name": "x", "tasks": "gsm8k", "metric": "tie_rate", "min": 0.1}],
      "red_flags": [{"name": "x", "tasks": "gsm8k", "metric": "tie_rate", "min": 0.1}]}, "used twice: x"),
    ({}, "nothing to check"),
])
def test_validation_names_the_key(raw, needle):
    with pytest.raises(ConfigError, match=None) as e:
        parse_criteria(raw, source="crit.yaml")
    assert needle in str(e.value) and "crit.yaml" in str(e.value)


def test_cli_exit_codes(tmp_path, capsys):
    ok = write_run(tmp_path, summary())
    assert main(["gate", str(ok), "--criteria", str(PHASE1A)]) == 0
    out = capsys.readouterr().out
    assert "gate phase1a: PASS" in out and "gsm8k_ties" in out and "warning:" in out

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text(json.dumps(summary(gsm=(5, 14, 31), he=(3, 8, 14), mbpp=(3, 8, 14))))
    assert main(["gate", str(bad), "--criteria", str(PHASE1A)]) == 1
    captured = capsys.readouterr()
    assert "RED FLAG: STOP" in captured.out and "STOP" in captured.err

    weak = tmp_path / "weak"
    weak.mkdir()
    (weak / "summary.json").write_text(json.dumps(summary(gsm=(5, 27, 18))))
    assert main(["gate", str(weak / "summary.json"), "--criteria", str(PHASE1A), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] is False and result["red_flags"] == []

    crit = tmp_path / "crit.yaml"
    crit.write_text("criteria:\n  - {name: a, tasks: [gsm8k], metric: tie_rate, min: 0.5, bogus: 1}\n")
    assert main(["gate", str(ok), "--criteria", str(crit)]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err

    assert main(["gate", str(tmp_path / "nope"), "--criteria", str(PHASE1A)]) == 2
    assert "no summary.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# a weak reference, base-relative rules, attribution (issue 16)
# ---------------------------------------------------------------------------------------------

def result_rows(task: str, cand: list[bool], ref: list[bool] | None, truncated: list[bool] | None = None) -> list[dict]:
    """results.jsonl rows as `cogumi eval` writes them (exact judge), item i of each list on task_id i."""
    from cogumi.evaluation.judge import exact_outcome
    rows = []
    for i, c in enumerate(cand):
        r = None if ref is None else {"correct": ref[i], "truncated": False, "repetition": 0.0}
        outcome, tie_kind = exact_outcome(c, ref[i]) if ref is not None else (None, None)
        rows.append({"task": task, "task_id": str(i), "prompt": f"q{i}", "gold": "1", "correct": c,
                     "truncated": bool(truncated[i]) if truncated else False, "repetition": 0.0,
                     "reference": r, "outcome": outcome, "tie_kind": tie_kind, "judge": None})
    return rows


def eval_dir(tmp_path, name: str, rows: list[dict], *, reference="openai:gpt-4", model=None) -> Path:
    from cogumi.evaluation.runner import summarize
    d = tmp_path / name
    d.mkdir()
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summarize(rows, list(dict.fromkeys(r["task"] for r in rows)))
    s.update(model=model or f"{name}-model", reference=reference, judge={"kind": "exact"})
    (d / "summary.json").write_text(json.dumps(s))
    return d


def weak_candidate(n=20) -> list[bool]:
    return [i < 2 for i in range(n)]                          # 2 of 20 right (10%)


def test_weak_reference_cannot_pass_gsm8k_ties(tmp_path, capsys):
    """Candidate 10%, reference 10%: 18 of 20 ties, 17 of them both wrong. The shipped criteria do not
    pass the ties and say why."""
    ref = [i in (0, 19) for i in range(20)]                   # 2 of 20 right, one shared with the candidate
    run = eval_dir(tmp_path, "weak", result_rows("gsm8k", weak_candidate(), ref))
    r = check_gates(json.loads((run / "summary.json").read_text()), PHASE1A)
    ties = next(x for x in r.rows if x.name == "gsm8k_ties")
    assert ties.value == pytest.approx(0.9)                   # inside the band, yet:
    assert ties.status == "fail" and "reference too weak to judge ties" in ties.reason
    assert "2/20 (10%)" in ties.reason and "GPT-4" in ties.reason and "17 of 18 ties are both wrong" in ties.reason
    collapsed = next(x for x in r.rows if x.name == "gsm8k_ties_collapsed")
    assert collapsed.status == "unknown" and not r.red_flags  # no evidence either way from this reference
    assert main(["gate", str(run), "--criteria", str(PHASE1A)]) == 1
    out = capsys.readouterr().out
    assert "reference too weak to judge ties" in out and "gsm8k_accuracy" in out


def test_strong_reference_stop_names_the_base_and_the_fidelity(tmp_path, capsys):
    """The same 10% candidate against a 90% reference: ties collapse, STOP -- and the message says the
    base already scores this, with the base's score on the same items and the merge's fidelity result."""
    ref = [i < 18 for i in range(20)]
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "cogumi.json").write_text(json.dumps({"kind": "merged", "fidelity": {
        "passed": True, "kl_mean": 2e-5, "top1_agreement": 1.0}}))
    run = eval_dir(tmp_path, "cand", result_rows("gsm8k", weak_candidate(), ref), model=str(merged))
    base = eval_dir(tmp_path, "base", result_rows("gsm8k", [i == 5 for i in range(20)] + [True] * 5,
                                                  ref + [True] * 5))     # 5 more items the candidate never saw
    rc = main(["gate", str(run), "--criteria", str(PHASE1A), "--base", str(base)])
    cap = capsys.readouterr()
    assert rc == 1 and "RED FLAG: STOP" in cap.out and "STOP" in cap.err
    line = next(x for x in cap.out.splitlines() if "likeliest cause" in x and "tie_rate" in x)
    assert "the base already scores this" in line
    assert "scores 3/20 (15%) on tie_rate on the same items, this model 4/20 (20%)" in line  # the 20 shared items
    assert "fidelity check passed" in line and "20 of 25 items matched" not in line
    assert "base" in cap.out.splitlines()[1]                            # the table gains a base column


@pytest.mark.parametrize("case", ["fidelity failed", "base healthy", "no base"])
def test_attribution_names_the_likeliest_cause(case):
    s = summary(gsm=(2, 12, 36))                                       # ties 24%: STOP
    base = summary(gsm=(5, 35, 10)) if case == "base healthy" else summary(gsm=(2, 10, 38))
    fid = {"passed": case != "fidelity failed", "kl_mean": 0.4 if case == "fidelity failed" else 1e-5,
           "top1_agreement": 0.61 if case == "fidelity failed" else 1.0}
    r = check_gates(s, PHASE1A, base=None if case == "no base" else base, fidelity=fid)
    row = next(x for x in r.rows if x.name == "gsm8k_ties_collapsed")
    assert row.status == "STOP"
    want = {"fidelity failed": "the merge diverged from the adapter",
            "base healthy": "the fine-tune made it worse", "no base": "no base eval on the same items"}[case]
    assert want in row.cause, row.cause
    if case == "base healthy":
        assert "35/50 (70%)" in row.cause and "12/50 (24%)" in row.cause and "fidelity check passed" in row.cause


def test_gate_on_an_eval_without_a_reference_does_not_blame_infrastructure(tmp_path, capsys):
    run = eval_dir(tmp_path, "noref", result_rows("gsm8k", weak_candidate(), None), reference=None)
    assert main(["gate", str(run), "--criteria", str(PHASE1A)]) == 1
    out = capsys.readouterr().out
    assert "infrastructure" not in out and "the eval has no reference" in out


def test_looping_is_a_red_flag_relative_to_the_base(tmp_path):
    rows = lambda loops: result_rows("gsm8k", [True] * 20, [True] * 20, [i < loops for i in range(20)])  # noqa: E731
    crit = {"name": "t", "red_flags": [{"name": "looping", "tasks": ["gsm8k"], "metric": "truncated_rate",
                                        "max": 0.6, "above_base": 0.15}]}
    cand = json.loads((eval_dir(tmp_path, "c", rows(8)) / "summary.json").read_text())           # 40% loop
    looping_base = json.loads((eval_dir(tmp_path, "b1", rows(6)) / "summary.json").read_text())  # 30%
    clean_base = json.loads((eval_dir(tmp_path, "b2", rows(1)) / "summary.json").read_text())    # 5%
    assert not check_gates(cand, crit).red_flags                                  # 40% <= 60%, no base
    assert not check_gates(cand, crit, base=looping_base).red_flags               # +10 points
    r = check_gates(cand, crit, base=clean_base)                                   # +35 points
    assert [x.name for x in r.red_flags] == ["looping"]
    assert "35% above the base's 5% on the same items" in r.rows[0].reason
    assert "the fine-tune made it worse" in r.rows[0].cause
    only_relative = {"name": "t", "criteria": [{"name": "no_more_loops", "tasks": ["gsm8k"],
                                                "metric": "truncated_rate", "above_base": 0.1}]}
    row = check_gates(cand, only_relative).rows[0]
    assert row.status == "fail" and "needs the base's eval" in row.reason


@pytest.mark.parametrize("raw, needle", [
    ({"reference": {"min_accuracy": 1.5}, "criteria": [{"name": "a", "tasks": ["gsm8k"], "metric": "accuracy",
                                                          "min": 0.1}]}, "reference.min_accuracy"),
    ({"reference": {"assumes": "GPT-4", "floor": 0.8}, "criteria": [{"name": "a", "tasks": ["gsm8k"],
                                                                    "metric": "accuracy", "min": 0.1}]}, "'floor'"),
    ({"criteria": [{"name": "a", "tasks": ["gsm8k"], "metric": "accuracy", "min": 0.1,
                    "reference_min_accuracy": 0.8}]}, "only for metrics measured against the reference"),
    ({"criteria": [{"name": "a", "tasks": ["gsm8k"], "metric": "tie_rate", "above_base": "x"}]}, "above_base"),
])
def test_reference_and_base_keys_are_validated(raw, needle):
    with pytest.raises(ConfigError) as e:
        parse_criteria(raw, source="crit.yaml")
    assert needle in str(e.value) and "crit.yaml" in str(e.value)


def test_a_rule_floor_guards_wins_too():
    crit = {"name": "t", "criteria": [{"name": "wins", "tasks": ["gsm8k"], "metric": "win_rate", "min": 0.3,
                                       "reference_min_accuracy": 0.5}]}
    s = summary(gsm=(30, 10, 10))                   # wins 60%, but the reference got 20/50 right
    row = check_gates(s, crit).rows[0]
    assert row.status == "fail" and "reference too weak to judge wins" in row.reason
