"""The jail the candidate's code runs in: how it is started, and which layers it has.

Why bubblewrap: it is the small, well-kept tool (Flatpak's sandbox) that does exactly this -- new user, mount,
pid, network, IPC and UTS namespaces; a root made of read-only binds plus a size-limited tmpfs; ``--cap-drop
ALL``; ``--die-with-parent``; ``--new-session`` -- without our own mount code. When it is missing, the
fallback is util-linux ``unshare`` (namespaces) with the zygote mounting its own tmpfs; with neither, only the
per-item layers (rlimits, Landlock, seccomp, no capabilities) remain, and the report says so.

A process limit that holds for root: ``RLIMIT_NPROC`` is ignored for processes of the real root user, so when
cogumi runs as root the jail must run as another user. The launcher is a chain of util-linux tools and
bubblewrap (``unshare --mount`` -> bind the Python install where that user can reach it -> ``prlimit`` ->
``setpriv --reuid`` -> ``bwrap``): every jail runs as its own unprivileged uid (one per slot), so one item's
thread bomb exhausts only its own slot's count (``RLIMIT_NPROC`` in the item, and the uid's limit outside).

Layers (``Layers``: what is active, what is missing, what a missing one means) are read from the jail's own
report at start-up (``worker.probe``: uid, uid map, capabilities, interfaces, mounts, writable places, host
paths visible) and from each item's arming (``landlock``, ``seccomp``, ``rlimits``, ``nocaps``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
JAIL_HOME = "/opt/cogumi-jail"     # where worker.py and wire.py appear inside the jail
JAIL_WORK = "/tmp"                 # the jail's only writable place: a size-limited tmpfs
JAIL_UID = 1000                    # the uid inside; outside it is unprivileged too (see module docstring)
HOST_UID_BASE = 2_000_000_000      # outside uids for jails started by root: owned by no one, one per slot
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")

LAYER_MEANING = {
    "userns": "a user namespace: the candidate is an unprivileged uid inside and outside",
    "mountns": "a private filesystem view: read-only system files, no host sockets (/dev/log, /run)",
    "tmpfs": "the only writable place is a size-limited tmpfs (a full disk is impossible)",
    "pidns": "its own pid namespace: it cannot see or signal other processes",
    "netns": "no network: no interface but loopback in an empty namespace",
    "nproc": "a process/thread limit that holds (an unprivileged uid: RLIMIT_NPROC applies)",
    "rlimits": "CPU, memory, file size and open-file limits",
    "landlock": "the kernel's path rules: read-only system files, read-write only in its own directory",
    "seccomp": "no new processes, sockets, ptrace, mounts, namespaces or identity changes",
    "nocaps": "no capabilities",
    "harness": "tests run in a separate trusted process; only plain data crosses (always on)",
}


@dataclass
class Layers:
    active: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)    # layer -> why it is missing
    launcher: str = "none"

    def summary(self) -> str:
        """One line of active layers, then one line per missing layer: why, and what is not guaranteed."""
        lines = [f"jail ({self.launcher}): " + (", ".join(self.active) or "none")]
        lines += [f"MISSING {name}: {why} -- not guaranteed: {LAYER_MEANING.get(name, name)}"
                  for name, why in self.missing.items()]
        return "\n".join(lines)


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]
    launcher: str
    staging: str | None = None     # a host temp dir used as a mount point (removed when the jail closes)


def process_tag() -> str:
    """An argument every sandbox process carries (ignored by it), so tests and operators can find them:
    ``cogumi-sandbox``, or ``cogumi-sandbox-TAG`` with ``COGUMI_SANDBOX_TAG`` set."""
    tag = os.environ.get("COGUMI_SANDBOX_TAG", "")
    return "cogumi-sandbox" + (f"-{tag}" if tag else "")


def python_install() -> tuple[str, str]:
    """(the real interpreter binary, its installation prefix): what the jail needs of Python."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return exe, os.path.realpath(sys.base_prefix)


def available_launcher(preferred: str = "auto") -> str:
    """``preferred`` if its tool is installed, else the next weaker one (bwrap > unshare > none)."""
    if preferred in ("bwrap", "auto") and shutil.which("bwrap"):
        return "bwrap"
    if preferred in ("unshare", "auto", "bwrap") and shutil.which("unshare") and sys.platform == "linux":
        return "unshare"
    return "none"


def worker_env(launcher: str, tmpfs_bytes: int) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0",
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": JAIL_WORK, "TMPDIR": JAIL_WORK}
    if launcher in ("bwrap", "unshare"):
        env["COGUMI_JAIL_PIDNS"] = "1"
    if launcher == "unshare":
        env["COGUMI_JAIL_OWN_TMPFS"] = str(tmpfs_bytes)
    return env


CONTROL_FD_PLACEHOLDER = "{CONTROL_FD}"


def build_launch(slot: int, *, tmpfs_mb: int, nproc: int, launcher: str = "auto") -> Launch:
    """The command that starts one jailed zygote (worker.py) for slot ``slot``. Its control socket's number,
    known only when it is started, stands as ``CONTROL_FD_PLACEHOLDER`` in the command and environment."""
    kind = available_launcher(launcher)
    exe, prefix = python_install()
    tmpfs_bytes = tmpfs_mb << 20
    env = worker_env(kind, tmpfs_bytes)
    env["COGUMI_CONTROL_FD"] = CONTROL_FD_PLACEHOLDER
    if kind == "bwrap":
        return _bwrap_launch(slot, exe, prefix, tmpfs_bytes, nproc, env)
    worker = [exe, "-I", "-S", "-B", str(HERE / "worker.py"), process_tag()]
    if kind == "unshare":
        work = tempfile.mkdtemp(prefix="cogumi-jail-")
        env["COGUMI_JAIL_WORK"] = work
        ns = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
              "--mount-proc", "--net", "--ipc", "--uts"]
        if os.geteuid() != 0:
            ns.insert(1, "--user")
            ns.insert(2, "--map-root-user")
        return Launch(ns + ["--"] + worker, env, "unshare", staging=work)
    work = tempfile.mkdtemp(prefix="cogumi-jail-")
    env["COGUMI_JAIL_WORK"] = work
    return Launch(worker, env, "none", staging=work)


