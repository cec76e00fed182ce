"""cogumi.data: every accepted row shape, the chat-template rendering and loss mask, over-long and duplicate
accounting, the seeded holdout, and a corpus of bad data files that each fail with one clear error naming
the file and line -- through `cogumi train`, before any weight loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cogumi.data import encode_messages, load_rows, prepare_dataset, row_to_messages, tokenize_rows
from cogumi.errors import DataError

GOOD = {"instruction": "What is 2 plus 3?", "response": "2 + 3 = 5\n#### 5"}


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_base)


def jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# ---------------------------------------------------------------------------------------------
# the corpus of bad data files: kind -> (file name, content, what the message must say, line)
# ---------------------------------------------------------------------------------------------

def _parquet_bytes(tmp_path: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / "_t.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "response": ["ok", None]}), p)
    return p.read_bytes()


BAD_FILES = {
    "malformed_json": ("bad.jsonl", jsonl([GOOD, '{"instruction": "x", "response": "y"']), "malformed JSON", 2),
    "not_an_object": ("bad.jsonl", jsonl([GOOD, GOOD, '["instruction", "response"]']),
                      "expected a JSON object, got a list", 3),
    "missing_field": ("bad.jsonl", jsonl([GOOD, {"instruction": "only a question"}]), "missing field 'response'", 2),
    "empty_field": ("bad.jsonl", jsonl([{"instruction": "   ", "response": "b"}]), "field 'instruction' is empty", 1),
    "non_string_value": ("bad.jsonl", jsonl([GOOD, GOOD, GOOD, {"instruction": 5, "response": "b"}]),
                         "field 'instruction' must be a string, got a number", 4),
    "null_value": ("bad.jsonl", jsonl([{"prompt": "p", "completion": None}]),
                   "field 'completion' must be a string, got null", 1),
    "unknown_shape": ("bad.jsonl", jsonl([GOOD, {"question": "q", "answer": "a"}]), "unknown row shape", 2),
    "empty_file": ("bad.jsonl", "\n  \n", "the file is empty", None),
    "not_utf8": ("bad.jsonl", jsonl([GOOD]).encode() + '{"instruction": "caf\xe9", "response": "x"}\n'.encode("latin-1"),
                 "not UTF-8", 2),
    "messages_without_assistant": ("bad.jsonl", jsonl([{"messages": [{"role": "user", "content": "hi"}]}]),
                                   "no assistant turn", 1),
    "messages_bad_role": ("bad.jsonl", jsonl([{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "bot", "content": "yo"}]}]),
                          "messages[1].role must be one of", 1),
    "messages_not_a_list": ("bad.jsonl", jsonl([{"messages": "user: hi"}]), "field 'messages' must be a list", 1),
    "both_response_and_output": ("bad.jsonl", jsonl([{"instruction": "a", "response": "b", "output": "c"}]),
                                 "has both 'response' and 'output'", 1),
    "non_string_input": ("bad.jsonl", jsonl([{"instruction": "a", "output": "b", "input": ["x"]}]),
                         "field 'input' must be a string, got a list", 1),
    "json_array_bad_element": ("bad.json", json.dumps([GOOD, GOOD, {"instruction": "q"}], indent=1),
                               "missing field 'response'", 10),
    "json_array_malformed": ("bad.json", '[\n {"instruction": "a", "response": "b"},\n {"instruction": }\n]',
                             "malformed JSON", 3),
    "unsupported_extension": ("bad.csv", "instruction,response\na,b\n", "unsupported file type '.csv'", None),
    "parquet_null_value": ("bad.parquet", None, "field 'response' must be a string, got null", "row 2"),
}


def write_bad(tmp_path: Path, kind: str) -> tuple[Path, str, int | str | None]:
    name, content, expect, line = BAD_FILES[kind]
    path = tmp_path / kind / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        content = _parquet_bytes(tmp_path)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path, expect, line


def test_the_corpus_has_at_least_ten_kinds():
    assert len(BAD_FILES) >= 10


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_gives_one_error_naming_file_and_line(tmp_path, kind):
    path, expect, line = write_bad(tmp_path, kind)
    with pytest.raises(DataError) as e:
        load_rows(str(path))
    msg = str(e.value)
    assert expect in msg
    assert str(path) in msg
    if isinstance(line, int):
        assert f"{path}:{line}:" in msg
    elif isinstance(line, str):
        assert f"{path} {line}:" in msg


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_cogumi_train_refuses_bad_data_before_loading_weights(tmp_path, tiny_base, kind, capsys, monkeypatch):
    import transformers

    from cogumi.cli import main

    def no_weights(*a, **k):
        raise AssertionError("model weights were loaded although the data is bad")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    path, expect, line = write_bad(tmp_path, kind)
    out = tmp_path / "run"
    cfg = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    rc = main(["train", str(cfg), "--set", f"base_model={tiny_base}", "--set", f"data.train={path}",
               "--set", f"output_dir={out}", "--set", "data.holdout=0"])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("error:") == 1 and err.startswith("error:")
    assert expect in err and str(path) in err
    if isinstance(line, int):
        assert f":{line}:" in err
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()


def test_many_bad_rows_are_listed_first_five_plus_a_count(tmp_path):
    rows = [GOOD] + [{"instruction": "q", "response": ""}] * 8 + [GOOD]
    path = tmp_path / "many.jsonl"
    path.write_text(jsonl(rows))
    with pytest.raises(DataError) as e:
        load_rows(str(path))
    msg = str(e.value)
    assert "8 bad row(s)" in msg and "... and 3 more" in msg
    assert [f"{path}:{n}:" in msg for n in range(2, 10)] == [True] * 5 + [False] * 3


# ---------------------------------------------------------------------------------------------
# good data
# ---------------------------------------------------------------------------------------------

def test_every_row_shape_becomes_chat_messages():
    assert row_to_messages({"instruction": "Q", "response": "A"})[0] == [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    msgs, shape = row_to_messages({"instruction": "Q", "input": "ctx", "output": "A", "source": "gsm8k"})
    assert shape == "instruction/output" and msgs[0]["content"] == "Q\n\nctx"
    assert row_to_messages({"instruction": "Q", "input": "", "output": "A"})[0][0]["content"] == "Q"
    assert row_to_messages({"prompt": "P", "completion": "C"})[1] == "prompt/completion"
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    assert row_to_messages({"messages": chat})[0] == chat
    msgs, _ = row_to_messages({"prompt": "P", "completion": "C"}, system_prompt="Be brief.")
    assert msgs[0] == {"role": "system", "content": "Be brief."}


def test_bom_json_array_and_parquet_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + jsonl([GOOD, GOOD]).encode())
    assert len(load_rows(str(bom)).rows) == 2
    arr = tmp_path / "rows.json"
    arr.write_text(json.dumps([GOOD, {"prompt": "p", "completion": "c"}]))
    assert load_rows(str(arr)).shapes == {"instruction/response": 1, "prompt/completion": 1}
    pq_path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b", "c"], "output": ["x", "y", "z"]}), pq_path)
    loaded = load_rows(str(pq_path))
    assert len(loaded.rows) == 3 and loaded.info["format"] == "parquet" and len(loaded.info["sha256"]) == 64


def test_loss_mask_covers_exactly_the_assistant_turns_and_end_of_turn(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 plus 4?"},
                {"role": "assistant", "content": "8"}]
    ids, mask = encode_messages(messages, tokenizer)
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "5<|eot_id|>8<|eot_id|>"
    # the prompt part is exactly what evaluation feeds the model (add_generation_prompt=True)
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)]) and mask[len(prompt)] == 1


def test_overlong_rows_are_truncated_or_dropped_and_counted(tokenizer):
    short = {"instruction": "2 plus 3?", "response": "5"}
    long = {"instruction": "Why?", "response": "Because " * 40}
    trunc = tokenize_rows([short, long, short], tokenizer, 48, "truncate")
    assert trunc.stats["overlong"] == 1 and trunc.stats["truncated"] == 1 and trunc.stats["kept"] == 3
    assert max(map(len, trunc.input_ids)) == 48
    drop = tokenize_rows([short, long, short], tokenizer, 48, "drop")
    assert drop.stats["dropped_overlong"] == 1 and drop.stats["kept"] == 2 and drop.kept == [0, 2]
    # a row whose prompt alone fills max_length has nothing to learn after truncation: dropped, counted
    prompt_only = tokenize_rows([{"instruction": "Explain. " * 60, "response": "ok"}], tokenizer, 48, "truncate")
    assert prompt_only.stats["kept"] == 0 and prompt_only.stats["dropped_no_loss_tokens"] == 1


def make_cfg(tmp_path, train, **data):
    from cogumi.config import RunConfig
    cfg = RunConfig(base_model="unused", output_dir=str(tmp_path / "out"))
    cfg.data.train = str(train)
    cfg.training.max_length = 64
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_prepare_dataset_holds_out_deterministically_and_counts_duplicates(tmp_path, tokenizer):
    from cogumi.tiny import synthetic_instructions, write_jsonl
    rows = [dict(r, id=i) for i, r in enumerate(synthetic_instructions(30, seed=1))]
    rows.append({k: v for k, v in rows[0].items()})        # one exact duplicate (same id too)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    a = prepare_dataset(make_cfg(tmp_path, path, holdout=5), tokenizer)
    b = prepare_dataset(make_cfg(tmp_path, path, holdout=5), tokenizer)
    assert a.holdout_rows == b.holdout_rows and len(a.holdout_rows) == 5
    assert all(set(r) == {"instruction", "response", "id"} for r in a.holdout_rows)   # input shape kept
    assert a.stats["train_rows"] == 26 and len(a.train_dataset) == 26
    assert a.stats["duplicates"] >= 1 and a.stats["files"][0]["rows"] == 31
    assert set(a.train_dataset.column_names) == {"input_ids", "completion_mask"}
    assert a.eval_dataset is not None and len(a.eval_dataset) == 5
    held = a.write_holdout(tmp_path / "holdout.jsonl")
    assert [json.loads(l) for l in held.read_text().splitlines()] == a.holdout_rows
    with pytest.raises(DataError, match="data.holdout=40"):
        prepare_dataset(make_cfg(tmp_path, path, holdout=40), tokenizer)


def test_a_file_of_only_overlong_rows_fails_before_training(tmp_path, tokenizer):
    path = tmp_path / "long.jsonl"
    path.write_text(jsonl([{"instruction": "Explain. " * 60, "response": "ok"}] * 3))
    with pytest.raises(DataError, match="no trainable rows left"):
        prepare_dataset(make_cfg(tmp_path, path), tokenizer)


def test_parallel_tokenization_equals_serial(tokenizer):
    from cogumi.tiny import synthetic_instructions
    rows = synthetic_instructions(40, seed=2)
    serial = tokenize_rows(rows, tokenizer, 64, num_proc=1)
    parallel = tokenize_rows(rows, tokenizer, 64, num_proc=2)
    assert parallel.input_ids == serial.input_ids and parallel.completion_mask == serial.completion_mask
    assert parallel.stats == serial.stats


def test_a_base_without_chat_template_is_refused(tokenizer):
    import copy
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize_rows([GOOD], plain, 64)
