"""Tasks: loading and selection, prompts, program assembly and checking (extraction: test_extract.py)."""

from __future__ import annotations

import json

import pytest

from cogumi.errors import ConfigError, DataError
from cogumi.evaluation import sandbox, tasks
from cogumi.evaluation.tasks import Item, build_messages, build_program, check, check_many, few_shot_pool, load_task
from cogumi.tiny import synthetic_gsm8k, synthetic_humaneval, synthetic_mbpp, write_jsonl


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

def test_load_gsm8k_ids_are_row_indices_and_selection_is_deterministic(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", synthetic_gsm8k("test"))
    items = load_task("gsm8k", str(path))
    assert [it.task_id for it in items] == [str(i) for i in range(30)]
    assert items[0].gold == synthetic_gsm8k("test")[0]["answer"].split("#### ")[1]
    assert "#### N" in items[0].prompt and items[0].data["question"] in items[0].prompt
    a = load_task("gsm8k", str(path), n=5, seed=1)
    assert [it.task_id for it in a] == [it.task_id for it in load_task("gsm8k", str(path), n=5, seed=1)]
    assert [int(it.task_id) for it in a] == sorted(int(it.task_id) for it in a)  # kept in file order
    assert [it.task_id for it in a] != [it.task_id for it in load_task("gsm8k", str(path), n=5, seed=2)]
    assert len(load_task("gsm8k", str(path), n=100)) == 30
    with pytest.raises(ConfigError):
        load_task("gsm8k", str(path), n=-1)


def test_bad_gsm8k_file_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1"}\n\n{"question": "b"}\n')
    with pytest.raises(DataError, match=rf"{path}:3: missing key\(s\) answer"):
        load_task("gsm8k", str(path))
    path.write_text('{"question": "a", "answer": "no final line"}\n')
    with pytest.raises(DataError, match=r":1: the answer has no final '#### N' line"):
        load_task("gsm8k", str(path))
    path.write_text('{"question": "a", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        load_task("gsm8k", str(path))
    with pytest.raises(DataError, match="file not found"):
        load_task("gsm8k", str(tmp_path / "missing.jsonl"))


def test_load_mbpp_full_splits_by_task_id(tmp_path):
    rows = synthetic_mbpp("test") + synthetic_mbpp("train")
    path = write_jsonl(tmp_path / "mbpp.jsonl", rows)
    test = load_task("mbpp", str(path))  # split="test" by default: task ids 11-510
    assert {int(it.task_id) for it in test} == {r["task_id"] for r in synthetic_mbpp("test")}
    assert {int(it.task_id) for it in load_task("mbpp", str(path), split="train")} == \
        {r["task_id"] for r in synthetic_mbpp("train")}
    assert len(load_task("mbpp", str(path), split=None)) == len(rows)
    item = test[0]
    assert item.gold == item.data["code"] and item.data["test_list"][0] in item.prompt
    assert "fenced code block" in item.prompt


def test_load_mbpp_sanitized_json_array(tmp_path):
    rows = [{"source_file": "x", "task_id": 11, "prompt": "Write a function double(x).",
             "code": "def double(x):\n    return x * 2", "test_imports": ["import math"],
             "test_list": ["assert math.isclose(double(2), 4)"]}]
    path = tmp_path / "sanitized.json"
    path.write_text(json.dumps(rows))
    items = load_task("mbpp", str(path))
    assert [it.task_id for it in items] == ["11"] and "Write a function double" in items[0].prompt
    with pytest.raises(DataError, match="looks like MBPP sanitized"):
        load_task("mbpp", str(path), variant="full")
    assert check(items[0], "```python\ndef double(x):\n    return math.floor(x * 2)\n```").correct  # test_imports first


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown task"):
        load_task("mmlu", "x")
    with pytest.raises(ConfigError, match="only mbpp has variants"):
        load_task("gsm8k", "x", variant="full")
    path = write_jsonl(tmp_path / "he.jsonl", synthetic_humaneval() + synthetic_humaneval()[:1])
    with pytest.raises(DataError, match="HumanEval/0' appears more than once"):
        load_task("humaneval", str(path))
    path = write_jsonl(tmp_path / "wrongtask.jsonl", synthetic_gsm8k("test"))
    with pytest.raises(DataError, match=r":1: missing key\(s\) task_id, prompt"):
        load_task("humaneval", str(path))


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------

def test_build_messages_with_and_without_few_shot(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", synthetic_gsm8k("test"))
    items = load_task("gsm8k", str(path))
    assert build_messages(items[5]) == [{"role": "user", "content": items[5].prompt}]
    msgs = build_messages(items[5], few_shot=2, shots=items[5:8])  # the item itself is never its own shot
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"] == items[6].prompt and msgs[-1]["content"] == items[5].prompt
    assert msgs[1]["content"].endswith(f"#### {items[6].gold}") and "<<" not in msgs[1]["content"]
    with pytest.raises(ConfigError, match="needs 2 example items"):
        build_messages(items[0], few_shot=2)


def test_few_shot_pools(tmp_path):
    rows = [dict(synthetic_mbpp("test")[0], task_id=i) for i in range(1, 11)]
    pool = few_shot_pool("mbpp", str(write_jsonl(tmp_path / "m.jsonl", rows)))
    assert [it.task_id for it in pool[:3]] == ["2", "3", "4"]  # upstream's 3-shot examples first
    with pytest.raises(ConfigError, match="no few-shot pool"):
        few_shot_pool("humaneval")


# ---------------------------------------------------------------------------------------------
# code extraction and assembly
# ---------------------------------------------------------------------------------------------

def _he_item(i=0):
    row = synthetic_humaneval()[i]
    return Item("humaneval", row["task_id"], tasks.humaneval_prompt(row), row["canonical_solution"], row)


def test_humaneval_continuation_and_restated_function_both_work():
    item = _he_item()
    row = item.data
    program, tests = build_program(item, row["canonical_solution"])
    assert program == row["prompt"] + row["canonical_solution"] and tests.rstrip().endswith(f"check({row['entry_point']})")
    restated = f"```python\n{row['prompt']}{row['canonical_solution']}```"
    wrong = f"```python\ndef {row['entry_point']}(x):\n    return -1\n```"
    results = check_many([item] * 4, [row["canonical_solution"], restated, wrong, "    pass\n"], workers=2)
    assert [c.correct for c in results] == [True, True, False, False]
    assert results[2].reason.startswith("AssertionError") and results[0].reason == "passed all tests"
    assert row["entry_point"] in results[1].extracted


def test_mbpp_runs_code_then_setup_then_asserts():
    # like MBPP tasks 367/927: the setup code builds objects of a class that the solution defines
    row = {"task_id": 367, "text": "Count the nodes of a linked list.",
           "code": "class Node:\n    def __init__(self, nxt=None):\n        self.nxt = nxt\n"
                   "def count(n):\n    return 0 if n is None else 1 + count(n.nxt)",
           "test_setup_code": "chain = Node(Node(Node()))", "test_list": ["assert count(chain) == 3"],
           "challenge_test_list": []}
    item = Item("mbpp", "367", tasks.mbpp_prompt(row), row["code"], row)
    job = tasks.build_job(item, row["code"])
    assert job.setup == "chain = Node(Node(Node()))" and job.tests.strip() == "assert count(chain) == 3"
    assert job.entry_points == ("Node", "count")  # the solution's names the setup and tests use
    assert check(item, row["code"]).correct
    assert check(item, "```python\n" + row["code"] + "\nif __name__ == '__main__':\n    input()\n```").correct


def test_infra_errors_are_not_wrong_answers(monkeypatch):
    monkeypatch.setattr(sandbox, "run_many",
                        lambda jobs, **kw: [sandbox.RunResult("infra_error", "sandbox: boom") for _ in jobs])
    c = check(_he_item(), "    return x\n")
    assert c.correct is None and c.infra_error == "sandbox: boom"


def test_check_many_keeps_order():
    items = [_he_item(i) for i in range(6)]
    comps = [it.data["canonical_solution"] if i % 2 == 0 else "    return None\n" for i, it in enumerate(items)]
    assert [c.correct for c in check_many(items, comps, workers=3)] == [True, False] * 3
    with pytest.raises(ValueError):
        check_many(items, comps[:2])


def test_a_huge_extracted_number_is_clipped_in_the_reason_not_in_the_value():
    item = Item("gsm8k", "0", "q", "5", {})
    check = tasks.check_gsm8k(item, "#### " + "9" * 500)
    assert check.extracted == "9" * 500 and check.correct is False
    assert len(check.reason) < 120 and "(500 characters)" in check.reason
