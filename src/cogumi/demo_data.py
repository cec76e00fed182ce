"""The demo's learning problem: synthetic GSM8K / MBPP / HumanEval items a tiny Llama learns with LoRA in
a couple of minutes on a CPU -- designed so that every greedy answer is decided by a wide margin, and so the
demo's table is the same on every machine (a CPU's last-bit arithmetic must not flip an answer).

Design (why each choice):
  * One token per word. The tiny base's tokenizer is trained on the demo's own texts (every prompt, answer
    and reference completion, rendered as evaluation renders them), so "seven", "mul" and every name are
    single tokens: an answer token depends on one prompt token, not on assembling five characters.
  * Every answer restates what it works on, then finishes with lookups. GSM8K: "six plus one is 7. #### 7"
    (copy the number word, then a one-token lookup). Code, MBPP and HumanEval alike: the whole function,
    "def mul_four(x): return x * 4": the name copied from the prompt, then a lookup on each of its two
    tokens a few positions back (``mul`` -> ``*``, ``four`` -> ``4``). Copying and lookups are what a
    2-layer model learns to a wide margin; and because code answers have one shape for both code tasks,
    what Phase 1B learns from MBPP's failures carries to HumanEval's items of the same operation.
  * A skill is an arithmetic fact or a function (operation, constant); test items are new problems of the
    skills (new names, objects and assert values around them), like a templated benchmark's. What a tiny
    model cannot do robustly is compose: test functions whose (operation, constant) pair no training row
    had were answered by lookups that won by hair's breadths, and flipped between CPUs.
  * Skills are all-or-nothing by construction. Phase 1A's data covers numbers up to ``PHASE1A_MAX`` and
    functions that add or subtract; the tests also ask larger numbers and multiplication. An item of a
    trained skill is answered with a wide margin, an item of an untrained one cannot be (its answer token
    never followed such a prompt), so Phase 1A's losses -- the ones the miner finds on the TRAIN splits --
    are exactly the untrained skills, and Phase 1B (those losses plus replayed Phase 1A rows) learns them.
  * Disjoint splits: test and train items use different names, objects and assert values, so no train text
    is a near-duplicate of a test text (the Phase 1B miner's decontamination has nothing to remove).
  * Rendered in one place: every training row's instruction is what ``cogumi.evaluation.tasks`` asks the
    model for that item (``load_task`` + ``build_messages`` on a benchmark-format file), so training and
    evaluation see the same prompt whatever the prompt templates say (all MBPP asserts, one, ...).

Features: ``build_demo_data(data_dir)`` writes the tiny base (its tokenizer trained on these texts) and every
file the demo plan names: GSM8K train/test JSONL, MBPP full JSONL (test ids 11-510, train 601-974),
HumanEval JSONL, the Phase 1A instruction file, and reference predictions (a stand-in for GPT-4: gold
answers, a deterministic ~25% made wrong). Deterministic: a rebuild writes the same bytes.
Failure modes: none of its own; a prompt template that cannot render a row raises the evaluation's DataError.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

HEAD_SCALE = 20.0               # see sharpen_output_head
PHASE1A_MAX = 4                 # Phase 1A's numbers: 1..4; the tests ask 1..8
HIDDEN, LAYERS = 64, 2          # the tiny base
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
# Disjoint vocabularies per split: a test question shares no 8-gram with any train question except the
# prompt template (which failures.Decontaminator knows is not evidence). Many train names and objects, so
# the model learns to ignore whichever stands there.
NAMES = {"train": ["Ann", "Ben", "Cal", "Dan", "Eva", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lee", "Mia",
                   "Noa", "Otto", "Pia", "Ray", "Sue", "Tom", "Uma", "Vic", "Wes", "Xia", "Yul"],
         "test": ["Max", "Ned", "Oli", "Pam", "Quin", "Rex"]}
OBJECTS = {"train": ["apples", "pens", "cards", "shells", "coins", "books", "cups", "hats", "keys", "nuts"],
           "test": ["stamps", "kites", "plums", "rocks"]}
OPS = {"plus": ("+", "add", lambda x, k: x + k), "minus": ("-", "sub", lambda x, k: x - k),
       "times": ("*", "mul", lambda x, k: x * k)}

PHASE1A_OPS = ("plus", "minus")
# The values a function's asserts call it with, per split: a test assert is never a train assert, and both
# splits mix one- and two-digit values (a shift in how the asserts look moves the answers' margins).
ASSERT_VALUES = {"train": range(2, 20, 2), "test": range(3, 20, 2)}
SIZES = {"gsm8k_train": 80, "gsm8k_test": 30, "mbpp_train": 160, "mbpp_test": 20, "humaneval": 12, "phase1a": 600}


# ---------------------------------------------------------------------------------------------
# items in the benchmarks' own formats
# ---------------------------------------------------------------------------------------------

def gsm8k_rows(split: str, n: int, seed: int, *, max_value: int = len(WORDS)) -> list[dict]:
    """GSM8K format: ``question`` and a worked ``answer`` with calculator annotations ending ``#### N``."""
    rng = random.Random(f"gsm8k-{split}-{seed}")
    rows = []
    for _ in range(n):
        a = rng.randrange(1, max_value + 1)
        name, obj, w = rng.choice(NAMES[split]), rng.choice(OBJECTS[split]), WORDS[a - 1]
        rows.append({"question": f"{name} has {w} {obj}. Add one to {w}: what is {w} plus one?",
                     "answer": f"{w} plus one is <<{a}+1={a + 1}>>{a + 1}.\n#### {a + 1}"})
    return rows


