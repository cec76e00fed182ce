"""Success criteria and red flags for an eval summary (``cogumi gate``, and the pipeline's gate stage).

Features:
  * ``load_criteria(path)``: YAML, validated -- an unknown key, metric or a bad threshold is one
    ``ConfigError`` naming the file, the rule and the key.
  * ``check_gates(summary, criteria) -> GateResult``: each rule reads one metric of a group of tasks
    (counts are pooled, e.g. code = humaneval + mbpp) with its 95% Wilson interval.
      - ``criteria``: must hold for the gate to pass (``min`` / ``max``; ``expected: [lo, hi]`` alone
        means min=lo, max=hi).
      - ``red_flags``: STOP conditions (the model is broken, e.g. a corrupted merge); same keys.
  * Warnings that keep a verdict honest: n too small for the band to mean anything (the Wilson
    half-width exceeds half the band's width: n=50 gives about +/-13 points against a 20-point band),
    a threshold inside the interval (another sample could flip it), a value above the expected band
    (leakage or a judge problem?), items lost to infrastructure errors.

File format (see configs/criteria/phase1a.yaml)::

    name: phase1a
    criteria:
      - {name: gsm8k_ties, tasks: [gsm8k], metric: tie_rate, min: 0.60, expected: [0.60, 0.80]}
    red_flags:
      - {name: gsm8k_ties_collapsed, tasks: [gsm8k], metric: tie_rate, min: 0.50}

Failure modes: a task the rules need but the summary lacks, or a group with no judged item, fails
its criterion ("not measured"); it does not trigger a red flag (no evidence either way).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cogumi.errors import ConfigError
from cogumi.evaluation.stats import n_for_half_width, wilson_half_width, wilson_interval

TOP_KEYS = {"name", "description", "criteria", "red_flags"}
RULE_KEYS = {"name", "tasks", "metric", "min", "max", "expected", "description"}

# metric -> (numerator fields, denominator field) in a summary's per-task entry
METRICS = {
    "win_rate": (("wins",), "judged"),
    "tie_rate": (("ties",), "judged"),
    "loss_rate": (("losses",), "judged"),
    "not_loss_rate": (("wins", "ties"), "judged"),
    "accuracy": (("correct",), "checked"),
    "infra_error_rate": (("infra_errors",), "n"),
}


@dataclass
class Rule:
    name: str
    tasks: list[str]
    metric: str
    min: float | None = None
    max: float | None = None
    expected: tuple[float, float] | None = None
    description: str = ""


@dataclass
class Criteria:
    name: str
    rules: list[Rule]
    red_flags: list[Rule]
    description: str = ""
    source: str = "criteria"


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


@dataclass
class GateResult:
    name: str
    rows: list[GateRow]

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
                "rows": [asdict(r) for r in self.rows]}


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
    if lo is None and hi is None:
        raise ConfigError(f"{where}: give at least one of min, max or expected")
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"{where}: min {lo} is above max {hi}")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{where}.description: expected a string")
    return Rule(name=name, tasks=list(tasks), metric=raw["metric"], min=lo, max=hi, expected=expected,
                description=description)


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
    return Criteria(name=str(raw.get("name") or Path(source).stem), rules=sections["criteria"],
                    red_flags=sections["red_flags"], description=str(raw.get("description") or ""), source=source)


def load_criteria(path: str | Path) -> Criteria:
    from cogumi.config import load_yaml
    return parse_criteria(load_yaml(path), source=str(path))


# ---------------------------------------------------------------------------------------------
# checking
# ---------------------------------------------------------------------------------------------

def _task_count(entry: dict, fieldname: str) -> int:
    if fieldname == "judged" and "judged" not in entry:
        return sum(int(entry.get(k) or 0) for k in ("wins", "ties", "losses"))
    if fieldname == "checked" and "checked" not in entry:
        return int(entry.get("n") or 0)
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


def _infra_count(summary: dict, tasks: list[str]) -> int:
    return sum(int((summary.get("tasks") or {}).get(t, {}).get("infra_errors") or 0) for t in tasks)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _evaluate(rule: Rule, kind: str, summary: dict, seen_infra: dict) -> GateRow:
    k, n, missing = pooled(summary, rule.tasks, rule.metric)
    row = GateRow(name=rule.name, kind=kind, tasks=rule.tasks, metric=rule.metric, value=None, k=k, n=n, ci=None,
                  min=rule.min, max=rule.max, expected=rule.expected, status="")
    if missing or n == 0:
        row.reason = (f"task(s) not in the results: {', '.join(missing)}" if missing
                      else "no item was judged (all infrastructure errors?)")
        row.status = "fail" if kind == "criterion" else "unknown"
        return row
    row.value = k / n
    row.ci = wilson_interval(k, n)
    inside = (rule.min is None or row.value >= rule.min) and (rule.max is None or row.value <= rule.max)
    if kind == "criterion":
        row.status = "pass" if inside else "fail"
    else:
        row.status = "ok" if inside else "STOP"
    if not inside:
        bound = rule.min if rule.min is not None and row.value < rule.min else rule.max
        side = "below" if rule.min is not None and row.value < rule.min else "above"
        row.reason = f"{_pct(row.value)} is {side} {_pct(bound)}"
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
    infra = _infra_count(summary, rule.tasks)
    if infra and not seen_infra.get(tuple(rule.tasks)):
        seen_infra[tuple(rule.tasks)] = True
        out.append(f"{infra} item(s) had infrastructure errors (sandbox/endpoint) and are not counted")
    return out


def check_gates(summary: dict, criteria: Criteria | dict | str | Path) -> GateResult:
    """Evaluate ``criteria`` (a Criteria, a raw mapping, or a YAML path) against an eval summary."""
    if isinstance(criteria, (str, Path)):
        criteria = load_criteria(criteria)
    elif isinstance(criteria, dict):
        criteria = parse_criteria(criteria)
    seen_infra: dict = {}  # say "k items had infrastructure errors" once per group of tasks
    rows = [_evaluate(r, "criterion", summary, seen_infra) for r in criteria.rules]
    rows += [_evaluate(r, "red_flag", summary, seen_infra) for r in criteria.red_flags]
    return GateResult(name=criteria.name, rows=rows)


def format_gate_table(result: GateResult) -> str:
    lines = [f"gate {result.name}",
             f"{'rule':<34} {'tasks':<16} {'metric':<14} {'value':>6} {'95% CI':>11} {'n':>5}  {'needs':<14} status"]
    for r in result.rows:
        needs = []
        if r.min is not None:
            needs.append(f">={_pct(r.min)}")
        if r.max is not None:
            needs.append(f"<={_pct(r.max)}")
        value = _pct(r.value) if r.value is not None else "-"
        ci = f"{_pct(r.ci[0])}-{_pct(r.ci[1])}" if r.ci else "-"
        status = {"pass": "PASS", "fail": "FAIL", "ok": "ok", "STOP": "RED FLAG: STOP", "unknown": "unknown"}[r.status]
        label = r.name if r.kind == "criterion" else f"[red flag] {r.name}"
        lines.append(f"{label:<34} {'+'.join(r.tasks):<16} {r.metric:<14} {value:>6} {ci:>11} {r.n:>5}  "
                     f"{' '.join(needs):<14} {status}" + (f"  ({r.reason})" if r.reason else ""))
    for w in result.warnings:
        lines.append(f"warning: {w}")
    verdict = "PASS" if result.passed else ("STOP: red flag(s) " + ", ".join(r.name for r in result.red_flags)
                                            if result.red_flags else "FAIL")
    lines.append(f"gate {result.name}: {verdict}")
    return "\n".join(lines)
