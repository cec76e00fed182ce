"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests, with fault injection and request counts.

It speaks ``POST /v1/chat/completions`` and ``GET /v1/models`` over real sockets (``http.server``),
so the ``openai`` client under test does real HTTP: headers, status codes, keep-alive, timeouts.

Models are plain callables ``responder(messages, body) -> str`` (or ``(str, finish_reason)``; default
``"stop"``) registered by name:
  * ``tiny_model_responder(model_dir)``: the tiny Llama's greedy generations (a candidate "served by vLLM");
  * ``scripted_judge(rule)``: reads the MT-Bench-style pair prompt ("[The Start of Assistant A's
    Answer]" ...), asks ``rule(answer_a, answer_b, reference)`` for "A"/"B"/"C" and answers "[[X]]";
  * any function of your own (e.g. scripted reference answers).

Faults (``Fault(kind, ...)``), consumed one per chat request from ``server.faults`` (a FIFO; ``None``
serves normally), or chosen by ``server.fault_rule(record)``:
  ``429`` (with Retry-After), ``500``, ``400`` (with ``message``), ``stall`` (hold the request past the
  client's timeout),
  ``truncated`` (a 200 whose JSON body is cut in half, with a matching Content-Length),
  ``schema`` (a 200 with valid JSON that is not a chat completion), ``drop`` (close the socket
  without answering), ``401``. ``server.down_after = K`` drops every request after the K-th
  request let through to a normal answer (the service "dies": deterministic interruption, also with
concurrent clients); ``revive()`` brings it back.

Every chat request is logged (model, content key = sha256 of the messages, fault, status) so tests
can assert, e.g., that each judge prompt got exactly one successful answer across a resumed run.
The server checks ``Authorization: Bearer <api_key>`` when constructed with ``api_key``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Fault:
    kind: str                      # "429" | "500" | "400" | "stall" | "truncated" | "schema" | "drop" | "401"
    retry_after: str | None = None  # header value for 429/500
    seconds: float = 5.0           # for "stall"
    message: str | None = None     # error message for "400" (e.g. a refused parameter)


@dataclass
class RequestRecord:
    model: str
    key: str
    fault: str | None
    status: int | None = None      # None: connection dropped / stalled


def messages_key(messages) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


class FakeOpenAIServer:
    def __init__(self, *, api_key: str | None = None, models: dict[str, Callable] | None = None):
        self.api_key = api_key
        self.models: dict[str, Callable] = dict(models or {})
        self.faults: deque = deque()
        self.fault_rule: Callable[[RequestRecord], Fault | None] | None = None
        self.down_after: int | None = None
        self._admitted = 0          # requests let through to a normal answer (what down_after counts)
        self.log: list[RequestRecord] = []
        self.headers_seen: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "FakeOpenAIServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def revive(self) -> None:
        with self._lock:
            self.down_after = None

    def reset(self) -> None:
        """Forget faults, counts and the log (between tests sharing one server)."""
        with self._lock:
            self.faults.clear()
            self.fault_rule = None
            self.down_after = None
            self._admitted = 0
            self.log.clear()
            self.headers_seen.clear()

    # ------------------------------------------------------------------ counts
    def successes(self) -> int:
        with self._lock:
            return sum(1 for r in self.log if r.status == 200)

    def ok_counts(self, model: str | None = None) -> Counter:
        with self._lock:
            return Counter(r.key for r in self.log if r.status == 200 and model in (None, r.model))

    def request_counts(self, model: str | None = None) -> Counter:
        with self._lock:
            return Counter(r.key for r in self.log if model in (None, r.model))

    def records(self, model: str | None = None) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.log if model in (None, r.model)]

    # ------------------------------------------------------------------ serving
    def _next_fault(self, record: RequestRecord) -> Fault | None:
        # Decided under one lock, so concurrent clients cannot both slip in under ``down_after``.
        with self._lock:
            if self.down_after is not None and self._admitted >= self.down_after:
                return Fault("drop")
            fault = self.faults.popleft() if self.faults else None
            if fault is None and self.fault_rule is not None:
                fault = self.fault_rule(record)
            if fault is None:
                self._admitted += 1
            return fault

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _send_json(self, status: int, obj, headers: dict | None = None, raw: bytes | None = None):
                body = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send_json(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in server.models]})
                else:
                    self._send_json(404, {"error": {"message": "not found"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send_json(404, {"error": {"message": f"no route {self.path}"}})
                model = body.get("model", "")
                messages = body.get("messages", [])
                record = RequestRecord(model=model, key=messages_key(messages), fault=None)
                with server._lock:
                    server.log.append(record)
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    record.status = 401
                    # Like OpenAI, the message quotes the key it got: clients must not print it unredacted.
                    got = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                    return self._send_json(401, {"error": {"message": f"Incorrect API key provided: {got}",
                                                           "type": "invalid_request_error"}})
                fault = server._next_fault(record)
                record.fault = fault.kind if fault else None
                try:
                    self._serve(record, fault, model, messages, body)
                except (BrokenPipeError, ConnectionResetError):
                    record.status = None

            def _serve(self, record, fault, model, messages, body):
                if fault is not None:
                    if fault.kind == "drop":
                        self.close_connection = True
                        return
                    if fault.kind == "stall":
                        server._stop.wait(fault.seconds)
                        self.close_connection = True
                        return
                    if fault.kind in ("429", "500", "401", "400"):
                        record.status = int(fault.kind)
                        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                        message = fault.message or f"injected {fault.kind}"
                        return self._send_json(int(fault.kind), {"error": {"message": message,
                                                                           "type": "injected"}}, headers)
                responder = server.models.get(model)
                if responder is None:
                    record.status = 404
                    return self._send_json(404, {"error": {"message": f"model {model!r} not found",
                                                           "type": "invalid_request_error"}})
                text = responder(messages, body)
                text, finish_reason = text if isinstance(text, tuple) else (text, "stop")
                payload = {
                    "id": f"chatcmpl-{record.key}", "object": "chat.completion", "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "finish_reason": finish_reason,
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                if fault is not None and fault.kind == "truncated":
                    raw = json.dumps(payload).encode()
                    record.status = 299  # answered, but unusable: not a success
                    return self._send_json(200, None, raw=raw[: len(raw) // 2])
                if fault is not None and fault.kind == "schema":
                    record.status = 298
                    return self._send_json(200, {"object": "chat.completion", "result": text, "choices": "none"})
                record.status = 200
                self._send_json(200, payload)

        return Handler


# ---------------------------------------------------------------------------------------------
# responders
# ---------------------------------------------------------------------------------------------

_SECTION = r"\[The Start of {name}\]\n(.*?)\n\[The End of {name}\]"


def parse_pair_prompt(messages) -> tuple[str, str, str | None]:
    """(answer A, answer B, reference) out of the MT-Bench-style pair prompt the judge sends."""
    text = "\n".join(m["content"] for m in messages if m["role"] == "user")

    def section(name):
        m = re.search(_SECTION.format(name=re.escape(name)), text, re.S)
        return m.group(1) if m else None

    a, b = section("Assistant A's Answer"), section("Assistant B's Answer")
    if a is None or b is None:
        raise ValueError("not a pair-judge prompt")
    return a, b, section("Reference Answer")


def scripted_judge(rule: Callable[[str, str, str | None], str], *, template: str = "My verdict: [[{v}]]"):
    """A judge model that answers ``template`` with rule(answer_a, answer_b, reference) in {A, B, C}."""
    def respond(messages, body):
        a, b, ref = parse_pair_prompt(messages)
        return template.format(v=rule(a, b, ref))
    return respond


def prefer_first(a, b, ref) -> str:
    """A maximally position-biased judge."""
    return "A"


def _last_number(text: str | None) -> str | None:
    nums = re.findall(r"-?\d+(?:\.\d+)?", (text or "").replace(",", ""))
    return nums[-1] if nums else None


def prefer_matching_reference(a, b, ref) -> str:
    """Prefer the answer whose last number equals the reference's; tie if both or neither do."""
    gold = _last_number(ref)
    a_ok, b_ok = _last_number(a) == gold, _last_number(b) == gold
    return "A" if a_ok and not b_ok else "B" if b_ok and not a_ok else "C"


def tiny_model_responder(model_dir):
    """Greedy generations of a local model (the tiny Llama), like a vLLM server would give."""
    from cogumi.evaluation.generate import generate_completions, load_candidate

    model, tok = load_candidate(str(model_dir), device="cpu")
    lock = threading.Lock()

    def respond(messages, body):
        with lock:
            return generate_completions(model, tok, [messages], max_new_tokens=int(body.get("max_tokens") or 16),
                                        batch_size=1)[0]
    return respond
