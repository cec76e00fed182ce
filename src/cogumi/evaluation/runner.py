"""``run_eval``: generate, check and judge a candidate against a reference; write results and summary.

Features:
  * Candidate and reference are each one of: a local model dir, an adapter dir (base + adapter,
    unmerged), a hub id (``generate.load_candidate``: own dtype, never silently quantized; batched
    greedy generation), an endpoint ``openai:MODEL[@URL]`` (``endpoint.ChatEndpoint``), or a
    predictions file / dir (JSONL ``{task_id, completion}`` [+ ``task``, ``truncated``], or ``TASK.jsonl``
    per task), or another eval run (its dir or ``results.jsonl``: its completions and ``truncated`` are
    read; a warning says how many of its items were asked with a different prompt).
  * Prompts come from a prompt set (``prompt=``: ``prompts.resolve`` -- the default set, a built-in name
    or a YAML file); every row and the summary record which (name, source, sha256).
  * Stop sequences per task (``prompt_set.stops(task)``): local generation stops there, endpoints get
    them as ``stop=``, and every completion -- generated, cached or read from predictions -- is cut
    before the first one (``finish.trim_at_stop``).
  * Truncation and looping are recorded per row: ``finish_reason`` (local ``eos``/``stop``/``length``,
    an endpoint's own), ``truncated`` (hit ``max_new_tokens`` with no stop; ``null`` when unknown, as for
    predictions files) and ``repetition`` (``finish.repetition``: share of repeated word 4-grams); the
    summary has per task ``truncated`` (count), ``truncation_known`` (answers whose truncation is known),
    ``truncated_rate``, ``repetition_mean``, and the same prefixed ``reference_`` for the reference.
  * Every generated answer goes to ``OUT/cache/generations.jsonl`` and every judgment to
    ``OUT/cache/judgments.jsonl`` as soon as it exists, keyed by content (model identity -- a weights
    fingerprint for local models -- plus the prompt and generation settings). A run killed at any
    moment resumes with the same command and pays for nothing twice; an endpoint that goes down stops
    the run with a clear error and the same resume.
  * Both sides are checked objectively (``tasks.check_many``, sandboxed for code). Judges (``judge.py``):
    ``exact`` from the checks; ``llm`` pairwise in both orders, disagreement -> tie.
  * ``OUT/results.jsonl`` (one row per item) then ``OUT/summary.json`` (written last: its presence marks
    a finished run), both atomically, in the docs/design.md layout, with 95% Wilson intervals.

Failure modes: bad arguments or files -> ``CogumiError`` naming the flag/file; a reference predictions
file missing sampled items -> ``DataError`` listing them; an OUT that holds a finished run -> refused
without ``overwrite``; a directory that is not an eval run -> refused. Infrastructure failures (sandbox,
endpoint refusing one item, unparseable judgment) are per-item ``infra_error``s, never wins or losses.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cogumi import __version__
from cogumi.errors import CogumiError, ConfigError, DataError
from cogumi.evaluation import finish as finish_mod
from cogumi.evaluation import prompts as prompts_mod
from cogumi.evaluation import tasks as tasks_mod
from cogumi.evaluation.endpoint import (ChatEndpoint, RequestFailed, ResponseCache, RetryBudget, RetryPolicy,
                                        cache_key, cached_reply, is_endpoint_spec, parse_endpoint_spec,
                                        redact, safe_url)
from cogumi.evaluation.judge import LLMJudge, exact_outcome
from cogumi.evaluation.stats import wilson_interval
from cogumi.io import atomic_write_json, atomic_write_jsonl, read_jsonl, sha256_file

JUDGES = ("exact", "llm")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# sides: where completions come from
# ---------------------------------------------------------------------------------------------

@dataclass
class Completions:
    texts: list[str | None]
    errors: list[str | None]
    finish_reasons: list[str | None] = field(default_factory=list)   # as generated; [] = all unknown
    truncated: list[bool | None] = field(default_factory=list)       # known already (another eval run)

    def settle(self, stops: list[tuple[str, ...]]) -> "Completions":
        """Texts cut at their stop sequences; ``truncated`` from the finish reason where not known."""
        n = len(self.texts)
        finish = self.finish_reasons or [None] * n
        known = self.truncated or [None] * n
        texts, truncated = [], []
        for text, reason, was, stop in zip(self.texts, finish, known, stops):
            cut, stopped = finish_mod.trim_at_stop(text, stop)
            texts.append(cut)
            if text is None or was is not None:   # no answer, or a side that knew already
                truncated.append(was if text is not None else None)
            else:
                truncated.append(finish_mod.is_truncated(reason, stopped))
        return Completions(texts, self.errors, list(finish), truncated)


@dataclass
class Prediction:
    completion: str | None
    truncated: bool | None = None
    finish_reason: str | None = None
    prompt: str | None = None          # what the item was asked (rows of another eval run)


class PredictionsSide:
    """Completions made elsewhere: a JSONL file, a dir with one TASK.jsonl per task, or an eval run."""

    kind = "predictions"

    def __init__(self, path: str, tasks: list[str]):
        self.path = Path(path)
        self.label = str(path)
        self.eval_run = _eval_run_results(self.path)
        self.table = load_predictions(self.eval_run or self.path, tasks)

    def info(self) -> dict:
        info = {"kind": self.kind, "path": str(self.path)}
        if self.eval_run is not None:
            summary = self.eval_run.with_name("summary.json")
            recorded = None
            if summary.is_file():
                try:
                    recorded = json.loads(summary.read_text(encoding="utf-8")).get("prompt")
                except (OSError, json.JSONDecodeError, AttributeError):
                    recorded = None
            info.update({"eval_run": str(self.eval_run.parent), "prompt": recorded})
        return info

    def check_covers(self, items) -> None:
        missing = [f"{it.task}/{it.task_id}" for it in items if (it.task, it.task_id) not in self.table]
        if missing:
            shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise DataError(f"{self.path}: no prediction for {len(missing)} of the {len(items)} sampled items: "
                            f"{shown}. Predictions must cover every item; check that --n/--seed/--data match how "
                            f"they were made (GSM8K ids are 0-based row indexes of the data file).")

    def prompt_mismatches(self, items) -> int:
        """Items this side's rows say were asked with another prompt (an eval run records its prompts)."""
        return sum(1 for it in items if (p := self.table[(it.task, it.task_id)].prompt) is not None
                   and p != it.prompt)

    def complete(self, items, conversations, stops, log) -> Completions:
        self.check_covers(items)
        preds = [self.table[(it.task, it.task_id)] for it in items]
        mismatched = self.prompt_mismatches(items)
        if mismatched:
            log(f"warning: {mismatched} of {len(items)} items in {self.label} were asked with a different prompt "
                f"than this run's (another prompt set or few-shot setting?): the comparison is not like for like")
        return Completions([p.completion for p in preds],
                           [None if p.completion is not None else "no completion in the predictions file"
                            for p in preds],
                           [p.finish_reason for p in preds], [p.truncated for p in preds])


