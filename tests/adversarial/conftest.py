"""Machinery of the adversarial suite: the real CLI as a subprocess, seeded samples, artifact scans.

* ``cli(...)`` runs ``python -m cogumi ...`` as a real subprocess (offline, one torch thread so that an
  interrupted run and an uninterrupted one compute the same numbers) and returns its CompletedProcess.
* ``KillSchedule`` draws the random kill moments from one seed (``COGUMI_ADVERSARIAL_SEED``, default
  below) and records every kill (verb, invocation, delay, what was on disk) into ``kills.jsonl`` under
  ``COGUMI_ADVERSARIAL_REPORT`` when that variable names a directory (docs/reliability.md's figures).
* ``scan_artifacts(root)`` is the "nothing half-written is readable" check run after every kill.
* Slow tests (the full sets) are skipped unless ``-m slow`` is asked for; the default run takes seeded
  samples of the same case lists (see ``sample``). ``pytest -m slow tests/adversarial`` runs the full sets
  and every single-scenario test (disk full, targeted kills), i.e. everything but the samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
SEED = int(os.environ.get("COGUMI_ADVERSARIAL_SEED", "7"))
REPORT_DIR = os.environ.get("COGUMI_ADVERSARIAL_REPORT")

# Settings every CLI subprocess gets: offline, quiet, deterministic and light on a 2-core machine.
CLI_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONHASHSEED": "0"}


# ---------------------------------------------------------------------------------------------
# slow tests: the full sets run only when asked for
# ---------------------------------------------------------------------------------------------

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Default run: the samples and the single-scenario tests; the full sets (``slow``) are skipped.
    ``-m slow``: the full sets plus every single-scenario test (they belong to both), not the samples."""
    here = Path(__file__).parent
    mine = [item for item in items if here in Path(str(item.fspath)).parents]
    markexpr = config.getoption("markexpr", "") or ""
    if "slow" in markexpr or os.environ.get("COGUMI_ADVERSARIAL_FULL") == "1":
        for item in mine:
            if "sample" not in item.name:
                item.add_marker(pytest.mark.slow)
        return
    skip = pytest.mark.skip(reason="full adversarial set: run with `pytest -m slow tests/adversarial`")
    for item in mine:
        if "slow" in item.keywords:
            item.add_marker(skip)


def sample(cases: list, k: int, salt: str) -> list:
    """A seeded sample of ``k`` cases (order kept); the same seed and salt give the same sample."""
    if k >= len(cases):
        return list(cases)
    rng = random.Random(f"{SEED}-{salt}")
    keep = set(rng.sample(range(len(cases)), k))
    return [c for i, c in enumerate(cases) if i in keep]


def report(name: str, record: dict) -> None:
    """Append one record to ``COGUMI_ADVERSARIAL_REPORT/NAME.jsonl`` (when set): the figures' raw data."""
    if not REPORT_DIR:
        return
    path = Path(REPORT_DIR) / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"seed": SEED, **record}, default=str) + "\n")


# ---------------------------------------------------------------------------------------------
# the CLI as a subprocess
# ---------------------------------------------------------------------------------------------

def cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGUMI_FAULT")}
    env.update(CLI_ENV)
    env.update(extra)
    return env


def cli_argv(*args) -> list[str]:
    return [sys.executable, "-m", "cogumi", *map(str, args)]


