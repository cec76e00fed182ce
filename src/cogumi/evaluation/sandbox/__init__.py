"""Run model-written code so that the verdict is out of its reach (package layout: see each module).

  * ``slots.py``   the parent side: slots of (jailed zygote, harness zygote), one item at a time each;
  * ``jail.py``    how the jail is started (bubblewrap; util-linux unshare as the fallback) and its layers;
  * ``worker.py``  inside the jail: the zygote and the candidate's process (arming, serving calls);
  * ``harness.py`` the trusted process that runs the benchmark's tests against proxies;
  * ``wire.py``    plain data with exact types, framed; ``zygote.py`` the fork-per-item loop;
    ``tree.py`` removing what hostile code wrote.
"""

from __future__ import annotations

import os

from cogumi.evaluation.sandbox.jail import Layers
from cogumi.evaluation.sandbox.slots import CodeJob, Limits, Policy, RunResult, SlotPool

__all__ = ["CodeJob", "Limits", "Policy", "RunResult", "Layers", "run_job", "run_many", "isolation"]


def run_many(jobs: list[CodeJob], *, timeout: float = 10.0, workers: int | None = None,
             limits: Limits | None = None, policy: Policy | None = None, progress=None) -> list[RunResult]:
    """Run every job (in parallel, ``workers`` slots); results in input order, one per job, always."""
    if not jobs:
        return []
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    with SlotPool(workers, limits or Limits(), policy or Policy()) as pool:
        return pool.run_many(list(jobs), timeout, progress=progress)


def run_job(job: CodeJob, **kwargs) -> RunResult:
    return run_many([job], workers=1, **kwargs)[0]


def run_python(program: str, tests: str = "", *, setup: str = "", entry_points=(), **kwargs) -> RunResult:
    """``program`` in the jail, ``tests`` (after ``setup``) in the harness; see ``CodeJob``."""
    return run_job(CodeJob(program, tests, setup, tuple(entry_points)), **kwargs)


_ISOLATION: Layers | None = None


def isolation(policy: Policy | None = None) -> Layers:
    """The layers a run gets on this machine (probed once, by running a trivial item), with what is
    missing and what that means."""
    global _ISOLATION
    if policy is not None:
        return _probe(policy)
    if _ISOLATION is None:
        _ISOLATION = _probe(Policy())
    return _ISOLATION


def _probe(policy: Policy) -> Layers:
    result = run_python("x = 1", "assert x == 1", timeout=30, policy=policy)
    if result.jail is None:
        return Layers(missing={"jail": f"the sandbox did not start: {result.detail}"})
    return result.jail
