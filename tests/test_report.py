"""report.html / report.md from a run dir built by hand from the artifact contracts (docs/design.md)."""

from __future__ import annotations

import html
import json
import random
import re
from pathlib import Path

import pytest

from cogumi.errors import CogumiError
from cogumi.io import atomic_write_json, atomic_write_jsonl
from cogumi.report import Run, lineage_rows, red_flags_and_warnings, write_report

REPO = Path(__file__).resolve().parents[1]


def eval_rows(seed: int, p_right: dict[str, float], n: dict[str, int], ref_right: float = 0.7) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for task, k in n.items():
        for i in range(k):
            ref_rng = random.Random(f"{task}{i}")         # the reference is the same in every phase
            c, r = rng.random() < p_right[task], ref_rng.random() < ref_right
            outcome = "win" if c and not r else "loss" if r and not c else "tie"
            rows.append({"task": task, "task_id": str(i), "prompt": f"{task} question {i} " + "word " * 9,
                         "gold": "1", "completion": "x", "extracted": "1", "correct": c, "reason": "", "infra_error": None,
                         "reference": {"completion": "ref", "extracted": "1", "correct": r, "reason": "",
                                       "infra_error": None},
                         "outcome": outcome, "tie_kind": ("both_right" if c else "both_wrong") if outcome == "tie" else None,
                         "judge": None})
    return rows


def put_stage(run_dir: Path, index: int, name: str, status="done", outputs=None, metrics=None, findings=None,
              seconds=1.0, reason=None, upstream=None):
    d = run_dir / "stages" / f"{index:02d}-{name}"
    d.mkdir(parents=True, exist_ok=True)
    rec = {"name": name, "index": index, "title": name, "status": status, "seconds": seconds, "cost_usd": 0.001,
           "inputs": {"upstream": upstream or {}}, "metrics": metrics or {}, "findings": findings or [],
           "outputs": {k: {"path": str(p.relative_to(run_dir)), "hash": f"sha256:{k}0123456789abcdef"}
                       for k, p in (outputs or {}).items()}}
    if reason:
        rec["reason"] = reason
    atomic_write_json(d / "stage.json", rec)
    return d


