"""The pipeline engine (stage records, input hashes, resume, stop on red flags) with small fake stages,
and plan validation. The end-to-end runs on the tiny model live in test_demo.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cogumi.errors import ConfigError, CogumiError, GateFailed, RedFlagError
from cogumi.pipeline import Engine, Stage, StageSkipped, _RunLock, load_plan

REPO = Path(__file__).resolve().parents[1]


def make_stages(calls: dict, config: dict | None = None, fail: dict | None = None) -> list[Stage]:
    """source -> double -> report: each writes a file derived from its input."""
    config = config or {}
    fail = fail or {}

    def source(ctx):
        calls["source"] = calls.get("source", 0) + 1
        out = ctx.dir / "numbers.txt"
        out.write_text(" ".join(str(i) for i in range(config.get("n", 5))))
        ctx.output("numbers", out)
        return {"n": config.get("n", 5)}

    def double(ctx):
        calls["double"] = calls.get("double", 0) + 1
        if "double" in fail:
            raise fail["double"]
        nums = [int(x) for x in ctx.input("source", "numbers").read_text().split()]
        out = ctx.dir / "doubled.txt"
        out.write_text(" ".join(str(2 * i) for i in nums))
        ctx.output("doubled", out)
        return {"sum": sum(2 * i for i in nums)}

    def report(ctx):
        calls["report"] = calls.get("report", 0) + 1
        text = ctx.input("double", "doubled").read_text()
        out = ctx.dir / "report.txt"
        out.write_text(f"{config.get('title', 'report')}: {text}")
        ctx.output("report", out)

    return [Stage(1, "source", "make numbers", source, config={"n": config.get("n", 5)}),
            Stage(2, "double", "double them", double, needs=("source",)),
            Stage(3, "report", "write a report", report, config={"title": config.get("title", "report")},
                  needs=("double",))]


def run(tmp_path, calls, *, resume=False, **kw):
    eng = Engine(make_stages(calls, **kw), tmp_path / "run", log=lambda *_: None, gpu_hourly_usd=3.6)
    return eng.run(resume=resume)


def test_records_summary_and_outputs(tmp_path):
    calls = {}
    summary = run(tmp_path, calls)
    assert summary["status"] == "done" and calls == {"source": 1, "double": 1, "report": 1}
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [("source", "done"), ("double", "done"),
                                                                      ("report", "done")]
    assert all(isinstance(s["seconds"], float) for s in summary["stages"])
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["stages"] == summary["stages"]
    rec = json.loads((tmp_path / "run" / "stages" / "02-double" / "stage.json").read_text())
    assert rec["status"] == "done" and rec["metrics"] == {"sum": 20}
    assert rec["outputs"]["doubled"]["path"] == "stages/02-double/doubled.txt"
    assert rec["outputs"]["doubled"]["hash"].startswith("sha256:")
    assert rec["inputs"]["upstream"]["source"]["outputs"]["numbers"].startswith("sha256:")
    assert not (tmp_path / "run" / "stages" / "02-double" / "started.json").exists()
    assert "make numbers" in (tmp_path / "run" / "stages" / "01-source" / "log.txt").read_text()


def test_resume_reuses_unchanged_and_reruns_what_changed(tmp_path):
    calls = {}
    run(tmp_path, calls)
    summary = run(tmp_path, calls, resume=True)
    assert calls == {"source": 1, "double": 1, "report": 1}
    assert all(s["reused"] for s in summary["stages"])
    # a changed title reruns only the report
    run(tmp_path, calls, resume=True, config={"title": "new"})
    assert calls == {"source": 1, "double": 1, "report": 2}
    # a changed source reruns everything downstream of it (their inputs' hashes changed)
    run(tmp_path, calls, resume=True, config={"title": "new", "n": 3})
    assert calls == {"source": 2, "double": 2, "report": 3}
    assert (tmp_path / "run/stages/03-report/report.txt").read_text() == "new: 0 2 4"
    # an artifact changed on disk since its stage completed -> that stage runs again
    (tmp_path / "run/stages/02-double/doubled.txt").write_text("tampered")
    run(tmp_path, calls, resume=True, config={"title": "new", "n": 3})
    assert calls["double"] == 3 and calls["source"] == 2
    assert (tmp_path / "run/stages/03-report/report.txt").read_text() == "new: 0 2 4"


def test_existing_run_needs_resume(tmp_path):
    run(tmp_path, {})
    with pytest.raises(CogumiError, match="already holds a run.*--resume"):
        run(tmp_path, {})


@pytest.mark.parametrize("exc,status", [(RedFlagError("NaN weights in adapter"), "red_flag"),
                                        (GateFailed("gsm8k_ties 20% is below 60%"), "gate_failed")])
def test_red_flag_or_failed_gate_stops_with_reason_and_fix(tmp_path, exc, status):
    calls = {}
    with pytest.raises(type(exc)) as info:
        run(tmp_path, calls, fail={"double": exc})
    msg = str(info.value)
    assert "stopped at stage 02-double" in msg and str(exc) in msg and "What to do:" in msg and "--resume" in msg
    assert info.value.exit_code == 1
    assert "report" not in calls
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["stopped_at"] == "double"
    assert [s["status"] for s in summary["stages"]] == ["done", status, "pending"]
    assert str(exc) in summary["reason"] and summary["fix"]
    # fixed: --resume reuses the first stage and runs the rest
    summary = run(tmp_path, calls, resume=True)
    assert calls == {"source": 1, "double": 2, "report": 1} and summary["status"] == "done"


def test_skipped_stage_skips_what_needs_it(tmp_path):
    def nothing(ctx):
        raise StageSkipped("nothing to learn")

    def after(ctx):
        raise AssertionError("must not run")

    def uses_optional(ctx):
        return {"has": ctx.has_input("a", "x")}

    stages = [Stage(1, "a", "a", nothing), Stage(2, "b", "b", after, needs=("a",)),
              Stage(3, "c", "c", uses_optional, needs=("a",), optional=("a",)),
              Stage(4, "d", "d", after, enabled=False, disabled_reason="off")]
    summary = Engine(stages, tmp_path / "r", log=lambda *_: None).run(resume=False)
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [("a", "skipped"), ("b", "skipped"),
                                                                      ("c", "done"), ("d", "disabled")]
    rec = json.loads((tmp_path / "r/stages/02-b/stage.json").read_text())
    assert "a did not run" in rec["reason"]


def test_lock_refuses_a_second_run(tmp_path):
    (tmp_path / "run").mkdir()
    with _RunLock(tmp_path / "run"):
        with pytest.raises(CogumiError, match="another cogumi pipeline is running"):
            run(tmp_path, {})


SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from cogumi.pipeline import Engine, Stage

    run_dir = Path(sys.argv[1])

    def slow(ctx):
        # a stage that resumes from its own progress file (like training from a checkpoint)
        prog = ctx.dir / "progress"
        prog.mkdir(exist_ok=True)
        done = sorted(int(p.name) for p in prog.iterdir())
        junk_seen = (ctx.dir / "junk.tmp").exists()     # a killed attempt's leftovers must be gone
        (ctx.dir / "junk.tmp").write_text("half-written")
        for i in range(len(done), 4):
            (prog / str(i)).write_text(str(i * i))
        out = ctx.dir / "result.json"
        out.write_text(json.dumps({"squares": [int((prog / str(i)).read_text()) for i in range(4)],
                                   "resumed_with": done, "junk_seen": junk_seen}))
        ctx.output("result", out)

    def last(ctx):
        out = ctx.dir / "final.txt"
        out.write_text(ctx.input("slow", "result").read_text())
        ctx.output("final", out)

    stages = [Stage(1, "slow", "slow", slow, keep_on_restart=("progress",)),
              Stage(2, "last", "last", last, needs=("slow",))]
    Engine(stages, run_dir, log=print).run(resume="--resume" in sys.argv)
""")


