"""``cogumi eval`` (a real subprocess) against flaky OpenAI-compatible endpoints on loopback, with the llm judge.

Candidate, reference and judge are three models behind one ``tests/openai_server.py`` server that injects,
per request and reproducibly (seeded per prompt and attempt, so thread timing does not change the plan):
429 with Retry-After, 500 (with and without Retry-After), stalls that end in a dropped connection, 200s
with truncated JSON, 200s with JSON that is not a chat completion, and dropped connections -- at most
``MAX_FAULTS_PER_PROMPT`` in a row for one prompt (below the client's 6 attempts). The run is interrupted
twice: the service goes down (every request a 503: the CLI stops with exit 3 and a clear message), and the
CLI is SIGKILLed by the server at the moment it answers the K-th request (K seeded). Then it resumes.

Checks: the run completes with every item judged; every prompt was answered exactly once, except the
ones whose answer was on the wire when the process was killed (answered by the server but not yet in the
cache -- at most one per concurrent worker); the final invocation's requests are exactly its prompts plus
one retry per injected fault, and its ``retries_used`` stays within the run's budget; the API key appears in
no output file and no log, even when the server quotes it back in an error.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import zlib
from collections import Counter
from pathlib import Path

import pytest
from openai_server import FakeOpenAIServer, Fault, messages_key, prefer_matching_reference, scripted_judge

from cogumi.evaluation.endpoint import RetryPolicy, cache_key

from .conftest import SEED, cli_argv, cli_env, report, scan_artifacts

KEY = "sk-adversarial-" + "7f3a9c0d2b" * 3
MAX_FAULTS_PER_PROMPT = 3
API_WORKERS = 4                        # runner.run_eval's concurrent endpoint requests
BUDGET = RetryPolicy().budget


def _numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def answer(messages, *, right: bool) -> str:
    """A model that reads the synthetic task: GSM8K 'What is A plus B?' and MBPP 'Write a function f(x)...'."""
    user = messages[-1]["content"]
    m = re.search(r"Write a function (\w+)\(x\) that returns x (plus|times|minus) (\d+)", user)
    if m:
        name, op, k = m.group(1), {"plus": "+", "times": "*", "minus": "-"}[m.group(2)], m.group(3)
        body = f"x {op} {k}" if right else f"x {op} {k} + 1"
        return f"```python\ndef {name}(x):\n    return {body}\n```"
    m = re.search(r"What is (\d+) plus (\d+)", user)
    total = int(m.group(1)) + int(m.group(2)) if m else 0
    return f"The answer is {total if right else total + 1}.\n#### {total if right else total + 1}"


class Plan:
    """The server side of the test: models, the seeded fault plan, interruptions, and what was asked."""

    def __init__(self, server: FakeOpenAIServer, fault_rate: float, salt: str):
        self.server, self.fault_rate, self.salt = server, fault_rate, salt
        self.attempts: Counter = Counter()
        self.asked: dict[tuple, tuple] = {}    # (model, server key) -> (messages, max_tokens, stop sequences)
        self.injected: Counter = Counter()                    # fault kind -> count
        self.faults_by_invocation: Counter = Counter()
        self.invocation = 0
        self.down_after: int | None = None                    # normal answers before the service "dies"
        self.kill_after: int | None = None                    # normal answers before the client is killed
        self.kill_pid: int | None = None
        self.admitted = 0                                     # normal answers in this invocation
        self.lock = threading.Lock()
        judge = scripted_judge(prefer_matching_reference)
        server.models.update({
            "cand": self._model("cand", lambda m, b: answer(m, right=zlib.crc32(m[-1]["content"].encode()) % 3 != 0)),
            "ref": self._model("ref", lambda m, b: answer(m, right=True)),
            "judge": self._model("judge", judge)})
        server.fault_rule = self.rule

    def _model(self, name, fn):
        def respond(messages, body):
            with self.lock:
                self.asked[(name, messages_key(messages))] = (messages, int(body.get("max_tokens") or 0),
                                                              body.get("stop"))
            return fn(messages, body)
        return respond

    def start_invocation(self, *, down_after: int | None = None, kill_after: int | None = None) -> None:
        self.invocation += 1
        self.down_after, self.kill_after, self.admitted = down_after, kill_after, 0

    def rule(self, record) -> Fault | None:
        # called under the server's lock: decisions are serialised
        if self.down_after is not None and self.admitted >= self.down_after:
            self.faults_by_invocation[self.invocation] += 1
            return Fault("500", retry_after="0.01")              # the service is down
        prompt = (record.model, record.key)
        n = self.attempts[prompt]
        self.attempts[prompt] += 1
        rng = random.Random(f"{SEED}-{self.salt}-{record.model}-{record.key}-{n}")
        if n < MAX_FAULTS_PER_PROMPT and rng.random() < self.fault_rate:
            kind = rng.choice(["429", "429", "500", "500-now", "stall", "truncated", "schema", "drop"])
            self.injected[kind] += 1
            self.faults_by_invocation[self.invocation] += 1
            return {"429": Fault("429", retry_after="0.02"), "500": Fault("500", retry_after="0.01"),
                    "500-now": Fault("500"), "stall": Fault("stall", seconds=0.3)}.get(kind) or Fault(kind)
        self.admitted += 1
        if self.kill_after is not None and self.admitted == self.kill_after and self.kill_pid:
            os.kill(self.kill_pid, signal.SIGKILL)           # kill -9 the client while it waits for this answer
            return Fault("drop")
        return None


def eval_argv(server, data, out, n) -> list:
    return cli_argv("eval", "openai:cand", "--reference", "openai:ref", "--judge", "llm", "--judge-model", "judge",
                    "--endpoint", server.url, "--tasks", "gsm8k,mbpp", "--data", f"gsm8k={data['gsm8k']}",
                    "--data", f"mbpp={data['mbpp']}", "--n", n, "--max-new-tokens", 64, "--timeout", 5, "--out", out)


def run_invocation(plan: Plan, argv, **interruptions):
    plan.start_invocation(**interruptions)
    before = len(plan.server.records())
    proc = subprocess.Popen(argv, env=cli_env(OPENAI_API_KEY=KEY), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    plan.kill_pid = proc.pid
    out, err = proc.communicate(timeout=300)
    plan.kill_pid = None
    return proc.returncode, out, err, plan.server.records()[before:]


def cached_keys(out: Path) -> set[str]:
    keys = set()
    for name in ("generations.jsonl", "judgments.jsonl"):
        p = out / "cache" / name
        if p.exists():
            for line in p.read_bytes().split(b"\n"):
                try:
                    keys.add(json.loads(line)["key"])
                except (ValueError, KeyError):
                    pass
    return keys


def client_cache_key(plan: Plan, prompt: tuple) -> str:
    model = prompt[0]
    messages, max_tokens, stop = plan.asked[prompt]
    params = {"max_tokens": max_tokens, "temperature": 0.0, "kind": "judge" if model == "judge" else "generate"}
    if stop:  # the API takes 4 stop sequences; the client's key holds its task's whole list
        from cogumi.evaluation.finish import task_stops
        params["stop"] = next(list(task_stops(t)) for t in ("gsm8k", "mbpp", "humaneval")
                              if list(task_stops(t))[:len(stop)] == list(stop))
    return cache_key(f"openai:{model}", messages, params)


def lost_in_flight(plan: Plan, out: Path, records) -> set[str]:
    """Prompts the server answered (200) in ``records`` whose answer never reached the client's cache."""
    cached = cached_keys(out)
    return {(r.model, r.key) for r in records if r.status == 200 and client_cache_key(plan, (r.model, r.key)) not in cached}


