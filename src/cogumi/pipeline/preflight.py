"""The preflight stage: everything a run needs is checked before any paid (GPU or API) work.

Checks: the run configs (Phase 1A, and Phase 1B with the pipeline's own keys), the base (a quantized one
is refused before any weight loads), the validation and mining items (they load, and are not empty), the
references and judge endpoint (reachable: a file/dir that exists, a key in the environment), and the
estimate of the training run. Writes ``preflight.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from cogumi.errors import CogumiError, ConfigError
from cogumi.io import atomic_write_text
from cogumi.pipeline.engine import StageContext
from cogumi.pipeline.plan import Plan, TaskPlan, _is_endpoint_ref, run_config_for

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
