"""OpenAI-compatible chat endpoints (GPT-4, vLLM, any server) with retries, a retry budget and a cache.

Features:
  * ``parse_endpoint_spec("openai:MODEL[@URL]")``: a model served behind an OpenAI-compatible API.
    The base URL comes from ``@URL``, else ``--endpoint``, else ``OPENAI_BASE_URL``, else OpenAI's.
  * ``ChatEndpoint.complete(messages, max_tokens=..., stop=None)`` -> the reply text, greedy (temperature
    0); ``.reply(...)`` -> ``Reply(text, finish_reason)`` (the server's ``"stop"`` / ``"length"`` / ...;
    ``"length"`` means the answer hit ``max_tokens``). ``stop`` sequences are sent as the API's ``stop=``
    (at most ``MAX_API_STOPS``, OpenAI's limit); a model that refuses the parameter (HTTP 400 naming it,
    like OpenAI's reasoning models) is asked again without it, once per endpoint. The caller trims the
    text at the stops itself (``finish.trim_at_stop``): servers differ in whether they do.
    Retried with exponential backoff (``RetryPolicy``: base delay, cap, jitter) on 408/409/429/5xx,
    timeouts, dropped connections, and 200 responses whose body is truncated or breaks the
    chat-completion schema. ``Retry-After`` / ``retry-after-ms`` headers are honoured (capped).
  * A retry budget shared by every request of a run, so a flaky API cannot multiply the bill.
  * ``ResponseCache``: append-only JSONL, one fsync'd record per answer, keyed by content
    (``cache_key(model, messages, params)``); a torn last line (kill -9 mid-write) is dropped on open.
    ``cached_reply`` / ``cached_complete``: ask at most once ever (records keep the finish_reason).
    Everything asked once is never paid for again, and an interrupted run resumes for free.
  * The API key is read from ``OPENAI_API_KEY`` only, handed to the client in memory, and redacted
    from every message cogumi prints (``redact``). It is never part of a cache key or record.

Why our own retry loop instead of the openai client's (``max_retries=0`` here): the client does not
retry a 200 with a truncated or schema-breaking body, has no run-wide budget, and its backoff
constants are module-level (tests need millisecond backoff). HTTP, auth, error classes and response
parsing stay the client's.

Failure modes:
  * service down (retryable errors outlast ``max_attempts``, or the budget is spent), bad key (401/403),
    unknown model or URL (404): ``EndpointUnavailable`` -- the run stops; what is cached stays cached;
  * the request itself is refused (400/413/422) or every attempt returned an unusable body:
    ``RequestFailed`` -- the caller records an infrastructure error for that item and goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from cogumi.errors import CogumiError, DataError

API_KEY_ENV = "OPENAI_API_KEY"
BASE_URL_ENV = "OPENAI_BASE_URL"
SPEC_PREFIX = "openai:"
MAX_API_STOPS = 4       # OpenAI's chat API takes at most 4 stop sequences; the rest are trimmed locally


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None   # as the server says ("stop", "length", ...); None when it does not


class EndpointUnavailable(CogumiError):
    """The endpoint cannot serve this run now (down, rate-limited past the budget, bad key or model)."""

    exit_code = 3


class RequestFailed(Exception):
    """One request could not be answered (refused, or never a usable body); other items may still work."""


# ---------------------------------------------------------------------------------------------
# secrets
# ---------------------------------------------------------------------------------------------

def api_key_from_env(required: bool = True) -> str | None:
    key = os.environ.get(API_KEY_ENV)
    if not key and required:
        raise CogumiError(
            f"{API_KEY_ENV} is not set. cogumi reads the API key from the environment only: "
            f"`export {API_KEY_ENV}=...` (for a local server without auth, any value, e.g. EMPTY).")
    return key or None


def redact(text: str) -> str:
    """``text`` with the API key (if any is set) replaced by ``***``."""
    key = os.environ.get(API_KEY_ENV)
    if key and len(key) >= 4:
        text = text.replace(key, "***")
    return text


def safe_url(url: str | None) -> str | None:
    """A URL without user:password@ (never recorded with credentials)."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc=host)
    return urlunsplit(parts)


# ---------------------------------------------------------------------------------------------
# specs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EndpointSpec:
    model: str
    base_url: str | None

    @property
    def label(self) -> str:
        return f"{SPEC_PREFIX}{self.model}"


def is_endpoint_spec(text: str | None) -> bool:
    return bool(text) and str(text).startswith(SPEC_PREFIX)