def run_flaky_eval(tmp_path, data, *, n: int, fault_rate: float, kill_points: list[int], salt: str) -> dict:
    out = tmp_path / "eval"
    texts: list[str] = []
    with FakeOpenAIServer(api_key=KEY) as server:
        plan = Plan(server, fault_rate, salt)
        argv = eval_argv(server, data, out, n)
        lost_total: Counter = Counter()
        # 1. the service goes down after a few answers: a clean stop (exit 3), nothing lost
        rc, so, se, recs = run_invocation(plan, argv, down_after=6)
        texts += [so, se]
        assert rc == 3, se[-2000:]
        assert "still failing after" in se and "run the same command again" in se
        assert se.count("error:") == 1 and "Traceback" not in se
        assert not lost_in_flight(plan, out, recs), "a clean stop lost answers"
        assert not scan_artifacts(out).problems
        # 2. kill -9 at seeded moments (the K-th answer of the invocation)
        kills = 0
        for k in kill_points:
            rc, so, se, recs = run_invocation(plan, argv, kill_after=k)
            texts += [so, se]
            scan = scan_artifacts(out)
            assert not scan.problems, scan.problems
            if rc == -9:
                kills += 1
                lost = lost_in_flight(plan, out, recs)
                assert len(lost) <= API_WORKERS, f"{len(lost)} answers lost by one kill (> {API_WORKERS} in flight)"
                lost_total.update(lost)
            else:
                assert rc == 0, se[-2000:]
        # 3. the run completes
        rc, so, se, final = run_invocation(plan, argv)
        texts += [so, se]
        assert rc == 0, se[-3000:]
        ok = Counter((r.model, r.key) for r in server.records() if r.status == 200)
        twice = {k: c for k, c in ok.items() if c != 1 + lost_total[k]}
        summary = json.loads((out / "summary.json").read_text())
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        asked_final = {(r.model, r.key) for r in final}
        faults_final = plan.faults_by_invocation[plan.invocation]
        result = {"items": len(rows), "prompts": len(ok), "requests": len(server.records()),
                  "faults_injected": dict(plan.injected), "kills": kills, "lost_in_flight": sum(lost_total.values()),
                  "retries_used_final": summary["retries_used"], "final_requests": len(final),
                  "final_prompts": len(asked_final), "final_faults": faults_final}
        report("flaky", result)
        assert not twice, f"prompts answered more than once beyond the in-flight ones: {twice}"
        assert all(r["outcome"] in ("win", "tie", "loss") and r["judge"]["infra_error"] is None for r in rows), \
            [r["judge"] for r in rows if r["outcome"] is None][:2]
        assert len(final) == len(asked_final) + faults_final, "requests beyond one per prompt plus one per fault"
        assert summary["retries_used"] == faults_final <= BUDGET
        for path in out.rglob("*"):
            if path.is_file():
                assert KEY.encode() not in path.read_bytes(), f"the API key reached {path}"
        assert not any(KEY in t for t in texts), "the API key reached a log"
    return result


