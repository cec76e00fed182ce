"""Entry points: ``run_pipeline`` (a plan file or ``Plan`` -> the engine over its stages) and the verb."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from cogumi.errors import CogumiError, ConfigError
from cogumi.pipeline.engine import SUMMARY_NAME, Engine
from cogumi.pipeline.plan import Plan, load_plan
from cogumi.pipeline.stages import build_stages, headline_results

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
                    capture_output=capture_output, headline=headline_results,
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
