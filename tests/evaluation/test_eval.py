"""`cogumi eval` end to end: the tiny model, predictions, an LLM judge over loopback HTTP with faults,
interruption and resume (each item generated and judged exactly once), position bias, secrets."""

import json
from pathlib import Path

import pytest
from openai_server import (FakeOpenAIServer, Fault, prefer_first, prefer_matching_reference, scripted_judge,
                           tiny_model_responder)

from cogumi.cli import main
from cogumi.errors import CogumiError, ConfigError, DataError
from cogumi.evaluation import generate as generate_mod
from cogumi.evaluation.endpoint import EndpointUnavailable, RetryPolicy, ResponseCache
from cogumi.evaluation.judge import exact_outcome
from cogumi.evaluation.runner import gold_text, run_eval
from cogumi.evaluation.tasks import load_task
from cogumi.tiny import synthetic_gsm8k, synthetic_humaneval, synthetic_mbpp, write_jsonl

KEY = "sk-eval-secret-7f3a9c2e5b1d4680"
FAST = RetryPolicy(base_delay=0.001, max_attempts=3, budget=60, request_timeout=1.0)
# The timeout must outlast a tiny-model generation on a busy 2-core machine; the stall below costs it once.
PATIENT = RetryPolicy(base_delay=0.001, max_attempts=6, budget=60, request_timeout=3.0)


@pytest.fixture
def gsm(tmp_path) -> Path:
    return write_jsonl(tmp_path / "gsm8k.jsonl", synthetic_gsm8k("test"))


def reference_file(tmp_path, gsm, right=lambda i: i % 2 == 0, name="ref.jsonl") -> Path:
    """Reference predictions: the gold answer where right(i), a wrong number elsewhere."""
    rows = [json.loads(line) for line in gsm.read_text().splitlines()]
    return write_jsonl(tmp_path / name, [
        {"task_id": str(i), "completion": r["answer"] if right(i) else "The answer is\n#### 99999"}
        for i, r in enumerate(rows)])


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def assert_summary_matches_rows(out: Path):
    summary = json.loads((out / "summary.json").read_text())
    rows = rows_of(out)
    for task, t in summary["tasks"].items():
        rs = [r for r in rows if r["task"] == task]
        assert t["n"] == len(rs)
        for key, outcome in (("wins", "win"), ("ties", "tie"), ("losses", "loss")):
            assert t[key] == sum(r["outcome"] == outcome for r in rs)
        assert t["judged"] == t["wins"] + t["ties"] + t["losses"]
        assert t["infra_errors"] == sum(r["outcome"] is None for r in rs)
        assert t["correct"] == sum(r["correct"] is True for r in rs)
        if t["judged"]:
            assert t["tie_rate"] == pytest.approx(t["ties"] / t["judged"])
            assert 0 <= t["tie_ci"][0] <= t["tie_rate"] <= t["tie_ci"][1] <= 1
    return summary, rows


def assert_no_secret(out: Path, *texts: str):
    for f in out.rglob("*"):
        if f.is_file():
            assert KEY not in f.read_text(errors="replace"), f"API key leaked into {f}"
    for text in texts:
        assert KEY not in text


# ---------------------------------------------------------------------------------------------
# the tiny model, exact judge
# ---------------------------------------------------------------------------------------------

