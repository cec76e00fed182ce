"""The ``cogumi eval``, ``cogumi compare`` and ``cogumi gate`` verbs (argument handling and printing).

Features:
  * ``eval_command``: ``runner.run_eval`` plus a per-task table: n, wins / ties / losses with % and
    95% Wilson intervals, infrastructure errors, accuracy of both sides, and how many answers hit the
    token limit (``truncated_rate``) with the mean repetition of each side; the header names the prompt set.
  * ``compare_command RUN_A RUN_B``: paired comparison on the same items (matched by task + task_id;
    says how many matched and how many prompts differ), per task and overall: correctness of A vs B
    with the exact McNemar p-value, and how outcomes moved (e.g. tie -> loss).
  * ``gate_command RESULTS --criteria FILE``: ``gates.check_gates``; prints the pass/fail table and
    warnings; exit 1 on a failed criterion or a red flag.
RESULTS / RUN arguments accept an eval run dir, its results.jsonl or (gate) its summary.json.

Failure modes: a missing or malformed results/summary file -> ``DataError`` naming it; runs with no
item in common -> ``DataError``; gate failure -> ``GateFailed`` / ``RedFlagError`` (exit 1) after the
table is printed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from cogumi.errors import DataError, GateFailed, RedFlagError
from cogumi.evaluation.stats import mcnemar_exact, wilson_interval
from cogumi.io import read_jsonl

# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------


def _cell(k: int, n: int) -> str:
    if not n:
        return "-"
    lo, hi = wilson_interval(k, n)
    return f"{k} {100 * k / n:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}]"


def _pct(rate) -> str:
    return "-" if rate is None else f"{100 * rate:.0f}%"


def _finish_cell(truncated_rate, repetition_mean) -> str:
    """'15%/0.04': share of answers cut off at the token limit / mean repeated-4-gram share."""
    rep = "-" if repetition_mean is None else f"{repetition_mean:.2f}"
    return f"{_pct(truncated_rate)}/{rep}"


def format_eval_table(summary: dict) -> str:
    judge = summary.get("judge") or {}
    prompt = summary.get("prompt") or {}
    head = (f"model {summary.get('model')}  vs  reference {summary.get('reference') or '(none)'}  "
            f"judge {judge.get('kind')}{' ' + judge['model'] if judge.get('model') else ''}")
    if prompt:
        head += f"  prompts {prompt.get('name')} ({str(prompt.get('sha256', ''))[:12]})"
    lines = [head, "(counts, % of judged items, 95% Wilson interval; trunc/rep: share of answers cut off at "
                   "--max-new-tokens / mean share of repeated 4-grams)",
             f"{'task':<10} {'n':>4} {'judged':>6}  {'wins':<16} {'ties':<16} {'losses':<16} {'infra':>5}  "
             f"{'accuracy':<16} {'ref acc':>7}  {'trunc/rep':>9} {'ref t/r':>9}"]
    for task, t in (summary.get("tasks") or {}).items():
        ref_acc = t.get("reference_accuracy")
        ref_finish = "-" if summary.get("reference") is None else \
            _finish_cell(t.get("reference_truncated_rate"), t.get("reference_repetition_mean"))
        lines.append(
            f"{task:<10} {t['n']:>4} {t['judged']:>6}  {_cell(t['wins'], t['judged']):<16} "
            f"{_cell(t['ties'], t['judged']):<16} {_cell(t['losses'], t['judged']):<16} {t['infra_errors']:>5}  "
            f"{_cell(t['correct'], t['checked']):<16} {_pct(ref_acc):>7}  "
            f"{_finish_cell(t.get('truncated_rate'), t.get('repetition_mean')):>9} {ref_finish:>9}")
        if t["ties"]:
            extra = f"   ties: both right {t['ties_both_right']}, both wrong {t['ties_both_wrong']}"
            if judge.get("kind") == "llm":
                extra += f", judge orders disagreed {t.get('judge_disagreements', 0)}"
            lines.append(extra)
    return "\n".join(lines)


def eval_command(model, *, tasks, n=None, seed=0, data=None, reference=None, judge="exact", judge_model=None,
                 out, batch_size=32, max_new_tokens=512, base=None, endpoint=None, api_model=None, few_shot=0,
                 workers=None, timeout=10.0, overwrite=False, prompt=None) -> int:
    from cogumi.evaluation.runner import run_eval

    summary = run_eval(model, tasks=tasks, out=out, n=n, seed=seed, data=data, reference=reference, judge=judge,
                       judge_model=judge_model, batch_size=batch_size, max_new_tokens=max_new_tokens, base=base,
                       endpoint=endpoint, api_model=api_model, few_shot=few_shot, workers=workers, timeout=timeout,
                       overwrite=overwrite, prompt=prompt)
    print(format_eval_table(summary))
    print(f"results: {Path(out) / 'results.jsonl'}  summary: {Path(out) / 'summary.json'}")
    return 0


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------

def results_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "results.jsonl"
    if not p.exists():
        raise DataError(f"{path}: no results here (expected an eval run dir with results.jsonl, or the file)")
    return p


def read_results(path: str | Path) -> dict[tuple[str, str], dict]:
    p = results_file(path)
    table = {}
    for i, row in enumerate(read_jsonl(p), start=1):
        for key in ("task", "task_id", "correct"):
            if key not in row:
                raise DataError(f"{p}: row {i} has no {key!r}; is this a cogumi eval results.jsonl?")
        table[(str(row["task"]), str(row["task_id"]))] = row
    if not table:
        raise DataError(f"{p}: no rows")
    return table


def _paired(pairs: list[tuple[dict, dict]]) -> dict:
    both = [(a, b) for a, b in pairs if a["correct"] is not None and b["correct"] is not None]
    a_only = sum(1 for a, b in both if a["correct"] and not b["correct"])
    b_only = sum(1 for a, b in both if b["correct"] and not a["correct"])
    moves = Counter(f"{a.get('outcome')}->{b.get('outcome')}" for a, b in pairs
                    if a.get("outcome") is not None and b.get("outcome") is not None and a["outcome"] != b["outcome"])
    outcomes = lambda side: dict(Counter(r.get("outcome") for r in side if r.get("outcome")))  # noqa: E731
    return {
        "matched": len(pairs), "paired": len(both), "excluded_infra": len(pairs) - len(both),
        "a_correct": sum(1 for a, _ in both if a["correct"]), "b_correct": sum(1 for _, b in both if b["correct"]),
        "both_right": sum(1 for a, b in both if a["correct"] and b["correct"]),
        "both_wrong": sum(1 for a, b in both if not a["correct"] and not b["correct"]),
        "a_only_right": a_only, "b_only_right": b_only, "p_value": mcnemar_exact(a_only, b_only),
        "a_outcomes": outcomes(a for a, _ in pairs), "b_outcomes": outcomes(b for _, b in pairs),
        "outcome_moves": dict(moves),
    }


def compare_runs(run_a: str | Path, run_b: str | Path) -> dict:
    a, b = read_results(run_a), read_results(run_b)
    keys = [k for k in a if k in b]
    if not keys:
        raise DataError(f"{run_a} and {run_b} have no item in common (matched by task + task_id); "
                        f"were they run on the same data with the same --n/--seed?")
    tasks = list(dict.fromkeys(k[0] for k in keys))
    per_task = {t: _paired([(a[k], b[k]) for k in keys if k[0] == t]) for t in tasks}
    return {
        "run_a": str(run_a), "run_b": str(run_b), "matched": len(keys),
        "only_a": len(a) - len(keys), "only_b": len(b) - len(keys),
        "prompt_mismatches": sum(1 for k in keys if a[k].get("prompt") != b[k].get("prompt")),
        "tasks": per_task, "overall": _paired([(a[k], b[k]) for k in keys]),
    }


def format_compare_table(result: dict) -> str:
    lines = [f"A = {result['run_a']}", f"B = {result['run_b']}",
             f"matched {result['matched']} items by task + task_id (only in A: {result['only_a']}, only in B: "
             f"{result['only_b']})"]
    if result["prompt_mismatches"]:
        lines.append(f"warning: {result['prompt_mismatches']} matched items have different prompts (different "
                     f"data, few-shot or prompt version?): the pairing may not compare like with like")
    lines.append(f"{'task':<10} {'paired':>6} {'A right':>12} {'B right':>12} {'only A':>7} {'only B':>7} "
                 f"{'p (exact McNemar)':>18}")
    for name, r in list(result["tasks"].items()) + [("overall", result["overall"])]:
        pct = lambda k: f"{k} ({100 * k / r['paired']:.0f}%)" if r["paired"] else "-"  # noqa: E731
        lines.append(f"{name:<10} {r['paired']:>6} {pct(r['a_correct']):>12} {pct(r['b_correct']):>12} "
                     f"{r['a_only_right']:>7} {r['b_only_right']:>7} {r['p_value']:>18.4g}")
        if r["excluded_infra"]:
            lines.append(f"   {r['excluded_infra']} item(s) left out: infrastructure error on a side")
        if r["outcome_moves"]:
            moves = ", ".join(f"{k} {v}" for k, v in sorted(r["outcome_moves"].items()))
            lines.append(f"   outcomes A {r['a_outcomes']} -> B {r['b_outcomes']}; moved: {moves}")
    return "\n".join(lines)


def compare_command(run_a, run_b, *, as_json=False) -> int:
    result = compare_runs(run_a, run_b)
    print(json.dumps(result, indent=2) if as_json else format_compare_table(result))
    return 0


# ---------------------------------------------------------------------------------------------
# gate
# ---------------------------------------------------------------------------------------------

def load_summary(path: str | Path) -> dict:
    """summary.json of an eval run (dir, summary.json, or results.jsonl beside it / recomputed from it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    elif p.name.endswith(".jsonl"):
        if (p.parent / "summary.json").exists():
            p = p.parent / "summary.json"
        else:
            from cogumi.evaluation.runner import summarize
            return summarize(list(read_results(p).values()))
    if not p.exists():
        raise DataError(f"{path}: no summary.json (is the eval finished? rerun `cogumi eval` with the same --out)")
    try:
        summary = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("tasks"), dict):
        raise DataError(f"{p}: not an eval summary (no 'tasks' mapping)")
    return summary


def gate_command(results, *, criteria, as_json=False, base=None) -> int:
    from cogumi.evaluation.gates import base_on_same_items, check_gates, fidelity_of, format_gate_table, load_criteria

    rules = load_criteria(criteria)
    summary = load_summary(results)
    base_summary, base_label = None, "base model"
    if base:       # the base's eval, recounted on exactly this eval's items
        run_dir = lambda p: Path(p).parent if Path(p).is_file() else Path(p)  # noqa: E731
        base_summary, base_label = base_on_same_items(run_dir(base), run_dir(results))
    result = check_gates(summary, rules, base=base_summary, base_label=base_label,
                         fidelity=fidelity_of(summary.get("model")))
    print(json.dumps(result.as_dict(), indent=2) if as_json else format_gate_table(result))
    if result.red_flags:
        raise RedFlagError(f"gate {result.name}: red flag(s) {', '.join(r.name for r in result.red_flags)}: STOP. "
                           f"Do not ship this model; see the table above (each red flag's likeliest cause).")
    if not result.passed:
        failed = [r.name for r in result.rows if r.kind == "criterion" and r.status != "pass"]
        raise GateFailed(f"gate {result.name}: failed {', '.join(failed)}")
    return 0
