"""The jailed side: a pre-warmed zygote that forks one child per item; the child runs the candidate's program
and answers the harness's calls with plain data. Runs inside the jail (``jail.py`` starts it as
``python -I -S -B worker.py``), stdlib only, nothing of cogumi but ``wire.py`` beside it.

The zygote (trusted code; no candidate code ever runs in it) reads jobs from its control socket (fd 3):
``{"op": "run", "program", "limits"}`` with the item's wire socket passed along (SCM_RIGHTS). It forks; the
child arms itself -- its own session, rlimits (CPU, memory, file size, open files, threads), Landlock
(read-only system files, read-write only in its own fresh directory), no new privileges, a seccomp filter
(no new processes, no signals but to itself, no ptrace, no sockets, no namespaces or mounts, no rlimit
raising) -- reports which layers it armed, and only then compiles and runs the candidate's program.
``{"op": "finish"}`` kills the child and everything it left, removes its directory without following a
link or recursing, and answers whether the slot is clean. The zygote is not dumpable, so a candidate
cannot reach its memory through /proc.

Child protocol on the wire (requests from the harness, one answer each; see wire.py for values):
``lookup`` names -> values (plain data, or handles for functions/classes/objects); ``call`` a handle with
args/kwargs; ``getattr``/``setattr`` on a handle. Exceptions answer as their type name and message.
"""

import builtins
import ctypes
import os
import resource
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wire  # noqa: E402  (beside this file; the jail has nothing else of cogumi)
import zygote  # noqa: E402
from tree import remove_tree  # noqa: E402

PRELOAD = ("math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string", "typing",
           "statistics", "fractions", "decimal", "datetime", "random", "hashlib", "copy", "operator", "json",
           "cmath", "array", "struct", "textwrap", "unicodedata", "dataclasses", "enum", "abc", "numbers")
WORK_ROOT = os.environ.get("COGUMI_JAIL_WORK", "/tmp")
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 4, 38, 22
LIBC = ctypes.CDLL(None, use_errno=True)


# ---------------------------------------------------------------------------------------------
# the zygote
# ---------------------------------------------------------------------------------------------

def main() -> None:
    zygote.preload(PRELOAD)
    LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    if os.environ.get("COGUMI_JAIL_OWN_TMPFS"):
        mount_tmpfs(WORK_ROOT, int(os.environ["COGUMI_JAIL_OWN_TMPFS"]))
    serial = [0]

    def start_child(job, fds):
        run_item(fds[0], job["work"], job)

    def stop_child(pid, job):
        report = usage(pid)
        report["clean"] = stop_item(pid, job["work"])
        return report

    def prepare(job):
        serial[0] += 1
        job["work"] = os.path.join(WORK_ROOT, "item-%d" % serial[0])
        os.mkdir(job["work"], 0o700)

    zygote.serve(start_child, stop_child, {"probe": probe()}, prepare=prepare)


