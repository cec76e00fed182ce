"""Hostile model-written code through ``cogumi score`` (the real CLI, a subprocess), in MBPP and HumanEval format.

The corpus in ``hostile/`` (one attack per file, beyond tests/evaluation/hostile/) goes after what the
sandbox promises: fake passes (the harness's own globals, ``==`` checkers that hide where they came from,
audit hooks, gc callbacks, finalizers, signal timers and threads that re-patch during the tests, forged
result lines), escapes (``__subclasses__`` to FileIO / a fresh ``posix``, ``_ctypes`` loaded by file path,
pidfd signals, /proc walks of the parent, dir_fd and chdir escapes, renames and truncation outside, mmap,
shared memory, AF_UNIX and every stdlib network client, TIOCSTI, kernel knobs, persistence in
site-packages) and harness attacks (cleanup symlink traps, 2000-deep trees, recursion in the report,
200 MB exception messages, binary output floods, exits from threads and faulthandler).

The arena (``Arena``) plants targets and watches them: a watched directory and a sentinel file, a fake
home with an ssh key holding a secret, a victim process that logs every signal it gets (and has the secret
in its environment), TCP (IPv4 and IPv6), UDP, a Unix path socket and an abstract one, all on loopback; the
CLI runs with the secret in its environment and its TMPDIR inside the arena. Then:
  * every program is scored failed (``correct: false``) with a reason, none as an infrastructure error;
  * 0 escapes: no watched file changed, no escape file anywhere, no signal reached the victim, no
    connection or datagram arrived, no process survived, the secret is in no output, the harness's
    temporary dirs are gone;
  * the harness survives: an honest control program before and after the corpus passes.
The default run scores every program once (a seeded half as MBPP, the rest as HumanEval); ``-m slow``
scores all of them in both formats.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from hostile_support import load_corpus, tree_snapshot

from .conftest import cli, cli_env, report, sample

HOSTILE = Path(__file__).parent / "hostile"
TIMEOUT = 3.0
SECRET_NAME = "OPENAI_API_KEY"
HONEST = "def solve(x):\n    return 2 * x\n"
# Like the real benchmarks' tests: == asserts on literals (MBPP's test_list, HumanEval's check()).
MBPP_TESTS = ["assert solve(2) == 4", "assert solve(3) == 6", "assert solve(-1) == -2"]
HE_PROMPT = 'def solve(x):\n    """Return twice x."""\n'
HE_TEST = ("METADATA = {}\n\ndef check(candidate):\n    assert candidate(2) == 4\n"
           "    assert candidate(3) == 6\n    assert candidate(-1) == -2\n")

VICTIM = r"""
import signal, sys, time
log = sys.argv[1]
def record(signum, frame):
    with open(log, "a") as f:
        f.write(f"{signum}\n")
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH,
          signal.SIGCONT, signal.SIGALRM, signal.SIGQUIT, signal.SIGPIPE):
    signal.signal(s, record)
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def corpus() -> dict[str, tuple[str, set[str]]]:
    return load_corpus(HOSTILE)


def _listener(family, kind, address):
    s = socket.socket(family, kind)
    s.bind(address)
    if kind == socket.SOCK_STREAM:
        s.listen(64)
    s.setblocking(False)
    return s