def eval_stage(run_dir, index, name, rows):
    from cogumi.evaluation.runner import summarize
    d = run_dir / "stages" / f"{index:02d}-{name}" / "eval"
    d.mkdir(parents=True)
    summary = {"model": name, "reference": "gpt-4 predictions", **summarize(rows)}
    atomic_write_jsonl(d / "results.jsonl", rows)
    atomic_write_json(d / "summary.json", summary)
    put_stage(run_dir, index, name, outputs={"results": d / "results.jsonl", "summary": d / "summary.json"},
              metrics={"tasks": summary["tasks"]})
    return summary


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    from cogumi.evaluation.commands import compare_runs
    from cogumi.evaluation.gates import check_gates
    from cogumi.failures import mine_failures

    rd = tmp_path / "run"
    n = {"gsm8k": 50, "humaneval": 25, "mbpp": 25}
    eval_stage(rd, 2, "validate-base", eval_rows(1, {"gsm8k": 0.3, "humaneval": 0.2, "mbpp": 0.25}, n))
    s1a = eval_stage(rd, 7, "validate-1a", eval_rows(2, {"gsm8k": 0.65, "humaneval": 0.55, "mbpp": 0.6}, n))
    s1b = eval_stage(rd, 15, "validate-1b", eval_rows(3, {"gsm8k": 0.8, "humaneval": 0.6, "mbpp": 0.7}, n))
    # training: adapter with its manifest, a loss curve
    for idx, phase, base in ((3, "1a", "meta-llama/Meta-Llama-3.1-8B-Instruct"), (11, "1b", "stages/05-merge-1a/merged")):
        d = rd / "stages" / f"{idx:02d}-train-{phase}" / "run"
        (d / "adapter").mkdir(parents=True)
        atomic_write_json(d / "adapter" / "cogumi.json", {
            "kind": "adapter", "phase": phase, "base": {"id": base, "fingerprint": "sha256-quick:base1234", "quantized": False},
            "parents": {"base": {"id": base, "fingerprint": "sha256-quick:base1234"}}, "red_flags": []})
        atomic_write_jsonl(d / "train_log.jsonl", [{"step": s, "loss": 2.5 * 0.93 ** s, "learning_rate": 1e-3}
                                                   for s in range(1, 40)])
        put_stage(rd, idx, f"train-{phase}", outputs={"adapter": d / "adapter", "train_log": d / "train_log.jsonl"},
                  metrics={"steps": 39, "tokens_seen": 12345, "losses": {"first": 2.3, "last": 0.2},
                           "rows": 200, "base_model": base, "warnings": ["loss spike at step 7"]}, seconds=61.0)
    for idx, phase in ((5, "1a"), (13, "1b")):
        m = rd / "stages" / f"{idx:02d}-merge-{phase}" / "merged"
        m.mkdir(parents=True)
        atomic_write_json(m / "cogumi.json", {"kind": "merged", "parents": {
            "base": {"id": "meta-llama/Meta-Llama-3.1-8B-Instruct", "fingerprint": "sha256-quick:base1234"},
            "adapter": {"path": f"train-{phase}/adapter", "fingerprint": "sha256-quick:adap5678"}},
            "target": "original", "forced": phase == "1b", "fidelity": {"top1_agreement": 1.0}})
        put_stage(rd, idx, f"merge-{phase}", outputs={"merged": m}, seconds=20.0)
    put_stage(rd, 6, "verify-merged-1a", findings=[{"level": "warn", "code": "size", "message": "size is small",
                                                    "fix": "check"}])
    criteria = REPO / "configs" / "criteria" / "phase1a.yaml"
    for idx, name, summ in ((8, "gate-1a", s1a), (17, "gate-1b", s1b)):
        g = check_gates(summ, criteria)
        d = rd / "stages" / f"{idx:02d}-{name}"
        d.mkdir(parents=True)
        atomic_write_json(d / "gate.json", {**g.as_dict(), "regression": None})
        put_stage(rd, idx, name, outputs={"gate": d / "gate.json"}, metrics={"passed": g.passed})
    comp = compare_runs(rd / "stages/07-validate-1a/eval", rd / "stages/15-validate-1b/eval")
    d = rd / "stages" / "16-compare-1a-1b"
    d.mkdir(parents=True)
    atomic_write_json(d / "compare.json", comp)
    put_stage(rd, 16, "compare-1a-1b", outputs={"compare": d / "compare.json"})
    d = rd / "stages" / "10-failures-1a"
    d.mkdir(parents=True)
    stats = mine_failures([rd / "stages/07-validate-1a/eval"], d / "phase1b.jsonl",
                          exclude=[rd / "stages/02-validate-base/eval"])
    atomic_write_json(d / "stats.json", stats)
    put_stage(rd, 10, "failures-1a", outputs={"phase1b_set": d / "phase1b.jsonl", "stats": d / "stats.json"},
              upstream={"mine-1a": {"outputs": {"results": "sha256:aaaa", "summary": "sha256:bbbb"}}})
    d = rd / "stages" / "18-incident"
    d.mkdir(parents=True)
    atomic_write_json(d / "incident.json", {   # the shape cogumi.incident.reproduce_incident returns
        "table": [{"model": "naive merge into bf16", "path": "x", "loss": 3.2, "token_accuracy": 0.1,
                   "verify": "RED FLAG (forced-merge)"},
                  {"model": "trained on the bf16 base, merged", "path": "y", "loss": 1.1, "token_accuracy": 0.8,
                   "verify": "clean"}],
        "verify": {"naive merge into bf16": {"exit_code": 1, "red_flags": ["[RED FLAG] merged with --force"]}},
        "auto": {"original": {"loss": 3.2}, "dequantized": {"loss": 1.5}, "chosen": "dequantized"}})
    put_stage(rd, 18, "incident", outputs={"incident": d / "incident.json"})
    names = ["preflight", "validate-base", "train-1a", "verify-adapter-1a", "merge-1a", "verify-merged-1a",
             "validate-1a", "gate-1a", "mine-1a", "failures-1a", "train-1b", "verify-adapter-1b", "merge-1b",
             "verify-merged-1b", "validate-1b", "compare-1a-1b", "gate-1b", "incident"]
    atomic_write_json(rd / "summary.json", {
        "name": "fixture", "description": "hand-built", "status": "done", "gpu_hourly_usd": 2.5,
        "stages": [{"name": nm, "index": i + 1, "status": "done", "seconds": float(i % 5 + 1), "cost_usd": 0.001}
                   for i, nm in enumerate(names)],
        "total_seconds": 50.0, "total_cost_usd": 0.018})
    return rd


def test_report_is_self_contained_with_all_sections(run_dir):
    path = write_report(run_dir)
    page = path.read_text()
    assert path == run_dir / "report.html"
    # self-contained: no external asset, script or stylesheet link
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page and "<link" not in page
    assert page.count('src="data:image/png;base64,') == 4       # accuracy, loss, outcomes, stage times
    for text in ("Artifact lineage", "training loss", "Wins / ties / losses", "gsm8k_ties", "code_wins",
                 "Phase 1A vs Phase 1B", "only 1B right", "Phase 1B training set", "4-bit incident",
                 "naive merge into bf16", "RED FLAG (forced-merge)", "kept 'dequantized'", "Red flags and warnings", "Time and cost per stage", "Run complete",
                 "merged with --force", "loss spike at step 7", "size is small"):
        assert text in html.unescape(page), text
    md = path.with_suffix(".md").read_text()
    assert "| gsm8k_ties |" in md or "gsm8k_ties" in md
    for img in re.findall(r"\(report_files/([\w.]+)\)", md):
        assert (run_dir / "report_files" / img).stat().st_size > 1000


