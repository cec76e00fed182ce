"""``cogumi pipeline PLAN``: the user's two-day checklist as one resumable run that stops at every red flag.

Stages (fixed numbers, so a stage's directory never moves when a plan turns an optional one off)::

    01 preflight          configs, data, base (refuses a quantized one), gate items, criteria, reference
    02 validate-base      optional: the base model on the validation (TEST) items, for "did it help?"
    03 train-1a           LoRA on the full-precision base (cogumi.train; resumes from its checkpoint)
    04 verify-adapter-1a  lineage / quantization / NaN checks (cogumi.verify)
    05 merge-1a           streaming bf16 merge with fidelity check (cogumi.merge)
    06 verify-merged-1a
    07 validate-1a        eval on the TEST items against the reference (cogumi.evaluation)
    08 gate-1a            success criteria and red flags (cogumi.evaluation.gates)
    09 mine-1a            eval on TRAIN-split items: where does the model lose?
    10 failures-1a        Phase 1B set: losses only, decontaminated against the gate items (cogumi.failures)
    11 train-1b           LoRA on the *merged* Phase 1A model
    12 verify-adapter-1b
    13 merge-1b
    14 verify-merged-1b
    15 validate-1b
    16 compare-1a-1b      paired comparison on the same items (exact McNemar)
    17 gate-1b            criteria again, plus "Phase 1B must not regress"
    18 incident           optional (the demo): the 4-bit incident reproduced (cogumi.incident)

The engine (``run_stages``):
  * Each stage works in ``RUN_DIR/stages/NN-name/``. A ``started.json`` marks it begun; its record
    ``stage.json`` (status, input hash, outputs with content hashes, metrics, findings, wall time, cost) is
    written atomically when it ends, and is the only thing that makes a stage complete.
  * A stage's input hash covers its slice of the plan (with content hashes of the files it names) and the
    content hashes of the upstream outputs it reads. ``--resume`` reuses a completed stage whose input hash
    is unchanged and whose outputs still hash the same, and continues from the first stage that is not.
    A stage killed mid-way restarts cleanly: its directory is emptied except what it can resume from
    (training checkpoints); training continues from its newest complete checkpoint.
  * A red flag (``RedFlagError``), a failed gate (``GateFailed``) or any user error stops the run: the stage
    is recorded as failed with the reason and what to do, ``summary.json`` says where it stopped, and the
    exit code is non-zero. Fix the cause and run again with ``--resume``.
  * ``RUN_DIR/summary.json`` is rewritten after every stage: ``stages`` (name, status, seconds, cost_usd,
    reused), the run's status, and headline results. A lock file stops two runs sharing one RUN_DIR.
  * Fault injection for tests (environment): ``COGUMI_FAULT_KILL_AT=NAME`` SIGKILLs the process when stage
    NAME has started, ``NAME:end`` after its work but before its record is written (comma-separated list).

Plan files are YAML validated like run configs: an unknown key or a wrong type is one ``ConfigError``
naming the dotted key; relative paths resolve against the current directory, then the plan's folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from typing import Any, Callable, Literal

import yaml

from cogumi.config import RunConfig, apply_overrides, from_dict, load_yaml, resolve_local, validate_run_config
from cogumi.errors import CogumiError, ConfigError, GateFailed, RedFlagError
from cogumi.io import atomic_write_json, atomic_write_text, sha256_file

SUMMARY_NAME = "summary.json"
RECORD_NAME = "stage.json"
STARTED_NAME = "started.json"
FAULT_ENV = "COGUMI_FAULT_KILL_AT"


# =============================================================================================
# the plan
# =============================================================================================

@dataclass
class TaskPlan:
    n: int | None = None                  # items (deterministic sample by seed); None: all
    data: str | None = None               # local file in the benchmark's own format; None: the hub dataset
    split: str = "test"                   # test for validation, train for mining (MBPP split by task id)
    variant: str | None = None            # mbpp: full | sanitized


@dataclass
class TrainPlan:
    config: str = ""                      # a run config YAML (configs/phase1a.yaml)
    base_model: str | None = None         # overrides the config's base_model (Phase 1A only)
    data: str | None = None               # overrides data.train (Phase 1A only)
    set: list[str] = field(default_factory=list)   # more KEY=VALUE overrides of the run config


@dataclass
class MergePlan:
    target: Literal["original", "dequantized", "auto"] = "original"
    fidelity: bool = True


@dataclass
class EvalPlan:
    tasks: dict = field(default_factory=dict)      # task -> TaskPlan fields
    seed: int = 0
    reference: str = ""                   # predictions file/dir, model dir, or openai:MODEL (e.g. openai:gpt-4)
    judge: Literal["exact", "llm"] = "exact"
    judge_model: str | None = None
    endpoint: str | None = None           # OpenAI-compatible base URL (default: OPENAI_BASE_URL)
    api_model: str | None = None
    max_new_tokens: int = 512
    batch_size: int = 32
    few_shot: int = 0
    workers: int | None = None
    timeout: float = 10.0


@dataclass
class GatePlan:
    criteria: str | dict = ""             # criteria YAML path, or the rules inline
    stop_on_fail: bool = True             # a failed criterion stops the run (a red flag always does)


@dataclass
class MiningPlan:
    tasks: dict = field(default_factory=dict)      # task -> TaskPlan fields (train splits)
    reference: str | None = None          # default: validation.reference
    include_both_wrong: bool = False
    ngram: int = 8
    overlap: float = 0.5


@dataclass
class Phase1BPlan:
    enabled: bool = True
    train: TrainPlan = field(default_factory=TrainPlan)
    criteria: str | dict | None = None    # default: gate.criteria
    stop_on_regression: bool = True       # 1B significantly worse than 1A on the same items (McNemar p<0.05)
    replay: float = 0.0                   # also train on this many Phase 1A rows per failure row (rehearsal
                                          # against forgetting; 0: the failure set alone, as the plan says)


@dataclass
class CostPlan:
    gpu_hourly_usd: float = 2.5
    api_prompt_usd_per_1m: float = 30.0       # reference/judge endpoint prices (GPT-4: $30 / $60 per 1M tokens)
    api_completion_usd_per_1m: float = 60.0


@dataclass
class Plan:
    name: str = ""
    description: str = ""
    run_dir: str | None = None
    baseline: bool = True                 # evaluate the base model too
    incident: bool = False                # reproduce the 4-bit incident (the demo)
    phase1a: TrainPlan = field(default_factory=TrainPlan)
    merge: MergePlan = field(default_factory=MergePlan)
    validation: EvalPlan = field(default_factory=EvalPlan)
    gate: GatePlan = field(default_factory=GatePlan)
    mining: MiningPlan = field(default_factory=MiningPlan)
    phase1b: Phase1BPlan = field(default_factory=Phase1BPlan)
    cost: CostPlan = field(default_factory=CostPlan)
    source: str = ""                      # set by load_plan: the plan file

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d


TASK_NAMES = ("gsm8k", "humaneval", "mbpp")


def _is_endpoint_ref(value: str) -> bool:
    return value.startswith("openai:")


def _parse_tasks(raw: Any, key: str, source: str, base_dir: Path) -> dict[str, TaskPlan]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: key '{key}' must map task names ({', '.join(TASK_NAMES)}) to settings, "
                          "e.g. {gsm8k: {n: 50}}")
    out = {}
    for name, value in raw.items():
        if name not in TASK_NAMES:
            raise ConfigError(f"{source}: unknown task '{key}.{name}' (known tasks: {', '.join(TASK_NAMES)})")
        tp = from_dict(TaskPlan, value, prefix=f"{key}.{name}.", source=source)
        if tp.n is not None and tp.n <= 0:
            raise ConfigError(f"{source}: key '{key}.{name}.n' must be > 0")
        if tp.split not in ("train", "test", "validation", "prompt"):
            raise ConfigError(f"{source}: key '{key}.{name}.split' must be train, test, validation or prompt")
        if tp.data:
            tp.data = resolve_local(tp.data, f"{key}.{name}.data", source, base_dir)
            if not Path(tp.data).exists():
                raise ConfigError(f"{source}: key '{key}.{name}.data' points to {tp.data!r}, which does not exist")
        out[name] = tp
    return out


def _resolve_criteria(value: Any, key: str, source: str, base_dir: Path) -> str | dict:
    if isinstance(value, dict):
        from cogumi.evaluation.gates import parse_criteria
        parse_criteria(value, source=f"{source}: {key}")
        return value
    if not value:
        raise ConfigError(f"{source}: key '{key}' is required (a criteria YAML like configs/criteria/phase1a.yaml, "
                          "or the rules inline)")
    path = resolve_local(str(value), key, source, base_dir)
    if not Path(path).exists():
        raise ConfigError(f"{source}: key '{key}' points to {value!r}, which does not exist")
    from cogumi.evaluation.gates import load_criteria
    load_criteria(path)
    return path


def _resolve_ref(value: str, key: str, source: str, base_dir: Path) -> str:
    if _is_endpoint_ref(value):
        return value
    return resolve_local(value, key, source, base_dir)


def parse_plan(raw: dict, *, source: str = "plan", base_dir: Path | None = None) -> Plan:
    """Validate a raw plan mapping into a ``Plan`` (paths resolved, tasks and criteria checked)."""
    base_dir = base_dir or Path.cwd()
    plan = from_dict(Plan, raw, source=source)
    plan.source = source

    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise ConfigError(f"{source}: key '{key}' {msg}")

    need(bool(plan.phase1a.config), "phase1a.config", "is required (a run config YAML, e.g. configs/phase1a.yaml)")
    plan.phase1a.config = resolve_local(plan.phase1a.config, "phase1a.config", source, base_dir)
    need(Path(plan.phase1a.config).is_file(), "phase1a.config", f"points to {plan.phase1a.config!r}, not a file")
    if plan.phase1a.base_model:
        plan.phase1a.base_model = resolve_local(plan.phase1a.base_model, "phase1a.base_model", source, base_dir)
    if plan.phase1a.data:
        plan.phase1a.data = resolve_local(plan.phase1a.data, "phase1a.data", source, base_dir)
    plan.validation.tasks = _parse_tasks(plan.validation.tasks, "validation.tasks", source, base_dir)
    need(bool(plan.validation.reference), "validation.reference",
         "is required: a predictions file/dir, a model dir, or openai:MODEL (e.g. openai:gpt-4)")
    plan.validation.reference = _resolve_ref(plan.validation.reference, "validation.reference", source, base_dir)
    need(plan.validation.max_new_tokens > 0, "validation.max_new_tokens", "must be > 0")
    need(plan.validation.batch_size > 0, "validation.batch_size", "must be > 0")
    plan.gate.criteria = _resolve_criteria(plan.gate.criteria, "gate.criteria", source, base_dir)
    if plan.phase1b.enabled:
        plan.mining.tasks = _parse_tasks(plan.mining.tasks, "mining.tasks", source, base_dir)
        for name, tp in plan.mining.tasks.items():
            need(tp.split != "test" or name not in plan.validation.tasks, f"mining.tasks.{name}.split",
                 "must not be the validation split: Phase 1B mines TRAIN splits and validates on TEST splits")
        if plan.mining.reference:
            plan.mining.reference = _resolve_ref(plan.mining.reference, "mining.reference", source, base_dir)
        need(plan.mining.ngram >= 1, "mining.ngram", "must be >= 1")
        need(0 < plan.mining.overlap <= 1, "mining.overlap", "must be in (0, 1]")
        need(plan.phase1b.replay >= 0, "phase1b.replay", "must be >= 0")
        need(bool(plan.phase1b.train.config), "phase1b.train.config", "is required (e.g. configs/phase1b.yaml)")
        plan.phase1b.train.config = resolve_local(plan.phase1b.train.config, "phase1b.train.config", source, base_dir)
        need(Path(plan.phase1b.train.config).is_file(), "phase1b.train.config",
             f"points to {plan.phase1b.train.config!r}, not a file")
        if plan.phase1b.criteria:
            plan.phase1b.criteria = _resolve_criteria(plan.phase1b.criteria, "phase1b.criteria", source, base_dir)
    return plan


def load_plan(path: str | Path, overrides: list[str] | None = None) -> Plan:
    path = Path(path)
    raw = apply_overrides(load_yaml(path), overrides)
    return parse_plan(raw, source=str(path), base_dir=path.parent)


def run_config_for(train: TrainPlan, *, output_dir: Path, extra: dict | None = None,
                   check_files: bool = True) -> RunConfig:
    """The run config a training stage uses: the YAML, the plan's overrides, then the pipeline's own keys
    (output_dir, and for Phase 1B the merged base and the failure set)."""
    raw = load_yaml(train.config)
    overrides = list(train.set)
    raw = apply_overrides(raw, overrides)
    if train.base_model:
        raw["base_model"] = train.base_model
    if train.data:
        raw.setdefault("data", {})["train"] = train.data
    raw["output_dir"] = str(output_dir)
    for key, value in (extra or {}).items():
        apply_overrides(raw, [f"{key}={json.dumps(value)}"])
    cfg = from_dict(RunConfig, raw, source=train.config)
    validate_run_config(cfg, source=train.config, base_dir=Path(train.config).parent, check_files=check_files)
    return cfg


# =============================================================================================
# the engine
# =============================================================================================

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
                 gpu_hourly_usd: float = 0.0, capture_output: bool = False, files: dict[str, str] | None = None):
        self.stages = stages
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
        out["results"] = headline_results(self.run_dir, self.records)
        return out

    def write_summary(self, status: str, **kw) -> None:
        atomic_write_json(self.run_dir / SUMMARY_NAME, self.summary(status, **kw))


def headline_results(run_dir: Path, records: dict[str, dict]) -> dict:
    """Per-phase eval metrics, gate verdicts, failure-set counts: what summary.json shows at a glance."""
    out: dict[str, Any] = {}
    for phase, stage in (("base", "validate-base"), ("1a", "validate-1a"), ("1b", "validate-1b")):
        rec = records.get(stage)
        if rec and rec.get("status") == "done":
            out.setdefault("validation", {})[phase] = {
                t: {k: v.get(k) for k in ("n", "accuracy", "win_rate", "tie_rate", "loss_rate", "wins", "ties",
                                          "losses", "infra_errors")}
                for t, v in (rec.get("metrics", {}).get("tasks") or {}).items()}
    for stage in ("gate-1a", "gate-1b"):
        rec = records.get(stage)
        if rec and rec.get("metrics"):
            out.setdefault("gates", {})[stage] = {k: rec["metrics"].get(k) for k in ("passed", "red_flags")}
    rec = records.get("failures-1a")
    if rec and rec.get("metrics"):
        out["phase1b_set"] = {k: rec["metrics"].get(k) for k in ("written", "candidates", "infra_excluded",
                                                                 "duplicates", "contaminated_removed")}
    rec = records.get("compare-1a-1b")
    if rec and rec.get("metrics"):
        out["compare_1a_1b"] = rec["metrics"].get("overall")
    return out


# =============================================================================================
# the stages
# =============================================================================================

def _json_default(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return str(obj)


def _finding_dicts(findings) -> list[dict]:
    return [dataclasses.asdict(f) if dataclasses.is_dataclass(f) else dict(f) for f in findings]


def stage_preflight(plan: Plan):
    def run(ctx: StageContext) -> dict:
        from cogumi.train import preflight_base
        cfg = run_config_for(plan.phase1a, output_dir=ctx.dir / "unused")
        base_cfg, findings = preflight_base(cfg, log=ctx.log)
        ctx.findings += _finding_dicts(findings)
        report: dict[str, Any] = {"phase1a": {"base_model": cfg.base_model, "data": cfg.data.train,
                                              "config": cfg.to_dict()}}
        if plan.phase1b.enabled:
            cfg1b = run_config_for(plan.phase1b.train, output_dir=ctx.dir / "unused", check_files=False,
                                   extra={"base_model": "merged-1a", "data.train": "failures-1a.jsonl"})
            report["phase1b"] = {"config": cfg1b.to_dict()}
        report["validation_items"] = _preflight_items(plan.validation.tasks, plan.validation.seed, ctx)
        if plan.phase1b.enabled:
            report["mining_items"] = _preflight_items(plan.mining.tasks, plan.validation.seed, ctx)
        for key, ref in (("validation.reference", plan.validation.reference),
                         ("mining.reference", plan.mining.reference)):
            if ref and _is_endpoint_ref(ref):
                if not (os.environ.get("OPENAI_API_KEY") or plan.validation.endpoint or os.environ.get("OPENAI_BASE_URL")):
                    raise ConfigError(f"{plan.source}: {key} is {ref!r}, but OPENAI_API_KEY is not set in the "
                                      "environment (keys are read from the environment only)")
            elif ref and not Path(ref).exists():
                raise ConfigError(f"{plan.source}: {key} {ref!r} does not exist")
        if plan.validation.judge == "llm" and not (os.environ.get("OPENAI_API_KEY") or plan.validation.endpoint
                                                   or os.environ.get("OPENAI_BASE_URL")):
            raise ConfigError(f"{plan.source}: validation.judge is llm, but no endpoint/OPENAI_API_KEY is configured")
        try:
            from cogumi.estimate import estimate
            est = estimate(cfg, usd_per_hour=plan.cost.gpu_hourly_usd)
            report["estimate"] = est
            ctx.log(f"estimate: {json.dumps({k: est[k] for k in est if not isinstance(est[k], (dict, list))})[:400]}")
        except CogumiError as e:
            report["estimate"] = {"error": str(e)}
        atomic_write_text(ctx.dir / "preflight.json", json.dumps(report, indent=2, default=_json_default) + "\n")
        ctx.output("preflight", ctx.dir / "preflight.json")
        return {"base_model": cfg.base_model, "findings": len(findings),
                "validation_items": {t: len(v) for t, v in report["validation_items"].items()}}
    return run


def _preflight_items(tasks: dict[str, TaskPlan], seed: int, ctx: StageContext) -> dict[str, list[str]]:
    from cogumi.evaluation.tasks import load_task
    out = {}
    for name, tp in tasks.items():
        items = load_task(name, tp.data, n=tp.n, seed=seed, split=tp.split, variant=tp.variant)
        if not items:
            raise ConfigError(f"{name}: no items in split {tp.split} of {tp.data or 'the hub dataset'}")
        out[name] = [it.task_id for it in items]
        ctx.log(f"{name}: {len(items)} item(s) from {tp.data or 'the hub'} (split {tp.split})")
    return out


def stage_train(plan: Plan, phase: str):
    train = plan.phase1a if phase == "1a" else plan.phase1b.train

    def run(ctx: StageContext) -> dict:
        from cogumi.lineage import read_manifest
        from cogumi.train import run_training
        extra = {}
        if phase == "1b":
            failures = ctx.input("failures-1a", "phase1b_set")
            if not failures.read_text(encoding="utf-8").strip():
                raise StageSkipped("the Phase 1B set is empty: the model lost no (clean) item, so there is nothing "
                                   "for Phase 1B to learn")
            data = failures
            if plan.phase1b.replay > 0:
                data = _with_replay(failures, plan, ctx)
            extra = {"base_model": str(ctx.input("merge-1a", "merged")), "data.train": str(data), "phase": "1b"}
        cfg = run_config_for(train, output_dir=ctx.dir / "run", extra=extra)
        resume = (ctx.dir / "run").exists()
        adapter = run_training(cfg, resume=resume, log=ctx.log)
        ctx.output("adapter", adapter)
        for name, fname in (("holdout", "holdout.jsonl"), ("train_log", "train_log.jsonl")):
            if (ctx.dir / "run" / fname).exists():
                ctx.output(name, ctx.dir / "run" / fname)
        man = read_manifest(adapter) or {}
        ctx.findings += man.get("red_flags") or []
        return {k: man.get(k) for k in ("steps", "tokens_seen", "losses", "wall_time_s", "global_batch_size",
                                        "warnings", "resumed_from")} | {"base_model": cfg.base_model,
                                                                        "rows": (man.get("data") or {}).get("train_rows")}
    return run


def _with_replay(failures: Path, plan: Plan, ctx: StageContext) -> Path:
    """The failure set plus ``replay`` x as many Phase 1A rows (seeded sample, rows kept in their own shape)."""
    import random

    from cogumi.data import read_records
    from cogumi.io import atomic_write_jsonl, read_jsonl
    rows = read_jsonl(failures)
    cfg1a = run_config_for(plan.phase1a, output_dir=ctx.dir / "unused")
    records, _ = read_records(cfg1a.data.train, split=cfg1a.data.split)
    pool = [r for _, r in records if isinstance(r, dict)]
    k = min(len(pool), round(plan.phase1b.replay * len(rows)))
    replayed = random.Random(cfg1a.training.seed).sample(pool, k)
    mixed = rows + replayed
    random.Random(cfg1a.training.seed + 1).shuffle(mixed)
    out = atomic_write_jsonl(ctx.dir / "train-1b.jsonl", mixed)
    ctx.log(f"Phase 1B data: {len(rows)} failure rows + {k} replayed Phase 1A rows -> {out}")
    ctx.output("train_data", out)
    return out


def _stop_on_red(ctx: StageContext, findings, what: str) -> None:
    from cogumi.lineage import red_findings
    reds = red_findings(findings)
    if reds:
        raise RedFlagError(f"{what}:\n  " + "\n  ".join(f.line() for f in reds))


def stage_verify(kind: str, source_stage: str, output: str):
    def run(ctx: StageContext) -> dict:
        from cogumi.verify import verify_path
        path = ctx.input(source_stage, output)
        findings = verify_path(str(path))
        ctx.findings += _finding_dicts(findings)
        for f in findings:
            ctx.log(f.line())
        atomic_write_json(ctx.dir / "verify.json", {"path": str(path), "findings": _finding_dicts(findings)})
        ctx.output("verify", ctx.dir / "verify.json")
        _stop_on_red(ctx, findings, f"cogumi verify found red flags in the {kind} {path}")
        return {"levels": {lvl: sum(f.level == lvl for f in findings) for lvl in ("red", "warn", "ok")}}
    return run


def stage_merge(plan: Plan, phase: str):
    def run(ctx: StageContext) -> dict:
        from cogumi.merge import merge_adapter
        train = f"train-{phase}"
        adapter = ctx.input(train, "adapter")
        holdout = ctx.input(train, "holdout") if ctx.has_input(train, "holdout") else None
        manifest = merge_adapter(str(adapter), str(ctx.dir / "merged"), target=plan.merge.target,
                                 holdout=str(holdout) if holdout else None, overwrite=True,
                                 fidelity=plan.merge.fidelity, log=ctx.log)
        ctx.output("merged", ctx.dir / "merged")
        ctx.findings += manifest.get("red_flags") or []
        return {k: manifest.get(k) for k in ("target", "target_requested", "forced", "fidelity", "output", "wall_s")
                if k in manifest}
    return run


def _eval_settings(plan: Plan, *, mining: bool) -> dict:
    v = plan.validation
    reference = (plan.mining.reference or v.reference) if mining else v.reference
    return {"reference": reference, "judge": v.judge, "judge_model": v.judge_model, "endpoint": v.endpoint,
            "api_model": v.api_model, "seed": v.seed, "max_new_tokens": v.max_new_tokens,
            "batch_size": v.batch_size, "few_shot": v.few_shot, "workers": v.workers, "timeout": v.timeout}


def run_eval_stage(ctx: StageContext, model: Path | str, tasks: dict[str, TaskPlan], settings: dict,
                   out: Path, *, base: str | None = None) -> dict:
    """One eval per task (each with its own n / data / split) under ``out/TASK/``, combined into
    ``out/results.jsonl`` + ``out/summary.json`` in the docs/design.md layout; returns the summary.

    A restarted stage keeps ``out`` (keep_on_restart), so each task's answer cache is reused.
    """
    import inspect

    from cogumi.evaluation.runner import run_eval, summarize
    from cogumi.io import atomic_write_jsonl, read_jsonl
    accepts = inspect.signature(run_eval).parameters
    rows: list[dict] = []
    combined: dict | None = None
    endpoints: dict[str, dict] = {}
    for name, tp in tasks.items():
        kwargs = dict(settings)
        if "split" in accepts:
            kwargs["split"] = tp.split
        elif tp.split != "test" and (tp.data is None or name == "mbpp"):
            raise ConfigError(f"{name}: split {tp.split!r} needs run_eval(split=...), which this cogumi's evaluation "
                              "does not have yet; give a local file that holds only that split")
        if tp.variant is not None and "variant" in accepts:
            kwargs["variant"] = tp.variant
        summary = run_eval(str(model), tasks=[name], n=tp.n, data={name: tp.data} if tp.data else {},
                           out=str(out / name), base=base, overwrite=True, log=ctx.log, **kwargs)
        rows += read_jsonl(out / name / "results.jsonl")
        if combined is None:
            combined = {k: v for k, v in summary.items() if k != "tasks"}
            combined.update(tasks={}, n={}, split={})
        combined["tasks"][name] = summary["tasks"][name]
        for label, stats in (summary.get("endpoints") or {}).items():
            acc = endpoints.setdefault(label, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
            usage = stats.get("usage") or {}
            acc["requests"] += int(stats.get("requests") or 0)
            acc["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
            acc["completion_tokens"] += int(usage.get("completion_tokens") or 0)
        combined["n"][name] = tp.n
        combined["split"][name] = tp.split
    recount = summarize(rows, list(tasks))["tasks"]
    for name in tasks:       # per-task counts recomputed from the combined rows: they must agree
        for key in ("n", "wins", "ties", "losses", "correct"):
            if recount[name][key] != combined["tasks"][name][key]:
                raise CogumiError(f"eval of {name}: summary.json and results.jsonl disagree on {key}")
    combined["endpoints"] = endpoints
    atomic_write_jsonl(out / "results.jsonl", rows)
    atomic_write_json(out / "summary.json", combined)
    ctx.output("results", out / "results.jsonl")
    ctx.output("summary", out / "summary.json")
    return combined


def stage_validate(plan: Plan, phase: str):
    def run(ctx: StageContext) -> dict:
        if phase == "base":
            model = run_config_for(plan.phase1a, output_dir=ctx.dir / "unused").base_model
        else:
            model = ctx.input(f"merge-{phase}", "merged")
        summary = run_eval_stage(ctx, model, plan.validation.tasks, _eval_settings(plan, mining=False),
                                 ctx.dir / "eval")
        return _summary_metrics(summary, plan)
    return run


def _summary_metrics(summary: dict, plan: Plan) -> dict:
    """Per-task results, and what the endpoints (GPT-4 as reference, an LLM judge) were paid for."""
    api = summary.get("endpoints") or {}
    prompt = sum(e["prompt_tokens"] for e in api.values())
    completion = sum(e["completion_tokens"] for e in api.values())
    cost = prompt / 1e6 * plan.cost.api_prompt_usd_per_1m + completion / 1e6 * plan.cost.api_completion_usd_per_1m
    return {"tasks": summary.get("tasks") or {}, "model": summary.get("model"), "reference": summary.get("reference"),
            "api": api, "api_cost_usd": round(cost, 4)}


def stage_gate(plan: Plan, phase: str):
    criteria = plan.gate.criteria if phase == "1a" else (plan.phase1b.criteria or plan.gate.criteria)

    def run(ctx: StageContext) -> dict:
        from cogumi.evaluation.gates import check_gates, format_gate_table
        summary = json.loads(ctx.input(f"validate-{phase}", "summary").read_text(encoding="utf-8"))
        result = check_gates(summary, criteria)
        table = format_gate_table(result)
        for line in table.splitlines():
            ctx.log(line)
        verdict = result.as_dict()
        regression = None
        if phase == "1b" and plan.phase1b.stop_on_regression and ctx.has_input("compare-1a-1b", "compare"):
            comp = json.loads(ctx.input("compare-1a-1b", "compare").read_text(encoding="utf-8"))
            o = comp.get("overall") or {}
            if o.get("b_correct", 0) < o.get("a_correct", 0) and o.get("p_value", 1.0) < 0.05:
                regression = (f"Phase 1B answers fewer validation items correctly than Phase 1A "
                              f"({o['a_correct']} -> {o['b_correct']} of {o['paired']}, exact McNemar "
                              f"p={o['p_value']:.3g})")
        verdict["regression"] = regression
        atomic_write_json(ctx.dir / "gate.json", {**verdict, "table": table})
        ctx.output("gate", ctx.dir / "gate.json")
        metrics = {"passed": result.passed and not regression, "red_flags": [r.name for r in result.red_flags],
                   "criteria_passed": result.criteria_passed, "regression": regression}
        if result.red_flags:
            raise RedFlagError(f"gate {result.name}: red flag(s) {', '.join(r.name for r in result.red_flags)} -- "
                               + "; ".join(f"{r.name}: {r.reason}" for r in result.red_flags)
                               + ". STOP: the model is broken (the corrupted merge of the incident looked like this).")
        if regression:
            raise GateFailed(f"gate {result.name}: {regression}")
        if not result.criteria_passed and plan.gate.stop_on_fail:
            failed = [r for r in result.rows if r.kind == "criterion" and r.status != "pass"]
            raise GateFailed(f"gate {result.name}: " + "; ".join(f"{r.name} {r.reason}" for r in failed))
        return metrics
    return run


def stage_mine(plan: Plan):
    def run(ctx: StageContext) -> dict:
        summary = run_eval_stage(ctx, ctx.input("merge-1a", "merged"), plan.mining.tasks,
                                 _eval_settings(plan, mining=True), ctx.dir / "eval")
        return _summary_metrics(summary, plan)
    return run


def stage_failures(plan: Plan):
    def run(ctx: StageContext) -> dict:
        from cogumi.failures import format_stats, mine_failures
        exclude = [ctx.input(s, "results").parent for s in ("validate-base", "validate-1a") if ctx.has_input(s, "results")]
        out = ctx.dir / "phase1b.jsonl"
        stats = mine_failures([ctx.input("mine-1a", "results").parent], out, exclude=exclude,
                              include_both_wrong=plan.mining.include_both_wrong, ngram=plan.mining.ngram,
                              overlap=plan.mining.overlap)
        for line in format_stats(stats).splitlines():
            ctx.log(line)
        atomic_write_json(ctx.dir / "stats.json", stats)
        ctx.output("phase1b_set", out)
        ctx.output("stats", ctx.dir / "stats.json")
        return {"written": stats["written"], "candidates": stats["candidates"], "infra_excluded": stats["infra_excluded"],
                "duplicates": stats["duplicates"], "contaminated_removed": len(stats["contaminated"]),
                "by_task": stats["by_task"], "targets": stats["targets"]}
    return run


def stage_compare():
    def run(ctx: StageContext) -> dict:
        from cogumi.evaluation.commands import compare_runs, format_compare_table
        comp = compare_runs(ctx.input("validate-1a", "results"), ctx.input("validate-1b", "results"))
        for line in format_compare_table(comp).splitlines():
            ctx.log(line)
        if ctx.has_input("validate-base", "results"):
            comp["base_vs_1a"] = compare_runs(ctx.input("validate-base", "results"), ctx.input("validate-1a", "results"))
        atomic_write_json(ctx.dir / "compare.json", comp)
        ctx.output("compare", ctx.dir / "compare.json")
        return {"overall": comp["overall"], "tasks": comp["tasks"]}
    return run


def stage_incident():
    def run(ctx: StageContext) -> dict:
        from cogumi.incident import reproduce_incident
        result = reproduce_incident(ctx.dir / "work", log=ctx.log)
        atomic_write_json(ctx.dir / "incident.json", result)
        ctx.output("incident", ctx.dir / "incident.json")
        return result
    return run


def _local_or_id(value: str | None, base_dir: Path) -> dict | None:
    """A run config's path (relative to the CWD, else to the config's folder) hashed, or a hub id as is."""
    if not value:
        return None
    for cand in (Path(value), base_dir / value):
        if cand.exists():
            return file_identity(str(cand))
    return {"id": value}


def _train_identity(train: TrainPlan) -> dict:
    raw = load_yaml(train.config)
    base_dir = Path(train.config).parent
    data = train.data or (raw.get("data") or {}).get("train")
    return {"config_file": file_identity(train.config), "set": list(train.set),
            "base_model": _local_or_id(train.base_model or raw.get("base_model"), base_dir),
            "base_revision": raw.get("base_revision"), "data": _local_or_id(data, base_dir)}


def _tasks_identity(tasks: dict[str, TaskPlan], seed: int) -> dict:
    return {name: {**dataclasses.asdict(tp), "data": file_identity(tp.data), "seed": seed}
            for name, tp in tasks.items()}


def _criteria_identity(criteria) -> Any:
    return criteria if isinstance(criteria, dict) else file_identity(criteria)


def build_stages(plan: Plan) -> list[Stage]:
    """The plan as stages (see the module docstring). Each stage's config is what its input hash covers."""
    v = plan.validation
    p1b = plan.phase1b.enabled
    settings = _eval_settings(plan, mining=False)
    settings_id = {**settings, "reference": file_identity(settings["reference"])
                   if not _is_endpoint_ref(settings["reference"]) else settings["reference"]}
    mine_settings = _eval_settings(plan, mining=True)
    mine_id = {**mine_settings, "reference": file_identity(mine_settings["reference"])
               if not _is_endpoint_ref(mine_settings["reference"]) else mine_settings["reference"]}
    val_tasks = _tasks_identity(v.tasks, v.seed)
    t1a = _train_identity(plan.phase1a)
    no1b = "phase1b.enabled is false"
    S = Stage
    return [
        S(1, "preflight", "preflight: configs, data, base, gate items, reference", stage_preflight(plan),
          config={"phase1a": t1a, "validation": val_tasks, "settings": settings_id,
                  "mining": _tasks_identity(plan.mining.tasks, v.seed) if p1b else None,
                  "phase1b": _train_identity(plan.phase1b.train) if p1b else None,
                  "criteria": _criteria_identity(plan.gate.criteria)}),
        S(2, "validate-base", "validate the base model on the validation (test) items", stage_validate(plan, "base"),
          config={"phase1a": t1a, "tasks": val_tasks, "settings": settings_id}, needs=("preflight",),
          keep_on_restart=("eval",), gpu=True, enabled=plan.baseline, disabled_reason="baseline is false"),
        S(3, "train-1a", "train Phase 1A (LoRA on the full-precision base)", stage_train(plan, "1a"),
          config=t1a, needs=("preflight",), keep_on_restart=("run",), gpu=True),
        S(4, "verify-adapter-1a", "verify the Phase 1A adapter", stage_verify("adapter", "train-1a", "adapter"),
          needs=("train-1a",)),
        S(5, "merge-1a", "merge Phase 1A into the full-precision base", stage_merge(plan, "1a"),
          config=dataclasses.asdict(plan.merge), needs=("train-1a",), gpu=True),
        S(6, "verify-merged-1a", "verify the merged Phase 1A model", stage_verify("merged model", "merge-1a", "merged"),
          needs=("merge-1a",)),
        S(7, "validate-1a", "validate Phase 1A on the validation (test) items", stage_validate(plan, "1a"),
          config={"tasks": val_tasks, "settings": settings_id}, needs=("merge-1a",),
          keep_on_restart=("eval",), gpu=True),
        S(8, "gate-1a", "gate Phase 1A", stage_gate(plan, "1a"),
          config={"criteria": _criteria_identity(plan.gate.criteria), "stop_on_fail": plan.gate.stop_on_fail},
          needs=("validate-1a",)),
        S(9, "mine-1a", "evaluate Phase 1A on train-split items (where does it lose?)", stage_mine(plan),
          config={"tasks": _tasks_identity(plan.mining.tasks, v.seed) if p1b else None, "settings": mine_id},
          needs=("merge-1a",), keep_on_restart=("eval",), gpu=True, enabled=p1b, disabled_reason=no1b),
        S(10, "failures-1a", "extract the Phase 1B set (losses, decontaminated)", stage_failures(plan),
          config={k: getattr(plan.mining, k) for k in ("include_both_wrong", "ngram", "overlap")},
          needs=("mine-1a", "validate-base", "validate-1a"), optional=("validate-base",), enabled=p1b,
          disabled_reason=no1b),
        S(11, "train-1b", "train Phase 1B on the merged Phase 1A model", stage_train(plan, "1b"),
          config={"train": _train_identity(plan.phase1b.train), "replay": plan.phase1b.replay,
                  "phase1a": t1a if plan.phase1b.replay else None} if p1b else None,
          needs=("failures-1a", "merge-1a"),
          keep_on_restart=("run",), gpu=True, enabled=p1b, disabled_reason=no1b),
        S(12, "verify-adapter-1b", "verify the Phase 1B adapter", stage_verify("adapter", "train-1b", "adapter"),
          needs=("train-1b",), enabled=p1b, disabled_reason=no1b),
        S(13, "merge-1b", "merge Phase 1B into the merged Phase 1A model", stage_merge(plan, "1b"),
          config=dataclasses.asdict(plan.merge), needs=("train-1b",), gpu=True, enabled=p1b, disabled_reason=no1b),
        S(14, "verify-merged-1b", "verify the merged Phase 1B model",
          stage_verify("merged model", "merge-1b", "merged"), needs=("merge-1b",), enabled=p1b, disabled_reason=no1b),
        S(15, "validate-1b", "validate Phase 1B on the same validation items", stage_validate(plan, "1b"),
          config={"tasks": val_tasks, "settings": settings_id}, needs=("merge-1b",),
          keep_on_restart=("eval",), gpu=True, enabled=p1b, disabled_reason=no1b),
        S(16, "compare-1a-1b", "compare Phase 1A and 1B on the same items", stage_compare(),
          needs=("validate-1a", "validate-1b", "validate-base"), optional=("validate-base",), enabled=p1b,
          disabled_reason=no1b),
        S(17, "gate-1b", "gate Phase 1B", stage_gate(plan, "1b"),
          config={"criteria": _criteria_identity(plan.phase1b.criteria or plan.gate.criteria),
                  "stop_on_fail": plan.gate.stop_on_fail, "stop_on_regression": plan.phase1b.stop_on_regression},
          needs=("validate-1b", "compare-1a-1b"), enabled=p1b, disabled_reason=no1b),
        S(18, "incident", "the 4-bit incident, reproduced on the tiny model", stage_incident(),
          config={"version": 1}, keep_on_restart=("work",), enabled=plan.incident, disabled_reason="incident is false (the demo turns it on)"),
    ]


