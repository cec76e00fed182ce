"""Prompt sets as data: the built-in sets, custom files (validation, include, system, stop), sandboxed
rendering of hostile rows, few-shot, and the `training` set matching how `cogumi train` renders a row."""

import pytest

from cogumi.errors import ConfigError, DataError
from cogumi.evaluation import prompts, tasks
from cogumi.evaluation.tasks import Item, build_messages

GSM = {"question": "  Ann has 3 cats and buys 4 more. How many cats?\n", "answer": "3+4=7\n#### 7"}
MBPP = {"task_id": 12, "text": "Write a function to add one.", "code": "def add_one(x):\r\n    return x + 1",
        "test_list": ["assert add_one(1) == 2", "assert add_one(2) == 3 ", "assert add_one(-1) == 0"]}
HUMANEVAL = {"task_id": "HumanEval/9", "prompt": "\ndef inc(x):\n    \"\"\"Add one.\"\"\"\n",
             "canonical_solution": "    return x + 1\n", "test": "def check(c):\n    assert c(1) == 2\n",
             "entry_point": "inc"}


def item(task, row, task_id="0"):
    return Item(task, task_id, "unused", "gold", row)


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# built-in sets
# ---------------------------------------------------------------------------------------------

def test_chat_set_reproduces_the_earlier_wrapper_prompts():
    chat = prompts.resolve("chat")
    assert chat.render_text("gsm8k", GSM) == (
        "Solve the following math problem. Reason step by step, then give the final answer on the last line in "
        "the form `#### N`, where N is the number only (no units).\n\nQuestion: Ann has 3 cats and buys 4 more. "
        "How many cats?")
    assert chat.render_text("mbpp", MBPP) == (
        "Write a function to add one.\nYour code should pass this test:\nassert add_one(1) == 2\n\n"
        "Answer with the Python function in one ```python fenced code block.")
    assert chat.render_text("humaneval", HUMANEVAL) == (
        "Complete the following Python function. Answer with the whole function (signature included) in one "
        "```python fenced code block.\n\n```python\n\ndef inc(x):\n    \"\"\"Add one.\"\"\"\n```")


def test_default_set_shows_every_mbpp_assert_and_keeps_chat_elsewhere():
    default, chat = prompts.resolve(None), prompts.resolve("chat")
    assert default.name == prompts.DEFAULT == "default" and default.source == "builtin:default"
    text = default.render_text("mbpp", MBPP)
    assert all(t.strip() in text for t in MBPP["test_list"]) and "these tests" in text
    assert "def add_one" not in text                       # the reference solution never leaks
    for task, row in (("gsm8k", GSM), ("humaneval", HUMANEVAL)):
        assert default.render_text(task, row) == chat.render_text(task, row)
    # the tasks module's prompt functions are the default set's
    assert tasks.gsm8k_prompt(GSM["question"]) == default.render_text("gsm8k", GSM)
    assert tasks.mbpp_prompt(MBPP) == text
    assert tasks.humaneval_prompt({"prompt": HUMANEVAL["prompt"]}) == default.render_text("humaneval", HUMANEVAL)
    assert len({prompts.resolve(n).sha256 for n in prompts.builtin_names()}) == len(prompts.builtin_names()) >= 3


def test_training_set_is_the_bare_question():
    training = prompts.resolve("training")
    assert training.render_text("gsm8k", GSM) == GSM["question"]             # verbatim, whitespace kept
    assert training.render_text("humaneval", HUMANEVAL) == HUMANEVAL["prompt"]
    assert training.render_text("mbpp", MBPP) == ("Write a function to add one.\nassert add_one(1) == 2\n"
                                                  "assert add_one(2) == 3\nassert add_one(-1) == 0")
    assert training.render(item("gsm8k", GSM)) == [{"role": "user", "content": GSM["question"]}]
    assert training.record() == {"name": "training", "source": "builtin:training", "sha256": training.sha256}


def test_training_prompt_is_the_prefix_of_a_rendered_training_row(tiny_base, tmp_path):
    """Through the real chat template: what eval asks under `training` (with a system message, as a run
    config's data.system_prompt adds one) is exactly the start of the rendered training row."""
    from transformers import AutoTokenizer

    from cogumi.data import row_to_messages
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    system = "You are a careful tutor."
    custom = prompts.resolve(str(write(tmp_path, f"include: training\nsystem: {system}\n")))
    row = {"instruction": GSM["question"], "response": "3 + 4 = 7\n#### 7"}
    trained = tok.apply_chat_template(row_to_messages(row, system)[0], tokenize=False)
    asked = tok.apply_chat_template(custom.render(item("gsm8k", GSM)), tokenize=False, add_generation_prompt=True)
    assert trained.startswith(asked) and trained[len(asked):].startswith("3 + 4 = 7")
    plain = prompts.resolve("training").render(item("gsm8k", GSM))
    assert tok.apply_chat_template(row_to_messages(row)[0], tokenize=False).startswith(
        tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True))


# ---------------------------------------------------------------------------------------------
# custom files
# ---------------------------------------------------------------------------------------------

