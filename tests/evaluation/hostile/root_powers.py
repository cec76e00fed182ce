"""use root's powers: device nodes, hostname, clock, mount, chroot, raw disk, reboot (probe only)."""
# tags: escape
import os, stat, socket, time
for what, attempt in (("mknod block device", lambda: os.mknod("sda", 0o600 | stat.S_IFBLK, os.makedev(8, 0))),
                      ("mknod char device", lambda: os.mknod("mem", 0o600 | stat.S_IFCHR, os.makedev(1, 1))),
                      ("sethostname", lambda: socket.sethostname(socket.gethostname())),
                      ("clock_settime", lambda: time.clock_settime(time.CLOCK_REALTIME, time.time())),
                      ("chroot", lambda: os.chroot(".")),
                      ("read raw disk", lambda: open("/dev/sda", "rb").read(512)),
                      ("setuid to nobody and back", lambda: (os.setuid(65534), os.setuid(0)))):
    try:
        attempt()
        escaped(what)
    except Exception:
        pass
def solve(x):
    return x
