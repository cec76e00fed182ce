"""``cogumi demo --out DIR``: the whole plan on a tiny model, on CPU, in a few minutes.

What it does (the same code path as ``cogumi pipeline configs/pipeline/seed-plan.yaml``):
  1. builds a tiny Llama base and synthetic data in the benchmarks' own formats (``cogumi.demo_data``: GSM8K
     JSONL ending ``#### N``, MBPP full JSONL with asserts and the upstream id ranges, HumanEval JSONL),
     with disjoint train and test splits; the learning problem is built so greedy answers are decided by
     wide margins and the table is the same on every CPU (docs/benchmarks.md, "The demo on three CPU paths");
  2. a Phase 1A instruction file (``{instruction, response}``, standing in for the user's 600K rows) that
     covers only part of the skills -- numbers up to four, functions that add or subtract -- so Phase 1A
     leaves losses for the Phase 1B miner to find on the TRAIN splits;
  3. a reference predictions file standing in for GPT-4 (offline): the gold answers with a deterministic ~25%
     made wrong;
  4. runs ``configs/pipeline/demo-plan.yaml`` through ``cogumi.pipeline.run_pipeline``: preflight, baseline,
     train 1A, verify, merge, verify, validate, gate, mine, failures, train 1B on the merged 1A model, merge,
     validate, compare, gate, and the 4-bit incident reproduced (``cogumi.incident``);
  5. prints a short table (base -> Phase 1A -> Phase 1B), writes ``DIR/report.html`` and ``DIR/summary.json``
     (the pipeline's summary plus the demo's measured wall time).

``--resume`` continues an interrupted demo (the pipeline resumes; the data is rebuilt identically).
Failure modes: DIR exists and is not empty without --overwrite/--resume -> CogumiError.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from cogumi.demo_data import build_demo_data
from cogumi.errors import CogumiError
from cogumi.io import atomic_write_json

__all__ = ["build_demo_data", "demo_command", "format_demo_table", "write_plan"]

PLAN = Path(__file__).resolve().parents[2] / "configs" / "pipeline" / "demo-plan.yaml"


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------

_PLAN_PATHS = [("phase1a", "base_model"), ("phase1a", "data"), ("validation", "reference"), ("mining", "reference")]


def write_plan(out: Path, template: Path = PLAN) -> Path:
    """The demo plan with every path made absolute (data under OUT/data): OUT/plan.yaml."""
    import yaml

    from cogumi.config import load_yaml
    raw = load_yaml(template)
    for section, key in _PLAN_PATHS:
        if raw.get(section, {}).get(key):
            raw[section][key] = str((out / raw[section][key]).resolve())
    for section in ("validation", "mining"):
        for spec in (raw.get(section, {}).get("tasks") or {}).values():
            if spec.get("data"):
                spec["data"] = str((out / spec["data"]).resolve())
    for cfg_owner in (raw["phase1a"], raw["phase1b"]["train"]):
        cfg_owner["config"] = str((template.parent / cfg_owner["config"]).resolve())
    raw["run_dir"] = str(out.resolve())
    from cogumi.io import atomic_write_text
    return atomic_write_text(out / "plan.yaml", "# written by `cogumi demo` from configs/pipeline/demo-plan.yaml\n"
                             + yaml.safe_dump(raw, sort_keys=False))


def _console(line: str) -> None:
    """The demo's console: stage lines and the tables; every line also lands in its stage's log.txt."""
    text = str(line)
    stage_line = re.match(r"\[\d\d-", text) is not None
    verdict = text.startswith("gate ") and text.rstrip().endswith(("PASS", "FAIL")) or text.startswith("error")
    if stage_line or verdict or text.startswith("incident:") or "RED FLAG" in text and not text.startswith(("|", "[RED")):
        print(text, flush=True)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:3.0f}%"


def format_demo_table(summary: dict) -> str:
    val = (summary.get("results") or {}).get("validation") or {}
    phases = [(k, label) for k, label in (("base", "base"), ("1a", "Phase 1A"), ("1b", "Phase 1B")) if k in val]
    tasks = list(dict.fromkeys(t for k, _ in phases for t in val[k]))
    lines = ["accuracy on the validation (test) items, and wins/ties/losses against the reference:",
             f"{'task':<10}" + "".join(f"{label:>22}" for _, label in phases)]
    for t in tasks:
        cells = []
        for k, _ in phases:
            e = val[k].get(t) or {}
            cells.append(f"{_pct(e.get('accuracy'))} ({e.get('wins', 0)}/{e.get('ties', 0)}/{e.get('losses', 0)})")
        lines.append(f"{t:<10}" + "".join(f"{c:>22}" for c in cells))
    p1b = (summary.get("results") or {}).get("phase1b_set")
    if p1b:
        lines.append(f"Phase 1B set: {p1b.get('written')} rows from {p1b.get('candidates')} losses (ties never); "
                     f"{p1b.get('infra_excluded')} infrastructure failures excluded, {p1b.get('contaminated_removed')} "
                     f"removed by decontamination against the gate items")
    gates = (summary.get("results") or {}).get("gates") or {}
    if gates:
        lines.append("gates: " + ", ".join(f"{k} {'PASS' if v.get('passed') else 'FAIL'}" for k, v in gates.items()))
    return "\n".join(lines)


def demo_command(*, out: str | Path = "demo-run", overwrite: bool = False, resume: bool = False) -> int:
    """Build everything, run the demo plan, print the table, write OUT/report.html and OUT/summary.json."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise CogumiError(f"{out} exists and is not empty: pass --resume to continue that demo, or --overwrite "
                              "to start again")
    out.mkdir(parents=True, exist_ok=True)
    print(f"cogumi demo: building the tiny base and synthetic data in {out / 'data'}", flush=True)
    build_demo_data(out / "data")
    plan = write_plan(out)
    print(f"cogumi demo: running {plan} (the pipeline the seed plan runs; logs in {out}/stages/*/log.txt)", flush=True)
    import torch

    from cogumi.pipeline import run_pipeline
    # One intra-op thread: the tiny model's matrices are too small to gain from two, and on a machine whose
    # cores are busy with anything else, two spinning OpenMP threads made the same run 3x slower (measured:
    # 15 s vs 47 s for the test-sized plan under load; equal when idle).
    torch.set_num_threads(1)
    try:
        summary = run_pipeline(plan, resume=resume, run_dir=out, log=_console, capture_output=True)
    except CogumiError:
        _finish(out, t0)
        raise
    summary = _finish(out, t0)
    print()
    print(format_demo_table(summary))
    inc = (out / "stages" / "18-incident" / "incident.json")
    if inc.exists():
        print("the 4-bit incident, reproduced:")
        print(json.loads(inc.read_text())["table_text"])
    print(f"stages: {sum(1 for s in summary['stages'] if s['status'] == 'done')} done; "
          f"demo wall time {summary['demo']['wall_seconds']:.0f}s on {summary['demo']['cpus']} CPU core(s)")
    print(f"report: {out / 'report.html'}\nsummary: {out / 'summary.json'}")
    return 0


def _finish(out: Path, t0: float) -> dict:
    """Add the demo's measured wall time to OUT/summary.json and write the report (also after a stop)."""
    summary_path = out / "summary.json"
    if not summary_path.exists():
        return {}
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    import torch
    summary["demo"] = {"wall_seconds": round(time.time() - t0, 1), "cpus": len(os.sched_getaffinity(0)),
                       "torch_threads": torch.get_num_threads()}
    atomic_write_json(summary_path, summary)
    from cogumi.report import write_report
    write_report(out)
    return summary
