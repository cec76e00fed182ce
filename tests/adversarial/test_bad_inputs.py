"""Bad inputs across data files, configs, model dirs, adapters, prediction and benchmark files, eval runs,
criteria and plans: each gets one clear ``error:`` naming the file / line / key, a non-zero exit, no
traceback, and leaves existing outputs byte-for-byte untouched.

One table (``CASES``): an id, the verb, how to build the bad input from a good world (``World``), and the
fragments the message must contain (regexes). Outputs: merge and eval write over an existing finished
output with ``--overwrite`` (it must survive the refusal whole), score over an existing results file,
train into a fresh dir (no adapter or checkpoint may appear); the good inputs themselves must not change.
Cases run in-process through ``cogumi.cli.main`` (the CLI's own entry point; an uncaught exception -- the
traceback a user would see -- fails the case). A few also run through a real ``python -m cogumi``
subprocess. The default run takes a seeded sample; ``-m slow`` runs the whole table.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from .conftest import TINY_CONFIG, cli, report, sample, tree_hash


@dataclass
class Case:
    id: str
    verb: str
    build: Callable      # (world, tmp) -> argv (list) for cogumi.cli.main
    expect: list[str]    # regexes the stderr message must match
    exit_code: int | None = None


class World:
    """Good inputs and finished outputs the bad cases are derived from (built once per module)."""

    def __init__(self, root: Path, tiny_base: Path, data: dict):
        from cogumi.cli import main
        self.root, self.data = root, data
        self.base = root / "base"
        shutil.copytree(tiny_base, self.base)
        self.config = root / "config.yaml"
        cfg = yaml.safe_load(TINY_CONFIG.read_text())
        cfg.update(base_model=str(self.base), output_dir=str(root / "unused"))
        cfg["data"]["train"] = str(data["train"])
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.adapter = make_adapter(self.base, root / "adapter")
        self.merged = root / "merged"
        assert main(["merge", str(self.adapter), "--out", str(self.merged), "--no-fidelity"]) == 0
        self.preds = root / "preds.jsonl"
        mbpp = [json.loads(line) for line in Path(data["mbpp"]).read_text().splitlines()]
        self.preds.write_text("".join(json.dumps({"task_id": r["task_id"], "completion": r["code"]}) + "\n"
                                      for r in mbpp))
        self.scored = root / "scored.jsonl"
        assert main(["score", "--task", "mbpp", "--data", str(data["mbpp"]), "--predictions", str(self.preds),
                     "--out", str(self.scored), "--timeout", "5"]) == 0
        self.eval_out = root / "eval-run"
        assert main(self.eval_args(self.data["reference"])) == 0
        self.criteria = root / "criteria.yaml"
        self.criteria.write_text(yaml.safe_dump({"name": "c", "criteria": [
            {"name": "acc", "tasks": ["gsm8k"], "metric": "accuracy", "min": 0.0}]}))
        self.protected = [self.base, self.adapter, self.merged, self.scored, self.eval_out, self.config,
                          *map(Path, data.values())]

    def eval_args(self, model, *extra, reference=None, out=None) -> list[str]:
        return ["eval", str(model), "--tasks", "gsm8k", "--data", f"gsm8k={self.data['gsm8k']}", "--n", "5",
                "--reference", str(reference or self.data["reference"]), "--out", str(out or self.eval_out),
                "--overwrite", *extra]

    def hashes(self) -> dict:
        return {str(p): tree_hash(p) for p in self.protected}


def make_adapter(base: Path, out: Path, **lora) -> Path:
    """A real PEFT LoRA adapter on ``base`` (random, non-zero B), as ``save_pretrained`` writes it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **lora)
    get_peft_model(model, cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base, adv_data) -> World:
    return World(tmp_path_factory.mktemp("bad-inputs-world"), tiny_base, adv_data)


# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------

def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def train_rows(w: World) -> list[str]:
    return Path(w.data["train"]).read_text().splitlines()


