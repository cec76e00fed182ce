"""The sandbox against hostile programs (tests/evaluation/hostile/, one attack kind per file).

Each hostile program gets a prelude naming real targets -- a watched directory, a sentinel file, a victim
process, a TCP and a UDP listener on loopback, the test process's pid -- and a planted fake
OPENAI_API_KEY in the parent's environment and in the victim's. A program calls ``escaped(what)`` when
an attack step *succeeded*. Then, for the whole corpus run through ``cogumi score`` (the production path)
and again for the escape attempts with layers switched off:
  * every program is scored failed with a reason, within the timeout, none as an infrastructure error;
  * no file outside the sandbox changed, no escape file exists, the victim lives, no connection or
    datagram arrived, no process carrying the run's marker survives, the secret appears nowhere.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile_support import load_corpus, tree_snapshot

from cogumi.cli import main
from cogumi.evaluation import sandbox
from cogumi.evaluation.sandbox import Limits, Policy, run_many, run_python

HOSTILE = Path(__file__).parent / "hostile"
TIMEOUT = 3.0
SECRET_NAME = "OPENAI_API_KEY"
TESTS = ["assert solve(2) == 4", "assert abs(solve(3) - 6) < 1e-9", "assert math.isclose(solve(1), 2)"]


def hostile_programs() -> dict[str, tuple[str, set[str]]]:
    return load_corpus(HOSTILE)


def _processes_with(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


class Arena:
    """The targets hostile programs aim at, and the checks that nothing was hit."""

    def __init__(self, base: Path):
        self.token = secrets.token_hex(6)
        self.secret = f"sk-cogumi-FAKE-{secrets.token_hex(12)}"
        self.watched = base / "watched"
        (self.watched / "subdir").mkdir(parents=True)
        (self.watched / "keep.txt").write_text("keep me\n")
        (self.watched / "subdir" / "nested.txt").write_text("nested\n")
        self.sentinel = base / "sentinel.txt"
        self.sentinel.write_text("sentinel\n")
        self.before = tree_snapshot(self.watched, self.sentinel)
        env = dict(os.environ, **{SECRET_NAME: self.secret})
        self.victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env,
                                       start_new_session=True)
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(16)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))

    def prelude(self) -> str:
        return (f"import math\nWATCHED = {str(self.watched)!r}\nSENTINEL = {str(self.sentinel)!r}\n"
                f"VICTIM_PID = {self.victim.pid}\nPARENT_PID = {os.getpid()}\nPORT = {self.tcp.getsockname()[1]}\n"
                f"UDP_PORT = {self.udp.getsockname()[1]}\nTOKEN = {self.token!r}\nSECRET_NAME = {SECRET_NAME!r}\n"
                "_ESCAPES = []\n"
                "def escaped(what):\n    _ESCAPES.append(what)\n    print('ESCAPED:' + what, flush=True)\n")

    def program(self, body: str) -> str:
        return (self.prelude() + body +
                "\nif _ESCAPES:\n    raise RuntimeError('ESCAPED:' + ','.join(_ESCAPES))\n")

    def assert_untouched(self) -> None:
        assert tree_snapshot(self.watched, self.sentinel) == self.before, "a file outside the sandbox changed"
        assert not list(Path("/tmp").glob(f"cogumi-escape-{self.token}*")), "an escape file was created in /tmp"
        assert not list(Path("/dev/shm").glob(f"cogumi-escape-{self.token}*"))
        assert self.victim.poll() is None, "the victim process was killed"
        assert _proc_state(self.victim.pid) not in ("T", "t"), "the victim process was stopped"
        self.tcp.setblocking(False)
        with pytest.raises(BlockingIOError):
            self.tcp.accept()  # the kernel completes handshakes on its own: any connect would be queued here
        self.udp.setblocking(False)
        with pytest.raises(BlockingIOError):
            self.udp.recvfrom(100)
        assert not _processes_with(self.token), "a process spawned by a hostile program survived"

    def close(self) -> None:
        self.victim.kill()
        self.victim.wait()
        self.tcp.close()
        self.udp.close()


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    if sys.platform != "linux":
        pytest.skip("the sandbox's isolation layers are Linux-specific")
    a = Arena(tmp_path_factory.mktemp("arena"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SECRET_NAME, a.secret)
        # every sandboxed process of this module carries the arena token in its cmdline
        mp.setattr(sandbox, "MARKER_PREFIX", f"cogumi-sandbox-{a.token}-")
        yield a
    a.close()


@pytest.fixture(scope="module")
def corpus_via_score(arena, tmp_path_factory):
    """The whole hostile corpus scored as MBPP predictions through `cogumi score` (plus one honest control)."""
    progs = hostile_programs()
    assert len(progs) >= 30, "issue 7 asks for at least 30 hostile programs"
    d = tmp_path_factory.mktemp("score")
    names = ["control", *progs]
    bodies = ["def solve(x):\n    return 2 * x\n", *(text for text, _ in progs.values())]
    data = [{"task_id": 1000 + i, "text": f"hostile: {name}", "code": "def solve(x):\n    return 2 * x",
             "test_list": TESTS, "test_setup_code": "import math", "challenge_test_list": []}
            for i, name in enumerate(names)]
    preds = [{"task_id": 1000 + i, "completion": f"```python\n{arena.program(body)}\n```"}
             for i, body in enumerate(bodies)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (d / "preds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))
    start = time.monotonic()
    rc = main(["score", "--task", "mbpp", "--data", str(d / "data.jsonl"), "--predictions", str(d / "preds.jsonl"),
               "--out", str(d / "results.jsonl"), "--workers", "6", "--timeout", str(TIMEOUT)])
    elapsed = time.monotonic() - start
    assert rc == 0
    rows = [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]
    return {name: row for name, row in zip(names, rows)}, (d / "results.jsonl").read_text(), elapsed


def test_corpus_is_scored_failed_and_contained(arena, corpus_via_score, capsys):
    rows, results_text, elapsed = corpus_via_score
    assert rows["control"]["correct"] is True, rows["control"]["reason"]
    for name, row in rows.items():
        if name == "control":
            continue
        assert row["correct"] is False, f"{name}: {row['reason']}"
        assert row["infra_error"] is None, f"{name} was blamed on the infrastructure: {row['infra_error']}"
        assert row["reason"] and "ESCAPED" not in row["reason"], f"{name}: {row['reason']}"
    assert arena.secret not in results_text, "the planted secret reached results.jsonl"
    arena.assert_untouched()
    # 54 programs, ~15 of them run into the 3 s timeout; 6 at a time.
    assert elapsed < 60, f"the hostile corpus took {elapsed:.0f}s"


@pytest.mark.parametrize("name, expected", [
    ("exit0_before_asserts", "SystemExit"), ("os_exit0", "exited (code 0)"), ("fake_pass_output", "exited (code 0)"),
    ("monkeypatch_builtins", "AssertionError at tests line"), ("always_equal", "at tests line 2: assert solve(2) == 4"),
    ("always_equal_int", "at tests line 2: assert solve(2) == 4"),
    ("redefine_test_names", "AssertionError"),
    ("infinite_loop", "timeout"), ("memory_bomb", "MemoryError|timeout"), ("recursion_crash", "SIGSEGV"),
    ("fork_bomb", "not allowed"), ("ctypes_libc", "import ctypes"), ("nonce_frame_walk", "exited (code 0)"),
    ("socket_connect", "AssertionError"), ("evil_exception_str", "timeout"), ("input_block", "EOFError"),
])
def test_reasons_name_what_happened(corpus_via_score, name, expected):
    rows, _, _ = corpus_via_score
    assert any(e in rows[name]["reason"] for e in expected.split("|")), rows[name]["reason"]


ONLY_KERNEL = Policy(audit=False)                                     # namespaces + landlock + seccomp + rlimits
ONLY_AUDIT = Policy(namespaces=False, landlock=False, seccomp=False)  # the fallback: audit hook + rlimits


@pytest.mark.parametrize("policy", [ONLY_KERNEL, ONLY_AUDIT], ids=["kernel-layers-only", "audit-hook-only"])
def test_escapes_contained_by_each_layer_alone(arena, policy):
    if policy is ONLY_KERNEL:
        layers = sandbox.isolation()
        if not {"landlock", "seccomp"} <= {x.rstrip("0123456789") for x in layers}:
            pytest.skip(f"kernel layers not available here ({layers})")
    progs = {n: text for n, (text, tags) in hostile_programs().items() if "escape" in tags}
    jobs = [(arena.program(text), "import math\n" + "\n".join(TESTS)) for text in progs.values()]
    results = run_many(jobs, timeout=TIMEOUT, workers=6, policy=policy, limits=Limits(memory_mb=1024))
    for name, res in zip(progs, results):
        assert res.status in ("failed", "timeout"), f"{name}: {res.status} {res.detail}"
        assert "ESCAPED" not in res.stdout + res.detail, f"{name} escaped: {res.stdout[-300:]} {res.detail}"
        assert arena.secret not in res.stdout + res.stderr + res.detail, f"{name} read the secret"
        assert res.survivors == 0
        assert res.wall_s < TIMEOUT + 2, f"{name} took {res.wall_s:.1f}s"
    arena.assert_untouched()


def test_harness_keeps_working_after_the_corpus(arena, corpus_via_score):
    res = run_python("def f(x):\n    return x + 1\n", "assert f(1) == 2", timeout=10)
    assert res.passed, res.detail


def test_layers_reported_and_environment_scrubbed(arena):
    res = run_python("import os, json\nprint(json.dumps(dict(os.environ)))", "", timeout=10)
    assert res.passed, res.detail
    env = json.loads(res.stdout)
    assert SECRET_NAME not in env and arena.secret not in res.stdout
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE"}
    assert "rlimits" in res.layers and "audit" in res.layers


def test_program_may_use_its_work_dir_and_threads():
    program = ("import threading, tempfile, os\nout = []\n"
               "t = threading.Thread(target=lambda: out.append(1)); t.start(); t.join()\n"
               "open('scratch.txt', 'w').write('ok')\nfd, p = tempfile.mkstemp()\n"
               "def solve():\n    return open('scratch.txt').read() + str(out[0])\n")
    res = run_python(program, "assert solve() == 'ok1'", timeout=10)
    assert res.passed, res.detail


def test_result_statuses():
    assert run_python("x = 1", "assert x == 2", timeout=5).detail.startswith("AssertionError at tests line 1")
    assert run_python("def f(:", "", timeout=5).detail.startswith("SyntaxError")
    slow = run_python("import time\ntime.sleep(30)", "", timeout=1)
    assert slow.status == "timeout" and "sleeping" in slow.detail and slow.wall_s < 3
    missing = run_python("x = 1", "", timeout=5, python="/nonexistent/python")
    assert missing.status == "infra_error"


def test_starved_timeout_is_an_infrastructure_error(monkeypatch):
    # A program that is runnable but got almost no CPU at the deadline was starved by the machine.
    monkeypatch.setattr(sandbox, "_usage", lambda pids: sandbox._Usage(0.01, "R", 0.9, 0))
    res = run_python("while True:\n    pass", "", timeout=1)
    assert res.status == "infra_error" and "overloaded" in res.detail


def test_output_is_capped():
    res = run_python("print('a' * 100_000)\nprint('END')", "", timeout=10, limits=Limits(keep_output=1000))
    assert res.passed
    assert len(res.stdout) < 1200 and res.stdout.rstrip().endswith("END") and "cut" in res.stdout


def test_files_never_written_outside_the_temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox.tempfile, "tempdir", str(tmp_path))
    res = run_python("open('inside.txt', 'w').write('x')", "", timeout=10)
    assert res.passed, res.detail
    assert list(tmp_path.iterdir()) == [], "the sandbox's temporary dir was not removed"


def test_group_killed_when_runner_hangs_in_reporting(monkeypatch):
    # the wall clock also covers the harness's own code inside the child (here: an endless __str__)
    res = run_python("class E(Exception):\n    def __str__(self):\n        while True: pass\nraise E()", "", timeout=1)
    assert res.status == "timeout" and res.survivors == 0


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")
def test_run_many_keeps_order_and_runs_in_parallel():
    jobs = [(f"x = {i}", f"assert x == {i}") for i in range(8)] + [("x = 0", "assert x == 1")]
    results = run_many(jobs, timeout=10, workers=4)
    assert [r.passed for r in results] == [True] * 8 + [False]
