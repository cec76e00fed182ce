"""Judges: verdict parsing, exact outcomes, both-order LLM judging over loopback HTTP, position bias."""

import pytest
from openai_server import FakeOpenAIServer, Fault, parse_pair_prompt, prefer_first, prefer_matching_reference, \
    scripted_judge

from cogumi.evaluation.endpoint import ChatEndpoint, EndpointSpec, ResponseCache, RetryPolicy
from cogumi.evaluation.judge import LLMJudge, combine_orders, exact_outcome, pair_messages, parse_verdict

KEY = "sk-judge-test-key-abcdef0123"


@pytest.mark.parametrize("text,verdict", [
    ("Both are fine. [[A]]", "A"),
    ("Format: \"[[A]]\" if A is better... After comparing, my final verdict: [[B]]", "B"),
    ("[[C]]", "C"),
    ("[[Tie]]", "C"),
    ("I think [[ B ]]", "B"),
    ("Final verdict: [A]", "A"),
    ("Final Verdict: Assistant B", "B"),
    ("The final verdict is: C.", "C"),
    ("My verdict is a tie.", "C"),
    ("Verdict: **A**", "A"),
    ("Overall, Assistant B is better.", "B"),
    ("A", "A"),
    ("**B**", "B"),
    ("I cannot decide.", None),
    ("a cat sat on a mat", None),
    ("", None),
    (None, None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


@pytest.mark.parametrize("cand,ref,outcome,tie_kind", [
    (True, False, "win", None), (False, True, "loss", None), (True, True, "tie", "both_right"),
    (False, False, "tie", "both_wrong"), (None, True, None, None), (True, None, None, None),
])
def test_exact_outcome(cand, ref, outcome, tie_kind):
    assert exact_outcome(cand, ref) == (outcome, tie_kind)


def test_combine_orders_disagreement_is_a_tie():
    assert combine_orders("win", "win") == ("win", True)
    assert combine_orders("loss", "loss") == ("loss", True)
    assert combine_orders("win", "loss") == ("tie", False)
    assert combine_orders("tie", "win") == ("tie", False)
    assert combine_orders(None, "win") == (None, None)


def test_pair_prompt_round_trip():
    a, b, ref = parse_pair_prompt(pair_messages("Q?", "answer one", "answer two", "gold 42"))
    assert (a, b, ref) == ("answer one", "answer two", "gold 42")


@pytest.fixture
def judge_server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeOpenAIServer(api_key=KEY) as srv:
        yield srv


def make_judge(server, tmp_path, rule, template="My verdict: [[{v}]]"):
    server.models["judge"] = scripted_judge(rule, template=template)
    ep = ChatEndpoint(EndpointSpec("judge", server.url), policy=RetryPolicy(base_delay=0.001, max_attempts=3),
                      sleep=lambda s: None)
    return LLMJudge(ep, ResponseCache(tmp_path / "judgments.jsonl"))


def test_position_biased_judge_yields_a_tie(judge_server, tmp_path):
    j = make_judge(judge_server, tmp_path, prefer_first).judge("Q", "#### 42", "#### 41", "#### 42")
    assert j.verdicts == ["A", "A"] and j.outcomes_by_order == ["win", "loss"]
    assert (j.outcome, j.consistent) == ("tie", False)
    assert len(judge_server.records()) == 2


def test_consistent_judge_gives_win_and_loss(judge_server, tmp_path):
    judge = make_judge(judge_server, tmp_path, prefer_matching_reference)
    win = judge.judge("Q", "so #### 42", "I say 41", "#### 42")
    assert (win.outcome, win.consistent, win.verdicts) == ("win", True, ["A", "B"])
    loss = judge.judge("Q2", "so 7", "#### 42", "#### 42")
    assert (loss.outcome, loss.consistent) == ("loss", True)
    tie = judge.judge("Q3", "42", "42", "#### 42")
    assert tie.outcome == "tie" and tie.consistent is True


def test_judgments_are_cached_and_survive_faults(judge_server, tmp_path):
    judge = make_judge(judge_server, tmp_path, prefer_matching_reference)
    judge_server.faults.extend([Fault("429", retry_after="0"), Fault("truncated"), None, Fault("500")])
    first = judge.judge("Q", "#### 42", "41", "#### 42")
    assert first.outcome == "win" and first.cached == [False, False]
    again = LLMJudge(judge.endpoint, ResponseCache(tmp_path / "judgments.jsonl")).judge("Q", "#### 42", "41", "#### 42")
    assert again.outcome == "win" and again.cached == [True, True]
    assert sorted(judge_server.ok_counts("judge").values()) == [1, 1]


def test_unparseable_judgment_is_an_infra_error(judge_server, tmp_path):
    judge = make_judge(judge_server, tmp_path, prefer_first, template="hmm, hard to say ({v} maybe)")
    j = judge.judge("Q", "x", "y", "z")
    assert j.outcome is None and "unparseable" in j.infra_error and j.texts[0].startswith("hmm")