def _eval_run_results(path: Path) -> Path | None:
    """results.jsonl of an eval run given as its dir; None for anything else. An unfinished run (cache
    but no results yet) is refused: its results are not known."""
    if not path.is_dir():
        return None
    if (path / "results.jsonl").is_file():
        return path / "results.jsonl"
    if (path / "cache").is_dir() or (path / "summary.json").exists():
        raise DataError(f"{path}: an eval run without results.jsonl (unfinished?); finish it with the same "
                        f"`cogumi eval` command first, or give a predictions file")
    return None


def load_predictions(path: Path, tasks: list[str]) -> dict[tuple[str, str], Prediction]:
    if not path.exists():
        raise DataError(f"{path}: predictions file or dir not found")
    files: list[tuple[Path, str | None]]
    if path.is_dir():
        files = []
        for task in tasks:
            f = path / f"{task}.jsonl"
            if not f.exists():
                raise DataError(f"{path}: no {task}.jsonl here (a predictions dir holds one TASK.jsonl per task, "
                                f"rows {{\"task_id\", \"completion\"}}; an eval run dir holds results.jsonl)")
            files.append((f, task))
    else:
        files = [(path, None)]
    table: dict[tuple[str, str], Prediction] = {}
    for f, task in files:
        rows = read_jsonl(f)
        has_task = any("task" in r for r in rows)
        if task is None and not has_task and len(tasks) > 1:
            raise DataError(f"{f}: rows have no 'task' field but {len(tasks)} tasks are evaluated "
                            f"({', '.join(tasks)}); add \"task\" to each row or use a dir with one TASK.jsonl per task")
        for i, row in enumerate(rows, start=1):
            where = f"{f}: row {i}"
            for key in ("task_id", "completion"):
                if key not in row:
                    raise DataError(f"{where}: missing key {key!r} (predictions rows are {{\"task_id\", \"completion\"}})")
            row_task = row.get("task") if has_task else (task or tasks[0])
            if row_task is None:
                raise DataError(f"{where}: missing key 'task' (other rows of this file have one)")
            key = (str(row_task), str(row["task_id"]))
            if key in table:
                raise DataError(f"{where}: task_id {key[1]!r} ({key[0]}) appears twice; keep one completion per item")
            table[key] = _prediction(row, where)
    return table


