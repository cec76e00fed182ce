"""A pre-warmed process that forks one child per item, driven over a control socket (stdlib only; used by
both the jailed worker and the trusted harness, each started once per slot).

Control protocol (length-prefixed JSON, file descriptors passed with SCM_RIGHTS), one item at a time:
  parent -> ``{"op": "run", ...job}`` + fds      zygote forks; the child gets the job and the fds
  zygote -> ``{"op": "started", "pid": P}``      (P in the zygote's own pid namespace)
  parent -> ``{"op": "finish"}``                 the zygote measures, kills and reaps the child, cleans up
  zygote -> ``{"op": "finished", ...}``          ``clean`` false: the slot should be replaced
End of stream on the control socket ends the zygote (and, through the kernel, its children).
"""

import array
import json
import os
import signal
import socket

CONTROL_FD = int(os.environ.get("COGUMI_CONTROL_FD", "3"))
MAX_CONTROL = 64 << 20


def send(sock: socket.socket, message: dict, fds=()) -> None:
    data = json.dumps(message).encode()
    frame = len(data).to_bytes(4, "big") + data
    if fds:
        sent = sock.sendmsg([frame[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        frame = frame[sent:]
    sock.sendall(frame)


def receive(sock: socket.socket):
    """(message, fds), or (None, []) at end of stream."""
    fds = array.array("i")
    head = b""
    while len(head) < 4:
        data, ancillary, _flags, _addr = sock.recvmsg(4 - len(head), socket.CMSG_SPACE(16 * fds.itemsize))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data:
            for fd in fds:
                os.close(fd)
            return None, []
        head += data
    size = int.from_bytes(head, "big")
    if size > MAX_CONTROL:
        raise ValueError("control message too large")
    body = b""
    while len(body) < size:
        more = sock.recv(size - len(body))
        if not more:
            return None, list(fds)
        body += more
    return json.loads(body), list(fds)


def serve(start_child, stop_child, ready: dict, prepare=None) -> None:
    """The zygote's loop. ``prepare(job)`` runs in the zygote before the fork; ``start_child(job, fds)`` runs
    in the forked child and never returns; ``stop_child(pid, job) -> dict`` runs in the zygote when the
    parent says finish."""
    control = socket.socket(fileno=CONTROL_FD)
    send(control, {"op": "ready", **ready})
    while True:
        job, fds = receive(control)
        if job is None:
            os._exit(0)
        if job.get("op") != "run":
            for fd in fds:
                os.close(fd)
            send(control, {"op": "error", "error": "unknown control message"})
            continue
        if prepare is not None:
            prepare(job)
        pid = os.fork()
        if pid == 0:
            try:
                control.close()
                start_child(job, fds)
            finally:
                os._exit(70)
        for fd in fds:
            os.close(fd)
        send(control, {"op": "started", "pid": pid})
        finish, more = receive(control)
        for fd in more:
            os.close(fd)
        report = stop_child(pid, job)
        if finish is None:
            os._exit(0)
        send(control, {"op": "finished", **report})


def preload(modules) -> None:
    """Import what the children will likely need once, here, so each fork starts with it."""
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            pass


def kill_and_reap(pid: int, *, group: bool = False) -> None:
    for target in ((-pid, pid) if group else (pid,)):
        try:
            os.kill(target, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