def test_lineage_rows_carry_parents_and_fingerprints(run_dir):
    rows = {r["artifact"]: r for r in lineage_rows(Run(run_dir))}
    merged = rows["merge-1a/merged"]
    assert merged["kind"] == "merged"
    assert any("adapter:" in p and "adap5678" in p for p in merged["parents"])
    assert rows["merge-1b/merged"]["red_flags"] == ["merged with --force (a red flag was overridden)"]
    assert rows["failures-1a/phase1b_set"]["parents"] == ["mine-1a/results [sha256:aaaa]"]


def test_stopped_run_shows_reason_and_fix(run_dir, tmp_path):
    s = json.loads((run_dir / "summary.json").read_text())
    s.update(status="stopped", stopped_at="gate-1a", reason="gate phase1a: gsm8k_ties 20% is below 60%",
             fix="Open the report and look at the lost items")
    (run_dir / "summary.json").write_text(json.dumps(s))
    put_stage(run_dir, 8, "gate-1a", status="gate_failed", reason="gate phase1a: gsm8k_ties 20% is below 60%",
              outputs={"gate": run_dir / "stages/08-gate-1a/gate.json"})
    out = write_report(run_dir, tmp_path / "elsewhere")
    page = out.read_text()
    assert out == tmp_path / "elsewhere" / "report.html"
    assert "Run STOPPED at stage gate-1a" in page and "look at the lost items" in page
    reds, _ = red_flags_and_warnings(Run(run_dir))
    assert any("gate-1a stopped the run" in r for r in reds)


def test_partial_run_renders(tmp_path):
    rd = tmp_path / "r"
    atomic_write_json(rd / "summary.json", {"status": "running", "stages": [
        {"name": "preflight", "index": 1, "status": "done", "seconds": 1.0, "cost_usd": 0.0},
        {"name": "train-1a", "index": 3, "status": "running", "seconds": 0.0, "cost_usd": 0.0}]})
    page = write_report(rd).read_text()
    assert "No validation finished yet" in page and "Run in progress" in page


def test_not_a_run_dir(tmp_path):
    with pytest.raises(CogumiError, match="not|no summary.json"):
        write_report(tmp_path)


def test_cli(run_dir, capsys):
    from cogumi.cli import main
    assert main(["report", str(run_dir)]) == 0
    assert "report.html" in capsys.readouterr().out


def test_a_plain_eval_dir_is_reported_with_its_truncation(tmp_path):
    from cogumi.evaluation.runner import summarize
    rows = eval_rows(3, {"gsm8k": 0.5, "mbpp": 0.4}, {"gsm8k": 20, "mbpp": 10})
    for i, r in enumerate(rows):
        r.update(truncated=i % 4 == 0, repetition=0.1)
        r["reference"].update(truncated=False, repetition=0.0)
    d = tmp_path / "eval"
    d.mkdir()
    atomic_write_jsonl(d / "results.jsonl", rows)
    atomic_write_json(d / "summary.json", {"model": "my-model", "reference": "gpt-4 predictions",
                                           "judge": {"kind": "exact"}, "prompt": {"name": "training"},
                                           **summarize(rows)})
    page = write_report(d).read_text()
    md = (d / "report.md").read_text()
    assert "cogumi eval report: eval" in page and "my-model" in page and "training" in page
    assert "truncated" in md and "25% (5) [ref 0%]" in md                # gsm8k: 5 of 20 hit max_new_tokens
    assert "outcomes.png" in md                                          # wins/ties/losses against the reference


def test_a_plain_training_dir_is_reported(tmp_path):
    d = tmp_path / "train-out"
    (d / "adapter").mkdir(parents=True)
    atomic_write_jsonl(d / "train_log.jsonl", [{"step": s, "loss": 2.0 / s} for s in range(1, 6)])
    atomic_write_json(d / "adapter" / "cogumi.json", {
        "kind": "adapter", "phase": "1a", "base": {"id": "tiny-base"}, "steps": 5, "tokens_seen": 1234,
        "losses": {"first": 2.0, "last": 0.4}, "wall_time_s": 12.0, "global_batch_size": 8,
        "red_flags": [{"level": "red", "code": "quantized-weights", "message": "base went through 4-bit"}]})
    page = write_report(d).read_text()
    assert "cogumi training report: train-out" in page and "tiny-base" in page and "2.000 -&gt; 0.400" in page
    assert "base went through 4-bit" in page and "data:image/png;base64" in page     # the loss curve
    assert (d / "report.md").exists()


def test_a_directory_of_nothing_says_what_it_needs(tmp_path):
    with pytest.raises(CogumiError, match="eval run dir.*cogumi train"):
        write_report(tmp_path)