def _function(split: str, rng: random.Random, ops) -> dict:
    """A function item of ``split``: an operation of ``ops`` and a constant, told through a one-line story
    with the split's own names and objects, its asserts calling it with the split's own values."""
    op = rng.choice(list(ops))
    k = rng.randrange(1, len(WORDS) + 1)
    sym, verb, fn = OPS[op]
    word, name = WORDS[k - 1], f"{verb}_{WORDS[k - 1]}"
    story = f"{rng.choice(NAMES[split])} has x {rng.choice(OBJECTS[split])}."
    return {"name": name, "text": f"{story} Write a function {name}(x) that returns x {op} {word}.",
            "doc": f"{story} Return x {op} {word}.", "code": f"def {name}(x):\n    return x {sym} {k}",
            "tests": [f"assert {name}({x}) == {fn(x, k)}" for x in rng.sample(ASSERT_VALUES[split], 3)]}


def mbpp_rows(split: str, n: int, seed: int, *, ops=tuple(OPS)) -> list[dict]:
    """MBPP full format; ids as upstream: test 11-510, train 601-974."""
    rng = random.Random(f"mbpp-{split}-{seed}")
    first = 11 if split == "test" else 601
    rows = []
    for i in range(n):
        f = _function(split, rng, ops)
        rows.append({"task_id": first + i, "text": f["text"], "code": f["code"], "test_list": f["tests"],
                     "test_setup_code": "", "challenge_test_list": []})
    return rows


def humaneval_rows(split: str, n: int, seed: int, *, ops=tuple(OPS)) -> list[dict]:
    """HumanEval format: a signature and docstring as the prompt; the tests call ``candidate``."""
    rng = random.Random(f"humaneval-{split}-{seed}")
    rows = []
    for i in range(n):
        f = _function(split, rng, ops)
        body = f["code"].split("\n", 1)[1]
        rows.append({"task_id": f"HumanEval/{i}", "prompt": f"def {f['name']}(x):\n    \"\"\"{f['doc']}\"\"\"\n",
                     "canonical_solution": body + "\n",
                     "test": "def check(candidate):\n" + "".join(
                         "    " + t.replace(f"{f['name']}(", "candidate(") + "\n" for t in f["tests"]),
                     "entry_point": f["name"]})
    return rows