def _prediction(row: dict, where: str) -> Prediction:
    completion = row["completion"]
    if completion is not None and not isinstance(completion, str):
        raise DataError(f"{where}: 'completion' must be a string, got {type(completion).__name__}")
    truncated = row.get("truncated")
    if truncated is not None and not isinstance(truncated, bool):
        raise DataError(f"{where}: 'truncated' must be true, false or null, got {truncated!r}")
    finish = row.get("finish_reason")
    prompt = row.get("prompt")
    return Prediction(completion, truncated, finish if isinstance(finish, str) else None,
                      prompt if isinstance(prompt, str) else None)


class EndpointSide:
    """Completions from an OpenAI-compatible endpoint, each asked once (cached)."""

    kind = "endpoint"

    def __init__(self, endpoint: ChatEndpoint, *, max_new_tokens: int, workers: int):
        self.endpoint = endpoint
        self.cache: ResponseCache | None = None  # set once OUT is ready
        self.max_new_tokens = max_new_tokens
        self.workers = workers
        self.label = endpoint.spec.label

    def info(self) -> dict:
        return {"kind": self.kind, "model": self.endpoint.spec.model, "base_url": safe_url(self.endpoint.spec.base_url)}

    def complete(self, items, conversations, stops, log) -> Completions:
        def one(job):
            messages, stop = job
            try:
                reply, _ = cached_reply(self.endpoint, self.cache, messages, max_tokens=self.max_new_tokens,
                                        kind="generate", stop=stop)
                return reply.text, None, reply.finish_reason
            except RequestFailed as e:
                return None, f"{self.label}: {e}", None
        got = run_concurrently(one, list(zip(conversations, stops)), self.workers, log, f"{self.label}: generating")
        return Completions([g[0] for g in got], [g[1] for g in got], [g[2] for g in got])