def cli(*args, env: dict | None = None, timeout: float = 600, cwd: str | Path | None = None,
        check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli_argv(*args), env=env or cli_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"cogumi {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def train_args(base, data, out, *extra) -> list[str]:
    return ["train", TINY_CONFIG, "--set", f"base_model={base}", "--set", f"data.train={data}",
            "--set", f"output_dir={out}", "--set", "training.max_steps=6", "--set", "training.save_steps=2",
            *extra]


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------

def _ppid_table() -> dict[int, int]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    table[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return table


def descendants(pid: int) -> list[int]:
    table = _ppid_table()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in table.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            out.append(pid)
    return out


def wait_gone(pids: list[int], within: float) -> list[int]:
    """Wait (pidfd + poll: no sleeping) up to ``within`` seconds for ``pids`` to exit; return survivors."""
    import select
    deadline = time.monotonic() + within
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll(max(0, int((deadline - time.monotonic()) * 1000)))
        finally:
            os.close(fd)
    return alive(pids)


# What each verb prints first once its imports are done and it starts on its inputs: the start of the
# "active" part of a run, where kill moments are drawn (a kill during imports finds nothing written).
ACTIVE_MARKERS = {"train": r"^(data|resume|train): ", "merge": r"^merge: ", "eval": r"^eval: ",
                  "pipeline": r"^\[\d\d-", "score": r"."}


@dataclass
class Watched:
    returncode: int | None
    output: str                   # stdout + stderr, last 6000 characters
    active_at: float | None       # seconds from start to the first ACTIVE_MARKERS line
    wall_s: float
    killed: bool = False
    children_at_kill: int = 0
    survivors: int = 0

    @property
    def active_s(self) -> float | None:
        return None if self.active_at is None else self.wall_s - self.active_at


def run_watched(args, *, verb: str, kill_after_active: float | None = None, env: dict | None = None, cwd=None,
                grace: float = 15.0, timeout: float = 600) -> Watched:
    """Run ``cogumi ARGS``; with ``kill_after_active``, SIGKILL it (a real external kill -9) that many
    seconds after it printed its first active-phase line, unless it ended before.

    The output is read by a thread as it comes (the child never blocks on a full pipe); waiting on the
    process with a timeout *is* the fault schedule (the kill moment), not a synchronisation sleep."""
    import re
    import threading
    marker = re.compile(ACTIVE_MARKERS[verb], re.MULTILINE)
    t0 = time.monotonic()
    proc = subprocess.Popen(cli_argv(*args), env=env or cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=cwd)
    seen = threading.Event()
    state = {"active_at": None, "text": ""}

    def read():
        buf = b""
        while chunk := os.read(proc.stdout.fileno(), 65536):
            buf = (buf + chunk)[-12000:]
            text = buf.decode("utf-8", "replace").replace("\r", "\n")
            if state["active_at"] is None and marker.search(text):
                state["active_at"] = time.monotonic() - t0
                seen.set()
            state["text"] = text
        seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed, children, survivors = False, [], []
    if kill_after_active is not None:
        seen.wait(timeout)
        try:
            proc.wait(timeout=kill_after_active)
        except subprocess.TimeoutExpired:
            children = descendants(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
    proc.wait(timeout=timeout)
    reader.join(timeout=30)
    proc.stdout.close()
    if killed:
        survivors = wait_gone(children, grace)
        for pid in survivors:             # leave the machine clean whatever the verdict
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return Watched(proc.returncode, state["text"][-6000:], state["active_at"], time.monotonic() - t0, killed,
                   len(children), len(survivors))


# ---------------------------------------------------------------------------------------------
# artifact scans: nothing half-written where a stage could read it
# ---------------------------------------------------------------------------------------------

APPEND_ONLY = {"train_log.jsonl", "generations.jsonl", "judgments.jsonl"}   # a torn last line is tolerated
TEMP_MARKERS = (".partial-", ".old-")


def is_temporary(path: Path, root: Path) -> bool:
    """Atomic writers' temporary names (``.NAME.XXXX.tmp``, ``.NAME.partial-XXXX``): invisible to readers."""
    for part in path.relative_to(root).parts:
        if part.startswith(".") and (part.endswith(".tmp") or any(m in part for m in TEMP_MARKERS)):
            return True
    return False


def _check_safetensors(path: Path) -> str | None:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                f.get_tensor(name)
    except Exception as e:  # any failure to read it back is the finding
        return f"{path}: unreadable safetensors ({type(e).__name__}: {str(e)[:120]})"
    return None


def _check_jsonl(path: Path) -> str | None:
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    torn = lines[-1] != b""
    body = lines[:-1]
    if torn and path.name not in APPEND_ONLY:
        return f"{path}: final-path JSONL without a trailing newline (cut short?)"
    for i, line in enumerate(body, start=1):
        if line.strip():
            try:
                json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return f"{path}:{i}: malformed JSON line at a final path"
    return None


def _check_checkpoint(ckpt: Path) -> str | None:
    import torch
    needed = ["adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "optimizer.pt",
              "scheduler.pt", "rng_state.pth"]
    missing = [n for n in needed if not (ckpt / n).exists()]
    if missing:
        return f"{ckpt}: marked complete but lacks {missing}"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        try:
            torch.load(ckpt / name, map_location="cpu", weights_only=False)
        except Exception as e:
            return f"{ckpt / name}: marked complete but unreadable ({type(e).__name__})"
    return None


@dataclass
class Scan:
    problems: list[str] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)
    complete_checkpoints: list[str] = field(default_factory=list)
    partial_checkpoints: list[str] = field(default_factory=list)
    files: int = 0

    def summary(self) -> dict:
        return {"files": self.files, "temporaries": len(self.temporaries),
                "complete_checkpoints": self.complete_checkpoints, "partial_checkpoints": self.partial_checkpoints,
                "problems": self.problems}


def scan_artifacts(root: Path) -> Scan:
    """Every artifact at a final path under ``root`` must read back whole:

    JSON parses; JSONL parses line by line (append-only logs/caches may have one torn last line, which their
    readers drop); safetensors open and every tensor loads; a checkpoint with its completeness marker has
    all its files and they load; an ``adapter/`` or merged-model dir is complete (manifest last); an eval dir
    with ``summary.json`` has a whole ``results.jsonl``; a pipeline stage recorded done has its outputs.
    Files inside an unmarked checkpoint are not read by anyone (resume deletes them) and are skipped.
    """
    scan = Scan()
    root = Path(root)
    if not root.exists():
        return scan
    unmarked = set()
    for ckpt in sorted(root.rglob("checkpoint-*")):
        if not ckpt.is_dir() or is_temporary(ckpt, root):
            continue
        if (ckpt / "cogumi-complete").exists():
            scan.complete_checkpoints.append(ckpt.name)
            if (p := _check_checkpoint(ckpt)):
                scan.problems.append(p)
        else:
            scan.partial_checkpoints.append(ckpt.name)
            unmarked.add(ckpt)
    for path in sorted(root.rglob("*")):
        if is_temporary(path, root):
            if path.parent == root or not is_temporary(path.parent, root):
                scan.temporaries.append(str(path.relative_to(root)))
            continue
        if not path.is_file() or any(c in path.parents for c in unmarked):
            continue
        scan.files += 1
        problem = None
        if path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                problem = f"{path}: JSON at a final path does not parse ({e})"
        elif path.suffix == ".jsonl":
            problem = _check_jsonl(path)
        elif path.suffix == ".safetensors":
            problem = _check_safetensors(path)
        elif path.suffix == ".yaml":
            import yaml
            try:
                yaml.safe_load(path.read_text(encoding="utf-8"))
            except Exception as e:
                problem = f"{path}: YAML at a final path does not parse ({type(e).__name__})"
        if problem:
            scan.problems.append(problem)
    for manifest in root.rglob("cogumi.json"):
        d = manifest.parent
        if is_temporary(d, root) or any(c in d.parents or c == d for c in unmarked):
            continue
        kind = (json.loads(manifest.read_text()) or {}).get("kind")
        if kind == "adapter":
            for n in ("adapter_config.json", "adapter_model.safetensors"):
                if not (d / n).exists():
                    scan.problems.append(f"{d}: adapter with a manifest but no {n}")
        if kind == "merged":
            index = d / "model.safetensors.index.json"
            shards = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else \
                {"model.safetensors"}
            for s in shards:
                if not (d / s).exists():
                    scan.problems.append(f"{d}: merged model with a manifest but no {s}")
    for summary in root.rglob("summary.json"):
        results = summary.parent / "results.jsonl"
        if is_temporary(summary, root) or not results.exists():
            continue
        data = json.loads(summary.read_text())
        tasks = data.get("tasks") or {}
        n = sum(t.get("n", 0) for t in tasks.values() if isinstance(t, dict))
        rows = sum(1 for line in results.read_text().splitlines() if line.strip())
        if "stages" not in data and n and rows != n:
            scan.problems.append(f"{summary}: says {n} items but {results.name} has {rows} rows")
    for record in root.rglob("stage.json"):
        rec = json.loads(record.read_text())
        if rec.get("status") != "done":
            continue
        run_dir = record.parents[2]
        for name, out in (rec.get("outputs") or {}).items():
            if not (run_dir / out["path"]).exists():
                scan.problems.append(f"{record}: stage done but its output {name} ({out['path']}) is missing")
    return scan


# ---------------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------------

def load_tensors(model_dir: Path, pattern: str = "*.safetensors") -> dict:
    from safetensors.torch import load_file
    tensors = {}
    for f in sorted(Path(model_dir).glob(pattern)):
        tensors.update(load_file(str(f)))
    return tensors


def assert_same_tensors(a: Path, b: Path, pattern: str = "*.safetensors") -> int:
    import torch
    ta, tb = load_tensors(a, pattern), load_tensors(b, pattern)
    assert ta and ta.keys() == tb.keys(), f"{a} vs {b}: different tensor names"
    for name in ta:
        assert torch.equal(ta[name], tb[name]), f"{a} vs {b}: tensor {name} differs"
    return len(ta)


def tree_hash(root: Path) -> str:
    """Names, sizes and contents of every file under ``root`` (or the file itself)."""
    h = hashlib.sha256()
    root = Path(root)
    paths = [root] if root.is_file() else sorted(root.rglob("*"))
    base = root.parent if root.is_file() else root   # a tree's own root: two copies of one tree hash alike
    for p in paths:
        if p.is_file() or p.is_symlink():
            h.update(str(p.relative_to(base)).encode() + b"\0")
            h.update(p.read_bytes() if p.is_file() else os.readlink(p).encode())
        elif p.is_dir():
            h.update(str(p.relative_to(base)).encode() + b"/\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# shared inputs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def adv_data(tmp_path_factory) -> dict[str, Path]:
    """Synthetic training data and benchmark files in their own formats, plus reference predictions."""
    from cogumi.tiny import synthetic_gsm8k, synthetic_humaneval, synthetic_instructions, synthetic_mbpp, write_jsonl
    d = tmp_path_factory.mktemp("adv-data")
    gsm = synthetic_gsm8k("test")
    mbpp = synthetic_mbpp("test")
    files = {
        "train": write_jsonl(d / "train.jsonl", synthetic_instructions(48, seed=0)),
        "gsm8k": write_jsonl(d / "gsm8k.jsonl", gsm),
        "mbpp": write_jsonl(d / "mbpp.jsonl", mbpp),
        "humaneval": write_jsonl(d / "humaneval.jsonl", synthetic_humaneval()),
    }
    ref = [{"task": "gsm8k", "task_id": str(i), "completion": r["answer"]} for i, r in enumerate(gsm)]
    ref += [{"task": "mbpp", "task_id": str(r["task_id"]), "completion": f"```python\n{r['code']}\n```"}
            for r in mbpp]
    files["reference"] = write_jsonl(d / "reference.jsonl", ref)
    return files


@dataclass
class Reference:
    path: Path
    seconds: float                # the active part of its wall time (see ACTIVE_MARKERS)


EVAL_N = 8           # per task; answers are cached every 8 generations, so a kill can land between two chunks


def eval_args(model, data, out) -> list:
    return ["eval", model, "--tasks", "gsm8k,mbpp", "--data", f"gsm8k={data['gsm8k']}",
            "--data", f"mbpp={data['mbpp']}", "--n", EVAL_N, "--reference", data["reference"],
            "--max-new-tokens", 24, "--batch-size", 1, "--timeout", 5, "--out", out]


def shared_reference(tmp_path_factory, name: str, verb: str, args_for) -> Reference:
    """An uninterrupted ``cogumi VERB`` run, built once per test session even under pytest-xdist (the workers
    share their basetemp's parent, and a file lock lets one of them build while the others wait)."""
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "adversarial-shared"
    root.mkdir(exist_ok=True)
    record = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if record.exists():
            info = json.loads(record.read_text())
            return Reference(Path(info["path"]), info["seconds"])
        out = root / name
        shutil.rmtree(out, ignore_errors=True)
        run = run_watched(args_for(out), verb=verb)
        assert run.returncode == 0 and run.active_s, f"reference `cogumi {verb}` failed:\n{run.output[-3000:]}"
        record.write_text(json.dumps({"path": str(out), "seconds": run.active_s}))
        return Reference(out, run.active_s)


@pytest.fixture(scope="session")
def train_reference(tmp_path_factory, tiny_base, adv_data) -> Reference:
    """One uninterrupted ``cogumi train`` (6 steps, checkpoints every 2) through the CLI: what every
    interrupted-and-resumed training run must equal, tensor for tensor."""
    return shared_reference(tmp_path_factory, "train-ref", "train",
                            lambda out: train_args(tiny_base, adv_data["train"], out))


@pytest.fixture(scope="session")
def merge_reference(tmp_path_factory, train_reference) -> Reference:
    """``cogumi merge`` of the reference adapter, uninterrupted."""
    return shared_reference(tmp_path_factory, "merge-ref", "merge",
                            lambda out: ["merge", train_reference.path / "adapter", "--out", out])


@pytest.fixture(scope="session")
def eval_reference(tmp_path_factory, merge_reference, adv_data) -> Reference:
    """``cogumi eval`` of the reference merged model on GSM8K + MBPP items, uninterrupted."""
    return shared_reference(tmp_path_factory, "eval-ref", "eval",
                            lambda out: eval_args(merge_reference.path, adv_data, out))