# =============================================================================================
# entry points
# =============================================================================================

def default_run_dir(plan: Plan) -> Path:
    if plan.run_dir:
        return Path(plan.run_dir)
    return Path("runs") / (plan.name or Path(plan.source).stem)


def run_pipeline(plan: Plan | str | Path, *, resume: bool = False, overrides: list[str] | None = None,
                 run_dir: str | Path | None = None, log: Callable[[str], Any] = print,
                 capture_output: bool = False) -> dict:
    """Run (or resume) a plan; returns the final summary. Raises RedFlagError / GateFailed / CogumiError when
    the run stops (summary.json then says where and why)."""
    if not isinstance(plan, Plan):
        plan = load_plan(plan, overrides)
    elif overrides:
        raise ConfigError("overrides apply to a plan file; pass the path, not a Plan")
    rd = Path(run_dir) if run_dir else default_run_dir(plan)
    rd.mkdir(parents=True, exist_ok=True)
    meta = {"plan": plan.source, "name": plan.name or Path(plan.source).stem, "description": plan.description,
            "gpu_hourly_usd": plan.cost.gpu_hourly_usd}
    engine = Engine(build_stages(plan), rd, meta=meta, log=log, gpu_hourly_usd=plan.cost.gpu_hourly_usd,
                    capture_output=capture_output,
                    files={"plan.resolved.yaml": yaml.safe_dump(plan.to_dict(), sort_keys=False)})
    return engine.run(resume=resume)


