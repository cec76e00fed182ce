"""The sandbox's parent side: slots (one jailed zygote + one harness zygote each) and the item lifecycle.

For each item a slot makes the wire (a socketpair) and a result pipe, hands one end of the wire to the jail's
zygote (which forks the candidate's process) and the other to the harness's zygote (which forks the test
runner), waits for the harness's verdict, then has both zygotes kill and reap their children. A slot whose
jail reports leftovers (a process, a file it could not remove) or stops answering is replaced; whatever
happens, the item gets a result and the next item a clean slot.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cogumi.evaluation.sandbox import jail, wire
from cogumi.evaluation.sandbox import zygote as control
from cogumi.evaluation.sandbox.tree import remove_tree

HERE = Path(__file__).resolve().parent
START_TIMEOUT = 30.0       # seconds for a zygote to report ready
CONTROL_TIMEOUT = 10.0     # seconds for a zygote to answer a control message
VERDICT_GRACE = 5.0        # seconds the harness may take beyond the item's timeout to report


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 2048          # the candidate's address space
    file_size_mb: int = 16         # any one file it writes
    open_files: int = 64
    threads: int = 32              # processes + threads of the jail's uid (RLIMIT_NPROC)
    tmpfs_mb: int = 64             # the jail's whole writable space
    harness_memory_mb: int = 4096  # the trusted harness (it decodes what the candidate sends)


@dataclass(frozen=True)
class Policy:
    """Which jail and which per-item layers to use; tests switch some off to show the others hold."""
    launcher: str = "auto"         # auto (bwrap, else unshare, else none) | bwrap | unshare | none
    landlock: bool = True
    seccomp: bool = True
    drop_capabilities: bool = True


@dataclass(frozen=True)
class CodeJob:
    program: str                   # the candidate's program: runs in the jail
    tests: str                     # the benchmark's tests: run in the trusted harness
    setup: str = ""                # trusted code the harness runs before the tests (prompt helpers, MBPP setup)
    entry_points: tuple[str, ...] = ()  # names bound to the candidate after the setup ran


@dataclass
class RunResult:
    status: str                    # "passed" | "failed" | "timeout" | "infra_error"
    detail: str                    # why, one line
    wall_s: float = 0.0
    cpu_s: float | None = None
    layers: tuple[str, ...] = ()   # jail layers confirmed for this item
    jail: jail.Layers | None = None  # the same, with what is missing and why

    @property
    def passed(self) -> bool:
        return self.status == "passed"


class ZygoteProcess:
    """One zygote (jailed worker or harness) and its control socket."""

    def __init__(self, argv: list[str], env: dict[str, str], *, staging: str | None = None):
        parent_end, child_end = socket.socketpair()
        self.staging = staging
        fd = str(child_end.fileno())
        env = {k: v.replace(jail.CONTROL_FD_PLACEHOLDER, fd) for k, v in env.items()}
        env["COGUMI_CONTROL_FD"] = fd
        argv = [a.replace(jail.CONTROL_FD_PLACEHOLDER, fd) for a in argv]
        try:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, pass_fds=(child_end.fileno(),),
                                         start_new_session=True)
        finally:
            child_end.close()
        self.sock = parent_end
        self.sock.settimeout(START_TIMEOUT)
        try:
            ready, _ = control.receive(self.sock)
        except (OSError, ValueError) as e:
            ready = None
            why = str(e)
        else:
            why = "it exited"
        if not ready or ready.get("op") != "ready":
            self.close()
            err = self._stderr_tail()
            raise OSError(f"the sandbox process did not start ({why}){': ' + err if err else ''}")
        self.ready = ready
        self.sock.settimeout(CONTROL_TIMEOUT)

    def _stderr_tail(self) -> str:
        try:
            data = self.proc.stderr.read(4000) if self.proc.stderr else b""
        except (OSError, ValueError):
            data = b""
        lines = data.decode("utf-8", "replace").strip().splitlines()
        return lines[-1][:300] if lines else ""

    def run(self, job: dict, fds: list[int]) -> None:
        control.send(self.sock, {"op": "run", **job}, fds)
        started = self._answer()
        if not started or started.get("op") != "started":
            raise OSError("the sandbox process did not start the item")

    def finish(self) -> dict:
        control.send(self.sock, {"op": "finish"})
        finished = self._answer()
        if not finished or finished.get("op") != "finished":
            raise OSError("the sandbox process did not finish the item")
        return finished

    def _answer(self) -> dict | None:
        """The zygote's next control message; an error as soon as its process is gone (a process in the jail
        may hold the socket open after the zygote died, so end of stream alone would come too late)."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLHUP)
        deadline = time.monotonic() + CONTROL_TIMEOUT
        while not poller.poll(100):
            if self.proc.poll() is not None:
                raise OSError("the sandbox process died")
            if time.monotonic() > deadline:
                raise OSError("the sandbox process stopped answering")
        message, fds = control.receive(self.sock)
        for fd in fds:
            os.close(fd)
        return message

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.stderr:
            self.proc.stderr.close()
        if self.staging:
            remove_tree(self.staging)


