"""The jail corpus: hostile completions, one per ``*.txt`` file, as a model would emit them, and the loader.

A file is a header of ``# key: value`` lines, a line ``---``, then the completion verbatim::

    # class: forge                 one of CLASSES
    # format: humaneval-body       humaneval-body (continues the prompt) | humaneval-full (fenced whole
    #                              function) | mbpp (fenced code)
    # item: double                 the benchmark item it answers (``key`` in items_*.jsonl)
    # tries: what the attack does, in one line
    # literal: yes                 optional: the body is a Python string literal (for lone surrogates, NUL
    #                              and invalid UTF-8, which no UTF-8 text file can hold)
    ---
    <completion>

Completions name the arena's targets with ``@@NAME@@`` placeholders (``TARGETS``), replaced by the
Python literal of the value (``render``): the strongest attacker knows the victim's pid, the listeners'
addresses and where the data file lies. An attack that sees itself succeed says so in an exception whose
message starts ``ESCAPED:`` (and carries what it took), so the row's reason names it; the host-side
canaries are the judge either way.

Items are real HumanEval/MBPP rows (HumanEval/2, 4, 8, 32, 34, 37, 38, 52, 111, copied verbatim from the
benchmark, MIT licence) plus a few in the same format whose tests use the styles the attacks need
(``map``/``filter`` over the candidate, a helper with default arguments and a closure).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
CLASSES = ("forge", "mutate", "liar", "stdlib", "hook", "unix", "disk", "pids", "cleanup", "encoding", "wire",
           "other")
FORMATS = {"humaneval-body": "humaneval", "humaneval-full": "humaneval", "mbpp": "mbpp"}
TARGETS = ("TOKEN", "NAME", "SECRET_NAME", "WATCHED", "SENTINEL", "FAKE_HOME", "VICTIM_PID", "PARENT_PID", "PORT",
           "UDP_PORT", "UNIX_PATH", "UNIX_ABSTRACT", "RUN_SOCK", "DEVLOG", "DATA_FILE")
_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")


@dataclass(frozen=True)
class Attack:
    name: str
    klass: str
    format: str          # key of FORMATS
    item: str            # key of an item in items_<task>.jsonl
    tries: str
    template: str        # the completion with @@NAME@@ placeholders

    @property
    def task(self) -> str:
        return FORMATS[self.format]

    def render(self, targets: dict) -> str:
        """The completion with every placeholder replaced by the Python literal of its target."""
        def value(m: re.Match) -> str:
            if m.group(1) == "NAME":
                return repr(self.name)
            return repr(targets[m.group(1)])
        return _PLACEHOLDER.sub(value, self.template)


def parse(path: Path) -> Attack:
    text = path.read_text(encoding="utf-8")
    head, sep, body = text.partition("\n---\n")
    if not sep:
        raise ValueError(f"{path}: no '---' line between the header and the completion")
    header = {}
    for line in head.splitlines():
        key, colon, value = line.removeprefix("# ").partition(":")
        if not line.startswith("# ") or not colon:
            raise ValueError(f"{path}: header line {line!r} is not '# key: value'")
        header[key.strip()] = value.strip()
    missing = {"class", "format", "item", "tries"} - set(header)
    if missing:
        raise ValueError(f"{path}: header lacks {sorted(missing)}")
    if header["class"] not in CLASSES or header["format"] not in FORMATS:
        raise ValueError(f"{path}: unknown class {header['class']!r} or format {header['format']!r}")
    if header.get("literal") == "yes":
        body = ast.literal_eval(body)
    unknown = {m for m in _PLACEHOLDER.findall(body)} - set(TARGETS) - {"NAME"}
    if unknown:
        raise ValueError(f"{path}: unknown placeholder(s) {sorted(unknown)}; targets are {TARGETS}")
    return Attack(path.stem, header["class"], header["format"], header["item"], header["tries"], body)


def load_corpus(directory: Path = HERE) -> dict[str, Attack]:
    return {p.stem: parse(p) for p in sorted(directory.glob("*.txt"))}


def load_items(task: str, directory: Path = HERE) -> dict[str, dict]:
    """{item key: benchmark row} of items_<task>.jsonl (the row as the benchmark file has it, plus ``key``)."""
    rows = [json.loads(line) for line in (directory / f"items_{task}.jsonl").read_text().splitlines() if line]
    return {r["key"]: r for r in rows}


def honest_completion(task: str, row: dict, style: str = "body") -> str:
    """The item's reference solution as a model would emit it (HumanEval: the body continuing the prompt,
    or with ``style="full"`` the whole function fenced; MBPP: the code fenced)."""
    if task == "mbpp":
        return f"```python\n{row['code']}\n```"
    if style == "full":
        return f"```python\n{row['prompt'] + row['canonical_solution']}\n```"
    return row["canonical_solution"]
