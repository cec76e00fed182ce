"""The stage engine: runs stages in order in a run dir, records each, resumes, stops at red flags.

See ``cogumi.pipeline`` for the protocol (stage dirs, ``started.json`` / ``stage.json`` records, input
hashes, ``--resume``, the run lock, fault injection). Nothing here knows what a stage does. Each
record carries the stage's own peak memory (``cogumi.memory``: the resettable RSS high-water mark, so a
merge after training reports the merge's peak, not training's).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cogumi.errors import CogumiError, GateFailed, RedFlagError
from cogumi.io import atomic_write_json, atomic_write_text, sha256_file
from cogumi.memory import PeakMemory

SUMMARY_NAME = "summary.json"
RECORD_NAME = "stage.json"
STARTED_NAME = "started.json"
FAULT_ENV = "COGUMI_FAULT_KILL_AT"

class StageSkipped(Exception):
    """Raised by a stage that has nothing to do (e.g. no failures to train Phase 1B on)."""


@dataclass
class Stage:
    index: int
    name: str
    title: str
    fn: Callable[["StageContext"], dict | None]
    config: Any = None                    # JSON-able: the plan slice this stage reads (hashed)
    needs: tuple[str, ...] = ()           # upstream stages whose outputs it reads (their hashes are hashed)
    optional: tuple[str, ...] = ()        # those of ``needs`` it can do without (e.g. validate-base)
    keep_on_restart: tuple[str, ...] = () # paths (relative to the stage dir) an interrupted attempt resumes from
    gpu: bool = False                     # billed at the GPU's hourly price
    enabled: bool = True
    disabled_reason: str = ""

    @property
    def dirname(self) -> str:
        return f"{self.index:02d}-{self.name}"


@dataclass
class StageContext:
    run_dir: Path
    dir: Path
    stage: Stage
    records: dict[str, dict]
    log: Callable[[str], Any]
    restarted: bool = False
    outputs: dict[str, Path] = field(default_factory=dict)
    findings: list[dict] = field(default_factory=list)
    memory: Any = None                    # PeakMemory of the stage's work (set by the engine)

    def output(self, name: str, path: str | Path) -> Path:
        """Register an artifact of this stage (hashed into its record and its consumers' input hashes)."""
        self.outputs[name] = Path(path)
        return Path(path)

    def input(self, stage: str, name: str) -> Path:
        rec = self.records.get(stage)
        if rec is None or name not in (rec.get("outputs") or {}):
            raise CogumiError(f"stage {self.stage.name}: needs output '{name}' of stage {stage}, which is missing; "
                              "run the pipeline again with --resume")
        return self.run_dir / rec["outputs"][name]["path"]

    def has_input(self, stage: str, name: str) -> bool:
        rec = self.records.get(stage)
        return bool(rec and rec.get("status") == "done" and name in (rec.get("outputs") or {}))


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def content_hash(path: Path) -> str:
    """Content hash of an artifact: a file's sha256; a model/adapter dir's lineage fingerprint; any other dir's
    files (relative name + sha256), skipping caches, checkpoints, logs and hidden files."""
    path = Path(path)
    if path.is_file():
        return "sha256:" + sha256_file(path)
    if not path.is_dir():
        raise CogumiError(f"{path}: artifact is missing")
    from cogumi.lineage import fingerprint, weight_files
    if weight_files(path):
        return fingerprint(path)
    h = hashlib.sha256()
    skip = {"cache", "checkpoints", "tensorboard", "__pycache__"}
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and not any(p.startswith(".") or p in skip for p in rel.parts):
            h.update(f"{rel.as_posix()}\0{sha256_file(f)}\0".encode())
    return "sha256-tree:" + h.hexdigest()


def file_identity(path: str | None) -> dict | None:
    """What a plan names, hashed: a local file's sha256, a local dir's content hash, or a hub id as is."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return {"path": str(p), "sha256": sha256_file(p)}
    if p.is_dir():
        return {"path": str(p), "hash": content_hash(p)}
    return {"id": path}


def _faults(name: str, when: str) -> None:
    for spec in filter(None, (s.strip() for s in os.environ.get(FAULT_ENV, "").split(","))):
        stage, _, at = spec.partition(":")
        if stage == name and (at or "start") == when:
            os.kill(os.getpid(), signal.SIGKILL)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _clear_dir(path: Path, keep: tuple[str, ...] = ()) -> None:
    """Empty ``path`` except the relative paths in ``keep`` (and their parents)."""
    if not path.exists():
        return
    keep_paths = {(path / k).resolve() for k in keep}

    def kept(p: Path) -> bool:
        r = p.resolve()
        return any(r == k or k.is_relative_to(r) for k in keep_paths)

    def walk(d: Path):
        for child in d.iterdir():
            if kept(child):
                if child.is_dir() and child.resolve() not in keep_paths:
                    walk(child)
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    walk(path)


class _RunLock:
    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise CogumiError(f"{self.path.parent}: another cogumi pipeline is running in this run dir") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _fix_for(exc: BaseException) -> str:
    if isinstance(exc, RedFlagError):
        return ("A red flag means an artifact is not trustworthy: read the finding above, fix its cause (the base, "
                "the adapter, the merge), then run the same command with --resume; stages before this one are reused.")
    if isinstance(exc, GateFailed):
        return ("The model did not meet the success criteria. Open the report (cogumi report RUN_DIR) and look at "
                "the lost items; then retrain with changed settings, or, if the bands do not fit your setup, edit "
                "the criteria and run again with --resume (only the gate reruns).")
    return "Fix the problem named above, then run the same command with --resume; completed stages are reused."


class Engine:
    """Runs ``stages`` in order in ``run_dir`` (see the module docstring for the protocol)."""

    def __init__(self, stages: list[Stage], run_dir: Path, *, meta: dict | None = None, log=print,
                 gpu_hourly_usd: float = 0.0, capture_output: bool = False, files: dict[str, str] | None = None,
                 headline: Callable[[Path, dict[str, dict]], dict] | None = None):
        self.stages = stages
        self.headline = headline                  # run dir, records -> the summary's "results" (the plan's own)
        self.files = files or {}                  # written into run_dir once the run holds its lock
        self.capture_output = capture_output      # stage stdout/stderr (progress bars, warnings) -> log.txt only
        self._stdout, self._stderr = sys.stdout, sys.stderr
        self.run_dir = Path(run_dir)
        self.meta = meta or {}
        self.log = log
        self.gpu_hourly_usd = gpu_hourly_usd
        self.records: dict[str, dict] = {}
        self.t0 = time.time()

    # -- paths and hashes ------------------------------------------------------------------
    def stage_dir(self, stage: Stage) -> Path:
        return self.run_dir / "stages" / stage.dirname

    def input_hash(self, stage: Stage) -> tuple[str, dict]:
        upstream = {}
        for name in stage.needs:
            rec = self.records.get(name)
            upstream[name] = None if rec is None else \
                {"status": rec.get("status"), "outputs": {k: v["hash"] for k, v in (rec.get("outputs") or {}).items()}}
        inputs = {"stage": stage.name, "config": stage.config, "upstream": upstream}
        return "sha256:" + hashlib.sha256(_canonical(inputs).encode()).hexdigest(), inputs

    def _outputs_intact(self, rec: dict) -> bool:
        for out in (rec.get("outputs") or {}).values():
            p = self.run_dir / out["path"]
            try:
                if content_hash(p) != out["hash"]:
                    return False
            except CogumiError:
                return False
        return True

    # -- the run ---------------------------------------------------------------------------
    def existing_records(self) -> list[str]:
        return [s.name for s in self.stages if (self.stage_dir(s) / RECORD_NAME).exists()
                or (self.stage_dir(s) / STARTED_NAME).exists()]

    def run(self, *, resume: bool) -> dict:
        with _RunLock(self.run_dir):
            if not resume and self.existing_records():
                raise CogumiError(f"{self.run_dir} already holds a run (stages: {', '.join(self.existing_records())}); "
                                  "pass --resume to continue it, or choose another --run-dir")
            for name, text in self.files.items():
                atomic_write_text(self.run_dir / name, text)
            self.write_summary("running")
            for stage in self.stages:
                if not stage.enabled:
                    self.records[stage.name] = {"name": stage.name, "index": stage.index, "title": stage.title,
                                                "status": "disabled", "reason": stage.disabled_reason, "seconds": 0.0}
                    continue
                self.run_stage(stage, resume=resume)
            self.write_summary("done")
        return self.summary("done")

    def run_stage(self, stage: Stage, *, resume: bool) -> None:
        sdir = self.stage_dir(stage)
        ihash, inputs = self.input_hash(stage)
        rec = _read_json(sdir / RECORD_NAME)
        if resume and rec and rec.get("status") in ("done", "skipped") and rec.get("input_hash") == ihash:
            if self._outputs_intact(rec):
                self.log(f"[{stage.dirname}] reused: completed earlier with the same inputs")
                rec["reused"] = True
                self.records[stage.name] = rec
                return
            self.log(f"[{stage.dirname}] outputs changed or missing since it completed: running it again")

        upstream_skipped = [n for n in stage.needs if n not in stage.optional
                            and (self.records.get(n) or {}).get("status") in ("skipped", "disabled")]
        started = _read_json(sdir / STARTED_NAME)
        # an attempt with the same inputs that did not complete (killed, crashed, stopped): resume its work
        previous = (started or {}).get("input_hash") or ((rec or {}).get("input_hash")
                                                         if (rec or {}).get("status") not in ("done", "skipped") else None)
        restarted = bool(resume and previous == ihash)
        if restarted:
            self.log(f"[{stage.dirname}] was interrupted: restarting it"
                     + (f" (keeping {', '.join(stage.keep_on_restart)})" if stage.keep_on_restart else ""))
            _clear_dir(sdir, stage.keep_on_restart)
        else:
            if rec is not None and resume and rec.get("input_hash") != ihash:
                self.log(f"[{stage.dirname}] inputs changed since it last ran: running it again")
            _clear_dir(sdir)
        sdir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(sdir / STARTED_NAME, {"input_hash": ihash, "started": _now(), "pid": os.getpid()})
        self.write_summary("running", current=stage.name)

        ctx = StageContext(self.run_dir, sdir, stage, self.records, self._stage_logger(sdir, stage), restarted)
        record = {"name": stage.name, "index": stage.index, "title": stage.title, "input_hash": ihash,
                  "inputs": inputs, "started": _now(), "restarted": restarted, "gpu": stage.gpu}
        t0 = time.time()
        if upstream_skipped:
            self._finish(sdir, record, ctx, t0, "skipped",
                         reason=f"skipped because {', '.join(upstream_skipped)} did not run")
            return
        ctx.log(f"[{stage.dirname}] {stage.title}")
        _faults(stage.name, "start")
        ctx.memory = PeakMemory().__enter__()      # this stage's own peak RSS / GPU memory
        try:
            if self.capture_output:
                with open(sdir / "log.txt", "a", encoding="utf-8", buffering=1) as fh, \
                        contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                    metrics = stage.fn(ctx) or {}
            else:
                metrics = stage.fn(ctx) or {}
        except StageSkipped as e:
            self._finish(sdir, record, ctx, t0, "skipped", reason=str(e))
            return
        except CogumiError as e:
            status = "red_flag" if isinstance(e, RedFlagError) else "gate_failed" if isinstance(e, GateFailed) else "error"
            self._finish(sdir, record, ctx, t0, status, reason=str(e), fix=_fix_for(e))
            self.write_summary("stopped", stopped_at=stage.name)
            raise type(e)(f"pipeline stopped at stage {stage.dirname}: {e}\nWhat to do: {_fix_for(e)}\n"
                          f"Run dir: {self.run_dir} (summary.json; `cogumi report {self.run_dir}`)",
                          exit_code=e.exit_code) from None
        except BaseException as e:
            self._finish(sdir, record, ctx, t0, "crashed", reason=f"{type(e).__name__}: {e}",
                         fix="This is a bug or an environment problem (see the traceback); --resume restarts the stage.")
            self.write_summary("stopped", stopped_at=stage.name)
            raise
        _faults(stage.name, "end")
        self._finish(sdir, record, ctx, t0, "done", metrics=metrics)

    def _finish(self, sdir: Path, record: dict, ctx: StageContext, t0: float, status: str, *,
                metrics: dict | None = None, reason: str = "", fix: str = "") -> None:
        seconds = time.time() - t0
        outputs = {}
        for name, path in ctx.outputs.items():
            if Path(path).exists():
                outputs[name] = {"path": os.path.relpath(Path(path).resolve(), self.run_dir.resolve()),
                                 "hash": content_hash(Path(path))}
        gpu_cost = seconds / 3600 * self.gpu_hourly_usd if record.get("gpu") else 0.0
        api_cost = float((metrics or {}).get("api_cost_usd") or 0.0)
        record.update(status=status, finished=_now(), seconds=round(seconds, 3),
                      cost_usd=round(gpu_cost + api_cost, 4),
                      outputs=outputs, metrics=metrics or {}, findings=ctx.findings)
        if ctx.memory is not None:
            record["memory"] = ctx.memory.read()
        if reason:
            record["reason"] = reason
        if fix:
            record["fix"] = fix
        atomic_write_json(sdir / RECORD_NAME, record)
        (sdir / STARTED_NAME).unlink(missing_ok=True)
        self.records[record["name"]] = record
        word = {"done": "done", "skipped": "skipped"}.get(status, status.upper())
        self.log(f"[{ctx.stage.dirname}] {word} in {seconds:.1f}s" + (f": {reason.splitlines()[0]}" if reason else ""))

    def _stage_logger(self, sdir: Path, stage: Stage):
        path = sdir / "log.txt"

        def log(msg: str = "") -> None:
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{msg}\n")
            with contextlib.redirect_stdout(self._stdout), contextlib.redirect_stderr(self._stderr):
                self.log(msg)
        return log

    # -- summary ---------------------------------------------------------------------------
    def summary(self, status: str, *, current: str | None = None, stopped_at: str | None = None) -> dict:
        stages = []
        for s in self.stages:
            rec = self.records.get(s.name)
            if rec is None:
                entry = {"name": s.name, "index": s.index, "title": s.title,
                         "status": "running" if s.name == current else ("disabled" if not s.enabled else "pending"),
                         "seconds": 0.0, "cost_usd": 0.0}
            else:
                entry = {"name": s.name, "index": s.index, "title": s.title, "status": rec.get("status"),
                         "seconds": rec.get("seconds", 0.0), "cost_usd": rec.get("cost_usd", 0.0),
                         "reused": bool(rec.get("reused")), "restarted": bool(rec.get("restarted")),
                         "peak_rss_gib": (rec.get("memory") or {}).get("peak_rss_gib"),
                         "dir": f"stages/{s.dirname}"}
                for k in ("reason", "fix"):
                    if rec.get(k):
                        entry[k] = rec[k]
            stages.append(entry)
        ran = [e for e in stages if e["status"] not in ("pending", "disabled", "running")]
        out = {**self.meta, "status": status, "run_dir": str(self.run_dir), "updated": _now(), "stages": stages,
               "total_seconds": round(sum(e["seconds"] for e in ran), 3),
               "total_cost_usd": round(sum(e["cost_usd"] for e in ran), 4),
               "wall_seconds_this_invocation": round(time.time() - self.t0, 3)}
        if stopped_at:
            rec = self.records.get(stopped_at) or {}
            out["stopped_at"] = stopped_at
            out["reason"] = rec.get("reason", "")
            out["fix"] = rec.get("fix", "")
        out["results"] = self.headline(self.run_dir, self.records) if self.headline else {}
        return out

    def write_summary(self, status: str, **kw) -> None:
        atomic_write_json(self.run_dir / SUMMARY_NAME, self.summary(status, **kw))
