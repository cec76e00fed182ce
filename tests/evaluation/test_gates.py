"""Gates: the shipped Phase 1A bands, pass / fail / red flag / small-n warnings, validation, CLI exit codes."""

import json
from pathlib import Path

import pytest

from cogumi.cli import main
from cogumi.errors import ConfigError
from cogumi.evaluation.gates import check_gates, load_criteria, parse_criteria

PHASE1A = Path(__file__).resolve().parents[2] / "configs" / "criteria" / "phase1a.yaml"


def summary(gsm=(5, 35, 10), he=(12, 8, 5), mbpp=(12, 8, 5), infra=0) -> dict:
    def task(w, t, l, extra=0):
        return {"n": w + t + l + extra, "wins": w, "ties": t, "losses": l, "judged": w + t + l,
                "infra_errors": extra, "correct": w + t, "checked": w + t + l}
    return {"tasks": {"gsm8k": task(*gsm), "humaneval": task(*he), "mbpp": task(*mbpp, extra=infra)}}


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
    assert {r.name for r in c.red_flags} == {"gsm8k_ties_collapsed", "code_wins_collapsed"}


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