class LocalModelSide:
    """A local model / adapter dir / hub id, loaded only if some answer is not cached yet."""

    kind = "local"

    def __init__(self, model: str, base: str | None, *, max_new_tokens: int, batch_size: int):
        self.model = model
        self.base = base
        self.cache: ResponseCache | None = None  # set once OUT is ready
        self.max_new_tokens = max_new_tokens
        self.batch_size = max(1, batch_size)
        self.label = model
        self.identity = model_identity(model, base)
        self.loaded_info: dict = {}

    def info(self) -> dict:
        info = {"kind": self.kind, "model": self.model, "base": self.base, "identity": self.identity}
        if (Path(self.model) / "config.json").exists():  # known without loading (all answers may be cached)
            from cogumi.lineage import config_dtype, read_model_config
            cfg = read_model_config(self.model)
            info["config_dtype"] = config_dtype(cfg)
            info["config_quantized"] = (cfg.get("quantization_config") or {}).get("quant_method")
        return {**info, **self.loaded_info}

    def _key(self, messages, stop) -> str:
        params = {"max_new_tokens": self.max_new_tokens, "greedy": True, "kind": "generate"}
        if stop:
            params["stop"] = list(stop)
        return cache_key(self.identity, messages, params)

    def complete(self, items, conversations, stops, log) -> Completions:
        keys = [self._key(m, s) for m, s in zip(conversations, stops)]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        if todo:
            self._generate(todo, conversations, stops, keys, log)
        else:
            log(f"{self.label}: all {len(keys)} answers cached")
        records = [self.cache.get(k) for k in keys]
        return Completions([r["text"] for r in records], [None] * len(keys), [r.get("finish_reason") for r in records])

    def _generate(self, todo, conversations, stops, keys, log) -> None:
        from cogumi.evaluation import generate as generate_mod

        log(f"{self.label}: loading ({len(keys) - len(todo)} of {len(keys)} answers cached)")
        model, tokenizer = generate_mod.load_candidate(self.model, self.base)
        self.loaded_info = _loaded_model_info(model)
        if self.loaded_info.get("quantized"):
            log(f"warning: {self.label} is a quantized model ({self.loaded_info['quantized']}); "
                f"its scores are the quantized model's, not the full-precision one's")
        # Longest prompts first (the batch most likely to run out of memory fails first); answers are
        # cached after every chunk of 8 batches, so a crash costs at most 8 batches. Chunks are not
        # smaller because on CUDA each distinct padded prompt width is one more static-cache compile.
        todo = sorted(todo, key=lambda i: -sum(len(m["content"]) for m in conversations[i]))
        chunk = self.batch_size * 8
        start_time = time.monotonic()
        try:
            for start in range(0, len(todo), chunk):
                idx = todo[start:start + chunk]
                done = generate_mod.generate(model, tokenizer, [conversations[i] for i in idx],
                                             max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                                             stop=[stops[i] for i in idx])
                for i, g in zip(idx, done):
                    self.cache.put(keys[i], {"text": g.text, "finish_reason": g.finish_reason,
                                             "model": self.identity, "kind": "generate"})
                log(f"{self.label}: generated {min(start + chunk, len(todo))}/{len(todo)} "
                    f"({time.monotonic() - start_time:.0f}s)")
        finally:
            del model
            gc.collect()
            _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # freeing memory must never fail the run
        pass


def _loaded_model_info(model) -> dict:
    param = next(model.parameters())
    qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
    quantized = None
    if qcfg is not None:
        quantized = getattr(qcfg, "quant_method", None) or (qcfg.get("quant_method") if isinstance(qcfg, dict) else None) \
            or "quantization_config present"
        quantized = str(getattr(quantized, "value", quantized))
    return {"dtype": str(param.dtype).replace("torch.", ""), "device": str(param.device), "quantized": quantized}


def model_identity(model: str, base: str | None) -> str:
    """What the cache keys on: weight fingerprints for local dirs (retraining in place changes it)."""
    from cogumi.lineage import fingerprint

    def ident(path_or_id: str) -> str:
        p = Path(path_or_id).expanduser()
        if p.is_dir():
            try:
                return fingerprint(p)
            except CogumiError:
                return f"dir:{p.resolve()}"
        return f"hub:{path_or_id}"

    path = Path(model).expanduser()
    if (path / "adapter_config.json").exists():
        recorded = None
        try:
            recorded = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError):
            pass
        base_ref = base or recorded or "recorded-base"
        return f"adapter:{ident(str(path))}+base:{ident(base_ref)}"
    return f"model:{ident(model)}"