FALLBACKS = {"auto": ("bwrap", "unshare", "none"), "bwrap": ("bwrap",), "unshare": ("unshare",), "none": ("none",)}


def start_jail(slot: int, limits: Limits, policy: Policy) -> ZygoteProcess:
    """The strongest jail that starts here: with ``launcher: auto``, bubblewrap, else util-linux unshare (a
    container may refuse user namespaces), else none -- the item's layers report says what is missing."""
    errors = []
    for launcher in FALLBACKS.get(policy.launcher, (policy.launcher,)):
        if jail.available_launcher(launcher) != launcher:
            continue
        launch = jail.build_launch(slot, tmpfs_mb=limits.tmpfs_mb, nproc=limits.threads, launcher=launcher)
        try:
            proc = ZygoteProcess(launch.argv, launch.env, staging=launch.staging)
        except OSError as e:
            errors.append(f"{launcher}: {e}")
            continue
        proc.launcher = launch.launcher
        return proc
    raise OSError("no jail could be started (" + "; ".join(errors or ["no launcher available"]) + ")")


def start_harness() -> ZygoteProcess:
    exe, _ = jail.python_install()
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return ZygoteProcess([exe, "-I", "-S", "-B", str(HERE / "harness.py"), jail.process_tag()], env)


class Slot:
    """A jail and a harness, running one item at a time."""

    def __init__(self, index: int, limits: Limits, policy: Policy):
        self.index, self.limits, self.policy = index, limits, policy
        self.jail: ZygoteProcess | None = None
        self.harness: ZygoteProcess | None = None

    def _ensure(self) -> None:
        if self.jail is None:
            self.jail = start_jail(self.index, self.limits, self.policy)
        if self.harness is None:
            self.harness = start_harness()

    def _replace_jail(self) -> None:
        if self.jail is not None:
            self.jail.close()
            self.jail = None

    def _replace_harness(self) -> None:
        if self.harness is not None:
            self.harness.close()
            self.harness = None

    def close(self) -> None:
        self._replace_jail()
        self._replace_harness()

    def run(self, job: CodeJob, timeout: float) -> RunResult:
        start = time.monotonic()
        try:
            self._ensure()
        except OSError as e:
            self.close()
            return RunResult("infra_error", f"sandbox: {e}", wall_s=time.monotonic() - start)
        try:
            return self._run(job, timeout, start)
        except (OSError, ValueError, wire.WireError) as e:
            self.close()
            return RunResult("infra_error", f"sandbox: {type(e).__name__}: {e}", wall_s=time.monotonic() - start)

    def _run(self, job: CodeJob, timeout: float, start: float) -> RunResult:
        wire_harness, wire_jail = socket.socketpair()
        result_r, result_w = os.pipe()
        limits = {"memory_mb": self.limits.memory_mb, "file_size_mb": self.limits.file_size_mb,
                  "open_files": self.limits.open_files, "threads": self.limits.threads,
                  "cpu_s": int(timeout) + 2, "landlock": self.policy.landlock, "seccomp": self.policy.seccomp,
                  "drop_capabilities": self.policy.drop_capabilities}
        try:
            self.jail.run({"program": job.program, "limits": limits}, [wire_jail.fileno()])
            wire_jail.close()
            self.harness.run({"setup": job.setup, "tests": job.tests, "entry_points": list(job.entry_points),
                              "timeout": timeout, "harness_memory_mb": self.limits.harness_memory_mb},
                             [wire_harness.fileno(), result_w])
            wire_harness.close()
            os.close(result_w)
            result_w = -1
            try:
                verdict = wire.receive(result_r, deadline=start + timeout + VERDICT_GRACE)
            except (TimeoutError, wire.WireError):
                verdict = None
        finally:
            for s in (wire_jail, wire_harness):
                s.close()
            if result_w >= 0:
                os.close(result_w)
            os.close(result_r)
        launcher, probe = self.jail.launcher, self.jail.ready.get("probe") or {}
        usage = self._finish_jail()
        self._finish_harness()
        return self._result(verdict, usage, timeout, time.monotonic() - start, launcher, probe)

    def _finish_jail(self) -> dict:
        try:
            usage = self.jail.finish()
        except (OSError, ValueError):
            usage = {"clean": False}
        if not usage.get("clean"):
            self._replace_jail()
        return usage

    def _finish_harness(self) -> None:
        try:
            self.harness.finish()
        except (OSError, ValueError):
            self._replace_harness()

    def _result(self, verdict: dict | None, usage: dict, timeout: float, wall: float, launcher: str,
                probe: dict) -> RunResult:
        cpu = usage.get("cpu_s")
        if verdict is None:
            return RunResult("infra_error", "sandbox: the test harness gave no verdict", wall_s=wall, cpu_s=cpu)
        status = verdict.get("status")
        detail = wire.sanitize(str(verdict.get("detail", "")), 400)
        armed = [x for x in verdict.get("layers") or [] if isinstance(x, str)]
        report = jail.read_layers(launcher, probe, armed, self.limits.tmpfs_mb) if armed else None
        layers = tuple(report.active) if report else ()
        if status == "timeout" and _starved(usage, timeout):
            return RunResult("infra_error", f"harness timeout: the program waited {usage.get('wait_s') or 0:.1f}s "
                             f"for a CPU and got {cpu or 0:.2f}s in {timeout:g}s (machine overloaded; not the "
                             "program's fault)", wall_s=wall, cpu_s=cpu, layers=layers, jail=report)
        if status == "timeout":
            detail = f"timeout after {timeout:g}s ({cpu or 0:.2f}s CPU)"
        if status not in ("passed", "failed", "timeout", "infra_error"):
            status, detail = "infra_error", "sandbox: the harness sent an unknown verdict"
        return RunResult(status, detail, wall_s=wall, cpu_s=cpu, layers=layers, jail=report)


