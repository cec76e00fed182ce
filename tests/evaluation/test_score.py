"""`cogumi score`: per-item rows, wins/ties/losses against a reference, the JSON last line, bad files."""

from __future__ import annotations

import json
import re

import pytest

from cogumi.cli import main
from cogumi.evaluation import sandbox
from cogumi.evaluation.scoring import score_items
from cogumi.evaluation.tasks import load_task
from cogumi.tiny import synthetic_gsm8k, synthetic_humaneval, synthetic_mbpp, write_jsonl

ROW_KEYS = {"task", "task_id", "prompt", "gold", "completion", "extracted", "correct", "reason", "infra_error",
            "reference", "outcome", "tie_kind", "judge"}


def _right(row):
    return f"```python\n{row['code']}\n```"


def _wrong(row):
    name = row["code"].split("(")[0][4:]
    return f"```python\ndef {name}(x):\n    return 0\n```"


@pytest.fixture
def mbpp_case(tmp_path):
    rows = synthetic_mbpp("test")  # 10 items
    data = write_jsonl(tmp_path / "mbpp.jsonl", rows)
    # candidate right on 0-5; reference right on 0-2 and 6-7
    cand = [{"task_id": r["task_id"], "completion": _right(r) if i <= 5 else _wrong(r)} for i, r in enumerate(rows)]
    ref = [{"task_id": str(r["task_id"]), "completion": _right(r) if i <= 2 or i in (6, 7) else _wrong(r)}
           for i, r in enumerate(rows)]
    return rows, data, write_jsonl(tmp_path / "cand.jsonl", cand), write_jsonl(tmp_path / "ref.jsonl", ref)


def _run(capsys, *args):
    rc = main(["score", *map(str, args), "--workers", "4", "--timeout", "10"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_score_with_reference_counts_wins_ties_losses(mbpp_case, tmp_path, capsys):
    rows, data, cand, ref = mbpp_case
    out = tmp_path / "results.jsonl"
    rc, stdout, _ = _run(capsys, "--task", "mbpp", "--data", data, "--predictions", cand, "--reference", ref,
                         "--out", out)
    assert rc == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary == {"task": "mbpp", "n": 10, "correct": 6, "infra_errors": 0, "wins": 3, "ties": 5,
                       "losses": 2, "ties_both_right": 3, "ties_both_wrong": 2, "unpaired": 0,
                       "reference_correct": 5, "reference_infra_errors": 0}
    assert "wins 3/10" in stdout and "losses 2/10" in stdout
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(set(r) == ROW_KEYS for r in results)
    assert [r["task_id"] for r in results] == [str(r["task_id"]) for r in rows]
    assert [r["outcome"] for r in results] == ["tie"] * 3 + ["win"] * 3 + ["loss"] * 2 + ["tie"] * 2
    assert [r["tie_kind"] for r in results] == ["both_right"] * 3 + [None] * 5 + ["both_wrong"] * 2
    assert results[6]["reason"].startswith("AssertionError") and results[6]["reference"]["correct"] is True


def test_infra_errors_and_missing_references_are_not_losses(mbpp_case, tmp_path, capsys, monkeypatch):
    rows, data, cand, ref = mbpp_case
    real = sandbox.run_many

    def flaky(jobs, **kwargs):  # the sandbox breaks on item 8's (wrong) program, on both sides
        broken = rows[8]["code"].split("(")[0][4:]
        results = real(jobs, **kwargs)
        return [sandbox.RunResult("infra_error", "sandbox: could not start")
                if "return 0" in job.program and broken in job.program else r for job, r in zip(jobs, results)]

    monkeypatch.setattr(sandbox, "run_many", flaky)
    ref_rows = [json.loads(line) for line in open(ref)][:-1]  # no reference for the last item
    write_jsonl(ref, ref_rows)
    rc, stdout, _ = _run(capsys, "--task", "mbpp", "--data", data, "--predictions", cand, "--reference", ref,
                         "--out", tmp_path / "r.jsonl")
    summary = json.loads(stdout.strip().splitlines()[-1])
    # item 8: both sides' wrong programs hit the broken sandbox; item 9: no reference at all
    assert summary["unpaired"] == 2 and summary["losses"] == 2 and summary["ties_both_wrong"] == 0
    assert summary["infra_errors"] == 1 and summary["reference_infra_errors"] == 2
    results = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    assert results[8]["outcome"] is None and results[8]["correct"] is None
    assert results[9]["reference"]["reason"] == "no reference completion for this item"


def test_score_gsm8k_and_humaneval_int_ids(tmp_path, capsys):
    data = write_jsonl(tmp_path / "gsm.jsonl", synthetic_gsm8k("test"))
    items = load_task("gsm8k", str(data))
    preds = [{"task_id": 0, "completion": f"#### {items[0].gold}"},
             {"task_id": "1", "completion": f"The answer is {items[1].gold}."},
             {"task_id": 2, "completion": "#### 99999"}]
    rc, stdout, _ = _run(capsys, "--task", "gsm8k", "--data", data, "--predictions",
                         write_jsonl(tmp_path / "p.jsonl", preds), "--out", tmp_path / "o.jsonl")
    assert json.loads(stdout.strip().splitlines()[-1]) == {"task": "gsm8k", "n": 3, "correct": 2, "infra_errors": 0}
    assert "3 of 30 items" in stdout
    he = synthetic_humaneval()
    hdata = write_jsonl(tmp_path / "he.jsonl", he)
    hpreds = write_jsonl(tmp_path / "hp.jsonl", [{"task_id": i, "completion": r["canonical_solution"]}
                                                 for i, r in enumerate(he)])
    rc, stdout, _ = _run(capsys, "--task", "humaneval", "--data", hdata, "--predictions", hpreds,
                         "--out", tmp_path / "ho.jsonl")
    assert json.loads(stdout.strip().splitlines()[-1])["correct"] == len(he)


@pytest.mark.parametrize("lines, message", [
    (['{"task_id": 11, "completion": "x"}', '{"task_id": 12, "completion": '], r"p\.jsonl:2: malformed JSON"),
    (['{"task_id": 11, "completion": "x"}', '{"task_id": 11, "completion": "y"}'], r"p\.jsonl:2: task_id '11' appears twice \(first on line 1\)"),
    (['{"task_id": 99999, "completion": "x"}'], r"p\.jsonl:1: task_id 99999 is not an item"),
    (['{"task_id": 11, "completion": 5}'], r"p\.jsonl:1: 'completion' must be a string"),
    (['{"completion": "x"}'], r"p\.jsonl:1: missing key 'task_id'"),
    (['', '  '], r"no predictions"),
])
def test_bad_prediction_files_name_file_and_line(mbpp_case, tmp_path, capsys, lines, message):
    _, data, _, _ = mbpp_case
    bad = tmp_path / "p.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "keep.jsonl"
    out.write_text("previous results\n")
    rc, _, err = _run(capsys, "--task", "mbpp", "--data", data, "--predictions", bad, "--out", out)
    assert rc != 0
    assert err.startswith("error: ") and re.search(message, err), err
    assert out.read_text() == "previous results\n"  # nothing half-written, nothing overwritten


def test_score_items_is_reusable(tmp_path):
    items = load_task("mbpp", str(write_jsonl(tmp_path / "m.jsonl", synthetic_mbpp("test"))))[:2]
    rows = score_items(items, [_right(it.data) for it in items], reference=[None, _wrong(items[1].data)], workers=2)
    assert [r["outcome"] for r in rows] == [None, "win"]
    assert rows[0]["reference"]["infra_error"] == "no reference completion for this item"