def format_stage_table(summary: dict) -> str:
    lines = [f"{'stage':<22} {'status':<12} {'seconds':>9} {'cost $':>8}"]
    for s in summary["stages"]:
        status = s["status"] + (" (reused)" if s.get("reused") else "")
        lines.append(f"{s['name']:<22} {status:<12} {s['seconds']:>9.1f} {s['cost_usd']:>8.3f}")
    lines.append(f"{'total':<22} {summary['status']:<12} {summary['total_seconds']:>9.1f} "
                 f"{summary['total_cost_usd']:>8.3f}")
    return "\n".join(lines)


def pipeline_command(plan, *, resume=False, overrides=None, run_dir=None) -> int:
    p = load_plan(plan, overrides)
    rd = Path(run_dir) if run_dir else default_run_dir(p)
    try:
        summary = run_pipeline(p, resume=resume, run_dir=rd)
    except CogumiError:
        _try_report(rd)
        raise
    print(format_stage_table(summary))
    _try_report(rd)
    return 0


def _try_report(run_dir: Path) -> None:
    """The report is a reader of the run dir: write it after the run (or where it stopped), never fail on it."""
    if not (run_dir / SUMMARY_NAME).exists():
        return
    try:
        from cogumi.report import write_report
        path = write_report(run_dir)
        print(f"report: {path}")
    except Exception as e:  # a report problem must not hide the run's own result
        print(f"warning: could not write the report ({type(e).__name__}: {e}); try `cogumi report {run_dir}`",
              file=sys.stderr)
