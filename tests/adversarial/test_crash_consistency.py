"""kill -9 at random moments across train, merge, eval and pipeline, then resume: every run finishes, its
final artifacts equal an uninterrupted run's, and no kill ever leaves a partial artifact at a final path.

Each verb runs as a real ``python -m cogumi`` subprocess on the tiny model. A *chain* is one output
directory: the command is started, SIGKILLed after a random delay (seeded: ``COGUMI_ADVERSARIAL_SEED``),
started again (``--resume`` for train/pipeline, the same command for merge/eval), killed again, ...,
and finally left to finish. After every kill the output tree is scanned (``conftest.scan_artifacts``) and
no process the killed one had started may outlive it. The kill moment is drawn uniformly over the
*active* part of the verb's uninterrupted run -- from its first log line (imports done, inputs being
read) to its exit -- so kills land in data preparation, training steps, checkpoint writes, shard writes,
fidelity checks, generation, sandboxed checks, stage records and result writes rather than in imports.

The default run takes one chain per verb (4 kills); ``pytest -m slow`` runs the full schedule (24 kills).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
import yaml

from .conftest import (SEED, TINY_CONFIG, assert_same_tensors, cli, cli_env, report, run_watched, sample,
                       scan_artifacts, train_args)

# (verb, chain id, kills in the chain). 24 kills in all.
FULL_SCHEDULE = ([("train", i, 2) for i in range(3)] + [("merge", i, 1) for i in range(5)]
                 + [("eval", i, 2) for i in range(3)] + [("pipeline", i, 3) for i in range(1)]
                 + [("pipeline", 1, 1), ("pipeline", 2, 1)])
EVAL_N = 8           # per task, answers cached every 8 generations: a kill can land between two chunks


def eval_args(model, data, out) -> list:
    return ["eval", model, "--tasks", "gsm8k,mbpp", "--data", f"gsm8k={data['gsm8k']}",
            "--data", f"mbpp={data['mbpp']}", "--n", EVAL_N, "--reference", data["reference"],
            "--max-new-tokens", 24, "--batch-size", 1, "--timeout", 5, "--out", out]


def write_plan(path: Path, base: Path, data: dict) -> Path:
    plan = {
        "name": "adversarial", "baseline": False,
        "phase1a": {"config": str(TINY_CONFIG), "base_model": str(base), "data": str(data["train"]),
                    "set": ["training.max_steps=4", "training.save_steps=2"]},
        "merge": {"target": "original", "fidelity": True},
        "validation": {"tasks": {"gsm8k": {"n": EVAL_N, "data": str(data["gsm8k"])},
                                 "mbpp": {"n": EVAL_N, "data": str(data["mbpp"])}},
                       "reference": str(data["reference"]), "max_new_tokens": 24, "batch_size": 1,
                       "timeout": 5.0},
        "gate": {"criteria": {"name": "anything", "criteria": [
            {"name": "ran", "tasks": ["gsm8k"], "metric": "loss_rate", "max": 1.0}]}},
        "phase1b": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


class Verb:
    """How to run, resume, finish and compare one verb."""

    def __init__(self, name: str, refs: "References"):
        self.name, self.refs = name, refs

    def args(self, out: Path, invocation: int) -> list:
        r = self.refs
        if self.name == "train":
            return train_args(r.base, r.data["train"], out, *(["--resume"] if invocation else []))
        if self.name == "merge":
            return ["merge", r.train / "adapter", "--out", out]
        if self.name == "eval":
            return eval_args(r.merged, r.data, out)
        return ["pipeline", r.plan, "--run-dir", out, *(["--resume"] if invocation else [])]

    def finished_already(self, proc_stderr: str, returncode: int | None = None) -> bool:
        """merge/eval refuse to redo a finished output (that is the designed answer to a rerun); a pipeline whose
        uninterrupted reference stops at a stage (a bug elsewhere) must stop the same way when resumed."""
        if self.name == "pipeline":
            return returncode is not None and returncode == self.refs.pipeline_rc
        return self.name in ("merge", "eval") and ("already exists" in proc_stderr or
                                                   "already holds a finished eval" in proc_stderr)

    def compare(self, out: Path) -> dict:
        r = self.refs
        if self.name == "train":
            return {"adapter_tensors": assert_same_tensors(out / "adapter", r.train / "adapter",
                                                           "adapter_model.safetensors")}
        if self.name == "merge":
            return {"merged_tensors": assert_same_tensors(out, r.merged)}
        if self.name == "eval":
            assert (out / "results.jsonl").read_text() == (r.eval / "results.jsonl").read_text()
            got, want = json.loads((out / "summary.json").read_text()), json.loads((r.eval / "summary.json").read_text())
            assert got["tasks"] == want["tasks"]
            return {"results_rows": len((out / "results.jsonl").read_text().splitlines())}
        # Everything the uninterrupted pipeline produced, the resumed one must have produced identically.
        stages, ref = out / "stages", r.pipeline / "stages"
        compared: dict = {}
        adapter = Path("03-train-1a") / "run" / "adapter"
        if (ref / adapter).exists():
            compared["adapter_tensors"] = assert_same_tensors(stages / adapter, ref / adapter, "adapter_model.safetensors")
        if (ref / "05-merge-1a" / "merged").exists():
            compared["merged_tensors"] = assert_same_tensors(stages / "05-merge-1a" / "merged", ref / "05-merge-1a" / "merged")
        results = Path("07-validate-1a") / "eval" / "results.jsonl"
        if (ref / results).exists():
            got = (stages / results).read_text()
            assert got == (ref / results).read_text()
            compared["results_rows"] = len(got.splitlines())
        status = lambda run: [(s["name"], s["status"]) for s in json.loads((run / "summary.json").read_text())["stages"]]
        assert status(out) == status(r.pipeline)
        compared["stages"] = sum(1 for _, st in status(out) if st == "done")
        return compared


class References:
    """Uninterrupted runs of each verb (the artifacts a killed-and-resumed run must equal) and the length of
    their active part (from their first log line to their exit: where kill moments are drawn)."""

    def __init__(self, root: Path, base: Path, data: dict, train_reference):
        self.root, self.base, self.data = root, base, data
        self.train, self.merged, self.eval, self.pipeline = (train_reference.path, root / "merged-ref",
                                                             root / "eval-ref", root / "pipeline-ref")
        self.plan = write_plan(root / "plan.yaml", base, data)
        self.seconds: dict[str, float] = {"train": train_reference.seconds}
        self.failed: dict[str, str] = {}
        self.pipeline_rc: int | None = None
        self.pipeline_error = ""

    def need(self, verb: str) -> None:
        order = {"train": ["train"], "merge": ["train", "merge"], "eval": ["train", "merge", "eval"],
                 "pipeline": ["pipeline"]}[verb]
        for v in order:
            if v in self.failed:
                raise AssertionError(self.failed[v])
            if v in self.seconds:
                continue
            out = {"merge": self.merged, "eval": self.eval, "pipeline": self.pipeline}[v]
            run = run_watched(Verb(v, self).args(out, 0), verb=v)
            if v == "pipeline":
                self.pipeline_rc = run.returncode
                if run.returncode != 0 and (out / "stages" / "03-train-1a" / "stage.json").exists():
                    # it stops at a later stage (a bug there): kill/resume still runs against what it made
                    self.pipeline_error = run.output[-1500:]
                    run.returncode = 0
            if run.returncode != 0 or not run.active_s:
                self.failed[v] = f"uninterrupted reference `cogumi {v}` failed ({run.returncode}):\n{run.output[-2500:]}"
                raise AssertionError(self.failed[v])
            assert not scan_artifacts(out).problems
            self.seconds[v] = run.active_s


@pytest.fixture(scope="module")
def refs(tmp_path_factory, tiny_base, adv_data, train_reference) -> References:
    return References(tmp_path_factory.mktemp("crash-refs"), tiny_base, adv_data, train_reference)


def scan_output(out: Path):
    """``scan_artifacts`` of ``out`` and of the temporaries beside it (``atomic_dir`` builds ``.OUT.partial-*``
    next to ``OUT`` and renames it into place)."""
    scan = scan_artifacts(out)
    for sibling in sorted(out.parent.glob(f".{out.name}.*")):
        scan.temporaries.append(sibling.name)
    return scan


def run_chain(refs: References, tmp: Path, verb_name: str, chain: int, kills: int) -> dict:
    refs.need(verb_name)
    verb = Verb(verb_name, refs)
    out = tmp / f"{verb_name}-{chain}"
    rng = random.Random(f"{SEED}-{verb_name}-{chain}")
    landed, records = 0, []
    for invocation in range(kills):
        delay = rng.uniform(0, 0.9 * refs.seconds[verb_name])
        run = run_watched(verb.args(out, invocation), verb=verb_name, kill_after_active=delay)
        scan = scan_output(out)
        rec = {"verb": verb_name, "case": f"{verb_name}-{chain}", "invocation": invocation,
               "delay_after_active_s": round(delay, 3), "killed": run.killed, "returncode": run.returncode,
               "wall_s": round(run.wall_s, 2), "children_at_kill": run.children_at_kill,
               "survivors": run.survivors, "on_disk": scan.summary()}
        records.append(rec)
        report("kills", rec)
        assert not scan.problems, f"after kill {invocation} ({delay:.2f}s into the active part): {scan.problems}"
        assert run.survivors == 0, f"{run.survivors} process(es) started by the killed {verb_name} outlived it"
        if run.killed:
            landed += 1
        else:
            assert run.returncode == 0 or verb.finished_already(run.output, run.returncode), run.output[-2000:]
    proc = cli(*verb.args(out, kills))
    if proc.returncode != 0:
        assert verb.finished_already(proc.stderr, proc.returncode), f"final {verb_name} run failed:\n{proc.stderr[-3000:]}"
    final = scan_output(out)
    assert not final.problems, final.problems
    compared = verb.compare(out)
    result = {"verb": verb_name, "chain": chain, "kills_landed": landed, "kills_scheduled": kills,
              "delays": [r["delay_after_active_s"] for r in records], "compared": compared,
              "leftover_temporaries": final.temporaries}
    report("chains", result)
    return result


def _run_schedule(refs, tmp_path, schedule) -> list[dict]:
    """Every chain runs even when an earlier one fails (the figures need them all); failures are raised at
    the end, together."""
    results, failures = [], []
    for entry in schedule:
        try:
            results.append(run_chain(refs, tmp_path, *entry))
        except Exception as e:  # collected: one verb's bug must not hide another's result
            failures.append(f"{entry[0]} chain {entry[1]}: {type(e).__name__}: {str(e)[:1500]}")
            report("chains", {"verb": entry[0], "chain": entry[1], "failed": failures[-1]})
    assert not failures, "\n\n".join(failures)
    assert not refs.pipeline_error, ("the uninterrupted pipeline itself does not finish (kill/resume was checked up to "
                                     f"where it stops):\n{refs.pipeline_error}")
    leftovers = {f"{r['verb']}-{r['chain']}": r["leftover_temporaries"] for r in results if r["leftover_temporaries"]}
    assert not leftovers, ("interrupted runs left temporary files/dirs behind after they were redone (disk leak; "
                           f"an 8B merge leaves ~16 GB per kill): {leftovers}")
    return results


def test_kill9_sample_one_chain_per_verb(refs, tmp_path):
    schedule = [sample([e for e in FULL_SCHEDULE if e[0] == v], 1, f"crash-{v}")[0] for v in
                ("train", "merge", "eval", "pipeline")]
    schedule = [(v, c, 1) for v, c, _ in schedule]
    _run_schedule(refs, tmp_path, schedule)


@pytest.mark.slow
def test_kill9_full_schedule(refs, tmp_path):
    results = _run_schedule(refs, tmp_path, FULL_SCHEDULE)
    landed = sum(r["kills_landed"] for r in results)
    assert landed >= 20, f"only {landed} kills landed before the runs ended"


# ---------------------------------------------------------------------------------------------
# kills at exact moments the random ones rarely hit
# ---------------------------------------------------------------------------------------------

def test_kill_between_checkpoint_rotation_and_its_marker_keeps_progress(refs, tmp_path):
    """save_total_limit=1: HF deletes the previous checkpoint right after writing the new one, and cogumi
    writes the new one's completeness marker after that. A kill in between must not lose every checkpoint
    (on an H100 that is up to 16 h of training): resume must continue from step 4, not from step 0."""
    from cogumi.faults import ENV_AFTER, sitecustomize_dir
    shim = sitecustomize_dir(tmp_path / "shim")
    out = tmp_path / "run"
    args = train_args(refs.base, refs.data["train"], out, "--set", "training.save_total_limit=1")
    env = cli_env(PYTHONPATH=str(shim), **{ENV_AFTER: "transformers.trainer:rotate_checkpoints@2"})
    proc = cli(*args, env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]        # killed right after the second rotation
    assert not scan_artifacts(out).problems
    resumed = cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    said = resumed.stdout + resumed.stderr
    resume_lines = "\n".join(line for line in said.splitlines() if line.startswith("resume:"))
    assert "starting from the beginning" not in said, ("a kill between HF's checkpoint rotation and cogumi's "
                                                       "completeness marker lost every checkpoint:\n" + resume_lines)
    assert "continuing from checkpoint-" in said


def test_kill9_of_score_leaves_no_sandboxed_program_running(tmp_path, adv_data):
    """The harness dies (kill -9) while sandboxed programs sleep: none of them may live on."""
    from .conftest import descendants, wait_gone
    import os
    import signal
    import subprocess

    from .conftest import cli_argv
    rows = [{"task_id": 700 + i, "text": "sleep", "code": "def solve(x):\n    return 2 * x",
             "test_list": ["assert solve(2) == 4"], "test_setup_code": "", "challenge_test_list": []}
            for i in range(4)]
    data = tmp_path / "data.jsonl"
    preds = tmp_path / "preds.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sleeper = "import time\ntime.sleep(300)\ndef solve(x):\n    return 2 * x\n"
    preds.write_text("".join(json.dumps({"task_id": r["task_id"], "completion": sleeper}) + "\n" for r in rows))
    proc = subprocess.Popen(cli_argv("score", "--task", "mbpp", "--data", data, "--predictions", preds,
                                     "--out", tmp_path / "results.jsonl", "--workers", 4, "--timeout", 120),
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    children: list[int] = []
    # wait until the four sandboxes are up (each is an unshare + python pair); the poll loop reads /proc
    while time.monotonic() < deadline and len(children) < 8:
        try:
            proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            children = descendants(proc.pid)
    assert len(children) >= 8, f"sandboxes did not start: {proc.stderr.read().decode()[-1500:] if proc.poll() is not None else children}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    survivors = wait_gone(children, within=10)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    report("orphans", {"children": len(children), "survivors": len(survivors)})
    assert not survivors, (f"{len(survivors)} of {len(children)} sandbox processes outlived the killed harness "
                           "(they would run until their own timeout, or forever while sleeping)")
    assert not (tmp_path / "results.jsonl").exists()
