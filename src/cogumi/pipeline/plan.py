"""Plan files: the YAML a ``cogumi pipeline`` run follows, validated into a ``Plan``.

Features
  * One dataclass per section (phase1a, merge, validation, gate, mining, phase1b, cost), read with the
    run config's ``from_dict``: an unknown key or a wrong type is one ``ConfigError`` naming the dotted key.
  * Relative paths resolve against the current directory, then the plan's folder; files the plan names
    must exist; criteria are parsed here so a bad rule fails before anything runs.
  * ``run_config_for``: the run config a training stage uses (the YAML, the plan's overrides, the
    pipeline's own keys).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cogumi.config import RunConfig, apply_overrides, from_dict, load_yaml, resolve_local, validate_run_config
from cogumi.errors import ConfigError

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
    prompt: str | None = None             # prompt set: a built-in name (default, chat, training) or a YAML file


@dataclass
class GatePlan:
    criteria: str | dict = ""             # criteria YAML path, or the rules inline
    stop_on_fail: bool = True             # a failed criterion stops the run (a red flag always does)


@dataclass
class MiningPlan:
    tasks: dict = field(default_factory=dict)      # task -> TaskPlan fields (train splits)
    reference: str | None = None          # default: validation.reference
    prompt: str | None = None             # default: validation.prompt (mine with the prompt you validate with)
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


def _resolve_prompt(value: str | None, key: str, source: str, base_dir: Path) -> str | None:
    """A prompt set's name as is; a file path resolved like every other path of the plan. Whether it
    exists and parses is checked at preflight (``prompts.resolve``)."""
    if not value or not any(c in value for c in "/\\."):
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
    plan.validation.prompt = _resolve_prompt(plan.validation.prompt, "validation.prompt", source, base_dir)
    plan.mining.prompt = _resolve_prompt(plan.mining.prompt, "mining.prompt", source, base_dir)
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