def probe() -> dict:
    """What the jail looks like from inside, before any candidate code ran (reported at start-up)."""
    def read(path):
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return None
    status = read("/proc/self/status") or ""
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    net = read("/proc/net/dev") or ""
    interfaces = [line.split(":")[0].strip() for line in net.splitlines()[2:] if ":" in line]
    mounts = [line.split()[:4] for line in (read("/proc/self/mounts") or "").splitlines()]
    writable = sorted({m[1] for m in mounts if len(m) == 4 and "rw" in m[3].split(",")
                       and m[2] not in ("proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2")
                       and os.path.isdir(m[1])})  # device nodes bound one by one are not places to write
    bound = (os.path.realpath(sys.base_prefix), os.path.dirname(os.path.abspath(__file__)))
    visible = [p for p in ("/run", "/var/run", "/dev/log", "/var/log", "/home", "/root", "/etc/passwd",
                           "/dev/shm", "/dev/tty", "/var/tmp", "/work", "/mnt", "/srv")
               if os.path.lexists(p) and not any(b.startswith(p.rstrip("/") + "/") for b in bound)]
    work_fs = next((m for m in mounts if len(m) == 4 and m[1] == WORK_ROOT), None)
    try:
        st = os.statvfs(WORK_ROOT)
        work_bytes = st.f_blocks * st.f_frsize
    except OSError:
        work_bytes = None
    return {"uid": os.getuid(), "gid": os.getgid(), "uid_map": (read("/proc/self/uid_map") or "").split(),
            "cap_eff": fields.get("CapEff", "").strip(), "no_new_privs": fields.get("NoNewPrivs", "").strip(),
            "seccomp": fields.get("Seccomp", "").strip(), "pid": os.getpid(), "interfaces": interfaces,
            "writable_mounts": writable, "host_paths_visible": visible,
            "work_fs": work_fs[2] if work_fs else None, "work_bytes": work_bytes,
            "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0]}


def stop_item(pid: int, work: str) -> bool:
    """Kill the item's child (its whole session) and every other process it may have left in the jail,
    reap them, remove its directory. True when nothing is left over."""
    zygote.kill_and_reap(pid, group=True)
    clean = True
    if os.environ.get("COGUMI_JAIL_PIDNS") == "1" and os.getpid() <= 3:
        try:  # anything else in the jail's own pid namespace but its init and this zygote is a leftover
            os.kill(-1, signal.SIGKILL)
            clean = False
        except OSError:
            pass
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break
    return remove_tree(work) and clean


def usage(pid: int) -> dict:
    """CPU the item's process used, how long it waited runnable for a CPU, and its state, read before the
    kill: a timeout while starved of CPU is the machine's fault, not the program's."""
    out = {"cpu_s": None, "wait_s": None, "state": None}
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        out["state"], out["cpu_s"] = fields[0], (int(fields[11]) + int(fields[12])) / tick
        with open("/proc/%d/schedstat" % pid) as f:
            out["wait_s"] = int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        pass
    return out


def mount_tmpfs(path: str, size: int) -> None:
    """The fallback jail (util-linux ``unshare``, no bubblewrap): this zygote, root in its own user and mount
    namespaces, mounts the size-limited tmpfs the items write in."""
    os.makedirs(path, exist_ok=True)
    options = ("size=%d,mode=0755" % size).encode()
    if LIBC.mount(b"tmpfs", path.encode(), b"tmpfs", 0x2 | 0x4 | 0x8, options) != 0:  # nosuid, nodev, noexec
        raise OSError(ctypes.get_errno(), "mounting the jail's tmpfs failed")


# ---------------------------------------------------------------------------------------------
# one item (the forked child)
# ---------------------------------------------------------------------------------------------

def run_item(wire_fd: int, work: str, job: dict) -> None:
    limits = job.get("limits") or {}
    try:
        layers = arm(work, limits)
        wire.send(wire_fd, {"op": "armed", "layers": layers})
    except BaseException as e:  # noqa: BLE001 -- the harness must hear why, then this process ends
        try:
            wire.send(wire_fd, {"op": "arm_error", "error": "%s: %s" % (type(e).__name__, e)})
        finally:
            os._exit(3)
    serve(wire_fd, job.get("program", ""))


def arm(work: str, limits: dict) -> list:
    """Everything that confines the item's process, before a line of its code runs."""
    os.setsid()
    os.chdir(work)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    layers = ["rlimits"]
    mem = int(limits.get("memory_mb", 2048)) << 20
    for res, value in ((resource.RLIMIT_CPU, int(limits.get("cpu_s", 12))), (resource.RLIMIT_AS, mem),
                       (resource.RLIMIT_FSIZE, int(limits.get("file_size_mb", 16)) << 20),
                       (resource.RLIMIT_NOFILE, int(limits.get("open_files", 64))), (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_NPROC, int(limits.get("threads", 32)))):
        try:
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError):
            if res != resource.RLIMIT_NPROC:
                raise
    if limits.get("landlock", True):
        abi = landlock(work)
        if abi:
            layers.append("landlock%d" % abi)
    if LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
    if limits.get("drop_capabilities", True) and drop_capabilities():
        layers.append("nocaps")
    if limits.get("seccomp", True):
        if not seccomp():
            raise OSError("seccomp filter could not be installed")
        layers.append("seccomp")
    return layers


def serve(fd: int, program: str) -> None:
    """Run the program, then answer the harness until it says bye (or the zygote kills this process)."""
    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    objects = Objects()
    try:
        exec(compile(program, "<candidate>", "exec"), namespace)
    except BaseException as e:  # noqa: BLE001 -- whatever the program raised is its load error
        wire.send(fd, {"op": "load_error", "error": describe(e)})
        os._exit(0)
    wire.send(fd, {"op": "loaded"})
    while True:
        request = wire.receive(fd)
        if request is None or request.get("op") == "bye":
            os._exit(0)
        try:
            reply = answer(request, namespace, objects)
        except BaseException as e:  # noqa: BLE001 -- the candidate's exception, reported by name
            reply = {"error": describe(e)}
        reply["id"] = request.get("id")
        try:
            wire.send(fd, reply)
        except wire.WireError as e:
            wire.send(fd, {"id": request.get("id"), "error": {"type": "WireError", "message": str(e)}})