def _starved(usage: dict, timeout: float) -> bool:
    cpu, wait, state = usage.get("cpu_s"), usage.get("wait_s"), usage.get("state")
    if cpu is None or cpu >= 0.1 * timeout:
        return False
    if wait is not None:
        return wait >= 0.5 * timeout
    return state == "R"


class SlotPool:
    """``workers`` slots; ``run_many`` feeds them jobs from one queue, results in input order."""

    def __init__(self, workers: int, limits: Limits, policy: Policy):
        self.slots = [Slot(i, limits, policy) for i in range(max(1, workers))]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for slot in self.slots:
            slot.close()

    def run_many(self, jobs: list[CodeJob], timeout: float, progress=None) -> list[RunResult]:
        results: list[RunResult | None] = [None] * len(jobs)
        next_index = iter(range(len(jobs)))
        lock = threading.Lock()

        def work(slot: Slot) -> None:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                try:
                    results[i] = slot.run(jobs[i], timeout)
                except Exception as e:  # noqa: BLE001 -- one item never loses the run
                    slot.close()
                    results[i] = RunResult("infra_error", f"sandbox: {type(e).__name__}: {e}")
                if progress is not None:
                    progress(i, results[i])

        threads = [threading.Thread(target=work, args=(s,), name=f"cogumi-slot-{s.index}", daemon=True)
                   for s in self.slots[: max(1, min(len(self.slots), len(jobs)))]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [r if r is not None else RunResult("infra_error", "sandbox: no result") for r in results]