def ideal_answer(task: str, row: dict) -> str:
    """The answer the demo teaches: GSM8K's worked answer without calculator annotations; for both code
    tasks the whole function in one fenced block (HumanEval accepts a restated function)."""
    if task == "gsm8k":
        return re.sub(r"<<[^>]*>>", "", row["answer"])
    code = row["code"] if task == "mbpp" else (row["prompt"].split("\n", 1)[0] + "\n" + row["canonical_solution"])
    return f"```python\n{code.rstrip()}\n```"


# ---------------------------------------------------------------------------------------------
# rendering: what the evaluation asks, as training rows
# ---------------------------------------------------------------------------------------------

def load_items(task: str, path: Path, split: str | None):
    """Items exactly as ``cogumi eval`` loads them from a benchmark-format file."""
    from cogumi.evaluation import tasks
    return tasks.load_task(task, str(path), split=split)


def training_row(item, response: str) -> dict:
    """A training row asking what evaluation asks for ``item`` (its chat messages), answered ``response``:
    ``{instruction, response}`` (the user's file shape) when the prompt is one user turn, else messages."""
    from cogumi.evaluation import tasks
    messages = tasks.build_messages(item)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return {"instruction": messages[0]["content"], "response": response}
    return {"messages": messages + [{"role": "assistant", "content": response}]}


def phase1a_rows(source_dir: Path, n: int, seed: int) -> list[dict]:
    """The Phase 1A instruction set (``{instruction, response}``, the shape of the user's 600K file): half
    GSM8K items with numbers up to PHASE1A_MAX, the rest MBPP and HumanEval items that add or subtract,
    drawn from train vocabularies; written in the benchmarks' formats under ``source_dir`` and rendered
    through the evaluation's loader and prompts."""
    from cogumi.io import atomic_write_jsonl
    n_gsm, n_mbpp = n // 2, (n - n // 2) * 3 // 5
    files = {
        "gsm8k": atomic_write_jsonl(source_dir / "gsm8k.jsonl",
                                    gsm8k_rows("train", n_gsm, seed + 1, max_value=PHASE1A_MAX)),
        "mbpp": atomic_write_jsonl(source_dir / "mbpp.jsonl", mbpp_rows("train", n_mbpp, seed + 2, ops=PHASE1A_OPS)),
        "humaneval": atomic_write_jsonl(source_dir / "humaneval.jsonl",
                                        humaneval_rows("train", n - n_gsm - n_mbpp, seed + 3, ops=PHASE1A_OPS)),
    }
    rows = [training_row(it, ideal_answer(task, it.data))
            for task, path in files.items() for it in load_items(task, path, "train" if task == "mbpp" else None)]
    random.Random(f"p1a-{seed}").shuffle(rows)
    return rows


def _wrong(key: str, share: float) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


def reference_predictions(items, *, wrong_share: float = 0.25) -> list[dict]:
    """A stand-in for GPT-4's answers to loaded items: the ideal answers, a deterministic ``wrong_share``
    of them wrong (a GSM8K answer one too high, code that adds one more)."""
    out = []
    for it in items:
        text = ideal_answer(it.task, it.data)
        if _wrong(f"{it.task}/{it.task_id}", wrong_share):
            text = (re.sub(r"(\d+)(?=\.?\n#### |$)", lambda m: str(int(m.group(1)) + 1), text) if it.task == "gsm8k"
                    else text.replace("return x", "return 1 + x"))
        out.append({"task": it.task, "task_id": it.task_id, "completion": text})
    return out


# ---------------------------------------------------------------------------------------------
# the tiny base
# ---------------------------------------------------------------------------------------------

