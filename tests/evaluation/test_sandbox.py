"""The sandbox: verdicts computed out of the candidate's reach, a jail around its code, nothing lost.

Three parts:
  * the hostile corpus (tests/evaluation/hostile/, one attack per file) through ``cogumi score`` and
    again with layers switched off: every program scored failed with a reason, nothing outside touched,
    no sandbox process left (every one carries the arena's tag in its command line);
  * the harness's semantics: liars, patched builtins/stdlib, prompt helpers, exceptions, generators,
    handles, the candidate's process dying or forging the protocol -- each a case that could pass falsely
    (or fail an honest solution) if the verdict were computed where the candidate runs;
  * the jail's layers, reported and real (a thread bomb cannot exhaust the host's processes, no host
    socket is visible, the disk cannot fill), and the run survives any one item.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
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
from cogumi.evaluation.sandbox import CodeJob, Limits, Policy, run_many, run_python, slots, wire

HOSTILE = Path(__file__).parent / "hostile"
TIMEOUT = 3.0
SECRET_NAME = "OPENAI_API_KEY"
TESTS = ["assert solve(2) == 4", "assert abs(solve(3) - 6) < 1e-9", "assert math.isclose(solve(1), 2)"]
FULL_JAIL = {"userns", "mountns", "tmpfs", "pidns", "netns", "nproc", "rlimits", "seccomp", "nocaps", "harness"}

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the jail is Linux-specific")


def sandbox_processes(tag: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if f"cogumi-sandbox-{tag}".encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
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
        assert not sandbox_processes(self.token), "a sandbox process outlived its run"

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
        mp.setenv("COGUMI_SANDBOX_TAG", a.token)  # every sandbox process of this module carries it
        yield a
    a.close()


@pytest.fixture(scope="module")
def corpus_via_score(arena, tmp_path_factory):
    """The whole hostile corpus scored as MBPP predictions through `cogumi score` (plus one honest control)."""
    progs = load_corpus(HOSTILE)
    assert len(progs) >= 30
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
               "--out", str(d / "results.jsonl"), "--workers", "4", "--timeout", str(TIMEOUT)])
    elapsed = time.monotonic() - start
    assert rc == 0
    rows = [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]
    return {name: row for name, row in zip(names, rows)}, (d / "results.jsonl").read_text(), elapsed


def test_corpus_is_scored_failed_and_contained(arena, corpus_via_score):
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
    assert elapsed < 90, f"the hostile corpus took {elapsed:.0f}s"


@pytest.mark.parametrize("name, expected", [
    ("exit0_before_asserts", "SystemExit"), ("always_equal", "candidate's own type"),
    ("always_equal_int", "candidate's own type"), ("monkeypatch_builtins", "AssertionError at tests line|broke the protocol"),
    ("redefine_test_names", "AssertionError"), ("infinite_loop", "timeout"), ("memory_bomb", "MemoryError|ended|timeout"),
    ("fork_bomb", "Operation not permitted"), ("socket_connect", "AssertionError"), ("input_block", "EOFError"),
])
def test_reasons_name_what_happened(corpus_via_score, name, expected):
    rows, _, _ = corpus_via_score
    assert any(e in rows[name]["reason"] for e in expected.split("|")), rows[name]["reason"]


@linux_only
@pytest.mark.parametrize("policy", [Policy(landlock=False, seccomp=False, drop_capabilities=False),
                                    Policy(launcher="none")], ids=["namespace-jail-only", "per-item-layers-only"])
def test_escapes_contained_by_each_part_alone(arena, policy):
    if policy.launcher == "auto" and shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is not installed: ./dev installs it (apt-get install bubblewrap)")
    progs = {n: text for n, (text, tags) in load_corpus(HOSTILE).items() if "escape" in tags}
    jobs = [CodeJob(arena.program(text), "\n".join(TESTS), "import math") for text in progs.values()]
    results = run_many(jobs, timeout=TIMEOUT, workers=4, policy=policy, limits=Limits(memory_mb=1024))
    for name, res in zip(progs, results):
        # without seccomp a program may stop its own zygote (same uid inside the jail): its slot is replaced
        # and the item is an infrastructure error -- never a pass, and nothing outside is touched
        allowed = ("failed", "timeout") if policy.seccomp else ("failed", "timeout", "infra_error")
        assert res.status in allowed, f"{name}: {res.status} {res.detail}"
        if policy.seccomp:  # without seccomp a step may succeed inside the jail (a shell there): harmless
            assert "ESCAPED" not in res.detail, f"{name} escaped: {res.detail}"
        assert arena.secret not in res.detail, f"{name} read the secret"
        # without seccomp a program may stop its own zygote (its slot is replaced after the control timeout);
        # without the jail's tmpfs, what a program wrote is on the host and its removal is part of the item
        full = policy.seccomp and policy.launcher == "auto"
        limit = TIMEOUT + 3 if full else TIMEOUT + slots.CONTROL_TIMEOUT + 3
        assert res.wall_s < limit, f"{name} took {res.wall_s:.1f}s"
    arena.assert_untouched()


def test_environment_is_scrubbed(arena):
    res = run_python("import os\nENV = dict(os.environ)\n",
                     f"assert {SECRET_NAME!r} not in ENV and not any({arena.secret!r} in v for v in ENV.values())\n"
                     "assert set(ENV) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'LC_ALL', 'PYTHONHASHSEED', "
                     "'PYTHONDONTWRITEBYTECODE', 'COGUMI_CONTROL_FD', 'COGUMI_JAIL_PIDNS', 'COGUMI_JAIL_OWN_TMPFS', "
                     "'COGUMI_JAIL_WORK', 'PWD'}", timeout=10)
    assert res.passed, res.detail


# ---------------------------------------------------------------------------------------------
# the harness: what crosses, and what the verdict rests on
# ---------------------------------------------------------------------------------------------

HARNESS_CASES = {
    # name: (program, tests, setup, entry points, expected status)
    "float subclass whose difference is zero": (
        "class F(float):\n    def __sub__(s, o): return 0.0\n    def __eq__(s, o): return True\n"
        "def f(x): return F(1.0)\n", "assert abs(f(1) - 2.0) < 1e-6", "", (), "failed"),
    "always-equal objects in a plain tuple": (
        "class A:\n    def __eq__(s, o): return True\ndef f(x): return (A(), A())\n", "assert f(1) == (1, 2)",
        "", (), "failed"),
    "liar inside a Fraction": (
        "from fractions import Fraction\nclass I(int):\n    def __eq__(s, o): return True\n"
        "def f(x): return Fraction(I(3), 1)\n", "assert f(1) == 7", "", (), "failed"),
    "liar inside a UserList": (
        "from collections import UserList\nclass A:\n    def __eq__(s, o): return True\n"
        "def f(x): return UserList([A()])\n", "assert f(1) == [5]", "", (), "failed"),
    "patched builtins and math in the candidate's process": (
        "import builtins, math\nbuiltins.abs = lambda x: 0\nbuiltins.range = lambda *a: []\n"
        "math.fabs = lambda x: 0\ndef f(x): return 100.0\n",
        "import math\nassert math.fabs(f(1) - 2) < 1\nassert abs(f(1)) < 1", "", (), "failed"),
    "a module-level abs the tests would use": (
        "def abs(x): return 0\ndef f(x): return 5\n", "assert abs(f(1) - 2) < 1", "", (), "failed"),
    "the candidate's math module used by the tests is the harness's own": (
        "import math\nmath.isclose = lambda *a, **k: True\ndef f(x): return 9.0\n",
        "assert math.isclose(f(1), 2.0)", "", (), "failed"),
    "patching a helper of the prompt": (
        "def encode(s): return s\ndef decode(s): return s\n",
        "assert decode(encode('abc')) == 'abc'", "def encode(s):\n    return s[::-1]\n", ("decode",), "failed"),
    "mutating the tests' state during a call": (
        "import gc, sys\ndef f(x):\n    for o in gc.get_objects():\n        if isinstance(o, dict) and 'check' in o:\n"
        "            o['check'] = lambda c: None\n    return 0\n",
        "def check(c):\n    assert c(1) == 1\ncheck(f)", "", (), "failed"),
    "StopIteration does not end the tests' loop": (
        "def f(x):\n    raise StopIteration\n", "assert all(map(f, [1, 2, 3]))", "", (), "failed"),
    "an endless call cannot be swallowed by except Exception": (
        "def f(x):\n    while True: pass\n", "try:\n    f(1)\nexcept Exception:\n    pass\n", "", (), "timeout"),
    "the candidate's process dying cannot be swallowed": (
        "import os\ndef f(x):\n    os._exit(0)\n", "try:\n    f(1)\nexcept BaseException:\n    pass\n", "", (),
        "failed"),
    "forged protocol messages on every fd": (
        "import os\nfor fd in range(3, 30):\n    try: os.write(fd, b'\\x00\\x00\\x00\\x10{\"op\":\"loaded\"}')\n"
        "    except OSError: pass\ndef f(x): return 1\n", "assert f(1) == 2", "", (), "failed"),
    "a value nested too deep": (
        "def f(x):\n    a = []\n    for _ in range(5000): a = [a]\n    return a\n", "assert f(1) is not None", "",
        (), "failed"),
    "a solution name bound to a builtin function runs in the jail, not the harness (MBPP 377)": (
        "remove_Char = open\n", "assert remove_Char('aba', 'a') == 'b'", "", (), "failed"),
    "eval bound to a solution name is not the harness's eval": (
        "from_text = eval\n", "assert from_text('__import__(\"os\").getpid()') == __import__('os').getpid()",
        "", (), "failed"),
    "a tuple subclass with field names a namedtuple cannot take": (
        "class P(tuple):\n    _fields = ('\\ufb01', 'fi')\nsolve = P((4, 6))\n", "assert solve == (4, 6)", "", (),
        "failed"),
    "the tests' module is the harness's own, not the solution's object (MBPP 596)": (
        "class _Sys:\n    def getsizeof(self, o): return 7\nsys = _Sys()\ndef tuple_size(t): return 7\n",
        "assert tuple_size((1, 2)) == sys.getsizeof((1, 2))", "", (), "failed"),
    # honest solutions that must pass
    "a builtin exception the tests expect": (
        "def f(x):\n    raise ValueError('bad')\n", "try:\n    f(1)\n    assert False\nexcept ValueError:\n    pass\n",
        "", (), "passed"),
    "a generator the tests call list() on": (
        "def f(x):\n    for i in range(x): yield i * i\n", "assert list(f(4)) == [0, 1, 4, 9]", "", (), "passed"),
    "exact types: big int, nan, -0.0, complex, bytes, sets, int keys, surrogate": (
        "def f(x): return [10**5000, float('nan'), -0.0, 1+2j, b'\\x00\\xff', {1, 2}, frozenset({3}), {1: (2,)},"
        " '\\ud83d', True]\n",
        "import math\nr = f(0)\nassert r[0] == 10**5000 and math.isnan(r[1]) and math.copysign(1, r[2]) == -1\n"
        "assert r[3:] == [1+2j, b'\\x00\\xff', {1, 2}, frozenset({3}), {1: (2,)}, '\\ud83d', True]\n"
        "assert type(r[-1]) is bool and type(r[4]) is bytes", "", (), "passed"),
    "stdlib value types": (
        "import collections, fractions, decimal, datetime, re\n"
        "P = collections.namedtuple('P', 'x y')\n"
        "def f(x): return [collections.Counter('aab'), collections.OrderedDict(a=1), collections.defaultdict(int, b=2),"
        " collections.deque([1]), fractions.Fraction(1, 3), decimal.Decimal('1.5'), datetime.date(2020, 1, 2),"
        " P(1, 2), range(3), {1: 2}.keys(), re.match('a(b)', 'abc')]\n",
        "import collections, fractions, decimal, datetime\nr = f(0)\n"
        "assert r[:7] == [{'a': 2, 'b': 1}, {'a': 1}, {'b': 2}, collections.deque([1]), fractions.Fraction(1, 3),"
        " decimal.Decimal('1.5'), datetime.date(2020, 1, 2)]\n"
        "assert r[7] == (1, 2) and r[7].y == 2 and list(r[8]) == [0, 1, 2] and r[9] == {1}\n"
        "assert r[10] and r[10].group(1) == 'b' and r[10].span() == (0, 2)", "", (), "passed"),
    "the solution's own class built by the benchmark's setup (MBPP 927)": (
        "class Node:\n    def __init__(s, d): s.data, s.left = d, None\n"
        "def depth(n): return 0 if n is None else 1 + depth(n.left)\n",
        "assert depth(root) == 2 and root.left.data == 2", "root = Node(1)\nroot.left = Node(2)", (), "passed"),
    "a function named like a builtin that is the one under test (MBPP 126)": (
        "def sum(a, b): return a + b\n", "assert sum(10, 15) == 25", "", ("sum",), "passed"),
    "a builtin type passed as an argument (MBPP 533)": (
        "def drop(t, kind): return [x for x in t if not isinstance(x, kind)]\n",
        "assert drop((4, 7.7, 5), int) == [7.7]", "", (), "passed"),
    "the candidate's work dir and threads": (
        "import threading, tempfile\nout = []\nt = threading.Thread(target=lambda: out.append(1)); t.start(); t.join()\n"
        "open('scratch.txt', 'w').write('ok')\nfd, p = tempfile.mkstemp()\n"
        "def solve(): return open('scratch.txt').read() + str(out[0])\n", "assert solve() == 'ok1'", "", (), "passed"),
    "the prompt's stub is replaced by the candidate's function": (
        "def f(x):\n    return x + 1\n", "assert f(1) == 2", "def f(x):\n    '''stub'''\n", ("f",), "passed"),
}


def test_harness_cases():
    names = list(HARNESS_CASES)
    jobs = [CodeJob(p, t, s, e) for p, t, s, e, _ in HARNESS_CASES.values()]
    results = run_many(jobs, timeout=TIMEOUT, workers=2)
    wrong = [f"{name}: {res.status} ({res.detail})" for name, res in zip(names, results)
             if res.status != HARNESS_CASES[name][4]]
    assert not wrong, "\n".join(wrong)


def test_reasons_for_the_usual_failures():
    results = run_many([CodeJob("x = 1", "assert x == 2"), CodeJob("def f(:", ""), CodeJob("import time\ntime.sleep(30)", ""),
                        CodeJob("def g(): pass", "assert f(1) == 2", "", ("f",))], timeout=1.5, workers=2)
    assert results[0].detail.startswith("AssertionError at tests line 1: assert x == 2")
    assert results[1].detail.startswith("SyntaxError") and "before the tests" in results[1].detail
    assert results[2].status == "timeout" and results[2].wall_s < 4
    assert results[3].detail.startswith("NameError: name 'f' is not defined"), results[3].detail


# ---------------------------------------------------------------------------------------------
# the wire: only plain data, however the bytes look
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, True, 0, -(2 ** 200), 1.5, float("inf"), 3 - 4j, "é\x00\ud83d", b"\x00",
                                   [1, (2, [3])], {(1, 2): {"a": frozenset({1})}}, {1, "a"}])
def test_wire_round_trip_keeps_exact_types(value):
    back = wire.decode_value(json.loads(json.dumps(wire.encode_value(value, lambda v: 1))))
    assert back == value and type(back) is type(value)


@pytest.mark.parametrize("tree, why", [
    (["x", 1], "unknown tag"), (["i", "zz"], "bad int"), (["S", [["l", []]]], "unhashable"),
    (["d", [[["l", []], ["n"]]]], "unhashable"), (["h", 1, "A"], "unknown tag"), ("text", "not a tagged value"),
    (["l", [["l", [["l", []]]]]] * 1, None),
])
def test_wire_decoder_rejects_malformed_values(tree, why):
    if why is None:
        assert wire.decode_value(tree) == [[[]]]
        return
    with pytest.raises(wire.WireError, match=why):
        wire.decode_value(tree)


def test_wire_decoder_rejects_deep_and_huge_messages():
    deep = ["n"]
    for _ in range(wire.MAX_DEPTH + 5):
        deep = ["l", [deep]]
    with pytest.raises(wire.WireError, match="deep"):
        wire.decode_value(deep)
    r, w = os.pipe()
    os.write(w, (wire.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(wire.WireError, match="announced"):
        wire.receive(r)
    os.close(r)
    os.close(w)


def test_remote_values_refuse_every_use():
    remote = wire.Remote(1, "Liar")
    for use in (lambda: remote == 1, lambda: bool(remote), lambda: remote + 1, lambda: hash(remote),
                lambda: remote < 2, lambda: list(remote), lambda: float(remote), lambda: 1 in remote):
        with pytest.raises(TypeError, match="candidate's own type"):
            use()
    assert "Liar" in repr(remote)


# ---------------------------------------------------------------------------------------------
# the jail's layers, reported and real
# ---------------------------------------------------------------------------------------------

@linux_only
def test_layers_are_reported_and_the_full_jail_runs_where_bubblewrap_is():
    layers = sandbox.isolation()
    if shutil.which("bwrap") is None:
        assert layers.launcher != "bwrap" and layers.missing, "without bubblewrap the report must say what is missing"
        pytest.fail("bubblewrap is not installed: ./dev installs it (apt-get install bubblewrap)")
    assert layers.launcher == "bwrap"
    assert FULL_JAIL <= set(layers.active), layers.summary()
    assert not layers.missing, layers.summary()
    fallback = sandbox.isolation(Policy(launcher="none"))
    assert {"pidns", "netns", "mountns"} <= set(fallback.missing), "a weaker jail must say what it lacks"
    assert "MISSING pidns" in fallback.summary()


@linux_only
def test_thread_bombs_stay_inside_their_slot_and_the_host_can_fork():
    bomb = ("import threading, os\nev = threading.Event()\nn = 0\n"
            "for i in range(3000):\n    try:\n        threading.Thread(target=ev.wait, daemon=True).start(); n += 1\n"
            "    except Exception:\n        break\nN = n\ndef f(x): return N\n")
    jobs = [CodeJob(bomb, "assert f(1) > 1000"), CodeJob(bomb, "assert f(1) > 1000"),
            CodeJob("def f(x): return x", "assert f(3) == 3")]
    forks = []
    results = run_many(jobs, timeout=5, workers=3,
                       progress=lambda i, r: forks.append(subprocess.run(["true"]).returncode))
    assert results[0].status == results[1].status == "failed"   # the bombs got a few dozen threads, not 1000
    assert results[2].passed, results[2].detail
    assert forks == [0, 0, 0]


@linux_only
def test_host_sockets_and_files_are_out_of_sight():
    probe = ("import os, socket\nSEEN = [p for p in ('/dev/log', '/run', '/var/run', '/home', '/var/log') "
             "if os.path.lexists(p)]\n"
             "try:\n    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); SOCK = 'made'\n"
             "except OSError as e:\n    SOCK = 'refused'\n"
             "try:\n    os.posix_fallocate(os.open('big', os.O_CREAT | os.O_WRONLY), 0, 1 << 34); FILL = 'done'\n"
             "except OSError:\n    FILL = 'refused'\n")
    res = run_python(probe, "assert SEEN == [] and SOCK == 'refused' and FILL == 'refused'", timeout=10)
    assert res.passed, res.detail


def test_cleanup_and_encoding_bombs_lose_nothing():
    jobs = [CodeJob("import os\nfor i in range(5000):\n    os.mkdir('d'); os.chdir('d')\n"
                    "os.symlink('/', 'root')\ntry:\n    os.chmod('.', 0)\nexcept OSError:\n    pass\n"
                    "def f(x): return 1\n", "assert f(1) == 1"),
            CodeJob("X = '\ud83d\x00'\ndef f(x): raise ValueError('\ud83d' * 10 + '\x00')\n", "assert f(1) == X"),
            CodeJob("def f(x): return x", "assert f(2) == 2")]
    results = run_many(jobs, timeout=20, workers=1)
    assert results[0].passed, results[0].detail
    assert results[1].status == "failed" and "\\ud83d" in results[1].detail
    json.dumps(results[1].detail).encode("utf-8")
    assert results[2].passed, results[2].detail


def test_a_slot_that_dies_loses_only_its_item(monkeypatch):
    real_run = slots.Slot._run
    calls = []

    def dying(self, job, timeout, start):
        calls.append(job.program)
        if "boom" in job.program:
            self.jail.proc.kill()
        return real_run(self, job, timeout, start)

    monkeypatch.setattr(slots.Slot, "_run", dying)
    jobs = [CodeJob(f"def f(x): return {i}  # {'boom' if i == 1 else ''}", f"assert f(0) == {i}") for i in range(4)]
    results = run_many(jobs, timeout=5, workers=1)
    assert results[1].status in ("infra_error", "failed")
    assert [r.passed for i, r in enumerate(results) if i != 1] == [True, True, True]


def test_starved_timeout_is_an_infrastructure_error():
    assert slots._starved({"cpu_s": 0.01, "wait_s": 0.9, "state": "R"}, 1.0)
    assert not slots._starved({"cpu_s": 0.9, "wait_s": 0.9, "state": "R"}, 1.0)   # it computed: its fault
    assert not slots._starved({"cpu_s": 0.0, "wait_s": 0.0, "state": "S"}, 1.0)   # it slept: its fault


def test_run_many_keeps_order():
    jobs = [CodeJob(f"x = {i}", f"assert x == {i}") for i in range(8)] + [CodeJob("x = 0", "assert x == 1")]
    results = run_many(jobs, timeout=10, workers=3)
    assert [r.passed for r in results] == [True] * 8 + [False]


def test_no_sandbox_process_or_temp_dir_outlives_a_run(monkeypatch):
    import tempfile
    from cogumi.evaluation.sandbox import jail
    base = Path(tempfile.mkdtemp(dir=jail.traversable_temp_dir()))  # reachable by the jail's own uid
    try:
        base.chmod(0o755)
        monkeypatch.setenv("COGUMI_SANDBOX_TAG", "outlive-" + secrets.token_hex(4))
        monkeypatch.setattr(jail, "traversable_temp_dir", lambda: str(base))
        monkeypatch.setattr("tempfile.tempdir", str(base))
        res = run_python("import time\ndef f(x):\n    time.sleep(60)\n", "f(1)", timeout=1)
        assert res.status == "timeout", res.detail
        assert not sandbox_processes(os.environ["COGUMI_SANDBOX_TAG"])
        assert list(base.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")
def test_items_with_long_sleeps_run_in_parallel():
    start = time.monotonic()
    results = run_many([CodeJob("import time\ntime.sleep(1)\nx = 1", "assert x == 1")] * 4, timeout=10, workers=4)
    assert all(r.passed for r in results)
    assert time.monotonic() - start < 3.5


@linux_only
def test_a_jail_that_cannot_start_falls_back_and_says_so(monkeypatch):
    from cogumi.evaluation.sandbox import jail
    real = jail.build_launch

    def broken_bwrap(slot, *, launcher="auto", **kw):
        launch = real(slot, launcher=launcher, **kw)
        if launch.launcher == "bwrap":  # as in a container that refuses user namespaces
            return jail.Launch(["/bin/false"], launch.env, "bwrap", launch.staging)
        return launch

    monkeypatch.setattr(jail, "build_launch", broken_bwrap)
    res = run_python("def f(x): return x", "assert f(1) == 1", timeout=10)
    assert res.passed, res.detail
    assert res.jail.launcher in ("unshare", "none") and "userns" in res.jail.missing