@pytest.mark.parametrize("kill_at", ["slow", "slow:end", "last"])
def test_kill9_then_resume(tmp_path, kill_at):
    script = tmp_path / "pipe.py"
    script.write_text(SCRIPT)
    run_dir = tmp_path / "run"
    env = {**os.environ, "COGUMI_FAULT_KILL_AT": kill_at}
    p = subprocess.run([sys.executable, str(script), str(run_dir)], env=env, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    name = kill_at.split(":")[0]
    sdir = next((run_dir / "stages").glob(f"*-{name}"))
    assert (sdir / "started.json").exists() and not (sdir / "stage.json").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "running"
    env.pop("COGUMI_FAULT_KILL_AT")
    # without --resume the half-done run is refused, not overwritten
    p = subprocess.run([sys.executable, str(script), str(run_dir)], env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "--resume" in p.stderr
    p = subprocess.run([sys.executable, str(script), str(run_dir), "--resume"], env=env, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    final = json.loads((run_dir / "stages/02-last/final.txt").read_text())
    assert final["squares"] == [0, 1, 4, 9] and not final["junk_seen"]
    assert final["resumed_with"] == ([0, 1, 2, 3] if kill_at == "slow:end" else [])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["done", "done"]
    if name == "slow":
        assert summary["stages"][0]["restarted"] and "restarting it" in p.stdout
    else:
        assert summary["stages"][0]["reused"]


# ---------------------------------------------------------------------------------------------
# plan validation
# ---------------------------------------------------------------------------------------------

def write_plan(tmp_path, text: str) -> Path:
    (tmp_path / "run.yaml").write_text("base_model: base\noutput_dir: out\ndata: {train: data.jsonl}\n")
    (tmp_path / "crit.yaml").write_text("criteria:\n  - {name: acc, tasks: [gsm8k], metric: accuracy, min: 0.1}\n")
    (tmp_path / "ref.jsonl").write_text("")
    p = tmp_path / "plan.yaml"
    p.write_text(textwrap.dedent(text))
    return p


GOOD = textwrap.dedent("""
    name: t
    phase1a: {config: run.yaml}
    validation:
      tasks: {gsm8k: {n: 5}}
      reference: ref.jsonl
    gate: {criteria: crit.yaml}
    mining:
      tasks: {gsm8k: {split: train}}
    phase1b:
      train: {config: run.yaml}
""")


def test_plan_loads_and_resolves_paths(tmp_path):
    plan = load_plan(write_plan(tmp_path, GOOD))
    assert Path(plan.phase1a.config).is_absolute() and plan.validation.tasks["gsm8k"].n == 5
    assert plan.mining.tasks["gsm8k"].split == "train" and Path(plan.gate.criteria).is_absolute()
    plan = load_plan(tmp_path / "plan.yaml", ["validation.tasks.gsm8k.n=7", "phase1b.enabled=false"])
    assert plan.validation.tasks["gsm8k"].n == 7 and not plan.phase1b.enabled


@pytest.mark.parametrize("edit,message", [
    (("name: t", "name: t\nbogus: 1"), "unknown key 'bogus'"),
    (("phase1a: {config: run.yaml}", "phase1a: {config: run.yaml, lr: 1}"), "unknown key 'phase1a.lr'"),
    (("{gsm8k: {n: 5}}", "{gsm8k: {n: 5, size: 2}}"), "unknown key 'validation.tasks.gsm8k.size'"),
    (("{gsm8k: {n: 5}}", "{gsm8k: {n: five}}"), "'validation.tasks.gsm8k.n' must be"),
    (("{gsm8k: {n: 5}}", "{math: {n: 5}}"), "unknown task 'validation.tasks.math'"),
    (("{gsm8k: {split: train}}", "{gsm8k: {split: test}}"), "mining.tasks.gsm8k.split.*TRAIN splits"),
    (("criteria: crit.yaml", "criteria: missing.yaml"), "gate.criteria.*does not exist"),
    (("reference: ref.jsonl", "reference: nope/ref.jsonl"), "validation.reference.*does not exist"),
    (("phase1a: {config: run.yaml}", "phase1a: {}"), "phase1a.config' is required"),
])
def test_plan_errors_name_the_key(tmp_path, edit, message):
    p = write_plan(tmp_path, GOOD.replace(*edit))
    with pytest.raises(ConfigError, match=message):
        load_plan(p)


def test_inline_criteria_are_validated(tmp_path):
    bad = GOOD.replace("criteria: crit.yaml", "criteria: {criteria: [{name: x, tasks: [gsm8k], metric: nope, min: 0}]}")
    with pytest.raises(ConfigError, match="unknown metric 'nope'"):
        load_plan(write_plan(tmp_path, bad))


def test_seed_plan_is_the_users_plan(tmp_path, shared_benchmarks, monkeypatch):
    """configs/pipeline/seed-plan.yaml validates (given the data file) and says what the user's plan says."""
    data = tmp_path / "train_600k.jsonl"
    data.write_text('{"instruction": "hi", "response": "hello"}\n')
    plan = load_plan(REPO / "configs/pipeline/seed-plan.yaml", [f"phase1a.data={data}"])
    assert plan.phase1a.base_model == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert {t: tp.n for t, tp in plan.validation.tasks.items()} == {"gsm8k": 50, "humaneval": 25, "mbpp": 25}
    assert all(tp.split == "test" for tp in plan.validation.tasks.values())
    assert all(tp.split == "train" for tp in plan.mining.tasks.values())
    assert plan.validation.reference == "openai:gpt-4" and not plan.mining.include_both_wrong
    assert Path(plan.gate.criteria) == (REPO / "configs/criteria/phase1a.yaml").resolve()
    assert plan.phase1b.enabled and plan.phase1b.replay == 0 and not plan.incident
    from cogumi.pipeline import build_stages
    stages = [s.name for s in build_stages(plan) if s.enabled]
    assert stages == ["preflight", "validate-base", "train-1a", "verify-adapter-1a", "merge-1a", "verify-merged-1a",
                      "validate-1a", "gate-1a", "mine-1a", "failures-1a", "train-1b", "verify-adapter-1b",
                      "merge-1b", "verify-merged-1b", "validate-1b", "compare-1a-1b", "gate-1b"]


def test_preflight_refuses_a_quantized_base_before_anything_runs(tmp_path):
    """The incident's base name stops the run at stage 01 with a red flag (no weights, no network)."""
    from cogumi.pipeline import run_pipeline
    p = write_plan(tmp_path, GOOD.replace("phase1a: {config: run.yaml}",
                                          "phase1a: {config: run.yaml, base_model: unsloth/meta-llama-3.1-8b-instruct-unsloth-bnb-4bit}"))
    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "response": "b"}\n')
    with pytest.raises(RedFlagError, match="stopped at stage 01-preflight.*quantized"):
        run_pipeline(p, run_dir=tmp_path / "run", log=lambda *_: None)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_at"] == "preflight" and summary["stages"][0]["status"] == "red_flag"
    assert all(s["status"] in ("pending", "disabled") for s in summary["stages"][1:])


def test_eval_metrics_bill_the_endpoint_tokens(tmp_path):
    from cogumi.pipeline import _summary_metrics
    plan = load_plan(write_plan(tmp_path, GOOD))
    summary = {"tasks": {"gsm8k": {"n": 3}}, "endpoints": {
        "openai:gpt-4": {"requests": 3, "prompt_tokens": 200_000, "completion_tokens": 50_000}}}
    m = _summary_metrics(summary, plan)
    assert m["api_cost_usd"] == pytest.approx(0.2 * 30 + 0.05 * 60)
    assert m["api"]["openai:gpt-4"]["requests"] == 3


def test_cost_adds_gpu_time_and_api_spend(tmp_path):
    def evaluates(ctx):
        return {"api_cost_usd": 1.25}
    stages = [Stage(1, "eval", "eval", evaluates, gpu=True), Stage(2, "cpu", "cpu", lambda ctx: {}, gpu=False)]
    summary = Engine(stages, tmp_path / "r", log=lambda *_: None, gpu_hourly_usd=3600.0).run(resume=False)
    eval_stage, cpu_stage = summary["stages"]
    assert eval_stage["cost_usd"] == pytest.approx(1.25 + eval_stage["seconds"], abs=0.01)
    assert cpu_stage["cost_usd"] == 0.0
    assert summary["total_cost_usd"] == pytest.approx(eval_stage["cost_usd"], abs=1e-3)


# ---------------------------------------------------------------------------------------------
# preflight checks the whole plan before paid work; gates attribute; per-stage memory (issue 16)
# ---------------------------------------------------------------------------------------------

PHASE1A = REPO / "configs" / "criteria" / "phase1a.yaml"


def tiny_plan(tmp_path, tiny_base, extra: str = "", criteria: str = str(PHASE1A), mining_file="gsm_train.jsonl",
              prompt: str | None = None) -> Path:
    from cogumi.tiny import synthetic_gsm8k, synthetic_instructions, write_jsonl
    write_jsonl(tmp_path / "gsm_test.jsonl", synthetic_gsm8k("test", 10))
    write_jsonl(tmp_path / "gsm_train.jsonl", synthetic_gsm8k("train", 10))
    write_jsonl(tmp_path / "data.jsonl", synthetic_instructions(8))
    (tmp_path / "run.yaml").write_text(f"base_model: {tiny_base}\noutput_dir: out\ndata: {{train: data.jsonl}}\n")
    (tmp_path / "ref.jsonl").write_text("")
    p = tmp_path / "plan.yaml"
    p.write_text(textwrap.dedent(f"""
        name: t
        baseline: false
        phase1a: {{config: run.yaml}}
        validation:
          tasks: {{gsm8k: {{data: gsm_test.jsonl}}}}
          reference: ref.jsonl
          {f'prompt: {prompt}' if prompt else ''}
        gate: {{criteria: {criteria}}}
        mining:
          tasks: {{gsm8k: {{data: {mining_file}, split: train}}}}
        phase1b:
          train: {{config: run.yaml}}
        """) + extra)
    return p


def stopped_at_preflight(tmp_path, plan: Path, match: str) -> str:
    from cogumi.pipeline import run_pipeline
    with pytest.raises(ConfigError, match="stopped at stage 01-preflight") as e:
        run_pipeline(plan, run_dir=tmp_path / "run", log=lambda *_: None)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_at"] == "preflight"
    assert all(s["status"] in ("pending", "disabled") for s in summary["stages"][1:])   # nothing trained
    assert not (tmp_path / "run" / "stages" / "03-train-1a").exists()
    assert re.search(match, str(e.value), re.S), str(e.value)
    return str(e.value)


def test_criteria_naming_a_task_the_plan_does_not_evaluate_stop_at_preflight(tmp_path, tiny_base):
    """A GSM8K-only plan with the shipped criteria (HumanEval/MBPP rules) could never pass its gate."""
    msg = stopped_at_preflight(tmp_path, tiny_plan(tmp_path, tiny_base), "gate.criteria.*humaneval, mbpp")
    assert "validation.tasks.humaneval" in msg and "code_wins" in msg


def test_mining_items_that_are_validation_items_stop_at_preflight(tmp_path, tiny_base):
    only_gsm8k = "{criteria: [{name: acc, tasks: [gsm8k], metric: accuracy, min: 0.1}]}"
    plan = tiny_plan(tmp_path, tiny_base, criteria=only_gsm8k, mining_file="gsm_test.jsonl")
    msg = stopped_at_preflight(tmp_path, plan, "mining.tasks.gsm8k and validation.tasks.gsm8k share 10 item")
    assert "Phase 1B would train on the items it is gated on" in msg


def test_a_missing_prompt_set_stops_at_preflight(tmp_path, tiny_base):
    only_gsm8k = "{criteria: [{name: acc, tasks: [gsm8k], metric: accuracy, min: 0.1}]}"
    plan = tiny_plan(tmp_path, tiny_base, criteria=only_gsm8k, prompt="no-such-prompt-set")
    stopped_at_preflight(tmp_path, plan, "validation.prompt.*no-such-prompt-set")


def test_an_unreachable_reference_endpoint_stops_at_preflight(tmp_path, tiny_base, monkeypatch):
    import socket
    with socket.socket() as s:                     # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    only_gsm8k = "{criteria: [{name: acc, tasks: [gsm8k], metric: accuracy, min: 0.1}]}"
    plan = tiny_plan(tmp_path, tiny_base, criteria=only_gsm8k)
    plan.write_text(plan.read_text().replace("reference: ref.jsonl", "reference: openai:gpt-4"))
    stopped_at_preflight(tmp_path, plan, "validation.reference is 'openai:gpt-4'.*not reachable")


def test_the_prompt_key_reaches_run_eval(tmp_path, tiny_base):
    from cogumi.pipeline.stages import _eval_settings
    only_gsm8k = "{criteria: [{name: acc, tasks: [gsm8k], metric: accuracy, min: 0.1}]}"
    plan = load_plan(tiny_plan(tmp_path, tiny_base, criteria=only_gsm8k, prompt="training"))
    assert _eval_settings(plan, mining=False)["prompt"] == "training"
    assert _eval_settings(plan, mining=True)["prompt"] == "training"     # mining asks as validation does


def _eval_dir(d: Path, correct: list[bool], ref: list[bool], model: str = "m") -> Path:
    from cogumi.evaluation.judge import exact_outcome
    from cogumi.evaluation.runner import summarize
    rows = []
    for i, (c, r) in enumerate(zip(correct, ref)):
        outcome, tie_kind = exact_outcome(c, r)
        rows.append({"task": "gsm8k", "task_id": str(i), "prompt": f"q{i}", "correct": c, "truncated": False,
                     "repetition": 0.0, "reference": {"correct": r}, "outcome": outcome, "tie_kind": tie_kind})
    d.mkdir(parents=True)
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summarize(rows, ["gsm8k"])
    s.update(model=model, reference="ref", judge={"kind": "exact"})
    (d / "summary.json").write_text(json.dumps(s))
    return d


def test_gate_stop_names_the_base_on_the_same_items_and_the_fidelity(tmp_path):
    """The STOP rule of a model that scores 2/20 against a strong reference, while the base scored 1/20
    on the same items and the merge matched the adapter: the message says the base already scores this
    (not 'the corrupted merge')."""
    from cogumi.pipeline.plan import Plan
    from cogumi.pipeline.stages import stage_gate
    plan = Plan()
    plan.gate.criteria = {"name": "g", "reference": {"assumes": "GPT-4", "min_accuracy": 0.8},
                          "red_flags": [{"name": "ties_collapsed", "tasks": ["gsm8k"], "metric": "tie_rate",
                                         "min": 0.5}]}
    ref = [i < 18 for i in range(20)]

    def validate(who, correct):
        def run(ctx):
            d = _eval_dir(ctx.dir / "eval", correct, ref)
            ctx.output("results", d / "results.jsonl")
            ctx.output("summary", d / "summary.json")
        return run

    def merge(ctx):
        m = ctx.dir / "merged"
        m.mkdir()
        (m / "cogumi.json").write_text(json.dumps({"kind": "merged", "fidelity": {"passed": True, "kl_mean": 1e-5,
                                                                                  "top1_agreement": 1.0}}))
        ctx.output("merged", m)

    stages = [Stage(2, "validate-base", "base", validate("base", [i == 0 for i in range(20)])),
              Stage(5, "merge-1a", "merge", merge),
              Stage(7, "validate-1a", "1a", validate("1a", [i < 2 for i in range(20)])),
              Stage(8, "gate-1a", "gate", stage_gate(plan, "1a"), needs=("validate-1a", "validate-base", "merge-1a"),
                    optional=("validate-base",))]
    with pytest.raises(RedFlagError) as e:
        Engine(stages, tmp_path / "run", log=lambda *_: None).run(resume=False)
    msg = str(e.value)
    assert "the base already scores this" in msg and "the base (validate-base) scores 3/20 (15%) on tie_rate on " \
        "the same items, this model 4/20 (20%)" in msg
    assert "fidelity check passed" in msg and "corrupted merge" not in msg
    gate = json.loads((tmp_path / "run" / "stages" / "08-gate-1a" / "gate.json").read_text())
    assert gate["rows"][0]["base_value"] == pytest.approx(0.15) and gate["fidelity"].startswith("the merge matches")


def test_each_stage_reports_its_own_peak_memory(tmp_path):
    """A light stage after a heavy one reports its own peak, not the process's (a merge after training)."""
    held = []

    def heavy(ctx):
        big = bytearray(b"\x01") * (400 * 2**20)  # written, so resident: 400 MiB
        held.append(len(big))

    def light(ctx):
        small = bytearray(b"\x01") * (20 * 2**20)
        held.append(len(small))

    summary = Engine([Stage(1, "heavy", "heavy", heavy), Stage(2, "light", "light", light)], tmp_path / "r",
                     log=lambda *_: None).run(resume=False)
    recs = {n: json.loads((tmp_path / "r" / "stages" / d / "stage.json").read_text())["memory"]
            for n, d in (("heavy", "01-heavy"), ("light", "02-light"))}
    if recs["light"]["rss_scope"] != "this work":
        pytest.skip("this kernel cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    assert recs["heavy"]["peak_rss_gib"] - recs["light"]["peak_rss_gib"] > 0.3
    assert summary["stages"][1]["peak_rss_gib"] == recs["light"]["peak_rss_gib"]