def parse_endpoint_spec(text: str, *, endpoint: str | None = None, api_model: str | None = None) -> EndpointSpec:
    """``openai:MODEL`` or ``openai:MODEL@URL``; ``openai:`` alone takes ``--api-model``."""
    rest = text[len(SPEC_PREFIX):] if text.startswith(SPEC_PREFIX) else text
    model, _, url = rest.partition("@")
    model = model.strip() or (api_model or "")
    if not model:
        raise CogumiError(f"{text!r}: no model name; write openai:MODEL (e.g. openai:gpt-4o) or pass --api-model")
    base_url = url.strip() or endpoint or os.environ.get(BASE_URL_ENV) or None
    if base_url and not base_url.startswith(("http://", "https://")):
        raise CogumiError(f"endpoint {safe_url(base_url)!r}: expected an http(s):// base URL, e.g. http://127.0.0.1:8000/v1")
    return EndpointSpec(model=model, base_url=base_url)


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------

def cache_key(model: str, messages: list[dict], params: dict | None = None) -> str:
    blob = json.dumps({"model": model, "messages": messages, "params": params or {}},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Append-only JSONL of ``{"key", "value"}`` records, fsync'd one by one; thread-safe.

    Only the last line can be torn by a crash (records are appended whole, then fsync'd); it is cut
    off on open. A damaged line elsewhere means someone edited the file: that is a DataError.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        # Each record is one write() of a whole line, so only text after the last newline can be torn.
        complete_end = raw.rfind(b"\n") + 1
        for lineno, line in enumerate(raw[:complete_end].split(b"\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self._data[rec["key"]] = rec["value"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise DataError(f"{self.path}:{lineno}: damaged cache record; delete this file to start the "
                                f"cache over (the answers in it will be asked for again)") from None
        if complete_end < len(raw):  # a record torn by a crash: cut it off so appends stay clean
            with open(self.path, "r+b") as f:
                f.truncate(complete_end)
                f.flush()
                os.fsync(f.fileno())

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def put(self, key: str, value: Any) -> None:
        line = (json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._data[key] = value


# ---------------------------------------------------------------------------------------------
# retries
# ---------------------------------------------------------------------------------------------

@dataclass
class RetryPolicy:
    max_attempts: int = 6            # per request, first try included
    budget: int | None = 200         # retries across the whole run (None: unlimited)
    base_delay: float = 1.0          # seconds; doubled per retry
    max_delay: float = 60.0
    max_retry_after: float = 120.0   # a longer Retry-After is capped to this
    jitter: float = 0.25             # up to 25% shorter, so parallel clients spread out
    request_timeout: float = 120.0   # seconds per HTTP request

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_retry_after)
        d = min(self.base_delay * (2 ** attempt), self.max_delay)
        return d * (1 - self.jitter * random.random())


@dataclass
class EndpointStats:
    requests: int = 0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    answered: int = 0                # requests that returned a usable reply (what is billed)
    prompt_tokens: int = 0           # as the server reports them in ``usage``
    completion_tokens: int = 0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "retries": self.retries, "errors": dict(self.errors),
                "usage": {"requests_paid": self.answered, "prompt_tokens": self.prompt_tokens,
                          "completion_tokens": self.completion_tokens}}


class _Retryable(Exception):
    def __init__(self, kind: str, retry_after: float | None = None):
        super().__init__(kind)
        self.kind = kind
        self.retry_after = retry_after


def _retry_after_seconds(headers) -> float | None:
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / divisor)
        except ValueError:
            continue
    return None


class ChatEndpoint:
    """One model behind an OpenAI-compatible API. Thread-safe; share one per run."""

    def __init__(self, spec: EndpointSpec, *, policy: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep, budget_counter: "RetryBudget | None" = None):
        import openai

        self.spec = spec
        self.policy = policy or RetryPolicy()
        self._sleep = sleep
        self.budget = budget_counter or RetryBudget(self.policy.budget)
        self.stats = EndpointStats()
        self._lock = threading.Lock()
        self._send_stop = True       # False once the model refused the stop parameter
        self._client = openai.OpenAI(api_key=api_key_from_env(), base_url=spec.base_url,
                                     max_retries=0, timeout=self.policy.request_timeout)

    @property
    def where(self) -> str:
        return f"{self.spec.label} at {safe_url(self.spec.base_url) or 'the OpenAI API'}"

    def complete(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0, stop=None) -> str:
        return self.reply(messages, max_tokens=max_tokens, temperature=temperature, stop=stop).text

    def reply(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0, stop=None) -> Reply:
        import openai

        last = "no attempt made"
        for attempt in range(self.policy.max_attempts):
            if attempt:
                self.budget.spend(self.where)
            with self._lock:
                self.stats.requests += 1
                self.stats.retries += 1 if attempt else 0
            try:
                return self._once(messages, max_tokens, temperature, stop)
            except _Retryable as e:
                last = e.kind
                retry_after = e.retry_after
            except openai.APITimeoutError:
                last, retry_after = "timeout", None
            except openai.APIConnectionError as e:
                last, retry_after = f"connection error ({redact(str(e))})", None
            except openai.APIStatusError as e:
                status = e.status_code
                detail = redact(str(e))[:300]
                if status in (401, 403):
                    raise EndpointUnavailable(f"{self.where}: HTTP {status}, the API key was refused "
                                              f"(check {API_KEY_ENV}): {detail}") from None
                if status == 404:
                    raise EndpointUnavailable(f"{self.where}: HTTP 404, unknown model or wrong base URL "
                                              f"(check --endpoint / {BASE_URL_ENV} and the model name): {detail}") from None
                if status in (408, 409, 429) or status >= 500:
                    last, retry_after = f"HTTP {status}", _retry_after_seconds(e.response.headers)
                elif status == 400 and stop and self._send_stop and "stop" in detail.lower():
                    self._send_stop = False   # e.g. "Unsupported parameter: 'stop'": trimmed locally instead
                    return self.reply(messages, max_tokens=max_tokens, temperature=temperature, stop=stop)
                else:
                    raise RequestFailed(f"{self.where}: HTTP {status}: {detail}") from None
            with self._lock:
                self.stats.errors[last.split(" (")[0]] = self.stats.errors.get(last.split(" (")[0], 0) + 1
            if attempt + 1 < self.policy.max_attempts:
                self._sleep(self.policy.delay(attempt, retry_after))
        if last.startswith("malformed"):
            raise RequestFailed(f"{self.where}: {self.policy.max_attempts} attempts, no usable reply ({last})")
        raise EndpointUnavailable(
            f"{self.where}: still failing after {self.policy.max_attempts} attempts (last: {last}). "
            f"Answers received so far are cached; run the same command again to resume.")

    def _once(self, messages, max_tokens, temperature, stop) -> Reply:
        import openai

        extra = {"stop": list(stop)[:MAX_API_STOPS]} if stop and self._send_stop else {}
        try:
            resp = self._client.chat.completions.create(
                model=self.spec.model, messages=messages, max_tokens=max_tokens, temperature=temperature, **extra)
        except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError) as e:
            raise _Retryable(f"malformed response ({type(e).__name__})") from None
        try:
            content = resp.choices[0].message.content
            finish = resp.choices[0].finish_reason
        except (AttributeError, IndexError, KeyError, TypeError):
            raise _Retryable("malformed response (not a chat completion)") from None
        if not isinstance(content, str):
            raise _Retryable("malformed response (no message content)")
        usage = getattr(resp, "usage", None)
        with self._lock:
            self.stats.answered += 1
            self.stats.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
            self.stats.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)
        return Reply(content, finish if isinstance(finish, str) else None)


