"""Phase 1B mining: losses only (never ties), targets, dedup, infra failures, decontamination."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cogumi.errors import DataError
from cogumi.failures import Decontaminator, GateItem, mine_failures, ngrams
from cogumi.io import read_jsonl
from cogumi.tiny import synthetic_gsm8k, synthetic_mbpp, write_jsonl


def row(task, task_id, prompt, *, correct, ref_correct, gold="", completion="bad", ref_completion="good",
        infra=None, ref_infra=None, ref_extracted=None):
    if infra or ref_infra:
        outcome, tie_kind = None, None
    elif correct and not ref_correct:
        outcome, tie_kind = "win", None
    elif ref_correct and not correct:
        outcome, tie_kind = "loss", None
    else:
        outcome, tie_kind = "tie", "both_right" if correct else "both_wrong"
    return {"task": task, "task_id": str(task_id), "prompt": prompt, "gold": gold, "completion": completion,
            "extracted": None, "correct": correct, "reason": "", "infra_error": infra,
            "reference": {"completion": ref_completion, "extracted": ref_extracted, "correct": ref_correct, "reason": "",
                          "infra_error": ref_infra},
            "outcome": outcome, "tie_kind": tie_kind, "judge": None}


def write_run(dir_: Path, rows, data_ident=None, split="train") -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    write_jsonl(dir_ / "results.jsonl", rows)
    tasks = {}
    for r in rows:
        tasks.setdefault(r["task"], {"n": 0})
        tasks[r["task"]]["n"] += 1
        if data_ident:
            tasks[r["task"]]["data"] = data_ident
    (dir_ / "summary.json").write_text(json.dumps({"model": "m", "reference": "r", "tasks": tasks, "split": split}))
    return dir_


GSM_GOLD = "2 + 3 = <<2+3=5>>5\n#### 5"


@pytest.fixture()
def mined_run(tmp_path):
    rows = [
        row("gsm8k", 0, "Ann has 2 pens. How many pens after 3 more are bought by her mother?", correct=False,
            ref_correct=True, gold=GSM_GOLD, ref_completion="Ann has 2+3=5 pens.\n#### 5"),      # loss -> ref
        row("gsm8k", 1, "Bob walks 4 miles per day for a week and then rests, how far did he walk?", correct=False,
            ref_correct=False, gold="4*7=28\n#### 28"),                                          # both wrong
        row("gsm8k", 2, "Cid bakes 12 pies and sells half of them on Monday at the fair in town.", correct=True,
            ref_correct=True, gold="#### 6"),                                                    # both right
        row("gsm8k", 3, "Dee earns 5 dollars an hour and works 8 hours on each of 3 days.", correct=True,
            ref_correct=False, gold="#### 120"),                                                 # win
        row("gsm8k", 4, "Eve reads 10 pages a night for 9 nights, how many pages are read?", correct=False,
            ref_correct=True, gold="#### 90", ref_infra="timeout"),                              # infra on ref
        row("mbpp", 601, "Write a function to add two numbers. assert add(1, 2) == 3", correct=False,
            ref_correct=True, gold="def add(a, b):\n    return a + b", infra="sandbox: OSError"),  # infra on model
        row("mbpp", 602, "Write a function to reverse a string. assert rev('ab') == 'ba'", correct=False,
            ref_correct=True, gold="def rev(s):\n    return s[::-1]",
            ref_completion="```python\ndef rev(s):\n    return s[::-1]\n```"),                      # loss -> ref
        row("humaneval", "HumanEval/7", 'def inc(x):\n    """Return x + 1."""\n', correct=False, ref_correct=True,
            gold="    return x + 1\n", ref_completion="    return x + 1\n",
            ref_extracted='def inc(x):\n    """Return x + 1."""\n    return x + 1\n'),              # loss, body only
    ]
    return write_run(tmp_path / "mine", rows)


def test_losses_only_targets_and_infra(mined_run, tmp_path):
    out = tmp_path / "p1b.jsonl"
    stats = mine_failures([mined_run], out, allow_test_split=True)     # HumanEval has only a test split
    rows = read_jsonl(out)
    assert [(r["source"].split(":")[0], r["task_id"]) for r in rows] == \
        [("gsm8k", "0"), ("mbpp", "602"), ("humaneval", "HumanEval/7")]
    assert all(r["failure_type"] == "loss" for r in rows)
    assert set(rows[0]) == {"instruction", "output", "source", "target_source", "task_id", "failure_type"}
    # no worked solution on record for GSM8K here: the reference's answer, verified right
    assert rows[0]["output"] == "Ann has 2+3=5 pens.\n#### 5" and rows[0]["source"] == "gsm8k:reference"
    assert rows[0]["target_source"] == "reference_verified"
    # MBPP's own code beats the reference's (equally right) answer
    assert rows[1]["output"] == "```python\ndef rev(s):\n    return s[::-1]\n```"
    assert rows[1]["target_source"] == "gold_solution"
    assert stats["test_split_items"] == 1 and stats["targets"] == {"reference_verified": 2, "gold_solution": 1}
    # a HumanEval body-only answer becomes the whole program that ran, fenced
    assert rows[2]["output"] == '```python\ndef inc(x):\n    """Return x + 1."""\n    return x + 1\n```'
    assert stats["infra_excluded"] == 2 and stats["written"] == 3
    assert stats["outcomes"] == {"loss": 3, "tie": 2, "win": 1}


def test_both_wrong_option_uses_gold(mined_run, tmp_path):
    out = tmp_path / "p1b.jsonl"
    stats = mine_failures([mined_run], out, include_both_wrong=True, allow_test_split=True)
    rows = {r["task_id"]: r for r in read_jsonl(out)}
    assert rows["1"]["failure_type"] == "both_wrong"
    assert rows["1"]["output"] == "4*7=28\n#### 28" and rows["1"]["source"] == "gsm8k:gold"
    assert "2" not in rows and "3" not in rows       # both-right ties and wins never
    assert stats["by_failure_type"] == {"loss": 3, "both_wrong": 1}


def test_gold_used_when_reference_wrong_under_loss(tmp_path):
    # an LLM judge can call a loss even though the reference's answer is not objectively right
    r = row("gsm8k", 0, "Ann has 2 pens and buys 3 more pens at the store, how many pens now?", correct=False,
            ref_correct=True, gold=GSM_GOLD)
    r["reference"]["correct"] = None
    run = write_run(tmp_path / "r", [r])
    mine_failures([run], tmp_path / "o.jsonl")
    assert read_jsonl(tmp_path / "o.jsonl")[0]["output"] == GSM_GOLD


def test_gold_solutions_come_from_the_recorded_data_file(tmp_path):
    """GSM8K rows carry only the gold number; the worked solution comes from the benchmark file."""
    items = synthetic_gsm8k("train")[:3]
    data = write_jsonl(tmp_path / "gsm_train.jsonl", items)
    rows = [row("gsm8k", i, it["question"], correct=False, ref_correct=False, gold=it["answer"].split("#### ")[1])
            for i, it in enumerate(items)]
    rows[0]["reference"]["correct"] = True                       # flexible-extracted right answer
    rows[0]["reference"].update(completion="The total is 7 apples.", extracted="7")
    rows[0]["outcome"], rows[0]["tie_kind"] = "loss", None
    run = write_run(tmp_path / "r", rows, data_ident=str(data))
    mine_failures([run], tmp_path / "o.jsonl", include_both_wrong=True)
    out = read_jsonl(tmp_path / "o.jsonl")
    # the reference was right by luck ("The total is 7 apples."): the benchmark's worked solution wins
    a0, b0 = items[0]["question"].split("What is ")[1].rstrip("?").split(" plus ")
    assert out[0]["output"] == f"{a0} + {b0} = {int(a0) + int(b0)}\n#### {int(a0) + int(b0)}"
    assert [r["target_source"] for r in out] == ["gold_solution"] * 3
    # worked solution, calculator annotations removed, ends with the answer line
    a, b = items[1]["question"].split("What is ")[1].rstrip("?").split(" plus ")
    assert out[1]["output"] == f"{a} + {b} = {int(a) + int(b)}\n#### {int(a) + int(b)}"
    assert out[1]["source"] == "gsm8k:gold"


def test_duplicates_across_results_files(tmp_path):
    a = row("mbpp", 610, "Write a function to square a number. assert sq(3) == 9", correct=False,
            ref_correct=True, gold="def sq(x):\n    return x*x")
    b = row("mbpp", 611, "Write  a function to SQUARE a number. assert sq(3) == 9", correct=False,
            ref_correct=True, gold="def sq(x):\n    return x*x")    # same text after normalising
    run1 = write_run(tmp_path / "r1", [a, b])
    run2 = write_run(tmp_path / "r2", [a])                           # same id again
    stats = mine_failures([run1, run2], tmp_path / "o.jsonl")
    assert stats["written"] == 1 and stats["duplicates"] == 2


def test_decontamination_by_id_and_ngram(tmp_path):
    gate_rows = [
        row("mbpp", 11, "Write a function to remove first and last occurrence of a given character from the string.",
            correct=True, ref_correct=True),
        row("gsm8k", 5, "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
            "muffins for her friends every day with four.", correct=True, ref_correct=True),
    ]
    gate = write_run(tmp_path / "gate", gate_rows, data_ident="test-file")
    mine_rows = [
        # same global id (MBPP ids are unique across splits) -> removed by id, text unrelated
        row("mbpp", 11, "Write a function to compute the nth triangular number quickly and exactly.",
            correct=False, ref_correct=True, gold="def t(n):\n    return n*(n+1)//2"),
        # GSM8K id 5 of a *different* data file is a different problem -> kept
        row("gsm8k", 5, "Tim has 4 cats and each cat eats 2 cans of food per day, how many cans in a week?",
            correct=False, ref_correct=True, gold="#### 56"),
        # a near-duplicate of the gate's GSM8K question embedded in a longer prompt -> removed by n-gram
        row("gsm8k", 9, "Question: Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning "
            "and bakes muffins for her friends every day with five. Answer step by step.",
            correct=False, ref_correct=True, gold="#### 9"),
    ]
    mine = write_run(tmp_path / "mine", mine_rows, data_ident="train-file")
    out = tmp_path / "o.jsonl"
    stats = mine_failures([mine], out, exclude=[gate])
    kept = [(r["source"].split(":")[0], r["task_id"]) for r in read_jsonl(out)]
    assert kept == [("gsm8k", "5")]
    assert stats["contaminated_by"] == {"id": 1, "ngram": 1}
    by = {c["task_id"]: c for c in stats["contaminated"]}
    assert by["11"]["by"] == "id" and by["9"]["by"] == "ngram" and by["9"]["overlap"] >= 0.5
    # the same gsm8k id from the *same* data file is the same problem -> removed by id
    same = write_run(tmp_path / "same", [mine_rows[1]], data_ident="test-file")
    stats = mine_failures([same], tmp_path / "o2.jsonl", exclude=[gate])
    assert stats["written"] == 0 and stats["contaminated_by"] == {"id": 1}
    # a stricter threshold lets the near-duplicate through only when overlap is below it
    stats = mine_failures([mine], tmp_path / "o3.jsonl", exclude=[gate], overlap=1.0)
    assert stats["contaminated_by"] == {"id": 1}


def test_exclude_benchmark_files_in_their_own_format(tmp_path):
    test_gsm = synthetic_gsm8k("test")
    gsm_file = write_jsonl(tmp_path / "gsm_test.jsonl", test_gsm)
    mbpp_test = synthetic_mbpp("test")
    mbpp_file = tmp_path / "mbpp_sanitized.json"      # sanitized layout: a JSON list with "prompt"
    mbpp_file.write_text(json.dumps([{"task_id": r["task_id"], "prompt": r["text"], "code": r["code"],
                                      "test_list": r["test_list"], "test_imports": []} for r in mbpp_test]))
    leaked = row("gsm8k", 77, test_gsm[3]["question"], correct=False, ref_correct=True, gold="#### 1")
    leaked_mbpp = row("mbpp", mbpp_test[0]["task_id"], "unrelated text here", correct=False, ref_correct=True,
                      gold="def f():\n    pass")
    run = write_run(tmp_path / "r", [leaked, leaked_mbpp])
    stats = mine_failures([run], tmp_path / "o.jsonl", exclude=[gsm_file, mbpp_file])
    assert stats["written"] == 0
    assert stats["contaminated_by"] == {"ngram": 1, "id": 1}


def test_ngrams_short_text_is_one_gram():
    assert ngrams("Hello, World", 8) == {("hello", "world")}
    assert len(ngrams(" ".join(str(i) for i in range(10)), 8)) == 3
    d = Decontaminator([GateItem("gsm8k", "0", "What is two plus two", "x", None)], ngram=8)
    assert d.match("gsm8k", "9", "what is TWO plus two?")["by"] == "ngram"
    assert d.match("gsm8k", "9", "what is two plus three") is None


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no results here"):
        mine_failures([tmp_path / "nope"], tmp_path / "o.jsonl")
    d = tmp_path / "noref"
    d.mkdir()
    write_jsonl(d / "results.jsonl", [{"task": "gsm8k", "task_id": "1", "prompt": "x"}])
    with pytest.raises(DataError, match="results.jsonl:1: .*--reference"):
        mine_failures([d], tmp_path / "o.jsonl")
    bad = write_jsonl(tmp_path / "weird.jsonl", [{"foo": 1}])
    run = write_run(tmp_path / "ok", [row("gsm8k", 0, "q", correct=False, ref_correct=True, gold="#### 1")])
    with pytest.raises(DataError, match="weird.jsonl: row 1 is neither"):
        mine_failures([run], tmp_path / "o.jsonl", exclude=[bad])
    assert not (tmp_path / "o.jsonl").exists()


def test_cli(mined_run, tmp_path, capsys):
    from cogumi.cli import main
    out = tmp_path / "cli.jsonl"
    assert main(["failures", str(mined_run), "--out", str(out), "--exclude", str(mined_run)]) == 0
    printed = capsys.readouterr().out
    # every loss is also a gate item here (same run excluded), so all are removed and reported
    assert "removed 3" in printed and "infrastructure failures excluded: 2" in printed
    assert out.read_text() == ""
    assert json.loads(Path(str(out) + ".stats.json").read_text())["written"] == 0
    assert main(["failures", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_prompt_template_is_not_evidence_of_overlap():
    """Short questions wrapped in the same instruction template must not all match each other."""
    from cogumi.evaluation.tasks import gsm8k_prompt
    names = ["Ava", "Ben", "Cy", "Dot", "Eli", "Fay"]
    gate = [GateItem("gsm8k", str(i), gsm8k_prompt(f"{n} has {i + 2} cats and buys {i + 4} more cats."), "g", None)
            for i, n in enumerate(names)]
    d = Decontaminator(gate, ngram=8, overlap=0.5)
    assert d.template                                        # the instruction text was recognised
    fresh = gsm8k_prompt("Kim bakes 7 pies for the fair and sells 3 of them at noon.")
    assert d.match("gsm8k", "99", fresh) is None
    leaked = gsm8k_prompt("Dot has 5 cats and buys 7 more cats.")     # gate item 3, verbatim
    hit = d.match("gsm8k", "99", leaked)
    assert hit["by"] == "ngram" and hit["gate_task_id"] == "3"


def test_test_split_items_are_refused_without_the_flag(tmp_path, capsys):
    from cogumi.cli import main
    rows = [row("gsm8k", 0, "Ann has 2 pens and buys 3 more pens at the store, how many now?", correct=False,
                ref_correct=True, gold=GSM_GOLD),
            row("mbpp", 12, "Write a function to add two numbers. assert add(1, 2) == 3", correct=False,
                ref_correct=True, gold="def add(a, b):\n    return a + b")]            # MBPP 11-510: test
    test_run = write_run(tmp_path / "test", rows, data_ident="/data/gsm8k/test.jsonl", split="test")
    out = tmp_path / "o.jsonl"
    with pytest.raises(DataError, match="2 of the 2 items to write are TEST-split items") as e:
        mine_failures([test_run], out)
    assert "--allow-test-split" in str(e.value) and "gsm8k/0" in str(e.value) and not out.exists()
    assert main(["failures", str(test_run), "--out", str(out)]) == 2 and not out.exists()
    assert "TEST-split" in capsys.readouterr().err
    assert main(["failures", str(test_run), "--out", str(out), "--allow-test-split"]) == 0
    assert len(read_jsonl(out)) == 2 and "TEST-split items (--allow-test-split)" in capsys.readouterr().out
    # train-split items of the same benchmarks are fine
    train = write_run(tmp_path / "train", [dict(rows[0]), dict(rows[1], task_id="620")],
                      data_ident="/data/gsm8k/train.jsonl", split="train")
    assert mine_failures([train], out)["written"] == 2


def test_nothing_written_is_said_plainly(mined_run, tmp_path):
    from cogumi.failures import format_stats
    stats = mine_failures([mined_run], tmp_path / "o.jsonl", exclude=[mined_run])
    text = format_stats(stats)
    assert "wrote 0 rows" in text and "(by task: ; targets: )" not in text


def test_gate_items_shared_by_two_evals_count_once(mined_run, tmp_path):
    """validate-base and validate-1a hold the same items: they are one set of gate items."""
    import shutil
    twin = tmp_path / "twin"
    shutil.copytree(mined_run, twin)
    stats = mine_failures([mined_run], tmp_path / "o.jsonl", exclude=[mined_run, twin])
    assert stats["gate_items"] == 8
