"""The preflight stage: everything a run needs is checked before any paid (GPU or API) work.

Checks, cheapest first, each a ``ConfigError`` naming the plan key and what to do:
  * the plan as a whole: every task a gate criterion or red flag names is evaluated by the plan (a
    GSM8K-only plan with criteria on HumanEval/MBPP could train, merge and validate, then never pass);
    the prompt sets (``validation.prompt`` / ``mining.prompt``) exist and parse (``prompts.resolve``);
  * the run configs (Phase 1A, and Phase 1B with the pipeline's own keys);
  * the validation and mining items load, are not empty, and do not overlap (the same id of a task with
    global ids or of the same data file, or the same question text): Phase 1B must not train on gate items;
  * the references and the judge: a local file/dir exists; an ``openai:MODEL`` endpoint has a key and
    answers (one free ``GET /models``; a server that answers at all, even 404, is reachable);
  * the base (a quantized one -- by config, name or weights -- is refused before any weight loads; a
    quantized upload's name is refused first of all, offline);
  * the estimate of the training run.
Writes ``preflight.json``.
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
        from cogumi.lineage import quantization_findings, red_findings
        cfg = run_config_for(plan.phase1a, output_dir=ctx.dir / "unused")
        if red_findings(quantization_findings({}, cfg.base_model)) and not cfg.allow_quantized_base:
            preflight_base(cfg, log=ctx.log)      # a quantized upload by its name: refused offline, first
        report: dict[str, Any] = {"criteria_tasks": check_criteria_tasks(plan),
                                  "prompts": check_prompts(plan, ctx.log)}
        report["phase1a"] = {"base_model": cfg.base_model, "data": cfg.data.train, "config": cfg.to_dict()}
        if plan.phase1b.enabled:
            cfg1b = run_config_for(plan.phase1b.train, output_dir=ctx.dir / "unused", check_files=False,
                                   extra={"base_model": "merged-1a", "data.train": "failures-1a.jsonl"})
            report["phase1b"] = {"config": cfg1b.to_dict()}
        validation = _preflight_items(plan.validation.tasks, plan.validation.seed, ctx)
        report["validation_items"] = {t: [it.task_id for it in items] for t, items in validation.items()}
        if plan.phase1b.enabled:
            mining = _preflight_items(plan.mining.tasks, plan.validation.seed, ctx)
            report["mining_items"] = {t: [it.task_id for it in items] for t, items in mining.items()}
            check_no_overlap(plan, validation, mining)
        report["references"] = check_references(plan, ctx.log)
        base_cfg, findings = preflight_base(cfg, log=ctx.log)
        ctx.findings += _finding_dicts(findings)
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


def check_criteria_tasks(plan: Plan) -> dict[str, list[str]]:
    """Every task a gate rule names must be evaluated by the plan's validation, or the gate can never pass."""
    from cogumi.evaluation.gates import as_criteria
    out = {}
    for key, criteria in (("gate.criteria", plan.gate.criteria),
                          ("phase1b.criteria", plan.phase1b.criteria if plan.phase1b.enabled else None)):
        if not criteria:
            continue
        c = as_criteria(criteria)
        missing = sorted(c.tasks() - set(plan.validation.tasks))
        if missing:
            rules = [r.name for r in c.rules + c.red_flags if set(r.tasks) & set(missing)]
            raise ConfigError(
                f"{plan.source}: {key} ({c.source if isinstance(criteria, str) else 'inline'}) names task(s) "
                f"{', '.join(missing)} (rules {', '.join(rules)}), but validation.tasks evaluates only "
                f"{', '.join(plan.validation.tasks)}: the gate could never pass. Add "
                + " and ".join(f"validation.tasks.{t}" for t in missing)
                + ", or use criteria that name only the tasks you evaluate.")
        out[key] = sorted(c.tasks())
    return out


def check_prompts(plan: Plan, log) -> dict[str, dict | None]:
    """The prompt sets the evals will use exist and parse (``prompts.resolve`` raises ConfigError)."""
    from cogumi.evaluation import prompts
    out = {}
    mining = (plan.mining.prompt or plan.validation.prompt) if plan.phase1b.enabled else None
    for key, spec in (("validation.prompt", plan.validation.prompt), ("mining.prompt", mining)):
        if key == "mining.prompt" and not plan.phase1b.enabled:
            continue
        try:
            ps = prompts.resolve(spec)
        except ConfigError as e:
            raise ConfigError(f"{plan.source}: key '{key}': {e}") from None
        out[key] = {"name": ps.name, "source": ps.source, "sha256": ps.sha256}
        log(f"{key}: prompt set {ps.name} ({ps.source})")
    return out


