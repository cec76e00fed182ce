"""Success criteria and red flags for an eval summary (``cogumi gate``, and the pipeline's gate stages).

Features:
  * ``load_criteria(path)``: YAML, validated -- an unknown key, metric or a bad threshold is one
    ``ConfigError`` naming the file, the rule and the key.
  * ``check_gates(summary, criteria, base=None, fidelity=None) -> GateResult``: each rule reads one
    metric of a group of tasks (counts are pooled, e.g. code = humaneval + mbpp) with its 95% Wilson
    interval.
      - ``criteria``: must hold for the gate to pass (``min`` / ``max``; ``expected: [lo, hi]`` alone
        means min=lo, max=hi).
      - ``red_flags``: STOP conditions (the model is broken, e.g. a corrupted merge); same keys.
  * A weak reference cannot pass a model: the criteria file declares what its bands assume of the
    reference (``reference: {assumes: GPT-4, min_accuracy: {gsm8k: 0.8, ...}}``); a tie-based rule
    (tie_rate, not_loss_rate, ties_both_*) is not passed when the reference's own accuracy on those
    items is below that floor ("reference too weak to judge ties"): against a reference that is itself
    wrong, a tie is a shared failure. A rule's ``reference_min_accuracy`` sets a floor for any metric
    measured against the reference (wins too). Unknown reference accuracy is not passed either.
  * Base-relative bounds: ``above_base: d`` (the value may exceed the base's on the same items by at most
    d) and ``below_base: d`` (may fall below it by at most d), checked when the base's eval is given.
  * Attribution: with the base's eval on the same items and the merge's fidelity result, every rule that
    does not pass says the likeliest cause -- the base already scores this; the merge diverged from the
    adapter; the fine-tune made it worse -- with the base's value and the fidelity result in the words.
  * Warnings that keep a verdict honest: n too small for the band to mean anything (the Wilson
    half-width exceeds half the band's width: n=50 gives about +/-13 points against a 20-point band),
    a threshold inside the interval (another sample could flip it), a value above the expected band
    (leakage or a judge problem?), items lost to infrastructure errors.

Metrics: win_rate, tie_rate, loss_rate, not_loss_rate, ties_both_right_rate, ties_both_wrong_rate
(of judged items), accuracy (of checked items), reference_accuracy, truncated_rate (generations that hit
max_new_tokens without a stop: a model that loops), infra_error_rate. docs/gates.md has the semantics.

File format (see configs/criteria/phase1a.yaml)::

    name: phase1a
    reference: {assumes: GPT-4, min_accuracy: {gsm8k: 0.80}}
    criteria:
      - {name: gsm8k_ties, tasks: [gsm8k], metric: tie_rate, min: 0.60, expected: [0.60, 0.80]}
    red_flags:
      - {name: gsm8k_ties_collapsed, tasks: [gsm8k], metric: tie_rate, min: 0.50}
      - {name: looping, tasks: [gsm8k], metric: truncated_rate, max: 0.5, above_base: 0.2}

Failure modes: a task the rules need but the summary lacks, or a group with no judged item, fails
its criterion ("not measured"); it does not trigger a red flag (no evidence either way). An eval with no
reference is told as such, never as infrastructure errors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cogumi.errors import ConfigError
from cogumi.evaluation.stats import n_for_half_width, wilson_half_width, wilson_interval

TOP_KEYS = {"name", "description", "criteria", "red_flags", "reference"}
RULE_KEYS = {"name", "tasks", "metric", "min", "max", "expected", "description", "above_base", "below_base",
             "reference_min_accuracy"}
REFERENCE_KEYS = {"assumes", "min_accuracy", "description"}

# metric -> (numerator fields, denominator field) in a summary's per-task entry
METRICS = {
    "win_rate": (("wins",), "judged"),
    "tie_rate": (("ties",), "judged"),
    "loss_rate": (("losses",), "judged"),
    "not_loss_rate": (("wins", "ties"), "judged"),
    "ties_both_right_rate": (("ties_both_right",), "judged"),
    "ties_both_wrong_rate": (("ties_both_wrong",), "judged"),
    "accuracy": (("correct",), "checked"),
    "reference_accuracy": (("reference_correct",), "reference_checked"),
    "truncated_rate": (("truncated",), "truncation_known"),
    "infra_error_rate": (("infra_errors",), "n"),
}
# measured against the reference: meaningless when the reference itself is wrong
REFERENCE_RELATIVE = {"win_rate", "tie_rate", "loss_rate", "not_loss_rate", "ties_both_right_rate",
                      "ties_both_wrong_rate"}
# a tie (or not losing) means "as good as the reference" only while the reference is right: the file's
# reference floors apply to these; a rule's own reference_min_accuracy applies to any REFERENCE_RELATIVE one
TIE_BASED = {"tie_rate", "not_loss_rate", "ties_both_right_rate", "ties_both_wrong_rate"}
HIGHER_IS_WORSE = {"loss_rate", "ties_both_wrong_rate", "truncated_rate", "infra_error_rate"}


@dataclass
class Rule:
    name: str
    tasks: list[str]
    metric: str
    min: float | None = None
    max: float | None = None
    expected: tuple[float, float] | None = None
    description: str = ""
    above_base: float | None = None
    below_base: float | None = None
    reference_min_accuracy: float | None = None


@dataclass
class Criteria:
    name: str
    rules: list[Rule]
    red_flags: list[Rule]
    description: str = ""
    source: str = "criteria"
    reference_assumes: str = ""                                    # e.g. "GPT-4"
    reference_floor: dict[str, float] = field(default_factory=dict)  # task -> min reference accuracy ("*": all)

    def tasks(self) -> set[str]:
        return {t for r in self.rules + self.red_flags for t in r.tasks}


@dataclass
class GateRow:
    name: str
    kind: str                    # "criterion" | "red_flag"
    tasks: list[str]
    metric: str
    value: float | None
    k: int
    n: int
    ci: tuple[float, float] | None
    min: float | None
    max: float | None
    expected: tuple[float, float] | None
    status: str                  # criterion: "pass"/"fail"; red flag: "ok"/"STOP"/"unknown"
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    base_value: float | None = None      # the base on the same items, when its eval is given
    base_k: int | None = None
    base_n: int | None = None
    cause: str = ""                      # the likeliest cause, for a rule that does not pass


@dataclass
class GateResult:
    name: str
    rows: list[GateRow]
    base: str | None = None              # what the base-relative numbers come from
    fidelity: str | None = None          # the merge's fidelity result, in words

    @property
    def criteria_passed(self) -> bool:
        return all(r.status == "pass" for r in self.rows if r.kind == "criterion")

    @property
    def red_flags(self) -> list[GateRow]:
        return [r for r in self.rows if r.kind == "red_flag" and r.status == "STOP"]

    @property
    def passed(self) -> bool:
        return self.criteria_passed and not self.red_flags

    @property
    def warnings(self) -> list[str]:
        return [f"{r.name}: {w}" for r in self.rows for w in r.warnings]

    def as_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "criteria_passed": self.criteria_passed,
                "red_flags": [r.name for r in self.red_flags], "warnings": self.warnings,
                "base": self.base, "fidelity": self.fidelity, "rows": [asdict(r) for r in self.rows]}


# ---------------------------------------------------------------------------------------------
# loading and validation
# ---------------------------------------------------------------------------------------------

def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{where}: expected a rate between 0 and 1 (e.g. 0.6 for 60%), got {value!r}")
    return float(value)


def _rule(raw: Any, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {sorted(RULE_KEYS)}")
    for key in raw:
        if key not in RULE_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(RULE_KEYS))})")
    for key in ("name", "tasks", "metric"):
        if key not in raw:
            raise ConfigError(f"{where}: missing key {key!r}")
    name = raw["name"]
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: expected a non-empty string")
    where = f"{where} ({name})"
    tasks = [raw["tasks"]] if isinstance(raw["tasks"], str) else raw["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"{where}.tasks: expected a task name or a list of them, e.g. [humaneval, mbpp]")
    if raw["metric"] not in METRICS:
        raise ConfigError(f"{where}.metric: unknown metric {raw['metric']!r} (allowed: {', '.join(METRICS)})")
    lo = _number(raw["min"], f"{where}.min") if raw.get("min") is not None else None
    hi = _number(raw["max"], f"{where}.max") if raw.get("max") is not None else None
    expected = None
    if raw.get("expected") is not None:
        e = raw["expected"]
        if not isinstance(e, list) or len(e) != 2:
            raise ConfigError(f"{where}.expected: expected [low, high], e.g. [0.6, 0.8]")
        expected = (_number(e[0], f"{where}.expected[0]"), _number(e[1], f"{where}.expected[1]"))
        if expected[0] > expected[1]:
            raise ConfigError(f"{where}.expected: low {expected[0]} is above high {expected[1]}")
        if lo is None and hi is None:
            lo, hi = expected
    above = _number(raw["above_base"], f"{where}.above_base") if raw.get("above_base") is not None else None
    below = _number(raw["below_base"], f"{where}.below_base") if raw.get("below_base") is not None else None
    if lo is None and hi is None and above is None and below is None:
        raise ConfigError(f"{where}: give at least one of min, max, expected, above_base or below_base")
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"{where}: min {lo} is above max {hi}")
    floor = raw.get("reference_min_accuracy")
    if floor is not None:
        floor = _number(floor, f"{where}.reference_min_accuracy")
        if raw["metric"] not in REFERENCE_RELATIVE:
            raise ConfigError(f"{where}.reference_min_accuracy: only for metrics measured against the reference "
                              f"({', '.join(sorted(REFERENCE_RELATIVE))})")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{where}.description: expected a string")
    return Rule(name=name, tasks=list(tasks), metric=raw["metric"], min=lo, max=hi, expected=expected,
                description=description, above_base=above, below_base=below, reference_min_accuracy=floor)


def _reference_section(raw: Any, source: str) -> tuple[str, dict[str, float]]:
    if raw is None:
        return "", {}
    where = f"{source}: reference"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {sorted(REFERENCE_KEYS)}, e.g. "
                          "{assumes: GPT-4, min_accuracy: {gsm8k: 0.8}}")
    for key in raw:
        if key not in REFERENCE_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(REFERENCE_KEYS))})")
    floors = raw.get("min_accuracy")
    if isinstance(floors, (int, float)) and not isinstance(floors, bool):
        out = {"*": _number(floors, f"{where}.min_accuracy")}
    elif isinstance(floors, dict) and floors:
        out = {str(t): _number(v, f"{where}.min_accuracy.{t}") for t, v in floors.items()}
    else:
        raise ConfigError(f"{where}.min_accuracy: expected a rate, or task -> rate (e.g. {{gsm8k: 0.8}})")
    return str(raw.get("assumes") or "the reference"), out


def parse_criteria(raw: Any, source: str = "criteria") -> Criteria:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with keys {sorted(TOP_KEYS)}")
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"{source}: unknown top-level key {key!r} (allowed: {', '.join(sorted(TOP_KEYS))})")
    sections = {}
    for section in ("criteria", "red_flags"):
        items = raw.get(section) or []
        if not isinstance(items, list):
            raise ConfigError(f"{source}: {section} must be a list of rules")
        sections[section] = [_rule(r, f"{source}: {section}[{i}]") for i, r in enumerate(items)]
    rules = sections["criteria"] + sections["red_flags"]
    if not rules:
        raise ConfigError(f"{source}: no criteria and no red_flags; nothing to check")
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{source}: rule name(s) used twice: {', '.join(dupes)}")
    assumes, floors = _reference_section(raw.get("reference"), source)
    return Criteria(name=str(raw.get("name") or Path(source).stem), rules=sections["criteria"],
                    red_flags=sections["red_flags"], description=str(raw.get("description") or ""), source=source,
                    reference_assumes=assumes, reference_floor=floors)


def load_criteria(path: str | Path) -> Criteria:
    from cogumi.config import load_yaml
    return parse_criteria(load_yaml(path), source=str(path))


def as_criteria(criteria: Criteria | dict | str | Path) -> Criteria:
    if isinstance(criteria, (str, Path)):
        return load_criteria(criteria)
    if isinstance(criteria, dict):
        return parse_criteria(criteria)
    return criteria


# ---------------------------------------------------------------------------------------------
# counting
# ---------------------------------------------------------------------------------------------

def _derived_total(entry: dict, count_key: str, rate_key: str, fallback: str) -> int:
    """A denominator the summary does not store: count / rate when the rate is positive, else ``fallback``."""
    k, rate = entry.get(count_key), entry.get(rate_key)
    if isinstance(k, (int, float)) and isinstance(rate, (int, float)) and rate > 0:
        return int(round(k / rate))
    return _task_count(entry, fallback)


def _task_count(entry: dict, fieldname: str) -> int:
    if fieldname == "judged" and "judged" not in entry:
        return sum(int(entry.get(k) or 0) for k in ("wins", "ties", "losses"))
    if fieldname == "checked" and "checked" not in entry:
        return int(entry.get("n") or 0)
    if fieldname == "reference_checked" and "reference_checked" not in entry:
        if entry.get("reference_correct") is None:
            return 0
        return _derived_total(entry, "reference_correct", "reference_accuracy", "judged")
    if fieldname == "truncation_known" and "truncation_known" not in entry:
        if entry.get("truncated_rate") is None:
            return 0
        return _derived_total(entry, "truncated", "truncated_rate", "n")
    return int(entry.get(fieldname) or 0)


def pooled(summary: dict, tasks: list[str], metric: str) -> tuple[int, int, list[str]]:
    """(k, n, missing tasks) for a metric pooled over tasks."""
    numerators, denominator = METRICS[metric]
    per_task = summary.get("tasks") or {}
    k = n = 0
    missing = []
    for task in tasks:
        entry = per_task.get(task)
        if entry is None:
            missing.append(task)
            continue
        k += sum(_task_count(entry, f) for f in numerators)
        n += _task_count(entry, denominator)
    return k, n, missing


def reference_accuracy(summary: dict, task: str) -> tuple[int, int] | None:
    """(right, judged) of the reference on the items judged for ``task``. With the exact judge that is
    losses + both-right ties (a win means the reference was wrong); otherwise the recorded accuracy."""
    entry = (summary.get("tasks") or {}).get(task) or {}
    judged = _task_count(entry, "judged")
    if (summary.get("judge") or {}).get("kind", "exact") == "exact" and "ties_both_right" in entry and judged:
        return int(entry.get("losses") or 0) + int(entry["ties_both_right"]), judged
    n = _task_count(entry, "reference_checked")
    return (int(entry.get("reference_correct") or 0), n) if n else None


def _infra_count(summary: dict, tasks: list[str]) -> int:
    return sum(int((summary.get("tasks") or {}).get(t, {}).get("infra_errors") or 0) for t in tasks)


def _has_reference(summary: dict) -> bool:
    if summary.get("reference"):
        return True
    return any(e.get("judged") or e.get("wins") or e.get("ties") or e.get("losses") or
               e.get("reference_correct") is not None for e in (summary.get("tasks") or {}).values())


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _frac(k: int, n: int) -> str:
    return f"{k}/{n} ({_pct(k / n)})" if n else "-"


# ---------------------------------------------------------------------------------------------
# checking
# ---------------------------------------------------------------------------------------------

def _not_measured(rule: Rule, summary: dict, missing: list[str]) -> str:
    if missing:
        return f"task(s) not in the results: {', '.join(missing)}"
    if rule.metric in REFERENCE_RELATIVE | {"reference_accuracy"} and not _has_reference(summary):
        return ("the eval has no reference, so there are no wins/ties/losses: run `cogumi eval --reference ...` "
                "(GPT-4: --reference openai:gpt-4)")
    if rule.metric == "truncated_rate":
        return "the eval does not record truncation (made by an older cogumi?): re-run the eval"
    infra = _infra_count(summary, rule.tasks)
    return f"no item was judged ({infra} infrastructure error(s))" if infra else "no item was judged"


def _weak_reference(rule: Rule, criteria: Criteria, summary: dict) -> str:
    """Why the reference cannot judge this rule (below the declared floor, or unknown), or ''."""
    if rule.metric not in REFERENCE_RELATIVE:
        return ""
    what = "ties" if "tie" in rule.metric else "wins" if "win" in rule.metric else "losses"
    problems = []
    for task in rule.tasks:
        floor = rule.reference_min_accuracy
        if floor is None and rule.metric in TIE_BASED:
            floor = criteria.reference_floor.get(task, criteria.reference_floor.get("*"))
        if floor is None:
            continue
        got = reference_accuracy(summary, task)
        if got is None:
            problems.append(f"its accuracy on {task} is not recorded (needs >= {_pct(floor)})")
        elif got[0] < floor * got[1]:
            problems.append(f"it got {_frac(*got)} of the {task} items right, below the {_pct(floor)} these bands "
                            f"assume of {criteria.reference_assumes or 'the reference'}")
    if not problems:
        return ""
    entry = [(summary.get("tasks") or {}).get(t) or {} for t in rule.tasks]
    both_wrong = sum(int(e.get("ties_both_wrong") or 0) for e in entry)
    ties = sum(int(e.get("ties") or 0) for e in entry)
    shared = f"; {both_wrong} of {ties} ties are both wrong" if ties else ""
    return (f"reference too weak to judge {what}: " + "; ".join(problems)
            + f" (against a reference that is itself wrong, a tie is a shared failure{shared})")


def _bounds(rule: Rule, value: float, base_value: float | None) -> tuple[bool, str, bool]:
    """(inside, why not, failed on a base-relative bound)."""
    if rule.min is not None and value < rule.min:
        return False, f"{_pct(value)} is below {_pct(rule.min)}", False
    if rule.max is not None and value > rule.max:
        return False, f"{_pct(value)} is above {_pct(rule.max)}", False
    if base_value is not None:
        if rule.above_base is not None and value > base_value + rule.above_base:
            return False, (f"{_pct(value)} is {_pct(value - base_value)} above the base's {_pct(base_value)} on the "
                           f"same items (allowed: {_pct(rule.above_base)})"), True
        if rule.below_base is not None and value < base_value - rule.below_base:
            return False, (f"{_pct(value)} is {_pct(base_value - value)} below the base's {_pct(base_value)} on the "
                           f"same items (allowed: {_pct(rule.below_base)})"), True
    return True, "", False


def _evaluate(rule: Rule, kind: str, summary: dict, seen_infra: dict, criteria: Criteria,
              base: dict | None = None) -> GateRow:
    k, n, missing = pooled(summary, rule.tasks, rule.metric)
    row = GateRow(name=rule.name, kind=kind, tasks=rule.tasks, metric=rule.metric, value=None, k=k, n=n, ci=None,
                  min=rule.min, max=rule.max, expected=rule.expected, status="")
    fail = "fail" if kind == "criterion" else "unknown"
    if missing or n == 0:
        row.reason = _not_measured(rule, summary, missing)
        row.status = fail
        return row
    row.value = k / n
    row.ci = wilson_interval(k, n)
    if base is not None:
        bk, bn, bmissing = pooled(base, rule.tasks, rule.metric)
        if not bmissing and bn:
            row.base_k, row.base_n, row.base_value = bk, bn, bk / bn
    relative_only = rule.min is None and rule.max is None
    if relative_only and row.base_value is None:
        row.status = fail
        row.reason = "needs the base's eval on the same items (the pipeline's validate-base; `cogumi gate --base`)"
        return row
    inside, why, _ = _bounds(rule, row.value, row.base_value)
    weak = _weak_reference(rule, criteria, summary)
    if weak:
        row.status, row.reason = fail, weak
    elif kind == "criterion":
        row.status, row.reason = ("pass" if inside else "fail"), why
    else:
        row.status, row.reason = ("ok" if inside else "STOP"), why
    row.warnings = _warnings(rule, row, summary, seen_infra)
    return row


def _warnings(rule: Rule, row: GateRow, summary: dict, seen_infra: dict) -> list[str]:
    out = []
    if rule.expected is not None:
        width = rule.expected[1] - rule.expected[0]
        # Judged at the band's middle: how precisely n items can place a model that belongs in the band.
        mid = (rule.expected[0] + rule.expected[1]) / 2
        half = wilson_half_width(round(mid * row.n), row.n)
        if width > 0 and half > width / 2:
            need = n_for_half_width(mid, width / 2)
            out.append(f"n={row.n} is too small for this band: the 95% interval is about +/-{100 * half:.0f} points, "
                       f"the band is {100 * width:.0f} points wide (about {need} items would fit the interval "
                       f"inside it)")
        if row.value > rule.expected[1]:
            out.append(f"{_pct(row.value)} is above the expected band {_pct(rule.expected[0])}-"
                       f"{_pct(rule.expected[1])}: good news, or test-set leakage / a lenient judge; look at the items")
    low, high = row.ci
    for threshold in (rule.min, rule.max):
        if threshold is not None and low < threshold < high:
            out.append(f"the 95% interval [{_pct(low)}, {_pct(high)}] contains the threshold {_pct(threshold)}: "
                       f"another sample of items could flip this verdict")
            break
    fresh = [t for t in rule.tasks if t not in seen_infra and _infra_count(summary, [t])]
    if fresh:                    # once per task, whichever rule reads it first
        seen_infra.update(dict.fromkeys(fresh, True))
        out.append(f"{_infra_count(summary, fresh)} {'+'.join(fresh)} item(s) had infrastructure errors "
                   "(sandbox/endpoint) and are not counted")
    return out


# ---------------------------------------------------------------------------------------------
# attribution
# ---------------------------------------------------------------------------------------------

def fidelity_words(fidelity: dict | None) -> str | None:
    """The merge's fidelity result (``cogumi.json``'s ``fidelity``) in words, or None when unknown."""
    if not isinstance(fidelity, dict) or not fidelity:
        return None
    if fidelity.get("skipped"):
        return "the merge's fidelity check was skipped (--no-fidelity)"
    detail = (f"KL {fidelity.get('kl_mean', float('nan')):.2g}, top-1 agreement "
              f"{fidelity.get('top1_agreement', float('nan')):.3f} with base + adapter unmerged")
    if fidelity.get("passed"):
        return f"the merge matches the adapter (fidelity check passed: {detail})"
    return f"the merge DIVERGED from the adapter (fidelity check failed: {detail})"


def _cause(rule: Rule, row: GateRow, base: dict | None, base_label: str, fidelity: dict | None) -> str:
    """The likeliest cause of a rule that does not pass, naming the base's score and the fidelity result."""
    fid = fidelity_words(fidelity)
    fid_failed = isinstance(fidelity, dict) and fidelity.get("passed") is False and not fidelity.get("skipped")
    base_text = ""
    if row.base_value is not None:
        base_text = (f"the base ({base_label}) scores {_frac(row.base_k, row.base_n)} on {rule.metric} on the same "
                     f"items, this model {_frac(row.k, row.n)}")
    facts = "; ".join(x for x in (base_text, fid) if x)
    if fid_failed:
        return f"likeliest cause: the merge diverged from the adapter -- {facts}. Re-merge; use the adapter unmerged meanwhile."
    if row.base_value is None:
        if base is None:
            return ("likeliest cause unknown: no base eval on the same items to compare with (the pipeline's "
                    "baseline: true runs one)" + (f"; {fid}" if fid else "; no fidelity result for the merge"))
        return "likeliest cause unknown: the base's eval lacks these tasks" + (f"; {fid}" if fid else "")
    _, _, relative = _bounds(rule, row.value, row.base_value)
    base_inside, _, _ = _bounds(Rule(**{**rule.__dict__, "above_base": None, "below_base": None}), row.base_value, None)
    better = row.base_value > row.value if rule.metric not in HIGHER_IS_WORSE else row.base_value < row.value
    if not relative and not base_inside and not better:
        return (f"likeliest cause: the base already scores this -- {facts}; fine-tuning did not cause it (the "
                "base fails the same rule). Check the prompt, the reference and the bands before the training.")
    if not relative and not base_inside:
        return (f"likeliest cause: the fine-tune made it worse, on a base that already fails this rule -- {facts}.")
    return (f"likeliest cause: the fine-tune made it worse -- {facts}. "
            + ("Look at the training data and recipe, not the merge." if fid
               else "No fidelity result: check the merge too (`cogumi verify`)."))


