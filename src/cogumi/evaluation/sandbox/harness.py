"""The trusted harness: runs the benchmark's own test code, with the candidate's functions bound to proxies
whose calls cross the wire to the jailed process. The verdict is computed here, where no code of the
candidate ever runs: ``==``, ``abs``, ``range``, ``math`` and the prompt's helpers are this process's own,
and what comes back over the wire is only plain data (wire.py) or a ``Remote`` that refuses every use.

Started once per slot as a zygote (``python -I -S -B harness.py``, zygote.py's protocol); each item is a
forked child that gets the job (``setup``: trusted code run first -- HumanEval's prompt, MBPP's
``test_setup_code`` and ``test_imports``; ``tests``; ``entry_points``: names bound to the candidate after the
setup ran, replacing the prompt's stub), the wire socket and a result pipe, and writes one verdict:
``{"status": "passed" | "failed" | "timeout" | "infra_error", "detail": ...}``.

Names: every name the setup and tests read as a global but never bind (e.g. MBPP's ``remove_Occ``,
``Node`` in task 927's setup) is asked of the candidate's program; a module found there is replaced by
this process's own import of it. Builtins are never asked for.

Verdict rules: the tests ran to the end -> passed. An assert or any exception -> failed, with the test
line. The candidate's exceptions reach the tests as the builtin exception of that name (so a test that
expects ``ValueError`` works) -- except StopIteration-like and non-Exception ones, which would end the
tests' loops silently -- or as ``CandidateError``. No answer before the deadline, a broken message or the
candidate's process dying end the item at once with ``timeout`` / ``failed``, whatever the tests catch.
"""

import builtins
import os
import resource
import symtable
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wire  # noqa: E402
import zygote  # noqa: E402

PRELOAD = ("math", "re", "collections", "itertools", "functools", "heapq", "random", "copy", "string", "typing",
           "fractions", "decimal", "statistics", "hashlib", "json", "operator", "cmath", "datetime", "unittest")
NOT_MAPPED = {"StopIteration", "StopAsyncIteration", "GeneratorExit", "KeyboardInterrupt", "SystemExit"}
BUILTIN_EXCEPTIONS = {name: obj for name, obj in vars(builtins).items()
                      if isinstance(obj, type) and issubclass(obj, Exception) and name not in NOT_MAPPED}


class CandidateError(Exception):
    """The candidate raised an exception that is not a builtin one."""


class ItemOver(BaseException):
    """Ends the tests whatever they catch: timeout, protocol violation, the candidate's process died."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class Candidate:
    """The harness's end of the wire to one item's jailed process."""

    def __init__(self, fd: int, deadline: float):
        self.fd, self.deadline, self.serial = fd, deadline, 0
        self.layers: list[str] = []   # what the jail armed for this item, before its code ran
        self.over: ItemOver | None = None  # once set, the item's verdict whatever the tests caught

    def end(self, status: str, detail: str) -> ItemOver:
        if self.over is None:
            self.over = ItemOver(status, detail)
        return self.over

    def receive(self) -> dict:
        if self.over is not None:
            raise self.over
        try:
            message = wire.receive(self.fd, self.deadline)
        except TimeoutError:
            raise self.end("timeout", "no answer from the candidate before the time limit") from None
        except wire.WireError as e:
            raise self.end("failed", f"the candidate's process broke the protocol: {e}") from None
        except OSError as e:
            raise self.end("failed", f"the candidate's process went away ({e.strerror})") from None
        if message is None:
            raise self.end("failed", "the candidate's process ended (killed by a limit, or it exited)")
        return message

    def request(self, op: str, **fields) -> dict:
        self.serial += 1
        try:
            wire.send(self.fd, {"op": op, "id": self.serial, **fields})
        except OSError as e:
            raise self.end("failed", f"the candidate's process went away ({e.strerror})") from None
        reply = self.receive()
        if reply.get("id") != self.serial:
            raise self.end("failed", "the candidate's process broke the protocol: an answer out of order")
        return reply

    def decode(self, tree):
        try:
            return wire.decode_value(tree, self.remote, self.deadline)
        except wire.WireError as e:
            raise self.end("failed", f"the candidate sent a malformed value: {e}") from None
        except TimeoutError:
            raise self.end("timeout", "the time limit passed while reading the candidate's answer") from None

    def remote(self, handle: int, type_name: str):
        return wire.Remote(handle, type_name, self.invoke)

    def invoke(self, op: str, handle: int, *rest):
        if op == "call":
            args, kwargs = rest
            fields = {"args": [self.encode(a) for a in args],
                      "kwargs": [[k, self.encode(v)] for k, v in kwargs.items()]}
        elif op == "getattr":
            fields = {"name": rest[0]}
        else:
            fields = {"name": rest[0], "value": self.encode(rest[1])}
        reply = self.request(op, target=handle, **fields)
        if "error" in reply:
            raise candidate_exception(reply["error"])
        return self.decode(reply.get("ok"))

    @staticmethod
    def encode(value):
        """Arguments the tests pass: plain data, or a candidate's value passed back by its handle."""
        def handle_of(v):
            if type(v) is wire.Remote:
                return object.__getattribute__(v, "_handle")
            raise wire.WireError(f"cannot pass a {type(v).__name__} to the candidate: only plain data crosses")
        return wire.encode_value(value, handle_of)

    def lookup(self, names) -> dict:
        reply = self.request("lookup", names=sorted(names))
        found = reply.get("found")
        if type(found) is not dict:
            raise self.end("failed", "the candidate's process broke the protocol: a bad lookup answer")
        return {name: self.decode(tree) for name, tree in found.items() if name in names}