def _norm(text: str) -> str:
    return " ".join(str(text).split()).lower()


def check_no_overlap(plan: Plan, validation: dict, mining: dict) -> None:
    """Mining items must not be validation items: same id (tasks with global ids, or the same data file)
    or the same question text."""
    from cogumi.failures import GLOBAL_ID_TASKS
    for task, mined in mining.items():
        gate = validation.get(task)
        if not gate:
            continue
        same_file = plan.mining.tasks[task].data == plan.validation.tasks[task].data
        ids = {it.task_id for it in gate} if (task in GLOBAL_ID_TASKS or same_file) else set()
        texts = {_norm(it.prompt): it.task_id for it in gate}
        clash = [(it.task_id, "id") for it in mined if it.task_id in ids]
        clash += [(it.task_id, f"text of validation item {texts[_norm(it.prompt)]}") for it in mined
                  if it.task_id not in ids and _norm(it.prompt) in texts]
        if clash:
            shown = ", ".join(f"{tid} ({how})" for tid, how in clash[:5])
            raise ConfigError(
                f"{plan.source}: mining.tasks.{task} and validation.tasks.{task} share {len(clash)} item(s) "
                f"(e.g. {shown}): Phase 1B would train on the items it is gated on. Mine a TRAIN split or "
                "another file (mining.tasks.T.split / .data).")


def check_references(plan: Plan, log) -> dict[str, str]:
    """Each reference (and an LLM judge) is reachable before anything is paid for."""
    out = {}
    endpoint_needed = plan.validation.judge == "llm"
    for key, ref in (("validation.reference", plan.validation.reference),
                     ("mining.reference", plan.mining.reference if plan.phase1b.enabled else None)):
        if not ref:
            continue
        if _is_endpoint_ref(ref):
            endpoint_needed = True
            out[key] = ref
        elif not Path(ref).exists():
            raise ConfigError(f"{plan.source}: {key} {ref!r} does not exist")
        else:
            out[key] = str(ref)
    if endpoint_needed:
        what = "validation.judge is llm" if plan.validation.judge == "llm" and "validation.reference" not in out \
            else f"validation.reference is {plan.validation.reference!r}"
        out["endpoint"] = check_endpoint(plan, what, log)
    return out


def check_endpoint(plan: Plan, what: str, log, timeout: float = 15.0) -> str:
    """A key in the environment, and a server that answers (``GET /models``, free, no tokens)."""
    import openai
    key = os.environ.get("OPENAI_API_KEY")
    base_url = plan.validation.endpoint or os.environ.get("OPENAI_BASE_URL")
    if not key and not base_url:
        raise ConfigError(f"{plan.source}: {what}, but OPENAI_API_KEY is not set in the environment (keys are "
                          "read from the environment only)")
    client = openai.OpenAI(api_key=key or "unused", base_url=base_url, timeout=timeout, max_retries=1)
    where = base_url or "api.openai.com"
    try:
        client.models.list()
    except openai.AuthenticationError as e:
        raise ConfigError(f"{plan.source}: {what}: the endpoint {where} rejected the key ({e.status_code}); "
                          "check OPENAI_API_KEY") from None
    except openai.APIConnectionError as e:
        raise ConfigError(f"{plan.source}: {what}: the endpoint {where} is not reachable ({type(e).__name__}: "
                          f"{e}); check validation.endpoint / OPENAI_BASE_URL and the network") from None
    except openai.APIStatusError as e:       # it answered: reachable (some servers have no /models)
        log(f"reference endpoint {where}: reachable (GET /models answered {e.status_code})")
        return f"{where} (reachable, /models {e.status_code})"
    log(f"reference endpoint {where}: reachable")
    return f"{where} (reachable)"


def _preflight_items(tasks: dict[str, TaskPlan], seed: int, ctx: StageContext) -> dict[str, list]:
    from cogumi.evaluation.tasks import load_task
    out = {}
    for name, tp in tasks.items():
        items = load_task(name, tp.data, n=tp.n, seed=seed, split=tp.split, variant=tp.variant)
        if not items:
            raise ConfigError(f"{name}: no items in split {tp.split} of {tp.data or 'the hub dataset'}")
        out[name] = items
        ctx.log(f"{name}: {len(items)} item(s) from {tp.data or 'the hub'} (split {tp.split})")
    return out