class Objects:
    """The candidate's non-plain values, kept here by number: the harness holds only the numbers."""

    def __init__(self):
        self.by_handle, self.handle_by_id = {}, {}

    def handle_of(self, obj) -> int:
        key = id(obj)
        if key not in self.handle_by_id:
            handle = len(self.by_handle) + 1
            self.by_handle[handle], self.handle_by_id[key] = obj, handle
        return self.handle_by_id[key]

    def resolve(self, handle, _type_name=None):
        if handle not in self.by_handle:
            raise wire.WireError("unknown handle")
        return self.by_handle[handle]

    def encode(self, value):
        return wire.encode_value(value, self.handle_of)

    def decode(self, tree):
        return wire.decode_value(tree, self.resolve)


def answer(request: dict, namespace: dict, objects: Objects) -> dict:
    op = request.get("op")
    if op == "lookup":
        names = [n for n in request.get("names") or [] if type(n) is str]
        return {"found": {n: objects.encode(namespace[n]) for n in names if n in namespace}}
    target = objects.resolve(request.get("target"))
    if op == "call":
        args = [objects.decode(a) for a in request.get("args") or []]
        kwargs = {k: objects.decode(v) for k, v in request.get("kwargs") or []}
        return {"ok": objects.encode(target(*args, **kwargs))}
    if op == "getattr":
        return {"ok": objects.encode(getattr(target, request.get("name")))}
    if op == "setattr":
        setattr(target, request.get("name"), objects.decode(request.get("value")))
        return {"ok": ["n"]}
    raise wire.WireError("unknown request")


def describe(e: BaseException) -> dict:
    try:
        name = type(e).__name__
        message = str(e)
    except BaseException:  # noqa: BLE001 -- a hostile __str__
        name, message = "Exception", "<unprintable>"
    line = None
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<candidate>":
            line = tb.tb_lineno
        tb = tb.tb_next
    if isinstance(e, SyntaxError):
        line = e.lineno
    return {"type": wire.sanitize(name if type(name) is str else "Exception", 80),
            "message": wire.sanitize(message if type(message) is str else "", wire.MAX_MESSAGE), "line": line}


# ---------------------------------------------------------------------------------------------
# kernel layers (ctypes: the jail has no cogumi, and Python's stdlib has no binding for these)
# ---------------------------------------------------------------------------------------------

