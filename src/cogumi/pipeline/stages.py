"""The plan's stages: what each of the 18 stages does, and ``build_stages`` (their order, inputs, hashes).

Each ``stage_*`` returns the function the engine runs with a ``StageContext``; it reads upstream outputs
through ``ctx.input``, registers its own with ``ctx.output``, and returns its metrics. A red flag is a
``RedFlagError``, a failed gate a ``GateFailed``; the engine records either and stops the run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from cogumi.config import load_yaml
from cogumi.errors import CogumiError, ConfigError, GateFailed, RedFlagError
from cogumi.io import atomic_write_json
from cogumi.pipeline.engine import Stage, StageContext, StageSkipped, file_identity
from cogumi.pipeline.plan import Plan, TaskPlan, TrainPlan, _is_endpoint_ref, run_config_for
from cogumi.pipeline.preflight import _finding_dicts, stage_preflight


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
    prompt = (plan.mining.prompt or v.prompt) if mining else v.prompt
    return {"reference": reference, "prompt": prompt, "judge": v.judge, "judge_model": v.judge_model, "endpoint": v.endpoint,
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
        from cogumi.evaluation.gates import (
            base_on_same_items, check_gates, fail_message, fidelity_of, format_gate_table, stop_message,
        )
        validated = ctx.input(f"validate-{phase}", "results")
        summary = json.loads(ctx.input(f"validate-{phase}", "summary").read_text(encoding="utf-8"))
        base = base_label = None
        if ctx.has_input("validate-base", "results"):     # the base on exactly these items: what fine-tuning changed
            base, label = base_on_same_items(ctx.input("validate-base", "results").parent, validated.parent)
            base_label = "validate-base" + (label[label.index(" ("):] if " (" in label else "")
        fidelity = fidelity_of(str(ctx.input(f"merge-{phase}", "merged"))) if ctx.has_input(f"merge-{phase}", "merged") \
            else None
        result = check_gates(summary, criteria, base=base, base_label=base_label or "base model", fidelity=fidelity)
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
        if result.red_flags:
            raise RedFlagError(stop_message(result).rstrip(".") + ". STOP: do not ship this model.")
        if regression:
            raise GateFailed(f"gate {result.name}: {regression}")
        if not result.criteria_passed and plan.gate.stop_on_fail:
            raise GateFailed(fail_message(result))
        return {"passed": result.passed and not regression, "red_flags": [r.name for r in result.red_flags],
                "criteria_passed": result.criteria_passed, "regression": regression}
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


def _settings_identity(settings: dict) -> dict:
    """Eval settings as hashed: the reference and a prompt file by content, names as they are."""
    ref, prompt = settings["reference"], settings.get("prompt")
    return {**settings, "reference": ref if _is_endpoint_ref(ref) else file_identity(ref),
            "prompt": file_identity(prompt) if prompt and Path(prompt).is_file() else prompt}


def build_stages(plan: Plan) -> list[Stage]:
    """The plan as stages (see the module docstring). Each stage's config is what its input hash covers."""
    v = plan.validation
    p1b = plan.phase1b.enabled
    settings = _eval_settings(plan, mining=False)
    settings_id = _settings_identity(settings)
    mine_settings = _eval_settings(plan, mining=True)
    mine_id = _settings_identity(mine_settings)
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
          needs=("validate-1a", "validate-base", "merge-1a"), optional=("validate-base",)),
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
          needs=("validate-1b", "compare-1a-1b", "validate-base", "merge-1b"), optional=("validate-base",),
          enabled=p1b, disabled_reason=no1b),
        S(18, "incident", "the 4-bit incident, reproduced on the tiny model", stage_incident(),
          config={"version": 1}, keep_on_restart=("work",), enabled=plan.incident, disabled_reason="incident is false (the demo turns it on)"),
    ]