def train_with_data(name: str, content) -> Callable:
    def build(w: World, tmp: Path):
        data = write(tmp / name, content(w) if callable(content) else content)
        return ["train", str(w.config), "--set", f"data.train={data}", "--set", f"output_dir={tmp / 'out'}"]
    return build


def replace_line(w: World, lineno: int, text: str) -> str:
    rows = train_rows(w)
    rows[lineno - 1] = text
    return "\n".join(rows) + "\n"


def train_with_config(content, *extra) -> Callable:
    def build(w: World, tmp: Path):
        text = content(w) if callable(content) else content
        cfg = write(tmp / "bad.yaml", text)
        return ["train", str(cfg), "--set", f"output_dir={tmp / 'out'}", *extra]
    return build


def config_text(w: World, **changes) -> str:
    cfg = yaml.safe_load(w.config.read_text())
    for dotted, value in changes.items():
        node = cfg
        parts = dotted.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return yaml.safe_dump(cfg, sort_keys=False)


def base_variant(mutate: Callable) -> Callable:
    """A copy of the tiny base with one thing broken, used as ``base_model`` of a training run."""
    def build(w: World, tmp: Path):
        base = tmp / "base"
        shutil.copytree(w.base, base)
        mutate(base, w)
        return ["train", str(w.config), "--set", f"base_model={base}", "--set", f"output_dir={tmp / 'out'}"]
    return build


def merge_base_variant(mutate: Callable) -> Callable:
    """The adapter merged with ``--base`` a different (broken or mis-shaped) base, over an existing merged model."""
    def build(w: World, tmp: Path):
        base = tmp / "base"
        shutil.copytree(w.base, base)
        mutate(base, w)
        return ["merge", str(w.adapter), "--base", str(base), "--out", str(w.merged), "--overwrite"]
    return build


def merge_own_base_broken(mutate: Callable) -> Callable:
    """An adapter trained on a base whose files broke afterwards (an interrupted copy or download): its own
    recorded base, so the fingerprint check cannot be the first thing that notices."""
    def build(w: World, tmp: Path):
        base = tmp / "base"
        shutil.copytree(w.base, base)
        adapter = make_adapter(base, tmp / "adapter")
        mutate(base, w)
        return ["merge", str(adapter), "--out", str(w.merged), "--overwrite"]
    return build


def adapter_variant(mutate: Callable) -> Callable:
    def build(w: World, tmp: Path):
        adapter = tmp / "adapter"
        shutil.copytree(w.adapter, adapter)
        mutate(adapter, w)
        return ["merge", str(adapter), "--out", str(w.merged), "--overwrite"]
    return build


def shard(base: Path, i: int = 1) -> Path:
    return sorted(base.glob("model-*.safetensors"))[i - 1]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_json(path: Path, **changes) -> None:
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def score_with(*, preds=None, data=None, task="mbpp") -> Callable:
    def build(w: World, tmp: Path):
        p = write(tmp / "preds.jsonl", preds(w)) if preds is not None else w.preds
        d = write(tmp / f"{task}.jsonl", data(w)) if data is not None else Path(w.data[task])
        return ["score", "--task", task, "--data", str(d), "--predictions", str(p), "--out", str(w.scored)]
    return build


def preds_lines(w: World) -> list[str]:
    return w.preds.read_text().splitlines()


def mbpp_rows(w: World) -> list[dict]:
    return [json.loads(line) for line in Path(w.data["mbpp"]).read_text().splitlines()]


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def drop_key(rows: list[dict], index: int, key: str) -> list[dict]:
    rows = [dict(r) for r in rows]
    rows[index].pop(key)
    return rows


