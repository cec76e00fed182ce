"""kill -9 at random moments across train, merge, eval and pipeline, then resume: every run finishes, its
final artifacts equal an uninterrupted run's, and no kill ever leaves a partial artifact at a final path.

Each verb runs as a real ``python -m cogumi`` subprocess on the tiny model. A *chain* is one output
directory: the command is started, SIGKILLed after a random delay (seeded: ``COGUMI_ADVERSARIAL_SEED``),
started again (``--resume`` for train/pipeline, the same command for merge/eval), killed again, ...,
and finally left to finish. After every kill the output tree is scanned (``conftest.scan_artifacts``) and
no process the killed one had started may outlive it. The kill moment is drawn uniformly over the first
80% of the *active* part of the verb's uninterrupted run -- from its first log line (imports done, inputs being
read) to its exit -- so kills land in data preparation, training steps, checkpoint writes, shard writes,
fidelity checks, generation, sandboxed checks, stage records and result writes rather than in imports.

The references are conftest's (built once per session): the pipeline, which runs the same train/merge/eval
settings, must end with exactly their adapter, merged model and results. The default run takes one chain
per verb (4 kills); ``pytest -m slow`` runs the full schedule (26 kill moments).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .conftest import (EVAL_N, SEED, TINY_CONFIG, assert_same_tensors, cli, cli_argv, cli_env, descendants,
                       eval_args, report, run_watched, sample, scan_artifacts, train_args, wait_gone)

# (verb, chain id, kills in the chain): 26 kill moments (one drawn after its run already ended does not
# land; the full test wants at least 20 that did).
FULL_SCHEDULE = ([("train", i, 2) for i in range(4)] + [("merge", i, 1) for i in range(5)]
                 + [("eval", i, 2) for i in range(3)] + [("pipeline", 0, 3), ("pipeline", 1, 2), ("pipeline", 2, 2)])


def write_plan(path: Path, base: Path, data: dict) -> Path:
    plan = {
        "name": "adversarial", "baseline": False,
        "phase1a": {"config": str(TINY_CONFIG), "base_model": str(base), "data": str(data["train"]),
                    "set": ["training.max_steps=6", "training.save_steps=2"]},     # as conftest.train_args
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


def same_training(adapter: Path, reference: Path) -> dict:
    """The same optimizer steps and tokens as the reference (equal tensors alone can hide an extra step taken
    at a learning rate of 0, the end of a cosine schedule)."""
    got, want = (json.loads((d / "cogumi.json").read_text()) for d in (adapter, reference))
    for key in ("steps", "tokens_seen"):
        assert got[key] == want[key], f"{adapter}: {key} {got[key]} != uninterrupted {want[key]}"
    return {"steps": got["steps"]}


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
        """merge/eval refuse to redo a finished output: that is the designed answer to a rerun."""
        return self.name in ("merge", "eval") and ("already exists" in proc_stderr or
                                                   "already holds a finished eval" in proc_stderr)

    def compare(self, out: Path) -> dict:
        r = self.refs
        if self.name == "train":
            return {"adapter_tensors": assert_same_tensors(out / "adapter", r.train / "adapter",
                                                           "adapter_model.safetensors"),
                    **same_training(out / "adapter", r.train / "adapter")}
        if self.name == "merge":
            return {"merged_tensors": assert_same_tensors(out, r.merged)}
        if self.name == "eval":
            assert (out / "results.jsonl").read_text() == (r.eval / "results.jsonl").read_text()
            got, want = json.loads((out / "summary.json").read_text()), json.loads((r.eval / "summary.json").read_text())
            assert got["tasks"] == want["tasks"]
            return {"results_rows": len((out / "results.jsonl").read_text().splitlines())}
        # The pipeline runs the same train/merge/eval settings as the standalone references: killed and resumed,
        # it must produce exactly what they produced uninterrupted.
        stages = out / "stages"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "done", summary.get("reason")
        n = assert_same_tensors(stages / "03-train-1a" / "run" / "adapter", r.train / "adapter",
                                "adapter_model.safetensors")
        same_training(stages / "03-train-1a" / "run" / "adapter", r.train / "adapter")
        m = assert_same_tensors(stages / "05-merge-1a" / "merged", r.merged)
        got = (stages / "07-validate-1a" / "eval" / "results.jsonl").read_text()
        assert got == (r.eval / "results.jsonl").read_text()
        return {"adapter_tensors": n, "merged_tensors": m, "results_rows": len(got.splitlines()),
                "stages_done": sum(1 for st in summary["stages"] if st["status"] == "done")}


class References:
    """The uninterrupted runs a killed-and-resumed one must equal (conftest's shared references), and the
    length of each verb's active part (first log line to exit: where kill moments are drawn)."""

    def __init__(self, root: Path, base: Path, data: dict, train, merge, evaluation):
        self.root, self.base, self.data = root, base, data
        self.train, self.merged, self.eval = train.path, merge.path, evaluation.path
        self.plan = write_plan(root / "plan.yaml", base, data)
        # the pipeline runs train, merge and eval in one process (imports paid once): a bit less than their sum
        self.seconds = {"train": train.seconds, "merge": merge.seconds, "eval": evaluation.seconds,
                        "pipeline": 0.8 * (train.seconds + merge.seconds + evaluation.seconds)}


@pytest.fixture(scope="module")
def refs(tmp_path_factory, tiny_base, adv_data, train_reference, merge_reference, eval_reference) -> References:
    return References(tmp_path_factory.mktemp("crash-refs"), tiny_base, adv_data, train_reference, merge_reference,
                      eval_reference)


def scan_output(out: Path):
    """``scan_artifacts`` of ``out`` and of the temporaries beside it (``atomic_dir`` builds ``.OUT.partial-*``
    next to ``OUT`` and renames it into place)."""
    scan = scan_artifacts(out)
    for sibling in sorted(out.parent.glob(f".{out.name}.*")):
        scan.temporaries.append(sibling.name)
    return scan


def run_chain(refs: References, tmp: Path, verb_name: str, chain: int, kills: int) -> dict:
    verb = Verb(verb_name, refs)
    out = tmp / f"{verb_name}-{chain}"
    rng = random.Random(f"{SEED}-{verb_name}-{chain}")
    landed, records = 0, []
    for invocation in range(kills):
        delay = rng.uniform(0, 0.8 * refs.seconds[verb_name])
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

def test_kill_between_checkpoint_rotation_and_its_marker_keeps_progress(tmp_path, tiny_base, adv_data):
    """save_total_limit=1: HF deletes the previous checkpoint right after writing the new one, and cogumi
    writes the new one's completeness marker after that. A kill in between must not lose every checkpoint
    (on an H100 that is up to 16 h of training): resume must continue from step 4, not from step 0."""
    from cogumi.faults import ENV_AFTER, sitecustomize_dir
    shim = sitecustomize_dir(tmp_path / "shim")
    out = tmp_path / "run"
    args = train_args(tiny_base, adv_data["train"], out, "--set", "training.save_total_limit=1",
                      "--set", "training.max_steps=4")
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


def test_kill_after_the_last_checkpoint_resumes_without_an_extra_step(tmp_path, tiny_base, adv_data):
    """Killed after its final checkpoint (step == max_steps) but before the adapter is written, a resumed run
    must write the adapter of step max_steps -- not train one more step. A constant learning rate makes an
    extra step visible in the weights (a cosine schedule reaches 0 there and hides it)."""
    from cogumi.faults import ENV_BEFORE, sitecustomize_dir
    shim = sitecustomize_dir(tmp_path / "shim")

    def args(out, *extra):
        return train_args(tiny_base, adv_data["train"], out, "--set", "training.lr_scheduler=constant", *extra)

    cli(*args(tmp_path / "uninterrupted"), check=True)
    killed = tmp_path / "killed"
    proc = cli(*args(killed), env=cli_env(PYTHONPATH=str(shim), **{ENV_BEFORE: "cogumi.train:build_manifest"}))
    assert proc.returncode == -9 and not (killed / "adapter").exists(), proc.stderr[-2000:]
    assert scan_artifacts(killed).complete_checkpoints[-1] == "checkpoint-6"
    cli(*args(killed, "--resume"), check=True)
    same_training(killed / "adapter", tmp_path / "uninterrupted" / "adapter")
    assert_same_tensors(killed / "adapter", tmp_path / "uninterrupted" / "adapter", "adapter_model.safetensors")


def test_kill_mid_merge_leaves_no_temporary_behind(tmp_path, train_reference, merge_reference):
    """merge.py's own hook kills it right after its first shard, inside the temporary output dir; the rerun
    must finish *and* not leave the dead run's partial output (an 8B merge: ~16 GB) beside the result."""
    out = tmp_path / "merged"
    args = ["merge", train_reference.path / "adapter", "--out", out, "--no-fidelity"]
    killed = cli(*args, env=cli_env(COGUMI_TEST_KILL_AFTER_SHARDS="1"))
    assert killed.returncode == -9 and not out.exists(), killed.stderr[-2000:]
    assert list(tmp_path.glob(".merged.partial-*")), "the kill did not land inside the temporary output"
    cli(*args, check=True)
    assert_same_tensors(out, merge_reference.path)
    leftovers = [p.name for p in tmp_path.glob(".merged.*")]
    assert not leftovers, f"the killed merge's temporary output is still there after the rerun: {leftovers}"


def sandboxed_pythons(pids: list[int]) -> list[int]:
    """The sandbox runners among ``pids`` (their command line carries the sandbox marker; unshare's too, so it
    is told apart by its executable)."""
    found = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(b"cogumi-sandbox") for a in argv) and not argv[0].endswith(b"unshare"):
            found.append(pid)
    return found


def test_kill9_of_score_leaves_no_sandboxed_program_running(tmp_path, adv_data):
    """The harness dies (kill -9) while sandboxed programs sleep: none of them may live on."""
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
    # poll /proc (bounded) until the four sandboxed interpreters run: the condition, not a fixed sleep
    while time.monotonic() < deadline and len(sandboxed_pythons(children)) < 4:
        try:
            proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            children = descendants(proc.pid)
    assert len(sandboxed_pythons(children)) >= 4, \
        f"sandboxes did not start: {proc.stderr.read().decode()[-1500:] if proc.poll() is not None else children}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    survivors = wait_gone(children, within=5)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    report("orphans", {"children": len(children), "survivors": len(survivors)})
    assert not survivors, (f"{len(survivors)} of {len(children)} sandbox processes outlived the killed harness "
                           "(they would run until their own timeout, or forever while sleeping)")
    assert not (tmp_path / "results.jsonl").exists()