def candidate_exception(error) -> Exception:
    if type(error) is not dict:
        raise ItemOver("failed", "the candidate's process broke the protocol: a bad error")  # caught by run_tests
    name = wire.sanitize(error.get("type"), 80)
    message = wire.sanitize(error.get("message"), 300)
    line = error.get("line")
    where = f" (candidate line {line})" if type(line) is int else ""
    cls = BUILTIN_EXCEPTIONS.get(name, CandidateError)
    text = f"{message}{where} [raised by the candidate]" if cls is not CandidateError else f"{name}: {message}{where}"
    try:
        return cls(text)
    except Exception:  # an exception class whose constructor wants other arguments (UnicodeDecodeError)
        return CandidateError(f"{name}: {message}{where}")


def free_names(source: str) -> set:
    """Names the code reads as globals but never binds at module level (or with ``global``): what the
    candidate's program must provide. Builtins excluded."""
    top = symtable.symtable(source, "<tests>", "exec")
    bound, read = set(), set()

    def visit(table, is_module):
        for sym in table.get_symbols():
            name = sym.get_name()
            if is_module:
                if sym.is_assigned() or sym.is_imported() or sym.is_namespace():
                    bound.add(name)
                if sym.is_referenced():
                    read.add(name)
            elif sym.is_global():
                if sym.is_declared_global() and sym.is_assigned():
                    bound.add(name)
                if sym.is_referenced():
                    read.add(name)
        for child in table.get_children():
            visit(child, False)

    visit(top, True)
    return {n for n in read - bound if not hasattr(builtins, n)}


def bind_candidate_values(namespace: dict, found: dict, entry_points) -> None:
    """Bind what the candidate's program provides. A name the tests use as a module (the name of a standard
    library module, or a module in the candidate's program) is this process's own import of it: the tests
    compute their side of ``==`` with it (MBPP 596's tests call ``sys.getsizeof`` on the solution's ``sys``)."""
    import importlib
    for name, value in found.items():
        is_module = type(value) is wire.Remote and object.__getattribute__(value, "_type_name") == "module"
        if name not in entry_points and (is_module or name in sys.stdlib_module_names):
            try:
                namespace[name] = importlib.import_module(name)  # the harness's own, never the candidate's
                continue
            except ImportError:
                pass
        namespace[name] = value