def test_flaky_endpoints_sample(tmp_path, adv_data):
    r = run_flaky_eval(tmp_path, adv_data, n=4, fault_rate=0.35, kill_points=[random.Random(f"{SEED}-k").randint(3, 9)],
                       salt="sample")
    assert r["kills"] == 1 and sum(r["faults_injected"].values()) >= 5


@pytest.mark.slow
def test_flaky_endpoints_full(tmp_path, adv_data):
    rng = random.Random(f"{SEED}-kills")
    r = run_flaky_eval(tmp_path, adv_data, n=8, fault_rate=0.5, kill_points=sorted(rng.sample(range(2, 20), 3)),
                       salt="full")
    assert r["kills"] == 3 and len(r["faults_injected"]) >= 6


def test_key_quoted_back_by_the_server_is_redacted(tmp_path, adv_data):
    """A server that refuses the key and quotes it in its error (as OpenAI's 401 does): exit 3, no key shown."""
    with FakeOpenAIServer(api_key="sk-the-server-wants-another-key") as server:
        Plan(server, 0.0, "401")
        out = tmp_path / "eval"
        proc = subprocess.run(eval_argv(server, adv_data, out, 2), env=cli_env(OPENAI_API_KEY=KEY),
                              capture_output=True, text=True, timeout=120)
        assert server.records() and server.records()[0].status == 401
    assert proc.returncode == 3 and "401" in proc.stderr and proc.stderr.count("error:") == 1
    assert KEY not in proc.stdout + proc.stderr
    assert not (out / "results.jsonl").exists()
    for path in out.rglob("*") if out.exists() else []:
        if path.is_file():
            assert KEY.encode() not in path.read_bytes()