def run_concurrently(fn: Callable, jobs: list, workers: int, log, what: str) -> list:
    """``[fn(job) for job in jobs]`` on ``workers`` threads; the first exception cancels the rest."""
    results: list = [None] * len(jobs)
    if not jobs:
        return results
    step = max(1, len(jobs) // 10)
    if workers <= 1:
        for i, job in enumerate(jobs):
            results[i] = fn(job)
            if (i + 1) % step == 0 or i + 1 == len(jobs):
                log(f"{what} {i + 1}/{len(jobs)}")
        return results
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cogumi-api")
    try:
        futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
        for done, future in enumerate(as_completed(futures), start=1):
            results[futures[future]] = future.result()
            if done % step == 0 or done == len(jobs):
                log(f"{what} {done}/{len(jobs)}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # requests in flight finish and are cached
    return results


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def _prepare_out(out: Path, overwrite: bool, log) -> None:
    if out.exists() and not out.is_dir():
        raise CogumiError(f"--out {out}: exists and is a file; give a directory for the eval run")
    if (out / "summary.json").exists() and not overwrite:
        raise CogumiError(f"--out {out}: already holds a finished eval (summary.json); pass --overwrite to redo it "
                          f"(cached answers and judgments are reused) or choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / "cache").is_dir() and not (out / "summary.json").exists():
        raise CogumiError(f"--out {out}: a non-empty directory that is not an eval run (no cache/ or summary.json); "
                          f"choose a new or empty directory")
    if (out / "cache").is_dir() and not (out / "summary.json").exists():
        log(f"resuming the eval in {out} (cached answers and judgments are reused)")
    (out / "cache").mkdir(parents=True, exist_ok=True)


def _check_local_model_config(model_dir: Path) -> None:
    """Before --out is touched: config.json must parse, and its dtype must be the weights' stored dtype
    (loading with dtype="auto" would otherwise silently cast, e.g. bf16 weights to float16)."""
    from cogumi.lineage import config_dtype_mismatch, read_model_config
    cfg = read_model_config(str(model_dir))
    mismatch = config_dtype_mismatch(model_dir, cfg)
    if mismatch is not None:
        raise CogumiError(f"{mismatch.message}; refusing to evaluate it in the wrong dtype -> {mismatch.fix}")


def _side(spec: str, role: str, *, tasks: list[str], base: str | None, endpoint: str | None, api_model: str | None,
          policy: RetryPolicy, budget: RetryBudget, max_new_tokens: int, batch_size: int, api_workers: int):
    if is_endpoint_spec(spec):
        ep = ChatEndpoint(parse_endpoint_spec(spec, endpoint=endpoint, api_model=api_model), policy=policy,
                          budget_counter=budget)
        return EndpointSide(ep, max_new_tokens=max_new_tokens, workers=api_workers)
    p = Path(spec).expanduser()
    if p.is_file():
        return PredictionsSide(str(p), tasks)
    if p.is_dir():
        if (p / "config.json").exists():
            _check_local_model_config(p)
        if (p / "config.json").exists() or (p / "adapter_config.json").exists():
            return LocalModelSide(str(p), base if role == "candidate" else None,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size)
        return PredictionsSide(str(p), tasks)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise CogumiError(f"{role} {spec!r}: no such file or directory (expected a model dir, an adapter dir, "
                          f"a hub id like org/name, openai:MODEL, a predictions file, or an eval run dir)")
    return LocalModelSide(spec, base if role == "candidate" else None,
                          max_new_tokens=max_new_tokens, batch_size=batch_size)


def _load_items(task_names: list[str], data: dict[str, str], n: int | None, seed: int, few_shot: int,
                split: str | None = "test", variant: str | None = None, prompt_set=None):
    known_keys = set(task_names) | {f"{t}-shots" for t in task_names}
    for key in data:
        if key not in known_keys:
            raise ConfigError(f"--data {key}=...: {key!r} is not among --tasks ({', '.join(task_names)}); "
                              f"use TASK=FILE (or TASK-shots=FILE for few-shot examples)")
    items, messages, data_info = [], [], {}
    for task in task_names:
        loaded = tasks_mod.load_task(task, data.get(task), n=n, seed=seed, split=split,
                                     variant=variant if task == "mbpp" else None)
        shots = _shots(task, data) if few_shot else None
        for it in loaded:
            it.prompt = prompt_set.text(it)   # what this run asks (rows record it)
        items += loaded
        messages += [tasks_mod.build_messages(it, few_shot=few_shot, shots=shots, prompts=prompt_set) for it in loaded]
        source = data.get(task)
        data_info[task] = {"data": source or tasks_mod.HUB_IDS[task][0],
                           "data_sha256": sha256_file(source) if source else None}
    return items, messages, data_info


def _shots(task: str, data: dict[str, str]):
    if f"{task}-shots" in data:
        return tasks_mod.few_shot_pool(task, data[f"{task}-shots"])
    source = data.get(task)
    if task == "gsm8k" and source:
        train = Path(source).with_name("train.jsonl")
        if not train.exists() or train.resolve() == Path(source).resolve():
            raise ConfigError(f"--few-shot for gsm8k needs training examples: no train.jsonl beside {source}; "
                              f"pass --data gsm8k-shots=TRAIN.jsonl")
        return tasks_mod.few_shot_pool(task, str(train))
    return tasks_mod.few_shot_pool(task, source)


def gold_text(item) -> str:
    """The benchmark's own solution, shown to the LLM judge as the reference answer."""
    if item.task == "gsm8k":
        import re
        return re.sub(r"<<[^>]*>>", "", str(item.data.get("answer", item.gold))).strip()
    if item.task == "humaneval":
        return item.data["prompt"] + item.data["canonical_solution"]
    return str(item.data.get("code", item.gold))


def _check_side(items, completions: Completions, workers, timeout) -> list[dict]:
    idx = [i for i, t in enumerate(completions.texts) if t is not None]
    checks = tasks_mod.check_many([items[i] for i in idx], [completions.texts[i] for i in idx],
                                  workers=workers, timeout=timeout)
    out = [{"completion": None, "extracted": None, "correct": None, "reason": e or "no completion",
            "infra_error": e or "no completion", "finish_reason": None, "truncated": None, "repetition": None}
           for e in completions.errors]
    for i, c in zip(idx, checks):
        text = completions.texts[i]
        out[i] = {"completion": text, "extracted": c.extracted, "correct": c.correct,
                  "reason": c.reason, "infra_error": c.infra_error,
                  "finish_reason": completions.finish_reasons[i], "truncated": completions.truncated[i],
                  "repetition": finish_mod.repetition(text)}
    return out


def run_eval(model: str, *, tasks: list[str], out: str | Path, n: int | None = None, seed: int = 0,
             data: dict[str, str] | None = None, reference: str | None = None, judge: str = "exact",
             judge_model: str | None = None, batch_size: int = 32, max_new_tokens: int = 512,
             base: str | None = None, endpoint: str | None = None, api_model: str | None = None,
             few_shot: int = 0, workers: int | None = None, timeout: float = 10.0, overwrite: bool = False,
             retry: RetryPolicy | None = None, api_workers: int = 4, judge_max_tokens: int = 1024,
             split: str | None = "test", variant: str | None = None, prompt: str | None = None,
             log: Callable[[str], None] | None = None) -> dict:
    """Evaluate ``model`` on ``tasks`` against ``reference``; write OUT/results.jsonl + summary.json.

    Returns the summary dict. ``retry`` sets endpoint retries/backoff/budget/timeouts; ``api_workers``
    how many endpoint requests run at once; ``split`` / ``variant`` go to ``tasks.load_task`` (MBPP);
    ``prompt`` names the prompt set (``prompts.resolve``: None = ``prompts.DEFAULT``, a built-in name, or
    a YAML file).
    """
    log = log or (lambda m: _stderr(f"eval: {redact(m)}"))
    task_names = list(dict.fromkeys(tasks))
    if not task_names:
        raise ConfigError("--tasks: give at least one of gsm8k, humaneval, mbpp")
    if judge not in JUDGES:
        raise ConfigError(f"--judge {judge!r}: choose exact or llm")
    if judge == "llm" and not reference:
        raise ConfigError("--judge llm compares two answers: pass --reference (predictions, model or openai:MODEL)")
    if judge == "llm" and not judge_model:
        raise ConfigError("--judge llm needs --judge-model (e.g. gpt-4o, served at --endpoint / OPENAI_BASE_URL)")
    if few_shot < 0 or max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("--few-shot must be >= 0, --max-new-tokens and --batch-size >= 1")
    out = Path(out)
    data = dict(data or {})
    prompt_set = prompts_mod.resolve(prompt)
    items, conversations, data_info = _load_items(task_names, data, n, seed, few_shot, split, variant, prompt_set)
    stops = [prompt_set.stops(it.task) for it in items]
    if not items:
        raise DataError(f"no items to evaluate for {', '.join(task_names)} (empty data or --n 0)")

    # Everything that can be checked without generating is checked before OUT is touched.
    policy = retry or RetryPolicy()
    budget = RetryBudget(policy.budget)
    common = dict(tasks=task_names, base=base, endpoint=endpoint, api_model=api_model, policy=policy,
                  budget=budget, max_new_tokens=max_new_tokens, batch_size=batch_size, api_workers=api_workers)
    candidate = _side(model, "candidate", **common)
    ref_side = _side(reference, "reference", **common) if reference else None
    for side in (candidate, ref_side):
        if isinstance(side, PredictionsSide):
            side.check_covers(items)
    judge_ep = None
    if judge == "llm":
        judge_ep = ChatEndpoint(parse_endpoint_spec(judge_model if is_endpoint_spec(judge_model) else
                                                    f"openai:{judge_model}", endpoint=endpoint),
                                policy=policy, budget_counter=budget)

    _prepare_out(out, overwrite, log)
    gen_cache = ResponseCache(out / "cache" / "generations.jsonl")
    judge_cache = ResponseCache(out / "cache" / "judgments.jsonl")
    for side in (candidate, ref_side):
        if isinstance(side, (EndpointSide, LocalModelSide)):
            side.cache = gen_cache
    llm_judge = LLMJudge(judge_ep, judge_cache, max_tokens=judge_max_tokens) if judge_ep else None
    log(f"{len(items)} items ({', '.join(f'{t}={sum(1 for it in items if it.task == t)}' for t in task_names)}); "
        f"prompts {prompt_set.name} ({prompt_set.source}); "
        f"cache: {len(gen_cache)} answers, {len(judge_cache)} judgments")

    cand = candidate.complete(items, conversations, stops, log).settle(stops)
    ref = ref_side.complete(items, conversations, stops, log).settle(stops) if ref_side else None
    log("checking answers")
    cand_checks = _check_side(items, cand, workers, timeout)
    ref_checks = _check_side(items, ref, workers, timeout) if ref else None

    judgments = None
    if llm_judge is not None:
        def judge_one(i):
            if cand.texts[i] is None or ref.texts[i] is None:
                return None
            it = items[i]
            return llm_judge.judge(it.prompt, cand.texts[i], ref.texts[i], gold_text(it))
        judgments = run_concurrently(judge_one, list(range(len(items))), api_workers, log,
                                     f"{llm_judge.model}: judging")

    used = {"name": prompt_set.name, "sha256": prompt_set.sha256}
    rows = [{**_row(i, items, cand_checks, ref_checks, judgments, llm_judge), "prompt_set": used}
            for i in range(len(items))]
    endpoints = {s.label: s.endpoint.stats.as_dict() for s in (candidate, ref_side) if isinstance(s, EndpointSide)}
    if llm_judge is not None:
        endpoints[f"judge {llm_judge.model}"] = llm_judge.endpoint.stats.as_dict()
    summary = summarize(rows, task_names)
    for task in task_names:
        summary["tasks"][task].update(data_info[task])
    summary = {
        "model": candidate.label, "reference": ref_side.label if ref_side else None,
        "judge": {"kind": "exact"} if judge == "exact" else
                 {"kind": "llm", "model": llm_judge.model, "orders": 2, "disagreement": "tie",
                  "base_url": safe_url(llm_judge.endpoint.spec.base_url)},
        "tasks": summary["tasks"],
        "candidate": candidate.info(), "reference_info": ref_side.info() if ref_side else None,
        "n": n, "seed": seed, "split": split, "few_shot": few_shot, "max_new_tokens": max_new_tokens,
        "prompt": prompt_set.record(), "stop_sequences": {t: list(prompt_set.stops(t)) for t in task_names},
        "endpoints": endpoints, "retries_used": budget.used,
        "usage": {label: stats["usage"] for label, stats in endpoints.items() if stats["usage"]["requests_paid"]},
        "cogumi_version": __version__, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # summary.json marks a finished run: an old one goes first, the new one is written last, so a crash
    # in between leaves an unfinished run (resumable from the cache), never a summary of other results.
    (out / "summary.json").unlink(missing_ok=True)
    atomic_write_jsonl(out / "results.jsonl", rows)
    atomic_write_json(out / "summary.json", summary)
    log(f"wrote {out / 'results.jsonl'} and {out / 'summary.json'}")
    return summary


def _row(i, items, cand_checks, ref_checks, judgments, llm_judge) -> dict:
    it = items[i]
    c = cand_checks[i]
    r = ref_checks[i] if ref_checks else None
    outcome = tie_kind = judge_record = None
    if r is not None:
        if llm_judge is None:
            outcome, tie_kind = exact_outcome(c["correct"], r["correct"])
        else:
            j = judgments[i]
            if j is not None:
                outcome = j.outcome
                judge_record = j.as_record(llm_judge.model)
                if outcome == "tie" and c["correct"] is not None and c["correct"] == r["correct"]:
                    tie_kind = "both_right" if c["correct"] else "both_wrong"
            else:
                judge_record = {"kind": "llm", "model": llm_judge.model, "outcome": None,
                                "infra_error": "not judged: an answer is missing"}
    return {"task": it.task, "task_id": it.task_id, "prompt": it.prompt, "gold": it.gold,
            "completion": c["completion"], "extracted": c["extracted"], "correct": c["correct"],
            "reason": c["reason"], "infra_error": c["infra_error"],
            "finish_reason": c["finish_reason"], "truncated": c["truncated"], "repetition": c["repetition"],
            "reference": r, "outcome": outcome, "tie_kind": tie_kind, "judge": judge_record}


def _ci(k: int, n: int):
    return list(wilson_interval(k, n)) if n else None


def _finish_stats(sides: list[dict]) -> dict:
    """Truncated count, how many answers' truncation is known, the rate over those, mean repetition."""
    known = [s["truncated"] for s in sides if s.get("truncated") is not None]
    reps = [s["repetition"] for s in sides if s.get("repetition") is not None]
    truncated = sum(1 for t in known if t)
    return {"truncated": truncated, "truncation_known": len(known),
            "truncated_rate": truncated / len(known) if known else None,
            "repetition_mean": sum(reps) / len(reps) if reps else None}


def summarize(rows: list[dict], task_names: list[str] | None = None) -> dict:
    """Per-task counts, rates and 95% Wilson intervals (docs/design.md's summary.json ``tasks``), and
    truncation / repetition (``truncated_rate`` is None when no row's truncation is known)."""
    task_names = task_names or list(dict.fromkeys(r["task"] for r in rows))
    tasks = {}
    for task in task_names:
        rs = [r for r in rows if r["task"] == task]
        with_ref = [r for r in rs if r.get("reference") is not None]
        count = lambda pred: sum(1 for r in rs if pred(r))  # noqa: E731
        wins, losses = count(lambda r: r["outcome"] == "win"), count(lambda r: r["outcome"] == "loss")
        ties = count(lambda r: r["outcome"] == "tie")
        judged = wins + ties + losses
        checked = count(lambda r: r["correct"] is not None)
        correct = count(lambda r: r["correct"] is True)
        ref_checked = sum(1 for r in with_ref if r["reference"]["correct"] is not None)
        ref_correct = sum(1 for r in with_ref if r["reference"]["correct"] is True)
        # With a reference: items left without a verdict; without one: candidate answers left unchecked.
        infra = sum(1 for r in with_ref if r["outcome"] is None) if with_ref else len(rs) - checked
        rate = lambda k: (k / judged) if judged else None  # noqa: E731
        finish = _finish_stats(rs)
        ref_finish = {f"reference_{k}": (v if with_ref else None)
                      for k, v in _finish_stats([r["reference"] for r in with_ref]).items()}
        tasks[task] = {
            "n": len(rs), "correct": correct, "checked": checked,
            "wins": wins, "ties": ties,
            "ties_both_right": count(lambda r: r["tie_kind"] == "both_right"),
            "ties_both_wrong": count(lambda r: r["tie_kind"] == "both_wrong"),
            "losses": losses, "judged": judged, "infra_errors": infra,
            "judge_disagreements": count(lambda r: (r.get("judge") or {}).get("consistent") is False),
            "win_rate": rate(wins), "tie_rate": rate(ties), "loss_rate": rate(losses),
            "win_ci": _ci(wins, judged), "tie_ci": _ci(ties, judged), "loss_ci": _ci(losses, judged),
            "accuracy": correct / checked if checked else None, "accuracy_ci": _ci(correct, checked),
            "reference_correct": ref_correct if with_ref else None,
            "reference_checked": ref_checked if with_ref else None,
            "reference_accuracy": ref_correct / ref_checked if ref_checked else None,
            **finish, **ref_finish,
        }
    return {"tasks": tasks}