def check_gates(summary: dict, criteria: Criteria | dict | str | Path, *, base: dict | None = None,
                base_label: str = "base model", fidelity: dict | None = None) -> GateResult:
    """Evaluate ``criteria`` (a Criteria, a raw mapping, or a YAML path) against an eval summary.

    ``base``: the base model's eval summary on the same items (base-relative bounds, attribution);
    ``fidelity``: the merged model's fidelity result (``cogumi.json``'s ``fidelity``), for attribution."""
    criteria = as_criteria(criteria)
    seen_infra: dict = {}  # say "k items had infrastructure errors" once per task
    rows = []
    for kind, rules in (("criterion", criteria.rules), ("red_flag", criteria.red_flags)):
        for rule in rules:
            row = _evaluate(rule, kind, summary, seen_infra, criteria, base)
            if row.status in ("fail", "STOP") and row.value is not None and "reference too weak" not in row.reason:
                row.cause = _cause(rule, row, base, base_label, fidelity)
            rows.append(row)
    return GateResult(name=criteria.name, rows=rows, base=base_label if base is not None else None,
                      fidelity=fidelity_words(fidelity))


def format_gate_table(result: GateResult) -> str:
    has_base = any(r.base_value is not None for r in result.rows)
    lines = [f"gate {result.name}",
             f"{'rule':<34} {'tasks':<16} {'metric':<20} {'value':>6} {'95% CI':>11} {'n':>5}"
             + (f" {'base':>6}" if has_base else "") + f"  {'needs':<14} status"]
    for r in result.rows:
        needs = []
        if r.min is not None:
            needs.append(f">={_pct(r.min)}")
        if r.max is not None:
            needs.append(f"<={_pct(r.max)}")
        value = _pct(r.value) if r.value is not None else "-"
        base = (_pct(r.base_value) if r.base_value is not None else "-") if has_base else None
        ci = f"{_pct(r.ci[0])}-{_pct(r.ci[1])}" if r.ci else "-"
        status = {"pass": "PASS", "fail": "FAIL", "ok": "ok", "STOP": "RED FLAG: STOP", "unknown": "unknown"}[r.status]
        label = r.name if r.kind == "criterion" else f"[red flag] {r.name}"
        lines.append(f"{label:<34} {'+'.join(r.tasks):<16} {r.metric:<20} {value:>6} {ci:>11} {r.n:>5}"
                     + (f" {base:>6}" if has_base else "") + f"  {' '.join(needs):<14} {status}"
                     + (f"  ({r.reason})" if r.reason else ""))
        if r.cause:
            lines.append(f"    {r.cause}")
    for w in result.warnings:
        lines.append(f"warning: {w}")
    verdict = "PASS" if result.passed else ("STOP: red flag(s) " + ", ".join(r.name for r in result.red_flags)
                                            if result.red_flags else "FAIL")
    lines.append(f"gate {result.name}: {verdict}")
    return "\n".join(lines)


