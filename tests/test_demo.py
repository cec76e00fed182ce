"""End to end on the tiny model: the demo, the Phase 1B set's guarantees, and kill -9 + --resume.

One full ``cogumi demo`` (the acceptance run: the story -- Phase 1A beats the base on every task, Phase 1B
keeps or beats Phase 1A on every task and beats it overall, the gates pass -- report and summary written),
then a quick version of the same plan (fewer steps and items, via --set) run uninterrupted and killed at
seeded points (a stage start, a stage's end before its record, mid-training) and resumed: the adapters, merged
models, eval results and the Phase 1B set must equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path


from cogumi.io import read_jsonl

# One OpenMP thread per subprocess: the tiny model gains nothing from more, and when the suite's workers share
# the cores, spinning threads slow everything down several times.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
       "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def cogumi(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cogumi", *map(str, args)], env=env or ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_demo_end_to_end(tmp_path):
    """The acceptance run (one test, so parallel workers never run the demo twice)."""
    demo_run = tmp_path / "run"
    p = cogumi("demo", "--out", demo_run)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    check_whole_plan(demo_run, p.stdout)
    check_story(demo_run)
    check_phase1b_set(demo_run)
    # a second demo into the same dir is refused; --resume reuses every stage
    p = cogumi("demo", "--out", demo_run)
    assert p.returncode == 2 and "--resume" in p.stderr
    p = cogumi("demo", "--out", demo_run, "--resume")
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((demo_run / "summary.json").read_text())
    assert all(s["reused"] for s in summary["stages"]), [s["name"] for s in summary["stages"] if not s["reused"]]


def check_whole_plan(demo_run: Path, printed: str) -> None:
    summary = json.loads((demo_run / "summary.json").read_text())
    names = [s["name"] for s in summary["stages"]]
    assert names[:3] == ["preflight", "validate-base", "train-1a"] and names[-1] == "incident"
    assert all(s["status"] == "done" and isinstance(s["seconds"], float) for s in summary["stages"])
    assert summary["status"] == "done" and summary["demo"]["wall_seconds"] > 0
    page = (demo_run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "The 4-bit incident, reproduced" in page
    assert "Phase 1A" in printed and "Phase 1B" in printed and "report:" in printed
    # the incident is part of the demo, and cogumi verify flags the naive path
    incident = json.loads((demo_run / "stages/18-incident/incident.json").read_text())
    naive = next(r for r in incident["table"] if r["model"].startswith("naive merge"))
    assert naive["verify"].startswith("RED FLAG")


def check_story(demo_run: Path) -> None:
    """What the demo shows on every CPU (its answers are decided by wide margins, so the table is the same
    under every kernel path -- docs/benchmarks.md; this test runs under ATEN_CPU_CAPABILITY=default, avx2 and the
    native path in CI): the story, not the digits."""
    summary = json.loads((demo_run / "summary.json").read_text())
    val = summary["results"]["validation"]
    acc = {phase: {t: v["accuracy"] for t, v in tasks.items()} for phase, tasks in val.items()}
    assert set(acc["base"]) == set(acc["1a"]) == set(acc["1b"]) == {"gsm8k", "humaneval", "mbpp"}, acc
    for task in acc["base"]:
        assert acc["base"][task] < acc["1a"][task] <= acc["1b"][task], (task, acc)
    assert sum(acc["1b"].values()) > sum(acc["1a"].values()), acc
    gates = summary["results"]["gates"]
    assert gates and all(g["passed"] for g in gates.values()), gates
    compare = json.loads((demo_run / "stages/16-compare-1a-1b/compare.json").read_text())
    assert compare["overall"]["b_correct"] > compare["overall"]["a_correct"]
    assert compare["overall"]["p_value"] < 0.05


def check_phase1b_set(demo_run: Path) -> None:
    """No ties, no validation items, no infrastructure failures."""
    from cogumi.failures import Decontaminator, load_gate_items
    rows = read_jsonl(demo_run / "stages/10-failures-1a/phase1b.jsonl")
    assert rows and all(set(r) == {"instruction", "output", "source", "target_source", "task_id", "failure_type"}
                        for r in rows)
    assert {r["target_source"] for r in rows} <= {"gold_solution", "reference_verified", "gold_answer"}
    mined = {(r["task"], r["task_id"]): r for r in read_jsonl(demo_run / "stages/09-mine-1a/eval/results.jsonl")}
    for r in rows:
        task = r["source"].split(":")[0]
        src = mined[(task, r["task_id"])]
        assert src["outcome"] == "loss" and r["failure_type"] == "loss"          # never a tie, never a win
        assert src["infra_error"] is None and src["reference"]["infra_error"] is None
        assert r["instruction"] == src["prompt"]
    gate_dirs = [demo_run / "stages" / s / "eval" for s in ("07-validate-1a", "15-validate-1b")]
    gate = [it for d in gate_dirs for it in load_gate_items(d)]
    ids = {(g.task, g.task_id) for g in gate if g.task != "gsm8k"}      # GSM8K ids are per file (train != test)
    decon = Decontaminator(gate)
    for r in rows:
        task = r["source"].split(":")[0]
        assert (task, r["task_id"]) not in ids
        assert decon.match(task, r["task_id"], r["instruction"]) is None
    assert {r["instruction"] for r in rows}.isdisjoint({g.text for g in gate})


# ---------------------------------------------------------------------------------------------
# kill -9 at seeded points, then --resume: same artifacts as an uninterrupted run
# ---------------------------------------------------------------------------------------------

TRAIN_1A = ("[lora.r=16, lora.alpha=32, lora.dropout=0.0, training.max_steps=12, training.batch_size=8, "
            "training.grad_accum=1, training.learning_rate=0.01, training.warmup_steps=2, training.max_length=256, "
            "training.save_steps=5, training.logging_steps=2, data.holdout=4]")
TRAIN_1B = ("[phase=1b, lora.r=16, lora.alpha=32, lora.dropout=0.0, training.max_steps=4, training.batch_size=8, "
            "training.grad_accum=1, training.learning_rate=0.005, training.warmup_steps=1, training.max_length=256, "
            "training.save_steps=2, training.logging_steps=1, data.holdout=0]")


def quick_settings(home: Path) -> list[str]:
    """The demo plan made small: fewer steps, rows and items; no baseline, HumanEval or incident."""
    from cogumi.io import atomic_write_jsonl
    small = atomic_write_jsonl(home / "phase1a-small.jsonl", read_jsonl(home / "data" / "phase1a.jsonl")[:120])
    data = home / "data"
    return [f"phase1a.set={TRAIN_1A}", f"phase1b.train.set={TRAIN_1B}", f"phase1a.data={small}",
            "incident=false", "baseline=false", "validation.max_new_tokens=40",
            f"validation.tasks={{gsm8k: {{n: 6, data: {data}/gsm8k/test.jsonl}}, "
            f"mbpp: {{n: 4, data: {data}/mbpp/mbpp.jsonl, split: test}}}}",
            "mining.tasks.gsm8k.n=12", "mining.tasks.mbpp.n=8",
            "gate.criteria={criteria: [{name: items_judged, tasks: [gsm8k, mbpp], metric: infra_error_rate, max: 0.5}]}",
            "phase1b.stop_on_regression=false"]


def run_quick(plan: Path, run_dir: Path, *extra, env=None) -> subprocess.CompletedProcess:
    args = ["pipeline", plan, "--run-dir", run_dir, *extra]
    for s in quick_settings(plan.parent):
        args += ["--set", s]
    return cogumi(*args, env=env)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_artifacts(a: Path, b: Path) -> None:
    import torch
    for stage in ("03-train-1a/run/adapter", "05-merge-1a/merged", "11-train-1b/run/adapter", "13-merge-1b/merged"):
        ta, tb = _tensors(a / "stages" / stage), _tensors(b / "stages" / stage)
        assert ta.keys() == tb.keys() and ta, stage
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{stage}: {k} differs"
    for f in ("07-validate-1a/eval/results.jsonl", "09-mine-1a/eval/results.jsonl",
              "10-failures-1a/phase1b.jsonl", "11-train-1b/train-1b.jsonl", "15-validate-1b/eval/results.jsonl"):
        assert (a / "stages" / f).read_text() == (b / "stages" / f).read_text(), f
    for f in ("08-gate-1a/gate.json", "17-gate-1b/gate.json"):
        assert json.loads((a / "stages" / f).read_text()) == json.loads((b / "stages" / f).read_text()), f
    ca, cb = (json.loads((d / "stages/16-compare-1a-1b/compare.json").read_text()) for d in (a, b))
    assert ca["tasks"] == cb["tasks"] and ca["overall"] == cb["overall"]


# Every stage start, every stage end (work done, record not yet written), and optimizer steps inside training
# (checkpoints every 5 steps): the seeded draw picks one stage point and one training step per run of the suite.
KILL_POINTS = ([{"COGUMI_FAULT_KILL_AT": f"{s}{w}"} for s in ("preflight", "train-1a", "merge-1a",
                                                             "validate-1a", "mine-1a", "failures-1a", "train-1b",
                                                             "merge-1b", "validate-1b", "gate-1b") for w in ("", ":end")]
               + [{"COGUMI_FAULT_KILL_AT_STEP": str(k)} for k in (3, 7, 11)])
SEED = int(os.environ.get("COGUMI_KILL_SEED", "0"))
_rng = random.Random(SEED)
CHOSEN = [_rng.choice(KILL_POINTS[:-3]), _rng.choice(KILL_POINTS[-3:])]


def test_kill9_then_resume_equals_uninterrupted(tmp_path):
    """kill -9 at seeded points (COGUMI_KILL_SEED picks them), then --resume: the same artifacts."""
    from cogumi.demo import build_demo_data, write_plan
    build_demo_data(tmp_path / "data")
    plan = write_plan(tmp_path)
    reference = tmp_path / "uninterrupted"
    p = run_quick(plan, reference)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for i, fault in enumerate(CHOSEN):
        run_dir = tmp_path / f"killed-{i}"
        p = run_quick(plan, run_dir, env={**ENV, **fault})
        assert p.returncode == -signal.SIGKILL, (fault, p.stdout[-2000:] + p.stderr[-2000:])
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"   # nothing says done
        p = run_quick(plan, run_dir, "--resume")
        assert p.returncode == 0, (fault, p.stdout[-3000:] + p.stderr[-3000:])
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "done", fault
        assert any(s["restarted"] for s in summary["stages"]), fault
        assert_same_artifacts(reference, run_dir)