def run_tests(job: dict, candidate: Candidate) -> dict:
    armed = candidate.receive()
    if armed.get("op") != "armed":
        return {"status": "infra_error", "detail": "the jail could not arm the item's process: "
                + wire.sanitize(str(armed.get("error")), 300)}
    layers = candidate.layers = [wire.sanitize(x, 40) for x in armed.get("layers") or [] if type(x) is str]
    loaded = candidate.receive()
    if loaded.get("op") == "load_error":
        err = loaded.get("error") if type(loaded.get("error")) is dict else {}
        line = err.get("line")
        return {"status": "failed", "layers": layers,
                "detail": f"{wire.sanitize(err.get('type'), 80)}: {wire.sanitize(err.get('message'), 300)}"
                          + (f" (program line {line})" if type(line) is int else "")
                          + " [while running the program, before the tests]"}
    if loaded.get("op") != "loaded":
        raise ItemOver("failed", "the candidate's process broke the protocol before the tests")
    setup, tests = job.get("setup") or "", job.get("tests") or ""
    entry_points = list(job.get("entry_points") or [])
    try:
        wanted = free_names(setup + "\n" + tests) | set(entry_points)
    except SyntaxError as e:
        return {"status": "infra_error", "layers": layers, "detail": f"the benchmark's test code does not parse: {e}"}
    found = candidate.lookup(wanted)
    namespace = {"__name__": "__tests__", "__builtins__": builtins}
    bind_candidate_values(namespace, found, entry_points)  # before the setup: it may build the candidate's objects
    phase = "setup"
    try:
        exec(compile(setup, "<setup>", "exec"), namespace)
        for name in entry_points:
            if name in found:
                namespace[name] = found[name]
            else:  # the prompt's stub must not answer for a candidate that never defined the function
                namespace.pop(name, None)
        phase = "tests"
        exec(compile(tests, "<tests>", "exec"), namespace)
    except ItemOver as over:
        raise candidate.end(over.status, over.detail) from None
    except BaseException as e:  # noqa: BLE001 -- any failure of the tests is the verdict
        if candidate.over is not None:
            raise candidate.over from None
        return {"status": "failed", "layers": layers, "detail": describe_failure(e, phase, setup, tests)}
    if candidate.over is not None:  # the tests caught the end of the item (``except BaseException``)
        raise candidate.over
    return {"status": "passed", "layers": layers, "detail": "passed all tests"}


def describe_failure(e: BaseException, phase: str, setup: str, tests: str) -> str:
    name = type(e).__name__
    if isinstance(e, NameError) and phase == "tests":
        name = "NameError"
    message = wire.sanitize(str(e), 300)
    where = ""
    tb, last = e.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename in ("<tests>", "<setup>"):
            last = tb
        tb = tb.tb_next
    if last is not None:
        source = tests if last.tb_frame.f_code.co_filename == "<tests>" else setup
        lines = source.splitlines()
        text = lines[last.tb_lineno - 1].strip() if 0 < last.tb_lineno <= len(lines) else ""
        where = f" at {phase} line {last.tb_lineno}: {wire.sanitize(text, 200)}"
    return f"{name}{': ' + message if message else ''}{where}"


def start_child(job: dict, fds) -> None:
    wire_fd, result_fd = fds
    memory = int(job.get("harness_memory_mb", 4096)) << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    candidate = Candidate(wire_fd, time.monotonic() + float(job.get("timeout", 10.0)))
    confine(job.get("setup") or "", job.get("tests") or "")
    try:
        verdict = run_tests(job, candidate)
    except ItemOver as over:
        verdict = {"status": over.status, "detail": over.detail, "layers": candidate.layers}
    except BaseException as e:  # noqa: BLE001 -- the harness itself failed: not the model's fault
        verdict = {"status": "infra_error", "detail": f"harness: {type(e).__name__}: {wire.sanitize(str(e), 300)}"}
    try:
        wire.send(wire_fd, {"op": "bye"})
    except (OSError, wire.WireError):
        pass
    wire.send(result_fd, verdict)
    os._exit(0)


NOBODY = 65534


def confine(*sources: str) -> None:
    """Defence in depth for the trusted process: import what the benchmark's code imports, then work from
    ``/`` as an unprivileged user (when started as root) with no way to regain privileges -- if some future
    path ever ran the candidate's values as code here, it would not run as root in the user's directory."""
    import ast
    import ctypes
    import importlib
    for source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                try:
                    importlib.import_module(name)
                except Exception:  # noqa: BLE001 -- the tests will report it where it matters
                    pass
    os.chdir("/")
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS


def stop_child(pid: int, _job: dict) -> dict:
    zygote.kill_and_reap(pid)
    return {"clean": True}


def main() -> None:
    zygote.preload(PRELOAD)
    zygote.serve(start_child, stop_child, {})


if __name__ == "__main__":
    main()