def sharpen_output_head(base: Path, factor: float) -> None:
    """Scale a freshly initialised tiny model's output head, in place.

    A randomly initialised Llama (init std 0.02) has an output head so small that its logits can never move
    far from uniform, and LoRA -- which trains the blocks, not the head -- cannot change that: the loss
    stalls near ln(vocab). A pretrained model's head is much larger; scaling the tiny one's gives LoRA a model
    that, like a real base, can become confident in a few hundred steps.
    """
    from safetensors.torch import load_file, save_file
    for shard in sorted(base.glob("*.safetensors")):
        tensors = load_file(str(shard))
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"] = (tensors["lm_head.weight"].float() * factor).to(tensors["lm_head.weight"].dtype)
            save_file(tensors, str(shard), metadata={"format": "pt"})


def tokenizer_corpus(items, phase1a: list[dict], references: list[dict]) -> list[str]:
    """Every text the demo's model reads or writes: prompts as evaluation renders them, answers, references."""
    from cogumi.evaluation import tasks
    corpus = []
    for it in items:
        corpus += [m["content"] for m in tasks.build_messages(it)] + [ideal_answer(it.task, it.data)]
    for row in phase1a:
        messages = row.get("messages") or [{"content": row["instruction"]}, {"content": row["response"]}]
        corpus += [m["content"] for m in messages]
    return corpus + [r["completion"] for r in references]


# ---------------------------------------------------------------------------------------------
# everything the plan names
# ---------------------------------------------------------------------------------------------

def build_demo_data(data_dir: Path, *, seed: int = 0, sizes: dict | None = None) -> dict[str, Path]:
    """Write the tiny base and every data file the demo plan names into ``data_dir`` (deterministic, atomic:
    a rebuild after a kill produces the same bytes, so a resumed pipeline reuses its stages)."""
    from cogumi.io import atomic_dir, atomic_write_jsonl as write_jsonl
    from cogumi.tiny import build_tiny_base
    sizes = {**SIZES, **(sizes or {})}
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "gsm8k_train": write_jsonl(data_dir / "gsm8k" / "train.jsonl", gsm8k_rows("train", sizes["gsm8k_train"], seed)),
        "gsm8k_test": write_jsonl(data_dir / "gsm8k" / "test.jsonl", gsm8k_rows("test", sizes["gsm8k_test"], seed)),
        "mbpp": write_jsonl(data_dir / "mbpp" / "mbpp.jsonl", mbpp_rows("test", sizes["mbpp_test"], seed)
                            + mbpp_rows("train", sizes["mbpp_train"], seed)),
        # HumanEval has no train split, so no Phase 1B loss comes from it: its items ask Phase 1A's skills
        # in its own format, and the table shows whether Phase 1B kept them
        "humaneval": write_jsonl(data_dir / "humaneval" / "HumanEval.jsonl",
                                 humaneval_rows("test", sizes["humaneval"], seed, ops=PHASE1A_OPS)),
    }
    phase1a = phase1a_rows(data_dir / "phase1a-source", sizes["phase1a"], seed)
    files["phase1a"] = write_jsonl(data_dir / "phase1a.jsonl", phase1a)
    test_items = (load_items("gsm8k", files["gsm8k_test"], None) + load_items("mbpp", files["mbpp"], "test")
                  + load_items("humaneval", files["humaneval"], None))
    train_items = load_items("gsm8k", files["gsm8k_train"], None) + load_items("mbpp", files["mbpp"], "train")
    ref_test, ref_train = reference_predictions(test_items), reference_predictions(train_items)
    files["reference_test"] = write_jsonl(data_dir / "reference" / "test.jsonl", ref_test)
    files["reference_train"] = write_jsonl(data_dir / "reference" / "train.jsonl", ref_train)
    if not (data_dir / "base").exists():
        with atomic_dir(data_dir / "base") as tmp:
            build_tiny_base(tmp, seed=seed, dtype="bfloat16", max_shard_size="200KB", hidden_size=HIDDEN,
                            num_layers=LAYERS, intermediate_size=2 * HIDDEN,
                            corpus=tokenizer_corpus(test_items + train_items, phase1a, ref_test + ref_train))
            sharpen_output_head(tmp, HEAD_SCALE)
    files["base"] = data_dir / "base"
    return files