class Arena:
    """Targets the corpus aims at, and the checks that none was hit."""

    def __init__(self, base: Path):
        self.base = base
        self.token = secrets.token_hex(6)
        self.secret = f"sk-cogumi-ADV-{secrets.token_hex(16)}"
        self.watched = base / "watched"
        (self.watched / "subdir").mkdir(parents=True)
        (self.watched / "keep.txt").write_text("keep me\n")
        (self.watched / "subdir" / "nested.txt").write_text("nested\n")
        self.sentinel = base / "sentinel.txt"
        self.sentinel.write_text("sentinel\n")
        self.home = base / "home"
        for rel in (".ssh/id_rsa", ".aws/credentials", ".netrc"):
            (self.home / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.home / rel).write_text(f"{SECRET_NAME}={self.secret}\n")
        self.tmp = base / "cli-tmp"          # the CLI's TMPDIR: every sandbox dir lives under it
        self.tmp.mkdir()
        self.signal_log = base / "victim-signals.log"
        self.signal_log.write_text("")
        self.before = tree_snapshot(self.watched, self.sentinel, self.home)
        self.victim = subprocess.Popen([sys.executable, "-c", VICTIM, str(self.signal_log)],
                                       env=dict(os.environ, **{SECRET_NAME: self.secret}), start_new_session=True,
                                       stdout=subprocess.PIPE)
        assert self.victim.stdout.readline().strip() == b"ready"
        self.listeners = {"tcp4": _listener(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0)),
                          "udp4": _listener(socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0))}
        try:
            self.listeners["tcp6"] = _listener(socket.AF_INET6, socket.SOCK_STREAM, ("::1", 0))
        except OSError:
            pass
        self.unix_path = str(base / "arena.sock")
        self.listeners["unix"] = _listener(socket.AF_UNIX, socket.SOCK_STREAM, self.unix_path)
        os.chmod(self.unix_path, 0o777)
        self.unix_abstract = f"cogumi-adv-{self.token}"
        self.listeners["abstract"] = _listener(socket.AF_UNIX, socket.SOCK_STREAM, "\0" + self.unix_abstract)
        self.escape_dirs = [Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path(sysconfig.get_paths()["purelib"]),
                            Path(sysconfig.get_paths()["stdlib"]), base]

    def prelude(self) -> str:
        port6 = self.listeners["tcp6"].getsockname()[1] if "tcp6" in self.listeners else None
        return (f"import math\nWATCHED = {str(self.watched)!r}\nSENTINEL = {str(self.sentinel)!r}\n"
                f"FAKE_HOME = {str(self.home)!r}\nVICTIM_PID = {self.victim.pid}\nPARENT_PID = {os.getpid()}\n"
                f"PORT = {self.listeners['tcp4'].getsockname()[1]}\nPORT6 = {port6}\n"
                f"UDP_PORT = {self.listeners['udp4'].getsockname()[1]}\nUNIX_PATH = {self.unix_path!r}\n"
                f"UNIX_ABSTRACT = {self.unix_abstract!r}\nTOKEN = {self.token!r}\nSECRET_NAME = {SECRET_NAME!r}\n"
                "_ESCAPES = []\n"
                "def escaped(what):\n    _ESCAPES.append(what)\n    print('ESCAPED:' + what, flush=True)\n")

    def program(self, body: str) -> str:
        return self.prelude() + body + "\nif _ESCAPES:\n    raise RuntimeError('ESCAPED:' + ','.join(_ESCAPES))\n"

    def env(self) -> dict:
        return cli_env(**{SECRET_NAME: self.secret, "HF_TOKEN": self.secret, "TMPDIR": str(self.tmp),
                          "HOME": str(self.home), "COGUMI_SANDBOX_TAG": self.token})

    # -- checks ----------------------------------------------------------------------------
    def escapes(self) -> list[str]:
        found = []
        if tree_snapshot(self.watched, self.sentinel, self.home) != self.before:
            found.append("a watched file, the sentinel or the fake home changed")
        for d in self.escape_dirs:
            try:
                hits = [p for p in d.iterdir() if self.token in p.name]
            except OSError:
                continue
            for p in hits:
                found.append(f"escape file {p}")
                if p.is_file():
                    p.unlink()
        if self.victim.poll() is not None:
            found.append("the victim process was killed")
        elif _proc_state(self.victim.pid) in ("T", "t"):
            found.append("the victim process was stopped")
            os.kill(self.victim.pid, signal.SIGCONT)
        if self.signal_log.read_text().strip():
            found.append(f"the victim received signals {self.signal_log.read_text().split()}")
        for name, s in self.listeners.items():
            try:
                if s.type == socket.SOCK_STREAM:
                    s.accept()
                else:
                    s.recvfrom(100)
                found.append(f"a connection/datagram reached the {name} listener")
            except BlockingIOError:
                pass
        survivors = processes_under(self.tmp) + tagged_processes(f"cogumi-sandbox-{self.token}")
        if survivors:
            found.append(f"{len(survivors)} sandboxed process(es) survived: {survivors}")
            for pid in survivors:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        leftovers = list(self.tmp.iterdir())
        if leftovers:
            found.append(f"the harness left {len(leftovers)} temporary dir(s) behind: {leftovers[:3]}")
        return found

    def close(self) -> None:
        self.victim.kill()
        self.victim.wait()
        for s in self.listeners.values():
            s.close()


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def processes_under(root: Path) -> list[int]:
    """Live processes whose working directory is (or was) under ``root``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd.startswith(str(root)) and _proc_state(int(entry)) not in (None, "Z", "X"):
            found.append(int(entry))
    return found


def tagged_processes(tag: str) -> list[int]:
    """Live processes carrying ``tag`` in their command line (every sandbox process carries its run's tag)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if tag.encode() in Path(f"/proc/{entry}/cmdline").read_bytes() \
                        and _proc_state(int(entry)) not in (None, "Z", "X"):
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    if sys.platform != "linux":
        pytest.skip("the sandbox's isolation layers are Linux-specific")
    a = Arena(tmp_path_factory.mktemp("arena"))
    yield a
    a.close()


def score_corpus(arena: Arena, work: Path, names: list[str], task: str) -> tuple[dict, subprocess.CompletedProcess, str]:
    """Score ``names`` (plus an honest control first and last) as TASK predictions through ``cogumi score``."""
    progs = corpus()
    order = ["control-first", *names, "control-last"]
    bodies = {"control-first": HONEST, "control-last": HONEST, **{n: progs[n][0] for n in names}}
    data, preds = [], []
    for i, name in enumerate(order):
        completion = f"```python\n{arena.program(bodies[name])}\n```"
        if task == "mbpp":
            data.append({"task_id": 1000 + i, "text": f"hostile: {name}", "code": "def solve(x):\n    return 2 * x",
                         "test_list": MBPP_TESTS, "test_setup_code": "import math", "challenge_test_list": []})
            preds.append({"task_id": 1000 + i, "completion": completion})
        else:
            data.append({"task_id": f"HumanEval/{i}", "prompt": HE_PROMPT, "canonical_solution": "    return 2 * x\n",
                         "test": HE_TEST, "entry_point": "solve"})
            preds.append({"task_id": f"HumanEval/{i}", "completion": completion})
    work.mkdir(parents=True, exist_ok=True)
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (work / "preds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))
    out = work / "results.jsonl"
    proc = cli("score", "--task", task, "--data", work / "data.jsonl", "--predictions", work / "preds.jsonl",
               "--out", out, "--workers", 4, "--timeout", TIMEOUT, env=arena.env(), timeout=900)
    assert proc.returncode == 0, f"the harness did not survive the corpus:\n{proc.stderr[-3000:]}"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [d["task_id"] for d in data]
    by_id = {str(r["task_id"]): r for r in rows}
    return {name: by_id[str(tid)] for name, tid in zip(order, ids)}, proc, out.read_text()


def check_scored(arena: Arena, rows: dict, proc, results_text: str, task: str) -> None:
    problems = []
    for control in ("control-first", "control-last"):
        if rows[control]["correct"] is not True:
            problems.append(f"{control}: the honest program did not pass ({rows[control]['reason']})")
    for name, row in rows.items():
        if name.startswith("control"):
            continue
        if row["correct"] is not False:
            problems.append(f"{name}: scored {row['correct']!r} ({row['reason']})")
        elif row["infra_error"] is not None:
            problems.append(f"{name}: blamed on the infrastructure ({row['infra_error']})")
        elif not row["reason"] or "ESCAPED" in row["reason"]:
            problems.append(f"{name}: reason {row['reason']!r}")
        elif row["reason"].startswith("passed"):
            problems.append(f"{name}: failed, but its reason says {row['reason']!r}: the program wrote its own "
                            "verdict into the harness's result file")
        if len(row["reason"] or "") > 2000:
            problems.append(f"{name}: a {len(row['reason'])}-character reason (the row must stay small)")
    for where, text in (("results.jsonl", results_text), ("stdout", proc.stdout), ("stderr", proc.stderr)):
        if arena.secret in text:
            problems.append(f"the planted secret reached {where}")
    escapes = arena.escapes()
    report("hostile", {"task": task, "programs": len(rows) - 2, "problems": problems, "escapes": escapes,
                       "reasons": {n: r["reason"][:160] for n, r in rows.items()}})
    assert not escapes, f"ESCAPES: {escapes}"
    assert not problems, "\n".join(problems)


def test_corpus_is_large_and_new():
    progs = corpus()
    first_corpus = {p.stem for p in (HOSTILE.parents[1] / "evaluation" / "hostile").glob("*.py")}
    assert len(progs) >= 30 and not set(progs) & first_corpus
    for name, (text, tags) in progs.items():
        assert text.startswith('"""') and tags <= {"cheat", "escape"} and tags, name


@pytest.mark.parametrize("name", [n for n, (_, tags) in corpus().items() if "cheat" in tags])
def test_fake_pass_trick_is_scored_failed(name):
    """Each cheat alone, straight through the sandbox (fast, and names the trick when one gets through)."""
    from cogumi.evaluation.sandbox import run_python
    body = corpus()[name][0]
    prelude = ("import math\nWATCHED = SENTINEL = FAKE_HOME = UNIX_PATH = UNIX_ABSTRACT = TOKEN = '/nonexistent'\n"
               "VICTIM_PID = PARENT_PID = 1\nPORT = PORT6 = UDP_PORT = 9\nSECRET_NAME = 'X'\n"
               "def escaped(what):\n    print('ESCAPED:' + what)\n")
    res = run_python(prelude + body, "import math\n" + "\n".join(MBPP_TESTS), timeout=TIMEOUT)
    assert res.status in ("failed", "timeout"), f"{name} faked a pass: {res.status} ({res.detail})"


def test_sample_is_contained_and_scored_failed(arena, tmp_path):
    """Every program once, in a seeded half MBPP / half HumanEval split (the full set runs both formats)."""
    names = list(corpus())
    as_mbpp = set(sample(names, len(names) // 2, "hostile-format"))
    by_task = {"mbpp": [n for n in names if n in as_mbpp], "humaneval": [n for n in names if n not in as_mbpp]}
    for task, chosen in by_task.items():
        rows, proc, text = score_corpus(arena, tmp_path / task, chosen, task)
        check_scored(arena, rows, proc, text, task)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["mbpp", "humaneval"])
def test_full_corpus_is_contained_and_scored_failed(arena, tmp_path, task):
    names = list(corpus())
    assert len(names) >= 30
    rows, proc, text = score_corpus(arena, tmp_path / task, names, task)
    check_scored(arena, rows, proc, text, task)
