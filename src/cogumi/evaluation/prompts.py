"""Prompt sets: what the model is asked on each benchmark, kept as data (YAML beside the tasks).

Features
  * A prompt set is one YAML file in lm-evaluation-harness's declarative style::

        name: my-prompts                 # optional (default: the file's stem)
        description: ...                 # optional
        include: default                 # optional: start from another set (a built-in name or a file
                                         #   path relative to this one) and override some tasks
        system: You are a careful ...    # optional: a system message before every conversation
        tasks:
          gsm8k:
            template: "Question: {{ question }}"   # Jinja2, rendered as the user turn
            stop: ["\\n\\n\\n"]                      # optional: stop sequences added to the task's own
          humaneval: {template: "{{ prompt }}"}
          mbpp: {template: "{{ text }}\\n{{ tests }}"}

    A complete set has a template for every task (after ``include``).
  * Template fields (the question side of a benchmark row only -- the gold answer, reference code and
    hidden tests are never passed, so no template can leak them): gsm8k ``question``; humaneval
    ``prompt``, ``entry_point``, ``task_id``; mbpp ``text`` (sanitized MBPP's ``prompt``),
    ``test_list``, ``tests`` (every assert, one per line), ``task_id``. Templates run in Jinja's
    immutable sandbox with strict undefined variables.
  * Built-in sets (``prompts/*.yaml``): ``default`` (``DEFAULT``: the chat wrappers for GSM8K and
    HumanEval, MBPP's original prompt with all its asserts), ``chat`` (cogumi's earlier wrappers, MBPP with
    one assert), ``training`` (the bare question, as a training row's instruction).
  * ``resolve(spec) -> PromptSet``: ``None`` -> the default set; a built-in name; or a YAML
    file. ``PromptSet``: ``.name``, ``.source`` (``builtin:NAME`` or the file path), ``.sha256`` (of the
    templates, stops and system message), ``.text(item)`` (the user message), ``.render(item)`` (chat
    messages), ``.messages(text, shots)``, ``.stops(task)``, ``.record()`` (what results record).
  * Conversations are assembled by ``cogumi.data.row_to_messages`` -- the function ``cogumi train``
    renders ``{instruction, response}`` rows with -- so the ``training`` set asks the question exactly
    as a training row's instruction was rendered (the same system message handling, the same turn).

Failure modes
  * A name that is neither built in nor a file; a file that does not parse, is not a mapping, has an
    unknown key or task, a template that is not a non-empty string, a Jinja syntax error, a field the task
    does not have, a malformed ``stop`` list, an include cycle, or a task without a template: one
    ``ConfigError`` naming the file and every key at fault.
  * A benchmark row whose template cannot be rendered (a field missing from a hand-made row) or renders
    empty: ``DataError`` naming the task, item and template key.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cogumi.errors import ConfigError, DataError

DEFAULT = "default"
BUILTIN_DIR = Path(__file__).with_name("prompts")
PROMPT_TASKS = ("gsm8k", "humaneval", "mbpp")
FIELDS = {
    "gsm8k": ("question",),
    "humaneval": ("prompt", "entry_point", "task_id"),
    "mbpp": ("text", "test_list", "tests", "task_id"),
}
_SET_KEYS = ("name", "description", "include", "system", "tasks")
_TASK_KEYS = ("template", "stop")


@functools.lru_cache(maxsize=1)
def _env():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)


def context(task: str, row: dict) -> dict:
    """The fields a template of ``task`` sees for a benchmark row (only those the row has)."""
    if task == "gsm8k":
        ctx = {"question": row.get("question")}
    elif task == "humaneval":
        ctx = {k: row.get(k) for k in ("prompt", "entry_point", "task_id")}
    elif task == "mbpp":
        tests = row.get("test_list")
        tests = [str(t) for t in tests] if isinstance(tests, list) else None
        ctx = {"text": row.get("text", row.get("prompt")), "task_id": row.get("task_id"), "test_list": tests,
               "tests": "\n".join(t.strip() for t in tests) if tests is not None else None}
    else:
        raise ConfigError(f"no prompt fields for task {task!r}; tasks are {', '.join(PROMPT_TASKS)}")
    return {k: v if k == "test_list" else str(v) for k, v in ctx.items() if v is not None}


@dataclass(frozen=True)
class TaskPrompt:
    template: str
    stop: tuple[str, ...] = ()


class PromptSet:
    """One prompt per task, plus an optional system message (see the module docstring)."""

    def __init__(self, name: str, source: str, tasks: dict[str, TaskPrompt], *, system: str | None = None,
                 description: str = ""):
        self.name = name
        self.source = source
        self.tasks = dict(tasks)
        self.system = system
        self.description = description
        self._compiled = {t: _env().from_string(p.template) for t, p in self.tasks.items()}
        blob = json.dumps({"system": system, "tasks": {t: {"template": p.template, "stop": list(p.stop)}
                                                         for t, p in sorted(self.tasks.items())}},
                          sort_keys=True, ensure_ascii=False)
        self.sha256 = hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"PromptSet({self.name!r}, {self.source!r}, sha256={self.sha256[:12]})"

    def record(self) -> dict:
        """What results.jsonl rows and summary.json record about the prompts used."""
        return {"name": self.name, "source": self.source, "sha256": self.sha256}

    def stops(self, task: str) -> tuple[str, ...]:
        """The task's own stop sequences, then this set's additions."""
        from cogumi.evaluation.finish import task_stops
        extra = self.tasks[task].stop if task in self.tasks else ()
        return tuple(dict.fromkeys(task_stops(task) + tuple(extra)))

    def render_text(self, task: str, row: dict, *, where: str | None = None) -> str:
        """The user message for a benchmark row of ``task``."""
        from jinja2 import TemplateError
        if task not in self._compiled:
            raise ConfigError(f"prompt set {self.name} ({self.source}) has no template for {task}")
        where = where or f"{task} item {row.get('task_id', '?')}"
        try:
            text = self._compiled[task].render(context(task, row))
        except TemplateError as e:
            raise DataError(f"{where}: prompt set {self.name} ({self.source}) tasks.{task}.template could not "
                            f"be rendered: {e}") from None
        if not text.strip():
            raise DataError(f"{where}: prompt set {self.name} ({self.source}) tasks.{task}.template renders "
                            f"an empty prompt")
        return text

    def text(self, item) -> str:
        return self.render_text(item.task, item.data, where=f"{item.task} item {item.task_id}")

    def messages(self, text: str, shots: list[tuple[str, str]] = ()) -> list[dict]:
        """Chat messages: [system], solved ``shots`` (user, assistant) pairs, then ``text`` as the user
        turn -- built by the training renderer, so the question is placed as a training row's would be."""
        from cogumi.data import RowProblem, row_to_messages
        try:
            rendered, _ = row_to_messages({"instruction": text, "response": "-"}, self.system)
        except RowProblem as p:
            raise DataError(f"prompt set {self.name}: {p}") from None
        head, user = rendered[:-2], rendered[-2]
        turns = [m for q, a in shots for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        return head + turns + [user]

    def render(self, item) -> list[dict]:
        """Chat messages for ``item`` (zero-shot)."""
        return self.messages(self.text(item))


# ---------------------------------------------------------------------------------------------
# resolving and loading
# ---------------------------------------------------------------------------------------------

def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def resolve(spec: str | None) -> PromptSet:
    """``None`` -> the default set; a built-in name; or a YAML file (validated: every task has a template)."""
    spec = spec or DEFAULT
    return _load_builtin(spec) if _is_builtin_name(spec) else _load_file(Path(spec).expanduser())


def default() -> PromptSet:
    return _load_builtin(DEFAULT)


def _is_builtin_name(spec: str) -> bool:
    return "/" not in spec and "\\" not in spec and not spec.endswith((".yaml", ".yml")) and \
        (BUILTIN_DIR / f"{spec}.yaml").is_file()


@functools.lru_cache(maxsize=None)
def _load_builtin(name: str) -> PromptSet:
    return _load_file(BUILTIN_DIR / f"{name}.yaml", builtin=True)


def _load_file(path: Path, *, builtin: bool = False, _seen: tuple[Path, ...] = ()) -> PromptSet:
    source = f"builtin:{path.stem}" if builtin else str(path)
    if not path.is_file():
        known = ", ".join(builtin_names())
        raise ConfigError(f"--prompt {path}: not a built-in prompt set ({known}) and no such file; give one of "
                          f"those names or a YAML prompt file (docs/evaluation.md, 'Prompts and truncation')")
    raw = _read_yaml(path)
    problems: list[str] = []
    base: PromptSet | None = None
    if "include" in raw:
        base = _included(path, raw["include"], _seen + (path.resolve(),), problems)
    tasks = dict(base.tasks) if base else {}
    for key in raw:
        if key not in _SET_KEYS:
            problems.append(f"unknown key {key!r} (a prompt set has {', '.join(_SET_KEYS)})")
    for key in ("name", "description", "system"):
        if key in raw and raw[key] is not None and not isinstance(raw[key], str):
            problems.append(f"{key}: must be a string")
    tasks_raw = raw.get("tasks", {})
    if not isinstance(tasks_raw, dict):
        problems.append("tasks: must be a mapping of task name -> {template, stop}")
        tasks_raw = {}
    invalid = set()
    for task, spec in tasks_raw.items():
        parsed = _task_prompt(str(task), spec, problems)
        if parsed is None:
            invalid.add(str(task))
        else:
            tasks[str(task)] = parsed
    for task in PROMPT_TASKS:
        if task not in tasks and task not in invalid:
            problems.append(f"tasks.{task}.template: missing (every task needs a template; or `include: {DEFAULT}`)")
    if problems:
        raise ConfigError(f"{source}: invalid prompt set: " + "; ".join(problems))
    system = raw.get("system") if "system" in raw else (base.system if base else None)
    return PromptSet(raw.get("name") or path.stem, source, tasks, system=system or None,
                     description=raw.get("description") or (base.description if base else ""))


def _read_yaml(path: Path) -> dict:
    import yaml
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; a prompt set is a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a prompt set is a YAML mapping with 'tasks' (see docs/evaluation.md)")
    return raw


def _included(path: Path, include, seen: tuple[Path, ...], problems: list[str]) -> PromptSet | None:
    if not isinstance(include, str) or not include.strip():
        problems.append("include: must be a built-in prompt set name or a file path")
        return None
    if _is_builtin_name(include):
        return _load_builtin(include)
    target = (path.parent / include).resolve()
    if target in seen:
        problems.append(f"include: {include!r} includes itself (cycle through {', '.join(map(str, seen))})")
        return None
    if not target.is_file():
        problems.append(f"include: {include!r} is neither a built-in set ({', '.join(builtin_names())}) "
                        f"nor a file beside {path.name}")
        return None
    return _load_file(target, _seen=seen)


def _task_prompt(task: str, spec, problems: list[str]) -> TaskPrompt | None:
    from jinja2 import TemplateSyntaxError, meta
    key = f"tasks.{task}"
    if task not in PROMPT_TASKS:
        problems.append(f"{key}: unknown task (tasks are {', '.join(PROMPT_TASKS)})")
        return None
    if isinstance(spec, str):
        spec = {"template": spec}
    if not isinstance(spec, dict):
        problems.append(f"{key}: must be a mapping with 'template' (and optional 'stop')")
        return None
    unknown = [k for k in spec if k not in _TASK_KEYS]
    if unknown:
        problems.append(f"{key}.{unknown[0]}: unknown key (a task has {', '.join(_TASK_KEYS)})")
    template = spec.get("template")
    if not isinstance(template, str) or not template.strip():
        problems.append(f"{key}.template: missing or empty (a Jinja2 string, e.g. '{{{{ {FIELDS[task][0]} }}}}')")
        return None
    try:
        names = meta.find_undeclared_variables(_env().parse(template))
    except TemplateSyntaxError as e:
        problems.append(f"{key}.template: Jinja2 syntax error on template line {e.lineno}: {e.message}")
        return None
    unknown_fields = sorted(n for n in names if n not in FIELDS[task] and n not in _env().globals)
    if unknown_fields:
        problems.append(f"{key}.template: unknown field(s) {', '.join(unknown_fields)} "
                        f"({task} templates see {', '.join(FIELDS[task])})")
        return None
    stop = spec.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        problems.append(f"{key}.stop: must be a list of non-empty strings")
        return None
    return TaskPrompt(template, tuple(stop))
