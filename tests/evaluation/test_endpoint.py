"""The OpenAI-compatible endpoint wrapper over real loopback HTTP: faults, backoff, budget, cache, secrets."""

import pytest
from openai_server import FakeOpenAIServer, Fault, messages_key

from cogumi.errors import CogumiError, DataError
from cogumi.evaluation.endpoint import (MAX_API_STOPS, ChatEndpoint, EndpointSpec, EndpointUnavailable, Reply,
                                        RequestFailed, ResponseCache, RetryPolicy, cached_complete, cached_reply,
                                        parse_endpoint_spec, safe_url)

KEY = "sk-test-endpoint-0123456789abcdef"
MSGS = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeOpenAIServer(api_key=KEY, models={"echo": lambda m, b: "echo: " + m[-1]["content"]}) as srv:
        yield srv


def endpoint(server, sleeps=None, model="echo", **policy):
    policy = {"base_delay": 0.01, "request_timeout": 2.0, **policy}
    return ChatEndpoint(EndpointSpec(model, server.url), policy=RetryPolicy(**policy),
                        sleep=(sleeps.append if sleeps is not None else lambda s: None))


@pytest.mark.parametrize("fault", [Fault("429", retry_after="0.25"), Fault("500"), Fault("truncated"),
                                   Fault("schema"), Fault("drop")])
def test_each_fault_is_retried_then_answered(server, fault):
    sleeps = []
    ep = endpoint(server, sleeps)
    server.faults.extend([fault, fault])
    assert ep.complete(MSGS, max_tokens=8) == "echo: What is 2 + 2?"
    assert server.request_counts()[messages_key(MSGS)] == 3
    assert server.ok_counts()[messages_key(MSGS)] == 1
    assert ep.stats.requests == 3 and ep.stats.retries == 2
    if fault.kind == "429":
        assert sleeps == [0.25, 0.25]                      # Retry-After honoured exactly
    else:                                                 # exponential backoff with <= 25% jitter
        assert 0.0075 <= sleeps[0] <= 0.01 and 0.015 <= sleeps[1] <= 0.02


def test_stall_times_out_and_is_retried(server):
    ep = endpoint(server, request_timeout=0.3)
    server.faults.append(Fault("stall", seconds=30))
    assert ep.complete(MSGS, max_tokens=8).startswith("echo")
    assert ep.stats.errors == {"timeout": 1}


def test_retry_after_is_capped(server):
    sleeps = []
    ep = endpoint(server, sleeps, max_retry_after=0.5)
    server.faults.append(Fault("429", retry_after="3600"))
    ep.complete(MSGS, max_tokens=8)
    assert sleeps == [0.5]


def test_max_attempts_then_unavailable(server):
    ep = endpoint(server, max_attempts=3)
    server.faults.extend([Fault("500")] * 10)
    with pytest.raises(EndpointUnavailable, match="still failing after 3 attempts"):
        ep.complete(MSGS, max_tokens=8)
    assert server.request_counts()[messages_key(MSGS)] == 3


def test_run_wide_retry_budget(server):
    ep = endpoint(server, budget=4, max_attempts=10)
    server.faults.extend([Fault("500")] * 3)
    ep.complete(MSGS, max_tokens=8)                          # 3 retries spent
    server.faults.extend([Fault("429", retry_after="0")] * 5)
    with pytest.raises(EndpointUnavailable, match="retry budget"):
        ep.complete([{"role": "user", "content": "other"}], max_tokens=8)
    # first call: 1 + 3 retries; second: 1 + 1 retry, then the budget (4 retries per run) is spent
    assert len(server.records()) == 4 + 2


def test_refused_request_fails_alone(server):
    ep = endpoint(server, model="no-such-model")
    with pytest.raises(EndpointUnavailable, match="404"):
        ep.complete(MSGS, max_tokens=8)
    ep = endpoint(server, max_attempts=2)
    server.faults.extend([Fault("schema"), Fault("schema")])
    with pytest.raises(RequestFailed, match="no usable reply"):
        ep.complete(MSGS, max_tokens=8)