def _bwrap_launch(slot: int, exe: str, prefix: str, tmpfs_bytes: int, nproc: int, env: dict) -> Launch:
    binds = [("--ro-bind-try", d, d) for d in SYSTEM_DIRS] + [("--ro-bind-try", f, f) for f in SYSTEM_FILES]
    staging = None
    setup = ""
    if os.geteuid() == 0:
        # Root: the jail runs as an unprivileged host uid, which may not traverse root's directories (a Python
        # under /root). In a private mount namespace the install is bound where that uid can reach it.
        staging = tempfile.mkdtemp(prefix="cogumi-jail-", dir=traversable_temp_dir())
        os.chmod(staging, 0o755)
        for name in ("python", "home"):
            os.mkdir(os.path.join(staging, name), 0o755)
        setup = (f"mount --bind {_q(prefix)} {_q(staging)}/python && mount -o remount,bind,ro {_q(staging)}/python && "
                 f"mount --bind {_q(str(HERE))} {_q(staging)}/home && "
                 f"mount -o remount,bind,ro {_q(staging)}/home && ")
        python_src, home_src = f"{staging}/python", f"{staging}/home"
    else:
        python_src, home_src = prefix, str(HERE)
    if not any(prefix == d or prefix.startswith(d + "/") for d in SYSTEM_DIRS):
        binds.append(("--ro-bind", python_src, prefix))
    binds.append(("--ro-bind", home_src, JAIL_HOME))
    bwrap = ["bwrap", "--unshare-all", "--uid", str(JAIL_UID), "--gid", str(JAIL_UID), "--die-with-parent",
             "--new-session", "--cap-drop", "ALL", "--hostname", "cogumi-jail"]
    for flag, src, dst in binds:
        bwrap += [flag, src, dst]
    for node in DEVICES:  # not --dev: that /dev is a writable tmpfs without a size limit
        bwrap += ["--dev-bind-try", node, node]
    bwrap += ["--proc", "/proc", "--size", str(tmpfs_bytes), "--tmpfs", JAIL_WORK, "--remount-ro", "/",
              "--chdir", JAIL_WORK, "--clearenv"]
    for key, value in env.items():
        bwrap += ["--setenv", key, value]
    bwrap += ["--", exe, "-I", "-S", "-B", f"{JAIL_HOME}/worker.py", process_tag()]
    if os.geteuid() != 0:
        return Launch(["prlimit", f"--nproc={nproc}", "--"] + bwrap, env, "bwrap")
    uid = HOST_UID_BASE + (os.getpid() * 16 + slot) % 100_000_000
    chain = (setup + f"exec prlimit --nproc={nproc} -- setpriv --reuid={uid} --regid={uid} --clear-groups "
             f"--inh-caps=-all -- " + " ".join(_q(a) for a in bwrap))
    argv = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", chain]
    return Launch(argv, env, "bwrap", staging=staging)


def traversable_temp_dir() -> str:
    """A temporary directory every user can reach (each ancestor searchable by others): the jail's
    unprivileged uid must reach the mount points made there. TMPDIR when it qualifies, else /tmp."""
    for candidate in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):
        path = Path(candidate).resolve()
        if path.is_dir() and all(p.stat().st_mode & 0o001 for p in [path, *path.parents]):
            return str(path)
    return tempfile.gettempdir()


def _q(text: str) -> str:
    import shlex
    return shlex.quote(text)


def read_layers(launcher: str, probe: dict, armed: list[str], tmpfs_mb: int) -> Layers:
    """Which layers hold, judged from the jail's own report (made before any candidate code ran)."""
    layers = Layers(launcher=launcher)

    def check(name: str, ok: bool, why: str) -> None:
        if ok:
            layers.active.append(name)
        else:
            layers.missing[name] = why

    uid_map = probe.get("uid_map") or []
    in_userns = len(uid_map) >= 3 and uid_map[:3] != ["0", "0", "4294967295"]
    check("userns", in_userns and probe.get("uid") != 0, "runs in the host's user namespace or as uid 0")
    visible = probe.get("host_paths_visible") or []
    check("mountns", not visible, "host paths visible: " + ", ".join(visible))
    writable = probe.get("writable_mounts") or []
    tmpfs_ok = probe.get("work_fs") == "tmpfs" and set(writable) <= {JAIL_WORK, probe.get("work_root") or JAIL_WORK} \
        and (probe.get("work_bytes") or 0) <= (tmpfs_mb << 20) * 1.05
    check("tmpfs", tmpfs_ok, f"writable mounts {writable}, work fs {probe.get('work_fs')}")
    check("pidns", int(probe.get("pid") or 99) <= 3, "shares the host's pid namespace")
    check("netns", set(probe.get("interfaces") or []) <= {"lo"}, "network interfaces "
          + ", ".join(probe.get("interfaces") or []))
    nproc = probe.get("nproc")
    check("nproc", in_userns and launcher == "bwrap" and nproc not in (None, -1),
          "the jail's uid is root's or shares the host's, so RLIMIT_NPROC does not bind")
    for name in ("rlimits", "seccomp", "nocaps"):
        check(name, name in armed, "not armed in the item's process")
    check("landlock", any(x.startswith("landlock") for x in armed), "the kernel has no Landlock")
    layers.active.append("harness")
    return layers
