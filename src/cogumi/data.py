"""Training data: read, validate every row, render with the base's chat template, tokenize.

Features
  * Sources: local ``.jsonl``, ``.json`` (an array of row objects, or JSONL saved as .json), ``.parquet``,
    or a hub dataset id (``datasets.load_dataset(id, split=data.split)``).
  * Row shapes (extra keys are kept in the holdout file and otherwise ignored):
      ``{instruction, response}``                  the user's 600K file
      ``{instruction, output}`` (+ optional ``input``)   the Phase 1B failure files, Alpaca
      ``{prompt, completion}``                      plain prompt-completion
      ``{messages: [{role, content}, ...]}``        chat (system/user/assistant; loss on every assistant turn)
  * Every row is rendered with the base tokenizer's own chat template -- the one ``cogumi eval`` uses through
    ``apply_chat_template(..., add_generation_prompt=True)`` -- so training and evaluation see the same prompt.
  * Loss on assistant tokens only (``completion_mask``), the end-of-turn token (Llama 3: ``<|eot_id|>``) included,
    so the model learns to stop.
  * Over-long rows: ``data.overlong: truncate`` (keep the start) or ``drop``; both counted and reported.
    Exact duplicate rows are counted (kept: deduplication is the user's call).
  * ``data.holdout`` rows are held out deterministically (seeded) in their input shape, for eval and
    ``merge --target auto``.

Failure modes (each one ``DataError`` naming the file and line -- the first 5 problems plus a count --
raised before any model weight is loaded, so a bad row never crashes a run hours in):
  file not found / a directory / unsupported extension, empty file, not UTF-8 (a UTF-8 BOM is fine),
  malformed JSON, a JSON value that is not an object, unknown row shape, missing field, empty field,
  non-string value, malformed ``messages`` (not a list, bad role, no assistant turn), a holdout larger than
  the data, and no trainable rows left after the over-long policy.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from cogumi.errors import DataError

MAX_LISTED_PROBLEMS = 5
SHAPES_HELP = ("expected one of the row shapes {instruction, response}, {instruction, output} (optional input), "
               "{prompt, completion}, or {messages: [{role, content}, ...]}")
ROLES = ("system", "user", "assistant")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class RowProblem(ValueError):
    """One row's problem (collected, then reported together as one DataError)."""


# ---------------------------------------------------------------------------------------------
# row shapes -> chat messages
# ---------------------------------------------------------------------------------------------

def _typename(value: Any) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", bool: "a boolean", int: "a number",
                                         float: "a number"}.get(type(value), type(value).__name__)


