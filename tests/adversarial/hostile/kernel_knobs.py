"""Open kernel control files for writing (nothing is written): sysrq, sysctl, cgroups, oom_score_adj."""
# tags: escape
for path in ("/proc/sysrq-trigger", "/proc/sys/kernel/hostname", "/proc/sys/vm/drop_caches",
             "/proc/self/oom_score_adj", f"/proc/{PARENT_PID}/oom_score_adj", "/sys/kernel/mm/transparent_hugepage/enabled",
             "/sys/fs/cgroup/cgroup.procs"):
    try:
        f = open(path, "a")
        f.close()
        escaped("opened for writing " + path)
    except Exception:
        pass
def solve(x):
    return x