def test_custom_file_with_include_system_and_stop(tmp_path):
    path = write(tmp_path, 'name: mine\ninclude: default\nsystem: Be brief.\ntasks:\n'
                           '  gsm8k:\n    template: "Q: {{ question.strip() }}\\nA:"\n    stop: ["\\nQ:"]\n')
    ps = prompts.resolve(str(path))
    assert (ps.name, ps.source) == ("mine", str(path))
    assert ps.render_text("gsm8k", GSM) == "Q: Ann has 3 cats and buys 4 more. How many cats?\nA:"
    assert ps.render_text("mbpp", MBPP) == prompts.default().render_text("mbpp", MBPP)   # inherited
    assert ps.render(item("gsm8k", GSM))[0] == {"role": "system", "content": "Be brief."}
    from cogumi.evaluation.finish import task_stops
    assert ps.stops("gsm8k")[:len(task_stops("gsm8k"))] == task_stops("gsm8k") and "\nQ:" in ps.stops("gsm8k")
    assert ps.stops("mbpp") == task_stops("mbpp")
    assert ps.sha256 != prompts.default().sha256
    path.write_text(path.read_text().replace("Be brief.", "Be short."))
    assert prompts.resolve(str(path)).sha256 != ps.sha256                   # the hash covers the content


@pytest.mark.parametrize("text, expected", [
    ("tasks:\n  gsm8k: {template: '{{ question }}'}\n", "tasks.humaneval.template: missing"),
    ("include: default\ntemplates: {}\n", "unknown key 'templates'"),
    ("include: default\ntasks:\n  math: {template: '{{ question }}'}\n", "tasks.math: unknown task"),
    ("include: default\ntasks:\n  gsm8k: {template: '{{ question }}', until: ['x']}\n", "tasks.gsm8k.until: unknown key"),
    ("include: default\ntasks:\n  gsm8k: {template: '{{ answer }}'}\n", "tasks.gsm8k.template: unknown field(s) answer"),
    ("include: default\ntasks:\n  mbpp: {template: '{{ code }}'}\n", "tasks.mbpp.template: unknown field(s) code"),
    ("include: default\ntasks:\n  gsm8k: {template: '{{ question '}\n", "tasks.gsm8k.template: Jinja2 syntax error"),
    ("include: default\ntasks:\n  gsm8k: {template: ''}\n", "tasks.gsm8k.template: missing or empty"),
    ("include: default\ntasks:\n  gsm8k: {template: '{{ question }}', stop: [1]}\n", "tasks.gsm8k.stop: must be"),
    ("include: nowhere\n", "include: 'nowhere' is neither"),
    ("include: p.yaml\n", "includes itself"),
    ("- just\n- a list\n", "a prompt set is a YAML mapping"),
    ("tasks: [oops\n", "p.yaml:2: not valid YAML"),
])
def test_invalid_files_are_one_clear_error(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        prompts.resolve(str(path))
    assert str(path) in str(e.value) and expected in str(e.value)


def test_every_problem_of_a_file_is_named_in_one_error(tmp_path):
    path = write(tmp_path, "colour: red\ntasks:\n  gsm8k: {template: '{{ answer }}'}\n")
    with pytest.raises(ConfigError) as e:
        prompts.resolve(str(path))
    msg = str(e.value)
    for part in ("unknown key 'colour'", "unknown field(s) answer", "tasks.humaneval.template: missing",
                 "tasks.mbpp.template: missing"):
        assert part in msg


def test_include_cycle_between_two_files(tmp_path):
    write(tmp_path, "include: b.yaml\n", "a.yaml")
    write(tmp_path, "include: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="includes itself"):
        prompts.resolve(str(tmp_path / "a.yaml"))


def test_unknown_name_lists_the_built_in_sets(tmp_path):
    with pytest.raises(ConfigError) as e:
        prompts.resolve("chatty")
    assert all(name in str(e.value) for name in ("default", "chat", "training"))
    with pytest.raises(ConfigError, match="no such file"):
        prompts.resolve(str(tmp_path / "missing.yaml"))


# ---------------------------------------------------------------------------------------------
# rendering untrusted rows
# ---------------------------------------------------------------------------------------------

def test_row_text_is_data_never_template_code():
    row = {"question": "What is {{ 7 * 7 }}? {% raw %}"}
    assert prompts.resolve("training").render_text("gsm8k", row) == row["question"]


def test_sandbox_blocks_template_escapes(tmp_path):
    path = write(tmp_path, "include: default\ntasks:\n  gsm8k: "
                           "{template: \"{{ question.__class__.__mro__[1].__subclasses__() }}\"}\n")
    ps = prompts.resolve(str(path))
    with pytest.raises(DataError, match="gsm8k item 0: prompt set p .*could not be rendered"):
        ps.text(item("gsm8k", GSM))


def test_rows_missing_a_field_or_rendering_empty_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="mbpp item 5: .*tasks.mbpp.template"):
        prompts.default().text(item("mbpp", {"task_id": 5, "text": "no tests"}, "5"))
    with pytest.raises(DataError, match="renders an empty prompt"):
        prompts.resolve("training").text(item("gsm8k", {"question": "  \n"}))


# ---------------------------------------------------------------------------------------------
# few-shot
# ---------------------------------------------------------------------------------------------

def test_few_shot_messages_render_shots_with_the_same_set(tmp_path):
    ps = prompts.resolve(str(write(tmp_path, "include: training\nsystem: S\n")))
    shots = [Item("gsm8k", str(i), "unused", str(i), {"question": f"q{i}", "answer": f"a{i} <<1+1=2>>\n#### {i}"})
             for i in range(3)]
    target = Item("gsm8k", "9", "unused", "7", GSM)
    msgs = build_messages(target, few_shot=2, shots=shots, prompts=ps)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in msgs[1:5]] == ["q0", "a0 \n#### 0", "q1", "a1 \n#### 1"]
    assert msgs[-1]["content"] == GSM["question"]
    # without a set, the item's own prompt text is asked (what load_task put there: the default set's)
    assert build_messages(target) == [{"role": "user", "content": "unused"}]