class RetryBudget:
    """Retries left for a whole run, shared by all endpoints (candidate, reference, judge)."""

    def __init__(self, total: int | None):
        self.total = total
        self.used = 0
        self._lock = threading.Lock()

    def spend(self, where: str) -> None:
        with self._lock:
            if self.total is not None and self.used >= self.total:
                raise EndpointUnavailable(
                    f"{where}: the retry budget ({self.total} retries for this run) is spent; the API is too "
                    f"flaky right now. Answers received so far are cached; run the same command again later.")
            self.used += 1


def cached_reply(endpoint: ChatEndpoint, cache: ResponseCache, messages: list[dict], *,
                 max_tokens: int, kind: str, stop=None) -> tuple[Reply, bool]:
    """The endpoint's reply to ``messages``, asked at most once ever: (reply, came_from_cache)."""
    params = {"max_tokens": max_tokens, "temperature": 0.0, "kind": kind}
    if stop:
        params["stop"] = list(stop)
    key = cache_key(endpoint.spec.label, messages, params)
    hit = cache.get(key)
    if hit is not None:
        return Reply(hit["text"], hit.get("finish_reason")), True
    reply = endpoint.reply(messages, max_tokens=max_tokens, stop=stop)
    cache.put(key, {"text": reply.text, "finish_reason": reply.finish_reason, "model": endpoint.spec.label,
                    "kind": kind})
    return reply, False


def cached_complete(endpoint: ChatEndpoint, cache: ResponseCache, messages: list[dict], *,
                    max_tokens: int, kind: str, stop=None) -> tuple[str, bool]:
    """``cached_reply``'s text: (text, came_from_cache)."""
    reply, hit = cached_reply(endpoint, cache, messages, max_tokens=max_tokens, kind=kind, stop=stop)
    return reply.text, hit
