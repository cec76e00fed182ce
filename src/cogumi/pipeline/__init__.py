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

Modules (each does one thing)
  * ``plan``       the plan file: dataclasses, validation, the run config a training stage uses
  * ``engine``     the stage engine: records, input hashes, resume, stop (knows nothing of what stages do)
  * ``preflight``  stage 01: every check that can fail before paid work
  * ``stages``     stages 02-18 and ``build_stages`` (order, inputs, what each hash covers)
  * ``run``        ``run_pipeline`` and the ``cogumi pipeline`` verb
"""

from cogumi.pipeline.engine import (
    FAULT_ENV, RECORD_NAME, STARTED_NAME, SUMMARY_NAME, Engine, Stage, StageContext, StageSkipped, _RunLock,
    content_hash, file_identity,
)
from cogumi.pipeline.plan import Plan, TaskPlan, load_plan, parse_plan, run_config_for
from cogumi.pipeline.run import default_run_dir, format_stage_table, pipeline_command, run_pipeline
from cogumi.pipeline.stages import _summary_metrics, build_stages, headline_results

__all__ = [
    "FAULT_ENV",
    "RECORD_NAME",
    "STARTED_NAME",
    "SUMMARY_NAME",
    "Engine",
    "Stage",
    "StageContext",
    "StageSkipped",
    "_RunLock",
    "content_hash",
    "file_identity",
    "Plan",
    "TaskPlan",
    "load_plan",
    "parse_plan",
    "run_config_for",
    "default_run_dir",
    "format_stage_table",
    "pipeline_command",
    "run_pipeline",
    "_summary_metrics",
    "build_stages",
    "headline_results",
]