def other_tokenizer(base: Path, w: World) -> None:
    """A tokenizer with more tokens than the model's embedding has rows (ids past its end: added special
    tokens without resizing the embeddings)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": [f"<|reserved_{i}|>" for i in range(64)]})
    tok.save_pretrained(base)


def wrong_shape_base(base: Path, w: World) -> None:
    from cogumi.tiny import build_tiny_base
    shutil.rmtree(base)
    build_tiny_base(base, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

ST_HEADER_GARBAGE = struct.pack("<Q", 40) + b"{not json at all, just junk bytes......}"

CASES = [
    # -- training data -------------------------------------------------------------------------
    Case("data-empty-file", "train", train_with_data("train.jsonl", ""), [r"train\.jsonl", r"empty"]),
    Case("data-blank-lines-only", "train", train_with_data("train.jsonl", "\n  \n\n"), [r"train\.jsonl", r"no rows|empty"]),
    Case("data-malformed-json-line-3", "train", train_with_data("train.jsonl", lambda w: replace_line(w, 3, '{"instruction": "x",')),
         [r"train\.jsonl:3", r"malformed JSON"]),
    Case("data-not-utf8", "train", train_with_data("train.jsonl", b'{"instruction": "caf\xe9", "response": "x"}\n'),
         [r"train\.jsonl", r"UTF-8"]),
    Case("data-utf16", "train", train_with_data("train.jsonl", '{"instruction": "a", "response": "b"}\n'.encode("utf-16")),
         [r"train\.jsonl", r"UTF-8"]),
    Case("data-row-is-array", "train", train_with_data("train.jsonl", lambda w: replace_line(w, 2, "[1, 2]")),
         [r"train\.jsonl", r"(:2|row 2|line 2)", r"object"]),
    Case("data-row-missing-fields", "train", train_with_data("train.jsonl", lambda w: replace_line(w, 1, '{"prompt_text": "x"}')),
         [r"train\.jsonl", r"(:1|row 1|line 1)", r"instruction|shape"]),
    Case("data-field-wrong-type", "train", train_with_data("train.jsonl", lambda w: replace_line(w, 4, '{"instruction": 5, "response": "x"}')),
         [r"train\.jsonl", r"(:4|row 4|line 4)", r"instruction.*string"]),
    Case("data-truncated-last-line", "train", train_with_data("train.jsonl", lambda w: "\n".join(train_rows(w))[:-25]),
         [r"train\.jsonl:48", r"malformed JSON"]),
    Case("data-nul-bytes", "train", train_with_data("train.jsonl", lambda w: replace_line(w, 5, '{"instruction": "a\x00b", "response": "x"}')),
         [r"train\.jsonl", r"(:5|row 5|line 5)"]),
    Case("data-is-a-directory", "train", lambda w, tmp: ["train", str(w.config), "--set", f"data.train={tmp}",
                                                         "--set", f"output_dir={tmp / 'out'}"], [r"is a directory"]),
    Case("data-json-not-an-array", "train", train_with_data("train.json", '"just a string"'),
         [r"train\.json", r"array"]),
    Case("data-parquet-garbage", "train", train_with_data("train.parquet", b"PAR1 this is not parquet"),
         [r"train\.parquet", r"Parquet"]),
    Case("data-empty-response", "train", train_with_data("train.jsonl", lambda w: replace_line(w, 6, '{"instruction": "a", "response": ""}')),
         [r"train\.jsonl", r"(:6|row 6|line 6)", r"empty"]),
    # -- run configs ---------------------------------------------------------------------------
    Case("config-empty", "train", train_with_config(""), [r"bad\.yaml", r"empty"]),
    Case("config-not-yaml", "train", train_with_config("base_model: [unclosed\ntraining: {"), [r"bad\.yaml", r"line \d+", r"YAML"]),
    Case("config-top-level-list", "train", train_with_config("- a\n- b\n"), [r"bad\.yaml", r"mapping"]),
    Case("config-unknown-key", "train", train_with_config(lambda w: config_text(w) + "trainig:\n  max_steps: 3\n"),
         [r"bad\.yaml", r"unknown key 'trainig'"]),
    Case("config-wrong-type", "train", train_with_config(lambda w: config_text(w, training__max_steps="ten")),
         [r"bad\.yaml", r"training\.max_steps", r"integer"]),
    Case("config-float-rank", "train", train_with_config(lambda w: config_text(w, lora__r=8.5)), [r"lora\.r", r"integer"]),
    Case("config-target-modules-string", "train", train_with_config(lambda w: config_text(w, lora__target_modules="q_proj")),
         [r"lora\.target_modules", r"list"]),
    Case("config-negative-learning-rate", "train", train_with_config(lambda w: config_text(w, training__learning_rate=-0.1)),
         [r"training\.learning_rate", r"> 0"]),
    Case("config-bad-choice", "train", train_with_config(lambda w: config_text(w, training__dtype="float8")),
         [r"training\.dtype", r"one of"]),
    Case("config-not-utf8", "train", train_with_config(lambda w: b"# caf\xe9 (latin-1)\n" + config_text(w).encode()),
         [r"bad\.yaml", r"UTF-8"]),
    Case("config-missing-file", "train", lambda w, tmp: ["train", str(tmp / "nope.yaml")], [r"nope\.yaml", r"not found"]),
    Case("config-base-path-missing", "train", train_with_config(lambda w: config_text(w, base_model="./no/such/base")),
         [r"base_model", r"does not exist"]),
    Case("set-without-equals", "train", lambda w, tmp: ["train", str(w.config), "--set", "training.max_steps"],
         [r"--set", r"key=value"]),
    Case("set-wrong-type", "train", lambda w, tmp: ["train", str(w.config), "--set", "training.max_steps=abc",
                                                    "--set", f"output_dir={tmp / 'out'}"], [r"training\.max_steps"]),
    # -- model dirs ----------------------------------------------------------------------------
    Case("base-without-config-json", "train", base_variant(lambda b, w: (b / "config.json").unlink()), [r"config\.json"]),
    Case("base-config-not-json", "train", base_variant(lambda b, w: write(b / "config.json", "{'model_type': llama")),
         [r"config\.json", r"JSON"]),
    Case("base-config-is-a-list", "train", base_variant(lambda b, w: write(b / "config.json", "[1, 2]")),
         [r"config\.json", r"object"]),
    Case("base-without-weights", "train", base_variant(lambda b, w: [p.unlink() for p in b.glob("model*.safetensors*")]),
         [r"weight|safetensors"]),
    Case("base-quantized-config", "train", base_variant(lambda b, w: edit_json(
        b / "config.json", quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})),
         [r"refusing to train on a quantized base"], exit_code=1),
    Case("base-mismatched-tokenizer", "train", base_variant(other_tokenizer), [r"tokenizer", r"vocab|embedding|token id"]),
    Case("base-truncated-shard", "merge", merge_own_base_broken(lambda b, w: truncate(shard(b, 2))),
         [r"model-00002-of-00003\.safetensors", r"truncated"]),
    Case("base-garbage-safetensors-header", "merge", merge_own_base_broken(lambda b, w: write(shard(b, 1), ST_HEADER_GARBAGE)),
         [r"model-00001-of-00003\.safetensors", r"header|corrupt"]),
    Case("base-index-names-missing-shard", "merge", merge_own_base_broken(lambda b, w: shard(b, 3).unlink()),
         [r"model-00003-of-00003\.safetensors"]),
    Case("base-config-lies-about-dtype-verify", "verify", lambda w, tmp: ["verify", str(_lying_dtype(w, tmp))],
         [r"config\.json", r"float16", r"BF16|bfloat16"], exit_code=1),
    Case("base-config-lies-about-dtype-eval", "eval", lambda w, tmp: w.eval_args(_lying_dtype(w, tmp), "--max-new-tokens", "4"),
         [r"config\.json", r"float16", r"BF16|bfloat16"]),
    Case("base-wrong-shape-for-adapter", "merge", merge_base_variant(wrong_shape_base),
         [r"not the base the adapter was trained on|shape"]),
    # -- adapters ------------------------------------------------------------------------------
    Case("adapter-missing-dir", "merge", lambda w, tmp: ["merge", str(tmp / "no-adapter"), "--out", str(w.merged),
                                                         "--overwrite"], [r"no-adapter"]),
    Case("adapter-without-config", "merge", adapter_variant(lambda a, w: (a / "adapter_config.json").unlink()),
         [r"adapter_config\.json"]),
    Case("adapter-config-not-json", "merge", adapter_variant(lambda a, w: write(a / "adapter_config.json", "{r: 8")),
         [r"adapter_config\.json", r"JSON"]),
    Case("adapter-weights-truncated", "merge", adapter_variant(lambda a, w: truncate(a / "adapter_model.safetensors", 0.7)),
         [r"adapter_model\.safetensors", r"truncated|unreadable|incomplete"]),
    Case("adapter-weights-empty", "merge", adapter_variant(lambda a, w: write(a / "adapter_model.safetensors", b"")),
         [r"adapter_model\.safetensors"]),
    Case("adapter-dora", "merge", adapter_variant(lambda a, w: edit_json(a / "adapter_config.json", use_dora=True)),
         [r"DoRA|use_dora"]),
    Case("adapter-rank-disagrees-with-tensors", "merge", adapter_variant(lambda a, w: edit_json(a / "adapter_config.json", r=16)),
         [r"rank|\br\b|shape"]),
    Case("adapter-manifest-corrupt", "merge", adapter_variant(lambda a, w: write(a / "cogumi.json", '{"kind": "adapter", ')),
         [r"cogumi\.json", r"JSON"]),
    Case("adapter-nan-weights", "merge", adapter_variant(lambda a, w: _poison_adapter(a)), [r"NaN"], exit_code=1),
    # -- predictions and benchmark files (cogumi score) ------------------------------------------
    Case("preds-empty", "score", score_with(preds=lambda w: ""), [r"preds\.jsonl", r"no predictions|empty"]),
    Case("preds-malformed-line-2", "score", score_with(preds=lambda w: "\n".join([preds_lines(w)[0], "{oops", *preds_lines(w)[2:]])),
         [r"preds\.jsonl:2", r"malformed JSON"]),
    Case("preds-completion-not-string", "score", score_with(preds=lambda w: jsonl([{"task_id": 11, "completion": 42}])),
         [r"preds\.jsonl:1", r"completion.*string"]),
    Case("preds-missing-task-id", "score", score_with(preds=lambda w: jsonl([{"completion": "x"}])),
         [r"preds\.jsonl:1", r"task_id"]),
    Case("preds-unknown-task-id", "score", score_with(preds=lambda w: jsonl([{"task_id": 99999, "completion": "x"}])),
         [r"preds\.jsonl:1", r"99999"]),
    Case("preds-duplicate-task-id", "score", score_with(preds=lambda w: "\n".join([preds_lines(w)[0]] * 2) + "\n"),
         [r"preds\.jsonl:2", r"twice"]),
    Case("preds-not-utf8", "score", score_with(preds=lambda w: b'{"task_id": 11, "completion": "\xff\xfe"}\n'),
         [r"preds\.jsonl", r"UTF-8"]),
    Case("mbpp-data-missing-test-list", "score", score_with(data=lambda w: jsonl(drop_key(mbpp_rows(w), 2, "test_list"))),
         [r"mbpp\.jsonl", r"test_list"]),
    Case("humaneval-data-missing-entry-point", "score", lambda w, tmp: [
        "score", "--task", "humaneval", "--data",
        str(write(tmp / "he.jsonl", jsonl(drop_key([json.loads(x) for x in Path(w.data["humaneval"]).read_text().splitlines()], 1, "entry_point")))),
        "--predictions", str(write(tmp / "p.jsonl", jsonl([{"task_id": "HumanEval/0", "completion": "x"}]))), "--out", str(w.scored)],
         [r"he\.jsonl", r"entry_point"]),
    Case("gsm8k-data-answer-without-hashes", "score", lambda w, tmp: [
        "score", "--task", "gsm8k", "--data", str(write(tmp / "gsm.jsonl", jsonl([{"question": "1+1?", "answer": "two"}]))),
        "--predictions", str(write(tmp / "p.jsonl", jsonl([{"task_id": 0, "completion": "2"}]))), "--out", str(w.scored)],
         [r"gsm\.jsonl", r"####"]),
    # -- eval -----------------------------------------------------------------------------------
    Case("eval-data-file-missing", "eval", lambda w, tmp: ["eval", str(w.data["reference"]), "--tasks", "gsm8k", "--data",
                                                           f"gsm8k={tmp / 'gone.jsonl'}", "--out", str(w.eval_out), "--overwrite"],
         [r"gone\.jsonl"]),
    Case("eval-data-flag-without-equals", "eval", lambda w, tmp: ["eval", str(w.data["reference"]), "--data", "gsm8k",
                                                                  "--out", str(w.eval_out), "--overwrite"], [r"--data"]),
    Case("eval-reference-missing-items", "eval", lambda w, tmp: w.eval_args(
        w.data["reference"], reference=write(tmp / "ref.jsonl", jsonl([{"task": "gsm8k", "task_id": "0", "completion": "#### 1"}]))),
         [r"ref\.jsonl", r"no prediction for"]),
    Case("eval-unknown-task", "eval", lambda w, tmp: ["eval", str(w.data["reference"]), "--tasks", "gsm9k",
                                                      "--out", str(w.eval_out), "--overwrite"], [r"gsm9k"]),
    Case("eval-out-is-a-file", "eval", lambda w, tmp: w.eval_args(w.data["reference"], out=w.scored), [r"--out", r"file"]),
    Case("eval-model-dir-corrupt-config", "eval", lambda w, tmp: w.eval_args(_copy_with(w.merged, tmp / "m", "config.json", "{")),
         [r"config\.json", r"JSON"]),
    # -- gate, plans ------------------------------------------------------------------------------
    Case("criteria-unknown-metric", "gate", lambda w, tmp: ["gate", str(w.eval_out), "--criteria", str(write(
        tmp / "c.yaml", yaml.safe_dump({"name": "c", "criteria": [{"name": "x", "tasks": ["gsm8k"], "metric": "vibes", "min": 0}]})))],
         [r"c\.yaml", r"metric", r"vibes"]),
    Case("summary-not-json", "gate", lambda w, tmp: ["gate", str(write(tmp / "run" / "summary.json", "{{{")), "--criteria",
                                                     str(w.criteria)], [r"summary\.json", r"JSON"]),
    Case("plan-unknown-key", "pipeline", lambda w, tmp: ["pipeline", str(write(tmp / "plan.yaml", yaml.safe_dump(
        {"phase1a": {"config": str(w.config)}, "validaton": {}}))), "--run-dir", str(tmp / "run")], [r"plan\.yaml", r"validaton"]),
    Case("plan-config-missing", "pipeline", lambda w, tmp: ["pipeline", str(write(tmp / "plan.yaml", yaml.safe_dump(
        {"phase1a": {"config": str(tmp / "nope.yaml")}}))), "--run-dir", str(tmp / "run")], [r"phase1a\.config"]),
]


def _lying_dtype(w: World, tmp: Path) -> Path:
    model = tmp / "lying"
    shutil.copytree(w.base, model)
    edit_json(model / "config.json", torch_dtype="float16", dtype="float16")
    return model


def _copy_with(src: Path, dst: Path, name: str, content: str) -> Path:
    shutil.copytree(src, dst)
    write(dst / name, content)
    return dst


def _poison_adapter(adapter: Path) -> None:
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    first = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(adapter / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------
# running a case
# ---------------------------------------------------------------------------------------------

def run_case(case: Case, world: World, tmp: Path, capsys) -> list[str]:
    """Problems with how ``case`` was refused ([] when it was refused the right way)."""
    from cogumi.cli import main
    argv = [str(a) for a in case.build(world, tmp)]
    capsys.readouterr()
    before = world.hashes()
    problems = []
    try:
        rc = main(argv)
    except SystemExit as e:          # argparse usage errors exit 2 with a usage line: acceptable
        rc = e.code
    except BaseException as e:       # what a user would see as a traceback
        import traceback
        tb = "".join(traceback.format_exception(e))
        problems = [f"uncaught {type(e).__name__}: {str(e)[:300]} (a traceback for the user)\n{tb[-1500:]}"]
        report("bad_inputs", {"case": case.id, "verb": case.verb, "rc": None, "message": tb[-500:],
                              "problems": problems})
        return problems
    err = capsys.readouterr().err
    if rc == 0:
        problems.append("exit code 0: the bad input was accepted")
    elif case.exit_code is not None and rc != case.exit_code:
        problems.append(f"exit code {rc}, expected {case.exit_code}")
    if "Traceback" in err:
        problems.append("a traceback was printed")
    if rc != 0 and not (err.startswith("error: ") or err.startswith("usage:")) and "\nerror: " not in err:
        problems.append(f"no 'error:' line: {err[-300:]!r}")
    if err.count("error:") > 1 and not err.startswith("usage:"):
        problems.append(f"{err.count('error:')} error lines")
    for pattern in case.expect:
        if not re.search(pattern, err):
            problems.append(f"message lacks /{pattern}/: {err.strip()[-400:]!r}")
    if world.hashes() != before:
        changed = [p for p, h in world.hashes().items() if before[p] != h]
        problems.append(f"existing outputs/inputs changed: {changed}")
    out = tmp / "out"
    for leftover in ("adapter", "checkpoints"):
        if (out / leftover).exists():
            problems.append(f"a refused run still wrote {out / leftover}")
    partials = [p.name for p in world.root.glob(".*partial*")]
    if partials:
        problems.append(f"temporary output left beside the outputs: {partials}")
    report("bad_inputs", {"case": case.id, "verb": case.verb, "rc": rc, "message": err.strip()[-500:],
                          "problems": problems})
    return problems


def test_table_is_large_and_ids_are_unique():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", sample(CASES, 16, "bad-inputs"), ids=lambda c: c.id)
def test_bad_input_sample(case, world, tmp_path, capsys):
    problems = run_case(case, world, tmp_path, capsys)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_full(case, world, tmp_path, capsys):
    problems = run_case(case, world, tmp_path, capsys)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case_id", ["data-malformed-json-line-3", "adapter-weights-truncated", "preds-duplicate-task-id"])
def test_bad_input_through_the_real_cli(case_id, world, tmp_path):
    """The same refusal from a real ``python -m cogumi`` process: one error line, no traceback, exit != 0."""
    case = next(c for c in CASES if c.id == case_id)
    before = world.hashes()
    proc = cli(*case.build(world, tmp_path))
    assert proc.returncode not in (0, None) and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("error:") == 1
    for pattern in case.expect:
        assert re.search(pattern, proc.stderr), proc.stderr[-500:]
    assert world.hashes() == before


ACCEPTED = [
    ("data-with-bom", lambda w: "\ufeff" + Path(w.data["train"]).read_text()),
    ("data-crlf-line-endings", lambda w: Path(w.data["train"]).read_text().replace("\n", "\r\n")),
]


@pytest.mark.parametrize("name, content", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_harmless_encodings_are_accepted(name, content, world, tmp_path):
    """A UTF-8 BOM or CRLF line endings (Windows editors) are not errors: the same rows are read."""
    from cogumi.data import load_rows
    data = write(tmp_path / "train.jsonl", content(world))
    assert load_rows(str(data)).rows == load_rows(str(world.data["train"])).rows


def test_config_with_bom_is_accepted(world, tmp_path):
    from cogumi.config import load_run_config
    cfg = write(tmp_path / "bom.yaml", ("\ufeff" + world.config.read_text()).encode("utf-8"))
    assert load_run_config(cfg).base_model == load_run_config(world.config).base_model