def test_bad_key_is_refused_and_never_printed(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-should-not-leak-42")
    ep = endpoint(server)
    with pytest.raises(EndpointUnavailable) as e:
        ep.complete(MSGS, max_tokens=8)
    assert "401" in str(e.value) and "OPENAI_API_KEY" in str(e.value)
    assert "sk-wrong-key-should-not-leak-42" not in str(e.value)   # the server echoed it; we redact it
    assert server.records()[-1].status == 401


def test_key_comes_from_the_environment_only(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(CogumiError, match="OPENAI_API_KEY is not set"):
        endpoint(server)


def test_key_is_sent_as_bearer_header(server):
    endpoint(server).complete(MSGS, max_tokens=8)
    assert server.headers_seen[-1]["authorization"] == f"Bearer {KEY}"


def test_cached_complete_asks_once(server, tmp_path):
    ep = endpoint(server)
    cache = ResponseCache(tmp_path / "c.jsonl")
    assert cached_complete(ep, cache, MSGS, max_tokens=8, kind="generate") == ("echo: What is 2 + 2?", False)
    reopened = ResponseCache(tmp_path / "c.jsonl")
    assert cached_complete(ep, reopened, MSGS, max_tokens=8, kind="generate") == ("echo: What is 2 + 2?", True)
    assert server.request_counts()[messages_key(MSGS)] == 1
    # different settings are a different question
    cached_complete(ep, reopened, MSGS, max_tokens=9, kind="generate")
    assert server.request_counts()[messages_key(MSGS)] == 2
    assert KEY not in (tmp_path / "c.jsonl").read_text()


# ---------------------------------------------------------------------------------------------
# stop sequences and finish reasons
# ---------------------------------------------------------------------------------------------

def run_on(seen):
    """A model that writes an answer, then runs on into an invented next question until max_tokens."""
    def respond(messages, body):
        seen.append(body)
        return "Answer: 4\n#### 4\n\nQuestion: and 5 + 5?\nAnswer: 10 " * 3, "length"
    return respond


def test_stops_are_sent_and_finish_reason_comes_back(server):
    seen = []
    server.models["runner"] = run_on(seen)
    ep = endpoint(server, model="runner")
    stops = ["Question:", "</s>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>"]
    reply = ep.reply(MSGS, max_tokens=8, stop=stops)
    assert reply == Reply("Answer: 4\n#### 4\n\nQuestion: and 5 + 5?\nAnswer: 10 " * 3, "length")
    assert seen[-1]["stop"] == stops[:MAX_API_STOPS] and MAX_API_STOPS == 4
    ep.reply(MSGS, max_tokens=8)
    assert "stop" not in seen[-1]                     # no stops: the parameter is not sent at all
    assert endpoint(server).reply(MSGS, max_tokens=8).finish_reason == "stop"


def test_a_model_refusing_the_stop_parameter_is_asked_without_it(server):
    seen = []
    server.models["runner"] = run_on(seen)
    ep = endpoint(server, model="runner")
    server.faults.append(Fault("400", message="Unsupported parameter: 'stop' is not supported with this model."))
    reply = ep.reply(MSGS, max_tokens=8, stop=["Question:"])
    assert reply.text.startswith("Answer: 4") and "stop" not in seen[-1]
    ep.reply([{"role": "user", "content": "again"}], max_tokens=8, stop=["Question:"])
    assert len(seen) == 2 and "stop" not in seen[-1]  # remembered: not sent (and refused) again
    assert ep.stats.retries == 0
    other = endpoint(server, max_attempts=2)
    server.faults.append(Fault("400", message="max_tokens is too large"))
    with pytest.raises(RequestFailed, match="HTTP 400"):   # any other 400 still fails that request alone
        other.reply(MSGS, max_tokens=8, stop=["Question:"])


def test_cached_reply_keeps_the_finish_reason_and_keys_on_the_stops(server, tmp_path):
    seen = []
    server.models["runner"] = run_on(seen)
    ep = endpoint(server, model="runner")
    cache = ResponseCache(tmp_path / "c.jsonl")
    first, hit = cached_reply(ep, cache, MSGS, max_tokens=8, kind="generate", stop=["Question:"])
    assert not hit and first.finish_reason == "length"
    again, hit = cached_reply(ep, ResponseCache(tmp_path / "c.jsonl"), MSGS, max_tokens=8, kind="generate",
                              stop=["Question:"])
    assert hit and again == first and len(seen) == 1
    cached_reply(ep, cache, MSGS, max_tokens=8, kind="generate")          # other stops: another question
    assert len(seen) == 2


def test_cache_drops_a_torn_last_record(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = ResponseCache(path)
    cache.put("a", {"text": "1"})
    cache.put("b", {"text": "2"})
    good = path.read_bytes()
    path.write_bytes(good + b'{"key": "c", "value": {"te')      # kill -9 in the middle of a write
    reopened = ResponseCache(path)
    assert len(reopened) == 2 and "c" not in reopened
    assert path.read_bytes() == good                            # cut back, so the next append is clean
    reopened.put("c", {"text": "3"})
    assert ResponseCache(path).get("c") == {"text": "3"}


def test_cache_damaged_middle_line_is_a_clear_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"key": "a", "value": 1}\nnot json\n{"key": "b", "value": 2}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: damaged cache record"):
        ResponseCache(path)


def test_spec_parsing(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert parse_endpoint_spec("openai:gpt-4o") == EndpointSpec("gpt-4o", None)
    assert parse_endpoint_spec("openai:m@http://127.0.0.1:9/v1") == EndpointSpec("m", "http://127.0.0.1:9/v1")
    assert parse_endpoint_spec("openai:m", endpoint="http://h/v1").base_url == "http://h/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://env/v1")
    assert parse_endpoint_spec("openai:m").base_url == "http://env/v1"
    assert parse_endpoint_spec("openai:", api_model="served").model == "served"
    with pytest.raises(CogumiError, match="no model name"):
        parse_endpoint_spec("openai:")
    with pytest.raises(CogumiError, match="http"):
        parse_endpoint_spec("openai:m@ftp://x")
    assert safe_url("https://user:pw@host:8000/v1") == "https://host:8000/v1"