def stop_message(result: GateResult) -> str:
    """One message for the red flags that stop a run: each with its reason and likeliest cause."""
    return (f"gate {result.name}: red flag(s) {', '.join(r.name for r in result.red_flags)} -- "
            + " | ".join(f"{r.name}: {r.reason}" + (f"; {r.cause}" if r.cause else "") for r in result.red_flags))


def fail_message(result: GateResult) -> str:
    failed = [r for r in result.rows if r.kind == "criterion" and r.status != "pass"]
    return f"gate {result.name}: " + " | ".join(f"{r.name} {r.reason}" + (f"; {r.cause}" if r.cause else "")
                                                for r in failed)


# ---------------------------------------------------------------------------------------------
# the base on the same items, and the fidelity of the model under test
# ---------------------------------------------------------------------------------------------

def base_on_same_items(base_results: str | Path, candidate_results: str | Path) -> tuple[dict, str]:
    """The base's eval summary over exactly the candidate's items (matched by task + task_id), and a label
    saying how many matched. Raises DataError when they share no item."""
    from cogumi.errors import DataError
    from cogumi.evaluation.commands import read_results
    from cogumi.evaluation.runner import summarize
    base, cand = read_results(base_results), read_results(candidate_results)
    rows = [row for key, row in base.items() if key in cand]
    if not rows:
        raise DataError(f"{base_results} and {candidate_results} share no item (task + task_id): the base must be "
                        "evaluated on the same items to be compared")
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    summary = summarize(rows, tasks)
    label = f"base model {Path(base_results)}" + (f" ({len(rows)} of {len(cand)} items matched)"
                                                  if len(rows) != len(cand) else "")
    return summary, label


def fidelity_of(model: str | None) -> dict | None:
    """The fidelity result a merged model's ``cogumi.json`` records (None for anything else)."""
    if not model or not Path(str(model)).is_dir():
        return None
    from cogumi.errors import CogumiError
    from cogumi.lineage import read_manifest
    try:
        man = read_manifest(model) or {}
    except CogumiError:
        return None
    return man.get("fidelity") if man.get("kind") == "merged" else None
