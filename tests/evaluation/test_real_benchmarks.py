"""The real GSM8K / HumanEval / MBPP files (../shared/benchmarks) scored through `cogumi score`.

The benchmarks' own reference solutions must all pass and a `pass` body must fail everywhere: this is
what proves the prompts-to-programs assembly, the test order (MBPP: code, then test_setup_code, then
asserts) and the sandbox never turn a right answer into a wrong one. Skipped when the files are absent.
Measured on the 2-core dev box: about 40 s for the module.
"""

from __future__ import annotations

import json
import os


from cogumi.cli import main

WORKERS = str(max(4, os.cpu_count() or 1))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _read(path):
    return [json.loads(line) for line in open(path)]


def _score(capsys, *args) -> dict:
    rc = main(["score", *args, "--workers", WORKERS, "--timeout", "20"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out.strip().splitlines()[-1])  # the last line printed is the JSON summary


def test_humaneval_canonical_pass_and_pass_bodies_fail(shared_benchmarks, tmp_path, capsys):
    data = shared_benchmarks / "humaneval" / "HumanEval.jsonl"
    problems = _read(data)
    assert len(problems) == 164
    canonical = _write(tmp_path / "canonical.jsonl",
                       [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems])
    stubs = _write(tmp_path / "pass.jsonl", [{"task_id": p["task_id"], "completion": "    pass\n"} for p in problems])
    summary = _score(capsys, "--task", "humaneval", "--data", str(data), "--predictions", stubs,
                     "--reference", canonical, "--out", str(tmp_path / "he.jsonl"))
    assert summary["n"] == 164
    assert summary["reference_correct"] == 164, "a canonical solution failed"
    assert summary["correct"] == 0 and summary["losses"] == 164, "a `pass` body passed"
    assert summary["infra_errors"] == summary["reference_infra_errors"] == 0
    rows = _read(tmp_path / "he.jsonl")
    assert all(r["reference"]["reason"] == "passed all tests" for r in rows)
    assert all(r["reason"] and r["outcome"] == "loss" for r in rows)


def test_humaneval_whole_function_answers_pass(shared_benchmarks, tmp_path, capsys):
    # what a chat model writes: prose and the whole function, signature included, in a fenced block
    data = shared_benchmarks / "humaneval" / "HumanEval.jsonl"
    preds = _write(tmp_path / "chat.jsonl", [
        {"task_id": p["task_id"],
         "completion": f"Here is the solution:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone."}
        for p in _read(data)])
    summary = _score(capsys, "--task", "humaneval", "--data", str(data), "--predictions", preds,
                     "--out", str(tmp_path / "he.jsonl"))
    assert summary == {"task": "humaneval", "n": 164, "correct": 164, "infra_errors": 0}


def test_mbpp_full_reference_programs_pass(shared_benchmarks, tmp_path, capsys):
    data = shared_benchmarks / "mbpp" / "mbpp.jsonl"
    preds = _write(tmp_path / "mbpp.jsonl", [{"task_id": r["task_id"], "completion": r["code"]} for r in _read(data)])
    summary = _score(capsys, "--task", "mbpp", "--data", str(data), "--predictions", preds,
                     "--out", str(tmp_path / "out.jsonl"))
    assert summary["n"] == 974
    failed = [(r["task_id"], r["reason"]) for r in _read(tmp_path / "out.jsonl") if not r["correct"]]
    assert summary["correct"] == 974, failed[:5]


def test_mbpp_sanitized_reference_programs_pass(shared_benchmarks, tmp_path, capsys):
    data = shared_benchmarks / "mbpp" / "sanitized-mbpp.json"
    rows = json.loads(data.read_text())
    preds = _write(tmp_path / "san.jsonl", [{"task_id": r["task_id"], "completion": f"```python\n{r['code']}\n```"}
                                            for r in rows])
    summary = _score(capsys, "--task", "mbpp", "--data", str(data), "--predictions", preds,
                     "--out", str(tmp_path / "out.jsonl"))
    assert summary["n"] == 427 and summary["correct"] == 427


def test_gsm8k_gold_solutions_score_strict(shared_benchmarks, tmp_path, capsys):
    data = shared_benchmarks / "gsm8k" / "test.jsonl"
    rows = _read(data)
    preds = _write(tmp_path / "gold.jsonl", [{"task_id": i, "completion": r["answer"]} for i, r in enumerate(rows)])
    summary = _score(capsys, "--task", "gsm8k", "--data", str(data), "--predictions", preds,
                     "--out", str(tmp_path / "out.jsonl"))
    assert summary == {"task": "gsm8k", "n": 1319, "correct": 1319, "infra_errors": 0}
    assert all(r["reason"].startswith("strict:") for r in _read(tmp_path / "out.jsonl"))
