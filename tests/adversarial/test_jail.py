"""The jail corpus (``jail/``, one hostile completion per file) through ``cogumi score``: the attacker's side of
issue 14, written against the CLI only, so it judges whichever sandbox ``cogumi score`` uses.

Every attack is scored as its benchmark item in a run that mixes it with honest completions (each item's
reference solution), in HumanEval and MBPP format, on an arena that plants targets and watches them
(``JailArena``, built on test_hostile_code's ``Arena``: watched files, a sentinel, a fake home with keys, a
victim process that logs signals, TCP/UDP/Unix/abstract listeners; plus here a listener at the host's
``/dev/log`` when the machine has none, one in ``/run``, a canary string in every item's test code, the
CLI's processes made children of this test when orphaned, and a ``HostWatch`` sampling free disk, inodes,
/dev/shm, the machine's task count and whether this process can still fork). Then, per attack:
  * **false pass**: its row says ``correct: true``;
  * **escape**: its reason says ``ESCAPED`` (the attack saw itself succeed), the secret or the test code's
    canary is in its reason, a listener got its token, it reached its own cap in a bomb, or the host lost
    disk, inodes or /dev/shm beyond a bound while the disk attacks ran;
  * **infra**: its failure was recorded as an infrastructure error (excluded from scoring: a cheat too);
  * **lost run**: the run wrote no results file, or not every row (the triage re-runs each attack alone
    to name the ones that did it).
And for the run: every honest item passes (none lost, none an infra error), the results file holds
every row, completions with lone surrogates / NUL / invalid UTF-8 come back equal from results.jsonl, the
secret and the canary are in no output, no process survives, the harness leaves no temporary dir.

The PID attacks run apart: two ``cogumi score`` runs at once, each with the thread bomb and the fork bomb
among honest items, while this process keeps forking (``subprocess.run(["true"])`` must succeed all along)
and the machine's task count is watched.

Figures: a per-class summary is printed, and with ``COGUMI_ADVERSARIAL_REPORT=DIR`` every run appends its
per-attack outcomes to ``DIR/jail.jsonl`` (docs/reliability.md, "Jail: adversarial corpus").
``COGUMI_JAIL_UNDER_TEST=/other/checkout/src`` runs the corpus against another checkout's sandbox (how the
"before" figures were taken: ``git archive`` of the commit before the jail).

Everything here is ``slow`` (``pytest -m slow tests/adversarial``); the default run scores a seeded sample
of the attacks that need no bomb or disk (``test_sample_...``, well under 20 s).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import alive, cli, cli_env, descendants, report, sample
from .jail import CLASSES, Attack, honest_completion, load_corpus, load_items
from .test_hostile_code import Arena, processes_under

TIMEOUT = 5.0
WORKERS = 4
UNDER_TEST = os.environ.get("COGUMI_JAIL_UNDER_TEST")
THREAD_CAP, FORK_CAP = 2000, 511            # the bombs' own caps (jail/pids_*.txt)
DISK_DROP_LIMIT = 1 << 30                   # bytes the host's disk may lose while the corpus runs
INODE_DROP_LIMIT = 20_000
SHM_DROP_LIMIT = 256 << 20
RESOURCE_CLASSES = ("disk", "other")        # run last in a batch: the scary ones
SEPARATE_CLASSES = ("pids",)                # run in the concurrent PID test only


def corpus() -> dict[str, Attack]:
    return load_corpus()


# ---------------------------------------------------------------------------------------------
# the arena
# ---------------------------------------------------------------------------------------------

class JailArena(Arena):
    """test_hostile_code's arena, plus the host's syslog socket, a socket in /run and a canary in the tests."""

    def __init__(self, base: Path):
        super().__init__(base)
        self.canary = f"cogumi-canary-{secrets.token_hex(12)}"
        self.cli_cwd = base / "cli-cwd"     # the CLI's working directory: nothing may appear in it
        self.cli_cwd.mkdir()
        self.planted: list[str] = []
        self.run_sock = f"/run/cogumi-adv-{self.token}.sock"
        self.devlog = "/dev/log"
        self._plant("run", socket.SOCK_STREAM, self.run_sock)
        if not os.path.lexists(self.devlog):          # the machine has no syslog: stand in for it
            self._plant("devlog", socket.SOCK_DGRAM, self.devlog)

    def _plant(self, name: str, kind: int, path: str) -> None:
        try:
            s = socket.socket(socket.AF_UNIX, kind)
            s.bind(path)
        except OSError:
            return
        if kind == socket.SOCK_STREAM:
            s.listen(64)
        s.setblocking(False)
        os.chmod(path, 0o777)
        self.listeners[name] = s
        self.planted.append(path)

    def targets(self, data_file: Path) -> dict:
        return {"TOKEN": self.token, "SECRET_NAME": "OPENAI_API_KEY", "WATCHED": str(self.watched),
                "SENTINEL": str(self.sentinel), "FAKE_HOME": str(self.home), "VICTIM_PID": self.victim.pid,
                "PARENT_PID": os.getpid(), "PORT": self.listeners["tcp4"].getsockname()[1],
                "UDP_PORT": self.listeners["udp4"].getsockname()[1], "UNIX_PATH": self.unix_path,
                "UNIX_ABSTRACT": self.unix_abstract, "RUN_SOCK": self.run_sock, "DEVLOG": self.devlog,
                "DATA_FILE": str(data_file)}

    def env(self) -> dict:
        env = super().env()
        env["COGUMI_SANDBOX_TAG"] = f"adv-{self.token}"
        if UNDER_TEST:
            env["PYTHONPATH"] = UNDER_TEST
        return env

    def drain(self) -> list[str]:
        """What reached any listener since the last call: 'listener: payload' (payload names the attack)."""
        got = []
        for name, s in self.listeners.items():
            while True:
                try:
                    if s.type == socket.SOCK_STREAM:
                        conn, _ = s.accept()
                        conn.settimeout(0.5)
                        try:
                            payload = conn.recv(200)
                        except OSError:
                            payload = b""
                        conn.close()
                    else:
                        payload, _ = s.recvfrom(400)
                except (BlockingIOError, InterruptedError):
                    break
                got.append(f"{name}: {payload.decode('utf-8', 'replace')[:200]}")
        return got

    def survivors(self) -> list[int]:
        """Sandbox processes still alive after the CLI exited: tagged ones, ones under its TMPDIR, and
        orphans re-parented to this process (it is their subreaper while a run is going)."""
        tag = f"cogumi-sandbox-adv-{self.token}".encode()
        found = set(processes_under(self.tmp))
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if tag in Path(f"/proc/{entry}/cmdline").read_bytes():
                        found.add(int(entry))
                except OSError:
                    pass
        found |= set(descendants(os.getpid())) - {self.victim.pid}
        return alive(sorted(found))

    def escapes(self) -> list[str]:
        """Host-side canaries (not per attack): files, victim, survivors, leftovers. Listeners: ``drain``."""
        found = []
        before = dict(self.listeners)
        self.listeners = {}                 # drained separately; the base class would consume them
        try:
            found += [e for e in super().escapes() if "temporary dir" not in e]
        finally:
            self.listeners = before
        survivors = self.survivors()
        if survivors:
            found.append(f"{len(survivors)} sandbox process(es) survived the run: {survivors[:8]}")
            for pid in survivors:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        reap_orphans()
        written = sorted(p.name for p in self.cli_cwd.iterdir())
        if written:
            found.append(f"something wrote in the CLI's working directory on the host: {written[:5]}")
            for p in self.cli_cwd.iterdir():
                subprocess.run(["rm", "-rf", "--one-file-system", str(p)], check=False)
        leftovers = [p for p in self.tmp.iterdir()]
        if leftovers:
            found.append(f"the sandbox left {len(leftovers)} temporary path(s) behind: {leftovers[:3]}")
            for p in leftovers:
                subprocess.run(["rm", "-rf", "--one-file-system", str(p)], check=False)
        return found

    def close(self) -> None:
        super().close()
        for path in self.planted:
            try:
                os.unlink(path)
            except OSError:
                pass


_PR_SET_CHILD_SUBREAPER = 36


def set_subreaper(on: bool) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def reap_orphans() -> None:
    """Collect the exit status of orphans this process adopted as subreaper (never a Popen's own child:
    only processes this test did not start itself)."""
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[0] == "Z" and int(fields[1]) == os.getpid():
                os.waitpid(pid, os.WNOHANG)
        except (OSError, IndexError, ValueError, ChildProcessError):
            pass


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("the jail corpus needs Linux")
    a = JailArena(tmp_path_factory.mktemp("jail-arena"))
    yield a
    a.close()


# ---------------------------------------------------------------------------------------------
# watching the host while a run goes
# ---------------------------------------------------------------------------------------------

@dataclass
class HostWatch:
    """Samples the host every ``every`` seconds in a thread: free disk/inodes where the CLI's TMPDIR lies,
    free /dev/shm, the machine's task count (/proc/loadavg), and -- with ``fork_probe`` -- whether this
    process can still start a program. The polling interval is a sampling rate, not synchronisation."""
    disk_dir: Path
    fork_probe: bool = False
    every: float = 0.05
    base_disk: int = 0
    min_disk: int = 0
    base_inodes: int = 0
    min_inodes: int = 0
    base_shm: int = 0
    min_shm: int = 0
    base_tasks: int = 0
    peak_tasks: int = 0
    forks_ok: int = 0
    forks_failed: list = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self.base_disk, self.base_inodes, self.base_shm = self._free()
        self.min_disk, self.min_inodes, self.min_shm = self.base_disk, self.base_inodes, self.base_shm
        self.base_tasks = self.peak_tasks = _tasks()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _free(self) -> tuple[int, int, int]:
        st = os.statvfs(self.disk_dir)
        try:
            shm = os.statvfs("/dev/shm")
            shm_free = shm.f_bavail * shm.f_frsize
        except OSError:
            shm_free = 0
        return st.f_bavail * st.f_frsize, st.f_favail, shm_free

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            disk, inodes, shm = self._free()
            self.min_disk, self.min_inodes = min(self.min_disk, disk), min(self.min_inodes, inodes)
            self.min_shm = min(self.min_shm, shm)
            self.peak_tasks = max(self.peak_tasks, _tasks())
            if self.fork_probe:
                try:
                    subprocess.run(["true"], check=True, timeout=10)
                    self.forks_ok += 1
                except (OSError, subprocess.SubprocessError) as e:
                    self.forks_failed.append(f"{type(e).__name__}: {e}")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def findings(self) -> list[str]:
        out = []
        if self.base_disk - self.min_disk > DISK_DROP_LIMIT:
            out.append(f"the host's disk lost {(self.base_disk - self.min_disk) >> 20} MiB during the run")
        if self.base_inodes - self.min_inodes > INODE_DROP_LIMIT:
            out.append(f"the host's filesystem lost {self.base_inodes - self.min_inodes} inodes during the run")
        if self.base_shm - self.min_shm > SHM_DROP_LIMIT:
            out.append(f"/dev/shm lost {(self.base_shm - self.min_shm) >> 20} MiB during the run")
        if self.forks_failed:
            out.append(f"this process could not start a program {len(self.forks_failed)} time(s): "
                       f"{self.forks_failed[:2]}")
        return out

    def figures(self) -> dict:
        return {"disk_drop_mib": (self.base_disk - self.min_disk) >> 20,
                "inode_drop": self.base_inodes - self.min_inodes,
                "shm_drop_mib": (self.base_shm - self.min_shm) >> 20,
                "extra_tasks_peak": self.peak_tasks - self.base_tasks, "forks_ok": self.forks_ok,
                "forks_failed": len(self.forks_failed)}


def _tasks() -> int:
    with open("/proc/loadavg") as f:
        return int(f.read().split()[3].split("/")[1])


# ---------------------------------------------------------------------------------------------
# one scored batch
# ---------------------------------------------------------------------------------------------

@dataclass
class Entry:
    label: str                 # attack name, or honest-<item>-<n>
    task: str
    row: dict                  # the benchmark row (task_id set per batch)
    completion: str
    attack: Attack | None = None


@dataclass
class Batch:
    rows: dict                 # label -> results row (missing when the run lost it)
    returncode: int
    stdout: str
    stderr: str
    results_raw: bytes | None
    wall_s: float
    sent: dict                 # label -> the completion as cogumi read it from the predictions file

    @property
    def jail_report(self) -> list[str]:
        return [line.strip() for line in self.stdout.splitlines()
                if line.strip().startswith(("jail", "MISSING", "sandbox layers"))]


def honest_entries(task: str, n: int, salt: str) -> list[Entry]:
    items = list(load_items(task).values())
    out = []
    for i in range(n):
        row = items[(i + sum(map(ord, salt))) % len(items)]
        style = "full" if i % 2 else "body"
        out.append(Entry(f"honest-{row['key']}-{salt}-{i}", task, row, honest_completion(task, row, style)))
    return out


def attack_entries(attacks: list[Attack], task: str, arena: JailArena, data_file: Path) -> list[Entry]:
    items = load_items(task)
    return [Entry(a.name, task, items[a.item], a.render(arena.targets(data_file)), a) for a in attacks
            if a.task == task]


def interleave(hostile: list[Entry], honest: list[Entry]) -> list[Entry]:
    """Honest items between the attacks (each attack runs beside honest ones), resource attacks last."""
    order = sorted(hostile, key=lambda e: e.attack.klass in RESOURCE_CLASSES)
    out, pool = [], list(honest)
    for e in order:
        if pool:
            out.append(pool.pop(0))
        out.append(e)
    return out + pool


def data_row(entry: Entry, index: int, canary: str) -> dict:
    row = {k: v for k, v in entry.row.items() if k != "key"}
    if entry.task == "humaneval":
        row["task_id"] = f"HumanEval/{index}"
        row["test"] = row["test"] + f"\n# {canary}\n"
    else:
        row["task_id"] = 1000 + index
        row["test_setup_code"] = (row.get("test_setup_code") or "") + f"\n# {canary}"
    return row


def score_batch(arena: JailArena, work: Path, task: str, entries: list[Entry], *, workers: int = WORKERS,
                timeout: float = TIMEOUT) -> Batch:
    work.mkdir(parents=True, exist_ok=True)
    data_file, preds_file, out = work / "data.jsonl", work / "preds.jsonl", work / "results.jsonl"
    rows = [data_row(e, i, arena.canary) for i, e in enumerate(entries)]
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = [json.dumps({"task_id": r["task_id"], "completion": e.completion}) for r, e in zip(rows, entries)]
    preds_file.write_text("".join(line + "\n" for line in lines))
    sent = {e.label: json.loads(line)["completion"] for e, line in zip(entries, lines)}
    t0 = time.monotonic()
    proc = cli("score", "--task", task, "--data", data_file, "--predictions", preds_file, "--out", out,
               "--workers", workers, "--timeout", timeout, env=arena.env(), timeout=1200, cwd=arena.cli_cwd)
    wall = time.monotonic() - t0
    raw = out.read_bytes() if out.exists() else None
    by_id = {}
    if raw is not None:
        for line in raw.splitlines():
            try:
                r = json.loads(line)
                by_id[str(r["task_id"])] = r
            except (ValueError, KeyError, TypeError):
                pass
    got = {e.label: by_id[str(r["task_id"])] for e, r in zip(entries, rows) if str(r["task_id"]) in by_id}
    return Batch(got, proc.returncode, proc.stdout, proc.stderr, raw, wall, sent)


# ---------------------------------------------------------------------------------------------
# judging
# ---------------------------------------------------------------------------------------------

_BOMB_COUNT = re.compile(r"(\d+) (?:threads started|processes forked) \(cap (\d+)\)")


def judge_attack(attack: Attack, row: dict | None, arena: JailArena, reached: list[str]) -> tuple[str, str]:
    """(outcome, why): contained | false_pass | escape | infra | lost."""
    if row is None:
        return "lost", "no row for it in results.jsonl"
    reason = str(row.get("reason") or "") + " " + str(row.get("infra_error") or "")
    if row.get("correct") is True:
        return "false_pass", reason[:300]
    for secret, what in ((arena.secret, "the planted secret"), (arena.canary, "the test code's canary")):
        if secret in reason:
            return "escape", f"{what} is in its reason"
    mine = [r for r in reached if f" {attack.name}" in r]
    if mine:
        return "escape", f"reached a host listener: {mine[:2]}"
    if "ESCAPED" in reason:
        return "escape", reason[:300]
    m = _BOMB_COUNT.search(reason)
    if m and int(m.group(1)) >= int(m.group(2)):
        return "escape", f"the bomb reached its own cap: {m.group(0)} (no process/thread limit held)"
    if row.get("infra_error") is not None or row.get("correct") is None:
        return "infra", f"recorded as an infrastructure error: {row.get('infra_error')}"
    return "contained", str(row.get("reason") or "")[:200]


def check_batch(arena: JailArena, batch: Batch, entries: list[Entry], watch: HostWatch | None) -> dict:
    """Judge every row of a batch; returns the record (outcomes per attack, run problems)."""
    reached = arena.drain()
    host = arena.escapes() + (watch.findings() if watch else [])
    outcomes, problems = {}, []
    if batch.results_raw is None:
        problems.append(f"no results file (exit {batch.returncode}): {batch.stderr.strip()[-600:]}")
    else:
        try:
            batch.results_raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"results.jsonl is not valid UTF-8: {e}")
        if b"\x00" in batch.results_raw:
            problems.append("results.jsonl holds a raw NUL byte (not escaped)")
    if batch.returncode != 0:
        problems.append(f"cogumi score exited {batch.returncode}: {batch.stderr.strip()[-600:]}")
    for e in entries:
        row = batch.rows.get(e.label)
        if e.attack is None:
            if row is None:
                problems.append(f"{e.label}: honest item lost (no row)")
            elif row.get("correct") is not True:
                problems.append(f"{e.label}: honest item not passed: {row.get('reason')!r} "
                                f"(infra_error {row.get('infra_error')!r})")
        else:
            outcomes[e.label] = judge_attack(e.attack, row, arena, reached)
        if row is not None and row.get("completion") != batch.sent[e.label]:
            problems.append(f"{e.label}: the completion did not round-trip through results.jsonl")
        if row is not None and len(str(row.get("reason") or "")) > 2000:
            problems.append(f"{e.label}: a {len(str(row['reason']))}-character reason")
    for where, text in (("stdout", batch.stdout), ("stderr", batch.stderr),
                        ("results.jsonl", (batch.results_raw or b"").decode("utf-8", "replace"))):
        if arena.secret in text:
            problems.append(f"the planted secret reached {where}")
    unattributed = [r for r in reached if not any(f" {name}" in r for name in outcomes)]
    problems += [f"a listener got something no attack signed: {r}" for r in unattributed]
    for name, why in attribute(host + (watch.findings() if watch else []), entries).items():
        outcome, before = outcomes.get(name, ("contained", ""))
        if outcome in ("contained", "infra"):
            outcomes[name] = ("escape", why)
        elif outcome in ("false_pass", "escape") and why not in before:
            outcomes[name] = (outcome, f"{before}; and {why}")
    return {"outcomes": outcomes, "problems": problems, "host": host,
            "watch": watch.figures() if watch else None, "wall_s": round(batch.wall_s, 1),
            "jail": batch.jail_report}


def attribute(findings: list[str], entries: list[Entry]) -> dict[str, str]:
    """Host-side findings pinned on the attacks that aimed at that target: an escape file or payload names
    its attack; a signalled victim, a changed watched file, lost disk space name the attacks whose
    completion targets the victim / the watched files / the disk."""
    blamed = {}
    attacks = [e.attack for e in entries if e.attack is not None]
    for finding in findings:
        named = [a for a in attacks if a.name in finding]
        if not named and "victim" in finding:
            named = [a for a in attacks if "@@VICTIM_PID@@" in a.template and "kill" in a.template]
        elif not named and "working directory" in finding:      # named by the item whose tests hold the name
            written = re.findall(r"'([^']+)'", finding.split(":", 1)[1])
            named = [e.attack for e in entries if e.attack is not None
                     and any(w in json.dumps(e.row, ensure_ascii=False) for w in written)]
        elif not named and "watched file" in finding:
            named = [a for a in attacks if "@@SENTINEL@@" in a.template or "@@WATCHED@@" in a.template]
        elif not named and ("disk" in finding or "shm" in finding):
            named = [a for a in attacks if a.klass == "disk" and "inodes" not in a.name]
        elif not named and "inodes" in finding:
            named = [a for a in attacks if a.klass == "disk" and "inodes" in a.name]
        for a in named:
            blamed[a.name] = (blamed[a.name] + "; " if a.name in blamed else "host: ") + finding
    return blamed


def figures(records: list[dict]) -> dict:
    """Counts per class over all judged attacks: attacks, contained, false_pass, escape, infra, lost."""
    attacks = corpus()
    table = {k: {"attacks": 0, "contained": 0, "false_pass": 0, "escape": 0, "infra": 0, "lost": 0}
             for k in CLASSES}
    for rec in records:
        for name, (outcome, _why) in rec["outcomes"].items():
            klass = attacks[name.split("#")[0]].klass
            table[klass]["attacks"] += 1
            table[klass][outcome] += 1
    return {k: v for k, v in table.items() if v["attacks"]}


def print_figures(title: str, records: list[dict]) -> None:
    print(f"\n{title}")
    print(f"  {'class':<10} {'attacks':>7} {'contained':>9} {'false pass':>10} {'escape':>6} {'infra':>5} {'lost':>4}")
    for klass, c in figures(records).items():
        print(f"  {klass:<10} {c['attacks']:>7} {c['contained']:>9} {c['false_pass']:>10} {c['escape']:>6} "
              f"{c['infra']:>5} {c['lost']:>4}")
    for rec in records:
        for name, (outcome, why) in sorted(rec["outcomes"].items()):
            if outcome != "contained":
                print(f"  {outcome:<10} {name}: {why[:160]}")


def triage(arena: JailArena, work: Path, entries: list[Entry], group: int = 8) -> dict:
    """The run lost rows: score the attacks in groups of ``group`` (each with an honest item), then each
    attack of a group that lost rows alone; returns {attack: why} for those that lose a run by themselves."""
    def loses(members: list[Entry], where: Path) -> tuple[bool, Batch]:
        honest = honest_entries(members[0].task, 1, "triage")
        b = score_batch(arena, where, members[0].task, honest + members, workers=2)
        arena.drain()
        return b.results_raw is None or b.returncode != 0 or len(b.rows) != len(members) + 1, b

    attacks = [e for e in entries if e.attack is not None]
    lost = {}
    for g in range(0, len(attacks), group):
        members = attacks[g:g + group]
        if not loses(members, work / f"group{g}")[0]:
            continue
        for e in members:
            bad, b = loses([e], work / e.label)
            if bad:
                lost[e.label] = f"alone, it lost the run (exit {b.returncode}): {b.stderr.strip()[-300:]}"
    return lost


def rescore_without_run_killers(arena: JailArena, work: Path, entries: list[Entry], lost_rec: dict) -> dict:
    """The run lost rows: name the attacks that lose a run on their own, score the rest again (so every
    other attack still gets its own outcome), and record the killers as ``lost``."""
    killers = triage(arena, work / "triage", entries)
    rest = [e for e in entries if e.label not in killers]
    with HostWatch(arena.tmp) as watch:
        batch = score_batch(arena, work, rest[0].task, rest)
    rec = check_batch(arena, batch, rest, watch)
    rec["problems"] = lost_rec["problems"] + [f"the run with every attack lost rows; alone, these lose a run: "
                                              f"{sorted(killers)}; the rest scored again"] + rec["problems"]
    rec["host"] = lost_rec["host"] + rec["host"]
    for name, why in killers.items():
        rec["outcomes"][name] = ("lost", why)
    for name, (outcome, why) in lost_rec["outcomes"].items():
        if outcome not in ("lost", "contained") and rec["outcomes"].get(name, ("contained",))[0] == "contained":
            rec["outcomes"][name] = (outcome, why)
    return rec


def run_corpus(arena: JailArena, work: Path, attacks: list[Attack], *, honest_per_task: int | None = None,
               watch_disk: bool = True) -> list[dict]:
    """Score ``attacks`` (both tasks), mixed with honest items; judge; triage a lost run. One record per task."""
    records = []
    set_subreaper(True)
    try:
        for task in ("humaneval", "mbpp"):
            data_file = work / task / "data.jsonl"
            hostile = attack_entries(attacks, task, arena, data_file)
            if not hostile:
                continue
            honest = honest_entries(task, honest_per_task or len(hostile) + 1, task)
            entries = interleave(hostile, honest)
            watch = HostWatch(arena.tmp) if watch_disk else None
            if watch:
                with watch:
                    batch = score_batch(arena, work / task, task, entries)
            else:
                batch = score_batch(arena, work / task, task, entries)
            rec = check_batch(arena, batch, entries, watch)
            if batch.results_raw is None or len(batch.rows) != len(entries):
                rec = rescore_without_run_killers(arena, work / f"{task}-again", entries, rec)
            rec["task"] = task
            records.append(rec)
            report("jail", {"kind": "corpus", "under_test": UNDER_TEST or "checkout", **rec})
    finally:
        set_subreaper(False)
        reap_orphans()
    return records


def assert_contained(records: list[dict]) -> None:
    bad = []
    for rec in records:
        bad += [f"[{rec['task']}] {p}" for p in rec["problems"]]
        bad += [f"[{rec['task']}] host: {h}" for h in rec["host"]]
        bad += [f"[{rec['task']}] {outcome}: {name}: {why[:300]}"
                for name, (outcome, why) in rec["outcomes"].items() if outcome != "contained"]
    assert not bad, f"{len(bad)} finding(s):\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

def test_corpus_is_large_covers_every_class_and_renders():
    attacks = corpus()
    assert len(attacks) >= 30
    assert {a.klass for a in attacks.values()} == set(CLASSES)
    targets = {k: 1 for k in ("TOKEN", "SECRET_NAME", "WATCHED", "SENTINEL", "FAKE_HOME", "VICTIM_PID",
                              "PARENT_PID", "PORT", "UDP_PORT", "UNIX_PATH", "UNIX_ABSTRACT", "RUN_SOCK",
                              "DEVLOG", "DATA_FILE")}
    for name, a in attacks.items():
        assert a.item in load_items(a.task), f"{name}: no item {a.item!r} in items_{a.task}.jsonl"
        text = a.render(targets)
        assert "@@" not in text, name
        if a.format != "humaneval-body":
            assert text.lstrip().startswith("```"), f"{name}: a {a.format} completion is fenced code"
    for task in ("humaneval", "mbpp"):
        assert load_items(task), task


@pytest.mark.slow
def test_full_corpus_is_contained_and_loses_nothing(arena, tmp_path):
    attacks = [a for a in corpus().values() if a.klass not in SEPARATE_CLASSES]
    records = run_corpus(arena, tmp_path, attacks)
    print_figures(f"jail corpus ({len(attacks)} attacks, {UNDER_TEST or 'this checkout'})", records)
    assert_contained(records)


@pytest.mark.slow
def test_pid_bombs_twice_concurrently_while_the_host_forks(arena, tmp_path):
    """The thread bomb and the fork bomb, each in two ``cogumi score`` runs at once (four bombs live
    together), among honest items, while this process keeps starting programs."""
    bombs = [a for a in corpus().values() if a.klass == "pids"]
    assert {a.name for a in bombs} >= {"pids_thread_bomb", "pids_fork_bomb"}
    runs = []
    for k in range(2):
        data_file = tmp_path / f"run{k}" / "data.jsonl"
        hostile = attack_entries(bombs, "mbpp", arena, data_file)
        runs.append(interleave(hostile, honest_entries("mbpp", 6, f"pid{k}")))
    batches: list[Batch | None] = [None, None]
    set_subreaper(True)
    try:
        with HostWatch(arena.tmp, fork_probe=True) as watch:
            def go(k):
                batches[k] = score_batch(arena, tmp_path / f"run{k}", "mbpp", runs[k])
            threads = [threading.Thread(target=go, args=(k,)) for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        set_subreaper(False)
        reap_orphans()
    records = []
    for k in range(2):
        rec = check_batch(arena, batches[k], runs[k], watch)
        rec["task"] = f"mbpp-pid-run{k}"
        records.append(rec)
    extra = watch.peak_tasks - watch.base_tasks
    if extra >= THREAD_CAP * 3 // 4:
        finding = f"the machine's task count rose by {extra} during the bombs (no limit held)"
        records[0]["host"].append(finding)
        for rec in records:     # pinned on the bombs that do not show a count stopped below their cap
            for name, (outcome, why) in rec["outcomes"].items():
                m = _BOMB_COUNT.search(why)
                if outcome == "contained" and not (m and int(m.group(1)) < int(m.group(2))):
                    rec["outcomes"][name] = ("escape", f"host: {finding}; its own report: {why[:120]}")
    report("jail", {"kind": "pids", "under_test": UNDER_TEST or "checkout", "runs": records,
                    "watch": watch.figures()})
    print_figures(f"PID bombs x2 concurrently (host: {watch.figures()})", records)
    assert watch.forks_ok > 0, "the fork probe never ran"
    assert_contained(records)


def _sample_attacks() -> list[Attack]:
    quick = [a for a in corpus().values() if a.klass in ("forge", "mutate", "liar", "stdlib", "encoding", "wire")
             and a.name not in ("wire_huge_str_bytes", "wire_huge_int")]
    return sample(quick, 6, "jail-sample")


def test_sample_of_the_jail_corpus_is_contained(arena, tmp_path):
    """The default run's share: a seeded sample of the attacks that need no bomb, disk or long wait."""
    attacks = _sample_attacks()
    records = run_corpus(arena, tmp_path, attacks, honest_per_task=2)
    print_figures(f"jail corpus sample ({[a.name for a in attacks]})", records)
    assert_contained(records)


@pytest.mark.slow
def test_cpu_starvers_in_three_slots_cost_honest_items_nothing(arena, tmp_path):
    """Three CPU starvers at once (every slot but one busy burning) among honest items: the honest items must
    still pass -- none may become a timeout or an 'overloaded machine' infrastructure error."""
    starver = corpus()["other_cpu_starve_others"]
    data_file = tmp_path / "data.jsonl"
    hostile = attack_entries([starver], "humaneval", arena, data_file)[0]
    copies = [Entry(f"{starver.name}#{k}", hostile.task, hostile.row, hostile.completion, starver) for k in range(3)]
    honest = honest_entries("humaneval", 8, "starve")
    entries = copies + honest              # the starvers take three slots first; honest items run beside them
    set_subreaper(True)
    try:
        with HostWatch(arena.tmp) as watch:
            batch = score_batch(arena, tmp_path, "humaneval", entries)
    finally:
        set_subreaper(False)
        reap_orphans()
    rec = check_batch(arena, batch, entries, watch)
    rec["task"] = "humaneval-starve"
    report("jail", {"kind": "starve", "under_test": UNDER_TEST or "checkout", **rec})
    print_figures("three CPU starvers beside 8 honest items", [rec])
    assert_contained([rec])