def _text_field(row: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in row:
        raise RowProblem(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise RowProblem(f"field '{key}' must be a string, got {_typename(value)}")
    if not allow_empty and not value.strip():
        raise RowProblem(f"field '{key}' is empty")
    return value


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list):
        raise RowProblem(f"field 'messages' must be a list of {{role, content}} objects, got {_typename(messages)}")
    if not messages:
        raise RowProblem("field 'messages' is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowProblem(f"messages[{i}] must be an object with 'role' and 'content', got {_typename(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RowProblem(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise RowProblem(f"messages[{i}].content must be a string, got {_typename(content)}")
        if not content.strip():
            raise RowProblem(f"messages[{i}].content is empty")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RowProblem("'messages' has no assistant turn, so there is nothing to learn from")
    return out


def row_shape(row: Any) -> str:
    """The shape name of a row (``instruction/response``, ...); raises RowProblem for anything else."""
    if not isinstance(row, dict):
        raise RowProblem(f"expected a JSON object, got {_typename(row)}")
    if "messages" in row:
        return "messages"
    if "instruction" in row:
        if "response" in row and "output" in row:
            raise RowProblem("has both 'response' and 'output'; keep one")
        if "response" in row:
            return "instruction/response"
        if "output" in row:
            return "instruction/output"
        raise RowProblem("missing field 'response' (or 'output') beside 'instruction'")
    if "prompt" in row or "completion" in row:
        return "prompt/completion"
    if "response" in row or "output" in row:
        raise RowProblem("missing field 'instruction'")
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise RowProblem(f"unknown row shape (keys: {keys}); {SHAPES_HELP}")


def row_to_messages(row: Any, system_prompt: str | None = None) -> tuple[list[dict], str]:
    """Validate one row and turn it into chat messages; returns (messages, shape name)."""
    shape = row_shape(row)
    if shape == "messages":
        messages = _check_messages(row["messages"])
    elif shape == "prompt/completion":
        messages = [{"role": "user", "content": _text_field(row, "prompt")},
                    {"role": "assistant", "content": _text_field(row, "completion")}]
    else:
        answer_key = "response" if shape == "instruction/response" else "output"
        instruction = _text_field(row, "instruction")
        answer = _text_field(row, answer_key)
        extra = _text_field(row, "input", allow_empty=True) if "input" in row else ""
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages, shape


# ---------------------------------------------------------------------------------------------
# reading files (each yields (where, row) with a human location like "line 12")
# ---------------------------------------------------------------------------------------------

def _decode_utf8(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); "
                        "re-save the file as UTF-8") from None


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"line {lineno}", RowProblem(f"malformed JSON ({e.msg} at column {e.colno})")


def _json_array_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    # The json module reports no positions for parsed elements; walking the array with raw_decode gives each
    # element's line so errors can name it like they do for JSONL.
    decoder = json.JSONDecoder()
    ws = " \t\r\n"

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    i = skip(0) + 1          # past "["
    i = skip(i)
    if i < len(text) and text[i] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                            "fix the file and run again") from None
        yield f"line {line_of(i)}", obj
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < len(text) and text[i] == "]":
            if skip(i + 1) != len(text):
                raise DataError(f"{path}:{line_of(skip(i + 1))}: unexpected text after the closing ']'")
            return
        raise DataError(f"{path}:{line_of(i)}: malformed JSON (expected ',' or ']' after an element)")


def _table_records(rows: Iterable[dict], label: str = "row") -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(rows, start=1):
        yield f"{label} {i}", row


def read_records(source: str, *, split: str = "train") -> tuple[list[tuple[str, Any]], dict]:
    """All raw records of a data source with their locations, plus a file record (path, sha256, format).

    Structural problems of the whole file raise DataError at once; per-row problems come back as
    ``RowProblem`` values in place of the row, to be reported together.
    """
    from cogumi.io import sha256_file

    path = Path(source).expanduser()
    if not path.exists():
        if path.suffix.lower() in LOCAL_SUFFIXES + (".csv", ".txt") or source.startswith((".", "/", "~")):
            raise DataError(f"{source}: data file not found")
        return _hub_records(source, split)
    if path.is_dir():
        raise DataError(f"{path}: is a directory; point data.train at a .jsonl, .json or .parquet file")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix or '(none)'}'; use JSONL, JSON or Parquet")
    info = {"path": str(path.resolve()), "sha256": sha256_file(path), "bytes": path.stat().st_size,
            "format": suffix.lstrip(".")}
    if suffix == ".parquet":
        records = _parquet_records(path)
    else:
        text = _decode_utf8(path)
        if not text.strip():
            raise DataError(f"{path}: the file is empty; expected one row object per line")
        if suffix == ".json" and text.lstrip().startswith("["):
            records = list(_json_array_records(path, text))
        elif suffix == ".json" and not text.lstrip().startswith("{"):
            raise DataError(f"{path}:1: expected a JSON array of row objects (or one JSON object per line)")
        else:
            records = list(_jsonl_records(path, text))
    if not records:
        raise DataError(f"{path}: contains no rows")
    return records, info


def _parquet_records(path: Path) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
        table = pq.read_table(path)
    except Exception as e:  # not a parquet file, truncated footer, ...
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: the file is empty (0 rows)")
    return list(_table_records(table.to_pylist()))


def _hub_records(name: str, split: str) -> tuple[list[tuple[str, Any]], dict]:
    """A hub dataset through ``datasets`` (the real loader: caching, auth via HF_TOKEN, revisions)."""
    try:
        import datasets
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, typo, gated, no such split
        raise DataError(f"{name}: not a local file, and loading it as a hub dataset (split {split!r}) failed "
                        f"({type(e).__name__}: {e}). Check the path or dataset id.") from None
    fingerprint = getattr(ds, "_fingerprint", None)
    info = {"path": None, "hub_id": name, "split": split, "sha256": None, "fingerprint": fingerprint,
            "format": "hub"}
    return list(_table_records(ds)), info


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

@dataclass
class LoadedRows:
    """Validated rows of one source: the originals (for the holdout file) and their chat messages."""
    source: str
    rows: list[dict]
    messages: list[list[dict]]
    shapes: dict[str, int]
    duplicates: int
    info: dict


def load_rows(source: str, *, split: str = "train", system_prompt: str | None = None) -> LoadedRows:
    """Read and validate every row of ``source``; one DataError lists the first few problems and the count."""
    records, info = read_records(source, split=split)
    problems: list[str] = []
    n_bad = 0
    rows, messages, shapes = [], [], Counter()
    for where, rec in records:
        try:
            if isinstance(rec, RowProblem):
                raise rec
            msgs, shape = row_to_messages(rec, system_prompt)
        except RowProblem as p:
            n_bad += 1
            if len(problems) < MAX_LISTED_PROBLEMS:
                problems.append(f"{source}:{where.split()[-1]}: {p}" if where.startswith("line")
                                else f"{source} {where}: {p}")
            continue
        rows.append(rec)
        messages.append(msgs)
        shapes[shape] += 1
    if n_bad:
        more = f"\n  ... and {n_bad - len(problems)} more" if n_bad > len(problems) else ""
        raise DataError(f"{n_bad} bad row(s) in {source} (of {len(records)}):\n  " + "\n  ".join(problems) + more +
                        "\nFix or remove these rows and run again; cogumi checks every row before training starts.")
    seen: set[str] = set()
    duplicates = 0
    for msgs in messages:
        key = hashlib.sha1(json.dumps(msgs, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        if key in seen:
            duplicates += 1
        seen.add(key)
    info = {**info, "rows": len(rows)}
    return LoadedRows(source, rows, messages, dict(shapes), duplicates, info)


# ---------------------------------------------------------------------------------------------
# rendering and tokenization
# ---------------------------------------------------------------------------------------------

def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_messages(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a conversation rendered with the tokenizer's chat template, and a mask that is 1 on
    every assistant turn's tokens (its content and end-of-turn token), 0 elsewhere.

    Each assistant turn spans from the end of ``render(history, add_generation_prompt=True)`` -- exactly the
    prompt evaluation feeds the model -- to the end of ``render(history + [turn])``. Tokens are compared as
    ids, so a merge across a boundary falls back to the common prefix (as TRL does).
    """
    full_text = _render(tokenizer, messages)
    texts = [full_text]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns:
        texts.append(_render(tokenizer, messages[:i], add_generation_prompt=True))
        texts.append(full_text if i == len(messages) - 1 else _render(tokenizer, messages[:i + 1]))
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    full_ids = encoded[0]
    mask = [0] * len(full_ids)
    for k in range(len(turns)):
        start = _common_prefix_length(encoded[1 + 2 * k], full_ids)
        end = _common_prefix_length(encoded[2 + 2 * k], full_ids)
        for j in range(start, end):
            mask[j] = 1
    return full_ids, mask


@dataclass
class TokenizedRows:
    input_ids: list[list[int]]
    completion_mask: list[list[int]]
    kept: list[int]                       # index (into the given rows) of each kept example
    stats: dict

    def to_dataset(self):
        from datasets import Dataset
        return Dataset.from_dict({"input_ids": self.input_ids, "completion_mask": self.completion_mask})


PARALLEL_ROWS = 20_000          # above this many rows, tokenize with several processes (datasets.map)


def _encode_batch(batch: dict, tokenizer) -> dict:
    pairs = [encode_messages(m, tokenizer) for m in batch["messages"]]
    return {"input_ids": [p[0] for p in pairs], "completion_mask": [p[1] for p in pairs]}


def _encode_all(conversations: list[list[dict]], tokenizer, num_proc: int) -> list[tuple[list[int], list[int]]]:
    if num_proc <= 1:
        return [encode_messages(m, tokenizer) for m in conversations]
    from datasets import Dataset
    ds = Dataset.from_dict({"messages": conversations}).map(
        _encode_batch, batched=True, batch_size=500, num_proc=num_proc, fn_kwargs={"tokenizer": tokenizer},
        remove_columns=["messages"], desc="Tokenizing rows")
    return list(zip(ds["input_ids"], ds["completion_mask"]))


def tokenize_rows(rows: list, tokenizer, max_length: int, overlong: str = "truncate", *,
                  system_prompt: str | None = None, source: str = "rows", num_proc: int | None = None) -> TokenizedRows:
    """Render and tokenize rows (any accepted row shape, or ready message lists) for training.

    Over-long rows (more than ``max_length`` tokens) are cut to their first ``max_length`` tokens
    (``truncate``) or left out (``drop``); a truncated row with no assistant token left is dropped too.
    Returns the examples and counts: rows, kept, overlong, truncated, dropped, tokens, loss_tokens.
    ``num_proc`` (default: up to 8 processes above ``PARALLEL_ROWS`` rows) spreads the rendering.
    """
    import os
    if overlong not in ("truncate", "drop"):
        raise DataError(f"data.overlong must be 'truncate' or 'drop', got {overlong!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the base model's tokenizer has no chat template, so {source} cannot be rendered the way "
                        "evaluation prompts the model; use an instruct/chat base (e.g. "
                        "meta-llama/Meta-Llama-3.1-8B-Instruct)")
    conversations = []
    for idx, row in enumerate(rows):
        if isinstance(row, list):
            conversations.append(row)
            continue
        try:
            conversations.append(row_to_messages(row, system_prompt)[0])
        except RowProblem as p:
            raise DataError(f"{source} row {idx + 1}: {p}") from None
    if num_proc is None:
        num_proc = min(8, os.cpu_count() or 1) if len(conversations) > PARALLEL_ROWS else 1
    out_ids, out_mask, kept = [], [], []
    n_overlong = n_truncated = n_dropped = n_no_loss = 0
    longest = 0
    for idx, (ids, mask) in enumerate(_encode_all(conversations, tokenizer, num_proc)):
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            n_overlong += 1
            if overlong == "drop":
                n_dropped += 1
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            n_truncated += 1
        if not any(mask):
            n_no_loss += 1
            continue
        out_ids.append(ids)
        out_mask.append(mask)
        kept.append(idx)
    stats = {
        "rows": len(rows), "kept": len(kept), "max_length": max_length, "overlong_policy": overlong,
        "overlong": n_overlong, "truncated": n_truncated, "dropped_overlong": n_dropped,
        "dropped_no_loss_tokens": n_no_loss,
        "tokens": sum(map(len, out_ids)), "loss_tokens": sum(map(sum, out_mask)), "longest_row_tokens": longest,
    }
    return TokenizedRows(out_ids, out_mask, kept, stats)


# ---------------------------------------------------------------------------------------------
# the whole preparation step
# ---------------------------------------------------------------------------------------------

@dataclass
class PreparedData:
    train_dataset: Any                    # datasets.Dataset: input_ids, completion_mask
    eval_dataset: Any | None              # same, from data.eval or the held-out rows; None when neither
    holdout_rows: list[dict]              # rows held out, in their input shape
    stats: dict = field(default_factory=dict)

    def write_holdout(self, path: str | Path) -> Path | None:
        from cogumi.io import atomic_write_jsonl
        if not self.holdout_rows:
            return None
        return atomic_write_jsonl(path, self.holdout_rows)

    def summary_lines(self) -> list[str]:
        s, t = self.stats, self.stats["train"]
        lines = [f"data: {s['rows_read']} rows read from {s['files'][0].get('path') or s['files'][0].get('hub_id')} "
                 f"({', '.join(f'{k}: {v}' for k, v in s['shapes'].items())})",
                 f"data: {t['kept']} training rows, {t['tokens']} tokens ({t['loss_tokens']} on assistant turns), "
                 f"{s['holdout_rows']} held out"]
        if t["overlong"]:
            lines.append(f"data: {t['overlong']} rows longer than max_length={t['max_length']}: "
                         f"{t['truncated']} truncated, {t['dropped_overlong']} dropped (policy: {t['overlong_policy']})")
        if t["dropped_no_loss_tokens"]:
            lines.append(f"data: {t['dropped_no_loss_tokens']} rows dropped: no assistant token left within max_length")
        if s["duplicates"]:
            lines.append(f"data: warning: {s['duplicates']} exact duplicate rows (kept; dedupe the file if unintended)")
        return lines


def split_holdout(n_rows: int, holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (seeded) split of row indices into (train, holdout), both in file order."""
    held = set(random.Random(seed).sample(range(n_rows), holdout)) if holdout else set()
    return [i for i in range(n_rows) if i not in held], sorted(held)


def prepare_dataset(cfg, tokenizer) -> PreparedData:
    """Read, validate, hold out and tokenize ``cfg.data`` for ``tokenizer`` (the base's)."""
    d, t = cfg.data, cfg.training
    loaded = load_rows(d.train, split=d.split, system_prompt=d.system_prompt)
    if d.holdout >= len(loaded.rows):
        raise DataError(f"{d.train}: data.holdout={d.holdout} but the file has only {len(loaded.rows)} rows; "
                        "lower data.holdout")
    train_idx, held_idx = split_holdout(len(loaded.rows), d.holdout, t.seed)
    train_tok = tokenize_rows([loaded.messages[i] for i in train_idx], tokenizer, t.max_length, d.overlong,
                              source=d.train)
    if not train_tok.kept:
        raise DataError(f"{d.train}: no trainable rows left: all {len(train_idx)} rows were dropped by the over-long "
                        f"policy (max_length={t.max_length}, overlong={d.overlong}); raise training.max_length")
    files = [loaded.info]
    eval_dataset, eval_stats = None, None
    if d.eval:
        ev = load_rows(d.eval, split=d.split, system_prompt=d.system_prompt)
        eval_tok = tokenize_rows(ev.messages, tokenizer, t.max_length, "truncate", source=d.eval)
        files.append({**ev.info, "role": "eval"})
        eval_dataset, eval_stats = eval_tok.to_dataset(), eval_tok.stats
    elif held_idx:
        eval_tok = tokenize_rows([loaded.messages[i] for i in held_idx], tokenizer, t.max_length, "truncate",
                                 source=d.train)
        if eval_tok.kept:
            eval_dataset, eval_stats = eval_tok.to_dataset(), eval_tok.stats
    files[0]["role"] = "train"
    stats = {
        "files": files, "rows_read": len(loaded.rows), "shapes": loaded.shapes, "duplicates": loaded.duplicates,
        "holdout_rows": len(held_idx), "train_rows": train_tok.stats["kept"], "train": train_tok.stats,
        "eval": eval_stats,
    }
    return PreparedData(train_tok.to_dataset(), eval_dataset, [loaded.rows[i] for i in held_idx], stats)