def test_cli_eval_on_the_tiny_model(tiny_base, gsm, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    ref = reference_file(tmp_path, gsm)
    code = main(["eval", str(tiny_base), "--tasks", "gsm8k", "--data", f"gsm8k={gsm}", "--n", "8", "--seed", "3",
                 "--reference", str(ref), "--out", str(out), "--max-new-tokens", "8", "--batch-size", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary, rows = assert_summary_matches_rows(out)
    assert len(rows) == 8
    assert [r["task_id"] for r in rows] == [it.task_id for it in load_task("gsm8k", str(gsm), n=8, seed=3)]
    for r in rows:
        assert isinstance(r["completion"], str) and r["judge"] is None
        assert r["reference"]["correct"] is (int(r["task_id"]) % 2 == 0)
        assert (r["outcome"], r["tie_kind"]) == exact_outcome(r["correct"], r["reference"]["correct"])
    assert summary["tasks"]["gsm8k"]["reference_correct"] == sum(int(r["task_id"]) % 2 == 0 for r in rows)
    assert summary["candidate"]["dtype"] == "bfloat16" == summary["candidate"]["config_dtype"]  # own dtype
    assert summary["candidate"]["quantized"] is None
    assert summary["tasks"]["gsm8k"]["data_sha256"]
    assert "gsm8k" in captured.out and "wins" in captured.out and "95% Wilson" in captured.out
    assert len(ResponseCache(out / "cache" / "generations.jsonl")) == 8

    # finished runs are not overwritten by accident ...
    again = ["eval", str(tiny_base), "--tasks", "gsm8k", "--data", f"gsm8k={gsm}", "--n", "8", "--seed", "3",
             "--reference", str(ref), "--out", str(out), "--max-new-tokens", "8"]
    assert main(again) == 2 and "--overwrite" in capsys.readouterr().err
    # ... and with --overwrite every answer comes from the cache: the model is not even loaded.
    def no_loading(*a, **k):
        raise AssertionError("model loaded although every answer is cached")
    monkeypatch.setattr(generate_mod, "load_candidate", no_loading)
    assert main(again + ["--overwrite"]) == 0
    assert rows_of(out) == rows


class Killed(BaseException):
    """Stands in for kill -9 / Ctrl-C: a BaseException nothing in cogumi may swallow."""


def test_adapter_candidate_against_its_base_as_reference(tiny_base, gsm, tmp_path):
    """An adapter dir (base + LoRA, unmerged) vs its base model: a fresh LoRA (B = 0) changes nothing,
    so every item is a tie -- and both sides were generated (their cache identities differ)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_base)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(adapter)
    out = tmp_path / "run"
    summary = run_eval(str(adapter), tasks=["gsm8k"], out=out, n=5, data={"gsm8k": str(gsm)}, base=str(tiny_base),
                       reference=str(tiny_base), max_new_tokens=6, batch_size=8, log=lambda m: None)
    rows = rows_of(out)
    assert all(r["completion"] == r["reference"]["completion"] for r in rows)
    assert summary["tasks"]["gsm8k"]["ties"] == 5
    assert summary["candidate"]["identity"].startswith("adapter:") and summary["reference_info"]["kind"] == "local"
    assert summary["candidate"]["dtype"] == "bfloat16"
    assert len(ResponseCache(out / "cache" / "generations.jsonl")) == 10


def test_local_generation_resumes_after_interrupt(tiny_base, gsm, tmp_path, monkeypatch):
    calls = []
    kill_armed = True
    real = generate_mod.generate

    def interrupting(model, tok, conversations, **kw):
        calls.append(len(conversations))
        if len(calls) == 2 and kill_armed:
            raise Killed  # a dying machine, between two chunks
        return real(model, tok, conversations, **kw)

    monkeypatch.setattr(generate_mod, "generate", interrupting)
    out = tmp_path / "run"
    kwargs = dict(tasks=["gsm8k"], out=out, n=20, data={"gsm8k": str(gsm)}, max_new_tokens=4, batch_size=1,
                  reference=str(reference_file(tmp_path, gsm)), log=lambda m: None)
    with pytest.raises(Killed):
        run_eval(str(tiny_base), **kwargs)
    assert not (out / "results.jsonl").exists() and not (out / "summary.json").exists()
    assert len(ResponseCache(out / "cache" / "generations.jsonl")) == 8   # the first chunk (8 x batch 1)
    assert calls == [8, 8]
    calls.clear()
    kill_armed = False
    summary = run_eval(str(tiny_base), **kwargs)
    assert calls == [8, 4]                                                 # only the 12 missing answers
    assert summary["tasks"]["gsm8k"]["n"] == 20


def test_exact_judge_known_outcomes_from_predictions(gsm, tmp_path, capsys):
    # candidate right on ids 0-4, reference right on even ids -> per id in 0..9:
    cand = reference_file(tmp_path, gsm, right=lambda i: i < 5, name="cand.jsonl")
    ref = reference_file(tmp_path, gsm, right=lambda i: i % 2 == 0)
    out = tmp_path / "run"
    summary = run_eval(str(cand), tasks=["gsm8k"], out=out, data={"gsm8k": str(gsm)}, reference=str(ref),
                       log=lambda m: None)
    t = summary["tasks"]["gsm8k"]
    ids = range(30)
    wins = sum(i < 5 and i % 2 for i in ids)
    losses = sum(i >= 5 and i % 2 == 0 for i in ids)
    both_right = sum(i < 5 and i % 2 == 0 for i in ids)
    assert (t["wins"], t["losses"], t["ties_both_right"], t["ties_both_wrong"]) == \
        (wins, losses, both_right, 30 - wins - losses - both_right)
    assert (t["accuracy"], t["reference_accuracy"]) == (5 / 30, 15 / 30)
    assert_summary_matches_rows(out)


def test_code_tasks_exact_judge_and_code_gate(tmp_path, capsys):
    mbpp, he = synthetic_mbpp("test"), synthetic_humaneval()
    data = {"mbpp": str(write_jsonl(tmp_path / "mbpp.jsonl", mbpp)),
            "humaneval": str(write_jsonl(tmp_path / "he.jsonl", he))}
    # candidate: the first 6 MBPP / 3 HumanEval right; reference: odd positions right, the rest wrong in
    # different ways (a crash, a wrong body, one infinite loop that the sandbox times out)
    cand = [{"task": "mbpp", "task_id": str(r["task_id"]),
             "completion": f"```python\n{r['code']}\n```" if i < 6 else "def nope():\n    pass"} for i, r in enumerate(mbpp)]
    cand += [{"task": "humaneval", "task_id": r["task_id"],
              "completion": r["canonical_solution"] if i < 3 else "    return None\n"} for i, r in enumerate(he)]
    ref = [{"task": "mbpp", "task_id": str(r["task_id"]), "completion": r["code"] if i % 2 else "oops"}
           for i, r in enumerate(mbpp)]
    ref += [{"task": "humaneval", "task_id": r["task_id"],
             "completion": r["canonical_solution"] if i % 2 else ("    while True:\n        pass\n" if i == 0 else
                                                                   "    return -1\n")} for i, r in enumerate(he)]
    out = tmp_path / "run"
    summary = run_eval(str(write_jsonl(tmp_path / "cand.jsonl", cand)), tasks=["mbpp", "humaneval"], out=out,
                       data=data, reference=str(write_jsonl(tmp_path / "ref.jsonl", ref)), timeout=1.0, workers=2,
                       log=lambda m: None)
    m, h = summary["tasks"]["mbpp"], summary["tasks"]["humaneval"]
    assert (m["n"], m["wins"], m["ties"], m["losses"], m["infra_errors"]) == (10, 3, 5, 2, 0)
    assert (h["n"], h["wins"], h["ties"], h["losses"], h["infra_errors"]) == (6, 2, 2, 2, 0)
    loop = next(r for r in rows_of(out) if r["task_id"] == "HumanEval/0")
    assert loop["reference"]["correct"] is False and "timeout" in loop["reference"]["reason"]
    assert_summary_matches_rows(out)
    # the Phase 1A code band pools humaneval + mbpp: 5 wins of 16
    criteria = tmp_path / "code.yaml"
    criteria.write_text("criteria:\n  - {name: code_wins, tasks: [humaneval, mbpp], metric: win_rate, min: 0.3}\n")
    assert main(["gate", str(out), "--criteria", str(criteria)]) == 0
    assert "31%" in capsys.readouterr().out


def test_predictions_dir_and_task_field(gsm, tmp_path):
    preds = tmp_path / "preds"
    reference_file(preds, gsm, name="gsm8k.jsonl")
    out = run_eval(str(reference_file(tmp_path, gsm, right=lambda i: True, name="c.jsonl")), tasks=["gsm8k"],
                   out=tmp_path / "a", data={"gsm8k": str(gsm)}, reference=str(preds), log=lambda m: None)
    assert out["tasks"]["gsm8k"]["wins"] == 15 and out["tasks"]["gsm8k"]["ties_both_right"] == 15
    # an eval's own results.jsonl works as a predictions file (rows carry "task")
    again = run_eval(str(tmp_path / "a" / "results.jsonl"), tasks=["gsm8k"], out=tmp_path / "b",
                     data={"gsm8k": str(gsm)}, reference=str(preds), log=lambda m: None)
    assert again["tasks"] == {**out["tasks"]}


def test_bad_inputs_are_clear_errors(gsm, tmp_path, capsys):
    ref = reference_file(tmp_path, gsm)
    partial = write_jsonl(tmp_path / "partial.jsonl", [json.loads(x) for x in ref.read_text().splitlines()][:20])
    with pytest.raises(DataError, match=r"no prediction for 10 of the 30 sampled items: gsm8k/20"):
        run_eval(str(ref), tasks=["gsm8k"], out=tmp_path / "o1", data={"gsm8k": str(gsm)}, reference=str(partial))
    with pytest.raises(ConfigError, match="--judge llm compares two answers"):
        run_eval(str(ref), tasks=["gsm8k"], out=tmp_path / "o2", data={"gsm8k": str(gsm)}, judge="llm")
    with pytest.raises(ConfigError, match="'mbpp' is not among --tasks"):
        run_eval(str(ref), tasks=["gsm8k"], out=tmp_path / "o3", data={"gsm8k": str(gsm), "mbpp": "x"})
    mbpp = write_jsonl(tmp_path / "mbpp.jsonl", synthetic_mbpp("test"))
    with pytest.raises(DataError, match="rows have no 'task' field but 2 tasks"):
        run_eval(str(ref), tasks=["gsm8k", "mbpp"], out=tmp_path / "o4", data={"gsm8k": str(gsm), "mbpp": str(mbpp)})
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"task_id": "0", "answer": "x"}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: missing key 'completion'"):
        run_eval(str(ref), tasks=["gsm8k"], out=tmp_path / "o5", data={"gsm8k": str(gsm)}, reference=str(bad))
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "precious.txt").write_text("keep")
    with pytest.raises(CogumiError, match="not an eval run"):
        run_eval(str(ref), tasks=["gsm8k"], out=stranger, data={"gsm8k": str(gsm)}, reference=str(ref))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))   # nothing written on bad input
    assert main(["eval", "no/such/model/dir", "--tasks", "gsm8k", "--data", f"gsm8k={gsm}",
                 "--out", str(tmp_path / "o6")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["eval", str(ref), "--tasks", "gsm8k", "--data", f"gsm8k={gsm}", "--prompt", "chatty",
                 "--out", str(tmp_path / "o7")]) == 2
    assert "--prompt chatty: not a built-in prompt set (chat, default, training)" in capsys.readouterr().err
    assert not (tmp_path / "o7").exists()


# ---------------------------------------------------------------------------------------------
# endpoints and the LLM judge over loopback HTTP
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_server(tiny_base):
    with FakeOpenAIServer(api_key=KEY, models={"tiny": tiny_model_responder(tiny_base)}) as srv:
        yield srv


@pytest.fixture
def server(shared_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    srv = shared_server
    srv.reset()
    srv.models["judge"] = scripted_judge(prefer_matching_reference)
    return srv


def expected_llm_outcome(row, gold) -> str:
    """What the scripted judge's rule says, both orders combined (MT-Bench: disagreement -> tie)."""
    cand, ref = row["completion"], row["reference"]["completion"]
    first = {"A": "win", "B": "loss", "C": "tie"}[prefer_matching_reference(cand, ref, gold)]
    second = {"A": "loss", "B": "win", "C": "tie"}[prefer_matching_reference(ref, cand, gold)]
    return first if first == second else "tie"


def test_llm_judge_with_faults_interrupted_and_resumed_judges_each_item_once(server, gsm, tmp_path, capsys):
    n = 6
    out = tmp_path / "run"
    logs: list[str] = []
    kwargs = dict(tasks=["gsm8k"], out=out, n=n, data={"gsm8k": str(gsm)}, reference=str(reference_file(tmp_path, gsm)),
                  judge="llm", judge_model="judge", endpoint=server.url, max_new_tokens=8, retry=PATIENT,
                  api_workers=1, judge_max_tokens=64, log=logs.append)
    # Every kind of fault on the way (one client, so each fault hits a known request and none outlasts
    # the retries), then the service dies after n answers + 3 judgments.
    server.faults.extend([Fault("429", retry_after="0.01"), None, Fault("500"), None, Fault("truncated"), None,
                          Fault("schema"), Fault("drop"), None,           # 4 of the n candidate answers
                          None, None,                                     # the other 2
                          Fault("stall", seconds=30), None,               # the first judgment times out once
                          Fault("500", retry_after="0")])
    server.down_after = n + 3
    with pytest.raises(EndpointUnavailable, match="run the same command again"):
        run_eval("openai:tiny", **kwargs)
    assert not (out / "summary.json").exists() and not (out / "results.jsonl").exists()
    assert len(ResponseCache(out / "cache" / "judgments.jsonl")) == 3
    assert len(ResponseCache(out / "cache" / "generations.jsonl")) == n

    server.revive()                                 # the service is back: resume with the same call
    server.faults.extend([Fault("429", retry_after="0"), Fault("truncated"), Fault("500")])
    summary = run_eval("openai:tiny", **{**kwargs, "api_workers": 3})

    # exactly one successful answer per candidate prompt and per judge prompt (2 orders x n items)
    assert sorted(server.ok_counts("tiny").values()) == [1] * n
    assert sorted(server.ok_counts("judge").values()) == [1] * (2 * n)
    assert summary["retries_used"] <= PATIENT.budget
    # the resumed run paid only for what the first one had not got: no answers, 2n - 3 judgments
    assert "openai:tiny" not in summary["usage"]
    assert summary["usage"]["judge openai:judge"]["requests_paid"] == 2 * n - 3
    failed = [r for r in server.records() if r.status != 200]
    assert len(failed) <= 2 * PATIENT.budget          # each run stays within its retry budget
    assert len(failed) >= 10 and {r.fault for r in failed} >= {"429", "500", "truncated", "schema", "drop", "stall"}

    summary, rows = assert_summary_matches_rows(out)
    items = {it.task_id: it for it in load_task("gsm8k", str(gsm), n=n)}
    for r in rows:
        assert r["judge"]["model"] == "openai:judge" and len(r["judge"]["verdicts"]) == 2
        assert r["outcome"] == expected_llm_outcome(r, gold_text(items[r["task_id"]]))
    assert summary["judge"] == {"kind": "llm", "model": "openai:judge", "orders": 2, "disagreement": "tie",
                                "base_url": server.url}
    assert_no_secret(out, "\n".join(logs), *capsys.readouterr())


def test_position_biased_judge_gives_ties_not_wins_via_cli(server, gsm, tmp_path, capsys, monkeypatch):
    server.models["judge"] = scripted_judge(prefer_first)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)          # base URL from the environment
    cand = reference_file(tmp_path, gsm, right=lambda i: i < 15, name="cand.jsonl")
    out = tmp_path / "run"
    code = main(["eval", str(cand), "--tasks", "gsm8k", "--data", f"gsm8k={gsm}", "--n", "10",
                 "--reference", str(reference_file(tmp_path, gsm)), "--judge", "llm", "--judge-model", "judge",
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary, rows = assert_summary_matches_rows(out)
    t = summary["tasks"]["gsm8k"]
    assert (t["wins"], t["losses"], t["ties"], t["judge_disagreements"]) == (0, 0, 10, 10)
    assert all(r["judge"]["verdicts"] == ["A", "A"] and r["judge"]["consistent"] is False for r in rows)
    assert "judge orders disagreed 10" in captured.out
    assert_no_secret(out, captured.out, captured.err)


def test_endpoint_candidate_item_refused_is_an_infra_error(server, gsm, tmp_path):
    server.models["picky"] = lambda messages, body: "#### 5"
    out = tmp_path / "run"
    # 3 schema-breaking bodies in a row for the first item: no usable reply -> that item only is an infra error
    server.faults.extend([Fault("schema")] * 3)
    summary = run_eval("openai:picky", tasks=["gsm8k"], out=out, n=4, data={"gsm8k": str(gsm)},
                       reference=str(reference_file(tmp_path, gsm)), endpoint=server.url, retry=FAST,
                       api_workers=1, log=lambda m: None)
    t = summary["tasks"]["gsm8k"]
    assert (t["n"], t["infra_errors"], t["judged"]) == (4, 1, 3)
    bad = [r for r in rows_of(out) if r["outcome"] is None]
    assert len(bad) == 1 and "no usable reply" in bad[0]["infra_error"] and bad[0]["completion"] is None
    # resume after --overwrite asks again only for the missing one
    server.reset()
    run_eval("openai:picky", tasks=["gsm8k"], out=out, n=4, data={"gsm8k": str(gsm)}, overwrite=True,
             reference=str(reference_file(tmp_path, gsm)), endpoint=server.url, retry=FAST, log=lambda m: None)
    assert len(server.records("picky")) == 1


def test_refused_key_stops_the_run_without_printing_it(server, gsm, tmp_path, capsys, monkeypatch):
    wrong = "sk-wrong-but-still-secret-5521"
    monkeypatch.setenv("OPENAI_API_KEY", wrong)
    out = tmp_path / "run"
    code = main(["eval", "openai:tiny", "--endpoint", server.url, "--tasks", "gsm8k", "--data", f"gsm8k={gsm}",
                 "--n", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 3 and "API key was refused" in captured.err
    assert wrong not in captured.out + captured.err          # the server quoted it back; cogumi redacts it
    for f in out.rglob("*"):
        assert not f.is_file() or wrong not in f.read_text()


# ---------------------------------------------------------------------------------------------
# prompt sets, stop sequences, truncation and looping
# ---------------------------------------------------------------------------------------------

def _three_ascii_chars(text: str) -> str:
    for start in range(3, len(text) - 3):
        piece = text[start:start + 3]
        if piece.isascii() and piece.strip() == piece and piece.strip():
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


def test_training_prompt_truncation_and_a_custom_stop_on_the_tiny_model(tiny_base, gsm, tmp_path, capsys):
    from cogumi.evaluation import finish, prompts
    args = ["eval", str(tiny_base), "--tasks", "gsm8k", "--data", f"gsm8k={gsm}", "--n", "4", "--max-new-tokens",
            "12", "--batch-size", "4"]
    assert main(args + ["--prompt", "training", "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr().out
    summary, rows = json.loads((tmp_path / "a" / "summary.json").read_text()), rows_of(tmp_path / "a")
    questions = [json.loads(line)["question"] for line in gsm.read_text().splitlines()]
    training = prompts.resolve("training")
    for r in rows:
        assert r["prompt"] == questions[int(r["task_id"])]                  # the bare question, verbatim
        assert r["prompt_set"] == {"name": "training", "sha256": training.sha256}
        assert r["finish_reason"] in ("eos", "stop", "length")
        assert r["truncated"] is (r["finish_reason"] == "length")
        assert r["repetition"] == finish.repetition(r["completion"])
    t = summary["tasks"]["gsm8k"]
    assert t["truncated"] == sum(r["truncated"] for r in rows) and t["truncated_rate"] == t["truncated"] / 4
    assert t["truncation_known"] == 4 and t["reference_truncated_rate"] is None
    assert t["repetition_mean"] == pytest.approx(sum(r["repetition"] for r in rows) / 4)
    assert summary["prompt"] == training.record()
    assert summary["stop_sequences"]["gsm8k"] == list(training.stops("gsm8k"))
    assert "prompts training" in captured and "trunc/rep" in captured
    assert f"{100 * t['truncated_rate']:.0f}%/{t['repetition_mean']:.2f}" in captured

    # a prompt file adding a stop string the model writes: that answer ends there and is not truncated
    longest = max(rows, key=lambda r: len(r["completion"]))
    stop = _three_ascii_chars(longest["completion"])
    custom = tmp_path / "stops.yaml"
    custom.write_text("include: training\ntasks:\n  gsm8k:\n    template: '{{ question }}'\n"
                      f"    stop: {json.dumps([stop])}\n")
    assert main(args + ["--prompt", str(custom), "--out", str(tmp_path / "b")]) == 0
    cut_rows = rows_of(tmp_path / "b")
    for before, after in zip(rows, cut_rows):
        assert after["prompt"] == before["prompt"] and after["prompt_set"]["name"] == "stops"
        if stop in before["completion"]:
            assert after["completion"] == before["completion"][:before["completion"].find(stop)]
            assert (after["finish_reason"], after["truncated"]) == ("stop", False)
        else:
            assert (after["completion"], after["truncated"]) == (before["completion"], before["truncated"])
    assert any(stop in r["completion"] for r in rows)


def test_endpoint_run_on_is_cut_at_the_stop_and_loops_count_as_truncated(server, gsm, tmp_path):
    """A server that ignores `stop` and runs on into an invented next question: cogumi cuts it locally and
    grades the real answer; an answer that loops to the token limit is truncated, with high repetition."""
    rows_by_question = [json.loads(line) for line in gsm.read_text().splitlines()]
    bodies = []

    def respond(messages, body):
        bodies.append(body)
        i = next(k for k, r in enumerate(rows_by_question) if r["question"].strip() in messages[-1]["content"])
        gold = rows_by_question[i]["answer"].rsplit("####", 1)[1].strip()
        if i % 2 == 0:
            return f"Adding up.\n#### {gold}\n\nQuestion: Tom has 2 pens and buys 5 more.\nAnswer: 7\n#### 7", "length"
        return "so the answer is " * 60, "length"
    server.models["runon"] = respond
    out = tmp_path / "run"
    summary = run_eval("openai:runon", tasks=["gsm8k"], out=out, n=6, data={"gsm8k": str(gsm)},
                       endpoint=server.url, retry=FAST, api_workers=2, log=lambda m: None)
    rows = rows_of(out)
    from cogumi.evaluation import prompts
    assert bodies and all(b["stop"] == list(prompts.default().stops("gsm8k"))[:4] for b in bodies)
    for r in rows:
        assert "Question:" not in r["completion"] and r["finish_reason"] == "length"
        if int(r["task_id"]) % 2 == 0:
            assert (r["correct"], r["truncated"]) == (True, False) and r["repetition"] == 0.0
        else:
            assert (r["correct"], r["truncated"]) == (False, True) and r["repetition"] > 0.9
    odd = sum(int(r["task_id"]) % 2 for r in rows)
    assert summary["tasks"]["gsm8k"]["truncated_rate"] == odd / 6 and 0 < odd < 6


def test_reference_can_be_an_earlier_eval_run(gsm, tmp_path):
    earlier = tmp_path / "earlier"
    preds = [{"task_id": str(i), "completion": f"#### {i}", "truncated": i % 3 == 0} for i in range(30)]
    first = run_eval(str(write_jsonl(tmp_path / "p.jsonl", preds)), tasks=["gsm8k"], out=earlier,
                     data={"gsm8k": str(gsm)}, log=lambda m: None)
    assert first["tasks"]["gsm8k"]["truncated_rate"] == 10 / 30       # a predictions file may say what it knows
    assert all(r["finish_reason"] is None for r in rows_of(earlier))
    logs: list[str] = []
    summary = run_eval(str(reference_file(tmp_path, gsm)), tasks=["gsm8k"], out=tmp_path / "now",
                       data={"gsm8k": str(gsm)}, reference=str(earlier), log=logs.append)
    then = {r["task_id"]: r for r in rows_of(earlier)}
    for r in rows_of(tmp_path / "now"):
        assert r["reference"]["completion"] == then[r["task_id"]]["completion"]
        assert r["reference"]["truncated"] is then[r["task_id"]]["truncated"]
        assert r["truncated"] is None                                    # plain predictions: unknown
    t = summary["tasks"]["gsm8k"]
    assert (t["reference_truncated_rate"], t["truncated_rate"]) == (10 / 30, None)
    assert (t["reference_truncated"], t["reference_truncation_known"], t["truncation_known"]) == (10, 30, 0)
    assert summary["reference_info"]["eval_run"] == str(earlier)
    assert summary["reference_info"]["prompt"] == first["prompt"]
    assert not any("different prompt" in m for m in logs)
    run_eval(str(reference_file(tmp_path, gsm)), tasks=["gsm8k"], out=tmp_path / "other", prompt="training",
             data={"gsm8k": str(gsm)}, reference=str(earlier), log=logs.append)
    assert any("30 of 30 items" in m and "different prompt" in m for m in logs)

    unfinished = tmp_path / "unfinished"
    (unfinished / "cache").mkdir(parents=True)
    with pytest.raises(DataError, match="eval run without results.jsonl"):
        run_eval(str(reference_file(tmp_path, gsm)), tasks=["gsm8k"], out=tmp_path / "x", data={"gsm8k": str(gsm)},
                 reference=str(unfinished))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**p, "truncated": "yes"} for p in preds])
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: 'truncated' must be true, false or null"):
        run_eval(str(bad), tasks=["gsm8k"], out=tmp_path / "y", data={"gsm8k": str(gsm)})


# ---------------------------------------------------------------------------------------------
# a real model: SmolLM2-135M-Instruct (ChatML template, 49K-token byte-level BPE)
# ---------------------------------------------------------------------------------------------

def test_smollm2_training_prompt_every_row_carries_truncated(smollm2, shared_benchmarks, tmp_path):
    """8 new tokens never finish a GSM8K solution: each answer is cut at the limit, and says so."""
    out = tmp_path / "run"
    data = shared_benchmarks / "gsm8k" / "test.jsonl"
    summary = run_eval(str(smollm2), tasks=["gsm8k"], out=out, n=2, data={"gsm8k": str(data)}, prompt="training",
                       max_new_tokens=8, log=lambda m: None)
    rows = rows_of(out)
    assert [r["prompt"] for r in rows] == [it.data["question"] for it in load_task("gsm8k", str(data), n=2)]
    assert all((r["finish_reason"], r["truncated"]) == ("length", True) and r["completion"] for r in rows)
    assert summary["tasks"]["gsm8k"]["truncated_rate"] == 1.0
    assert summary["prompt"]["name"] == "training"


@pytest.mark.slow
def test_smollm2_stops_on_a_real_vocabulary_and_both_prompts_run(smollm2, shared_benchmarks, tmp_path, request):
    """A stop word of the model's own answer ends generation there, whichever tokens spell it (leading-space
    BPE tokens included); `chat` and `training` prompts both run and record their truncation."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("three SmolLM2 evals: run with -m slow")
    data = {"gsm8k": str(shared_benchmarks / "gsm8k" / "test.jsonl")}
    kwargs = dict(tasks=["gsm8k"], n=3, seed=1, data=data, max_new_tokens=48, log=lambda m: None)
    runs = {p: (run_eval(str(smollm2), out=tmp_path / p, prompt=p, **kwargs), rows_of(tmp_path / p))
            for p in ("chat", "training")}
    for name, (summary, rows) in runs.items():
        assert all(isinstance(r["truncated"], bool) for r in rows)
        assert summary["tasks"]["gsm8k"]["truncated_rate"] == sum(r["truncated"] for r in rows) / 3
    rows = runs["training"][1]
    words = [w for w in rows[0]["completion"].split() if w.isalpha() and len(w) > 3]
    stop = " " + words[len(words) // 2]                  # a word with its leading space: one BPE token or more
    custom = tmp_path / "stop.yaml"
    custom.write_text(f"include: training\ntasks:\n  gsm8k:\n    template: '{{{{ question }}}}'\n"
                      f"    stop: {json.dumps([stop])}\n")
    run_eval(str(smollm2), out=tmp_path / "stopped", prompt=str(custom), **kwargs)
    first = rows_of(tmp_path / "stopped")[0]
    assert first["completion"] == rows[0]["completion"][:rows[0]["completion"].find(stop)]
    assert (first["finish_reason"], first["truncated"]) == ("stop", False)