def landlock(work: str) -> int:
    """Read-only: the Python install and system libraries; read-write: the item's own directory; nothing
    else (not /proc: a candidate cannot reach other processes' memory or file descriptors)."""
    create, add_rule, restrict = 444, 445, 446
    abi = LIBC.syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    fs_all = (1 << 13) - 1
    if abi >= 2:
        fs_all |= 1 << 13
    if abi >= 3:
        fs_all |= 1 << 14
    if abi >= 5:
        fs_all |= 1 << 15

    class Ruleset(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = Ruleset(fs_all, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    rfd = LIBC.syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if rfd < 0:
        return 0
    read_file, read_dir, write_file = 4, 8, 2
    truncate = 1 << 14 if abi >= 3 else 0
    ioctl = 1 << 15 if abi >= 5 else 0
    make_char, make_block = 64, 2048
    rules = [(work, fs_all & ~(make_char | make_block)), (os.devnull, read_file | write_file | truncate | ioctl)]
    for root in readable_roots():
        rules.append((root, read_file | read_dir if os.path.isdir(root) else read_file))
    for path, access in rules:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        rule = PathBeneath(access, pfd)
        LIBC.syscall(add_rule, rfd, 1, ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(pfd)
    if LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or LIBC.syscall(restrict, rfd, ctypes.c_uint32(0)) != 0:
        os.close(rfd)
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(rfd)
    return abi


def readable_roots() -> list:
    roots = {p for p in sys.path if p} | {sys.prefix, sys.base_prefix, sys.exec_prefix, "/usr/lib", "/usr/lib64",
                                          "/lib", "/lib64", "/usr/share/zoneinfo", "/etc/localtime",
                                          os.path.dirname(os.path.abspath(__file__))}
    return sorted(os.path.realpath(p) for p in roots if os.path.exists(p))


def drop_capabilities() -> bool:
    """capset(all zero): whatever this process still held in its namespace, it holds nothing now."""
    nr = {"x86_64": 126, "aarch64": 91}.get(os.uname().machine)
    if nr is None:
        return False

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()
    return LIBC.syscall(nr, ctypes.byref(header), ctypes.byref(data)) == 0


# syscall numbers: (x86_64, aarch64); None where the syscall does not exist
SYSCALLS = {
    "fork": (57, None), "vfork": (58, None), "execve": (59, 221), "execveat": (322, 281),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "setsid": (112, 157), "setpgid": (109, 154), "setrlimit": (160, 164), "unshare": (272, 97),
    "setns": (308, 268), "mount": (165, 40), "tkill": (200, 130), "rt_sigqueueinfo": (129, 138),
    "rt_tgsigqueueinfo": (297, 240), "pidfd_send_signal": (424, 424), "setpriority": (141, 140),
    "sched_setscheduler": (144, 119), "sched_setattr": (314, 274), "sched_setaffinity": (203, 122),
    "io_uring_setup": (425, 425), "bpf": (321, 280), "clone": (56, 220), "clone3": (435, 435),
    "kill": (62, 129), "tgkill": (234, 131), "prlimit64": (302, 261), "socket": (41, 198),
    "pidfd_open": (434, 434), "pidfd_getfd": (438, 438), "process_madvise": (440, 440), "kcmp": (312, 272),
    "fallocate": (285, 47), "userfaultfd": (323, 282), "perf_event_open": (298, 241), "keyctl": (250, 219),
    "add_key": (248, 217), "request_key": (249, 218), "syslog": (103, 116), "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264), "mknod": (133, None), "mknodat": (259, 33), "chroot": (161, 51),
    "pivot_root": (155, 41), "umount2": (166, 39), "fsopen": (430, 430), "fsmount": (432, 432),
    "move_mount": (429, 429), "open_tree": (428, 428), "mount_setattr": (442, 442), "capset": (126, 91),
    "setuid": (105, 146), "setgid": (106, 144), "setreuid": (113, 145), "setregid": (114, 143),
    "setresuid": (117, 147), "setresgid": (119, 149), "setgroups": (116, 159), "setfsuid": (122, 151),
    "setfsgid": (123, 152), "personality": (135, 92), "acct": (163, 89), "swapon": (167, 224),
    "reboot": (169, 142), "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "kexec_load": (246, 104), "quotactl": (179, 60), "iopl": (172, None), "ioperm": (173, None),
    # file metadata: Landlock does not govern it, and the owner of a file may change it
    "chmod": (90, None), "fchmod": (91, 52), "fchmodat": (268, 53), "fchmodat2": (452, 452),
    "chown": (92, None), "fchown": (93, 55), "lchown": (94, None), "fchownat": (260, 54),
    "utime": (132, None), "utimes": (235, None), "futimesat": (261, None), "utimensat": (280, 88),
    "setxattr": (188, 5), "lsetxattr": (189, 6), "fsetxattr": (190, 7), "removexattr": (197, 14),
    "lremovexattr": (198, 15), "fremovexattr": (199, 16),
}
ALLOWED_WITH_ARGS = ("clone", "clone3", "kill", "tgkill", "prlimit64")


def seccomp() -> bool:
    """No new processes (threads only), signals only to itself, rlimits readable but never raised, no
    sockets (the wire was made outside), no ptrace or cross-process memory, no namespaces, mounts,
    identity or file-metadata changes, no disk preallocation (``fallocate`` could fill the jail's tmpfs past
    its file-size limit in one call)."""
    import struct
    machine = os.uname().machine
    if machine not in ("x86_64", "aarch64"):
        return False
    col = 0 if machine == "x86_64" else 1
    arch = 0xC000003E if col == 0 else 0xC00000B7
    nr = {k: v[col] for k, v in SYSCALLS.items() if v[col] is not None}
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    me = os.getpid()
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    if col == 0:
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # the x32 ABI
    arg_lo = lambda i: 16 + 8 * i  # noqa: E731
    arg_hi = lambda i: 20 + 8 * i  # noqa: E731
    for name in SYSCALLS:
        if name in nr and name not in ALLOWED_WITH_ARGS:
            prog += [(jeq, 0, 1, nr[name]), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, nr["clone3"]), (ret, 0, 0, enosys)]  # glibc falls back to clone for threads
    prog += [(jeq, 0, 4, nr["clone"]), (ld, 0, 0, arg_lo(0)), (jset, 0, 1, 0x00010000),
             (ret, 0, 0, allow), (ret, 0, 0, eperm)]                               # CLONE_THREAD only
    for name in ("kill", "tgkill"):                                                # only to itself
        prog += [(jeq, 0, 6, nr[name]), (ld, 0, 0, arg_lo(0)), (jeq, 0, 3, me), (ld, 0, 0, arg_hi(0)),
                 (jeq, 0, 1, 0), (ret, 0, 0, allow), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 6, nr["prlimit64"]), (ld, 0, 0, arg_lo(2)), (jeq, 0, 3, 0), (ld, 0, 0, arg_hi(2)),
             (jeq, 0, 1, 0), (ret, 0, 0, allow), (ret, 0, 0, eperm)]               # read limits only
    prog += [(ret, 0, 0, allow)]
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    return LIBC.prctl(PR_SET_SECCOMP, 2, ctypes.byref(fprog), 0, 0) == 0


if __name__ == "__main__":
    main()
