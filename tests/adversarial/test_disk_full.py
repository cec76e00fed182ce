"""Disk full during a training checkpoint and during a merge, on a real small tmpfs (the kernel's ENOSPC).

Each scenario runs in a private mount namespace (``unshare --mount``; ``--map-root-user`` when not root) so
the tmpfs exists only for it and vanishes with it. Inside: mount a tmpfs sized from a reference run so
that it fills up part-way through the work, run the real ``cogumi`` command there, copy what it left out
for inspection, grow the tmpfs (the user freed space), run again, copy out again.

  * train: the disk fills while the last checkpoint is written. Wanted: a clear ``error:`` naming the disk
    (no traceback), the previous checkpoint complete and loadable, no adapter, nothing half-written at a
    final path; ``--resume`` after freeing space continues from that checkpoint and ends with exactly the
    adapter of an uninterrupted run.
  * merge, space checked first: a tmpfs too small for the output is refused before anything is written.
  * merge, disk full mid-write (a tmpfs out of inodes, so the free-bytes check passes and the writes fail):
    a clear error, the existing merged model at ``--out`` (``--overwrite``) intact, no temporary left;
    the same command after freeing space writes exactly the reference merged model.
Skipped where no mount namespace can be made.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from .conftest import assert_same_tensors, cli_env, report, scan_artifacts, train_args, tree_hash


@lru_cache(maxsize=1)
def unshare_prefix() -> tuple[str, ...] | None:
    exe = shutil.which("unshare")
    if not exe or sys.platform != "linux":
        return None
    for extra in ((), ("--map-root-user",)):
        cmd = (exe, "--mount", *extra)
        probe = subprocess.run([*cmd, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d"],
                               capture_output=True)
        if probe.returncode == 0:
            return cmd
    return None


@pytest.fixture(scope="module")
def namespace():
    prefix = unshare_prefix()
    if prefix is None:
        pytest.skip("no private mount namespace here (unshare --mount / tmpfs not permitted)")
    return prefix


def run_steps(prefix, steps: list[str], host: Path, mnt: Path) -> None:
    """Run shell ``steps`` in a private mount namespace (the tmpfs lives and dies with it)."""
    script = host / "steps.sh"
    script.write_text("set -u\n" + "\n".join(steps) + "\n")
    mnt.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([*prefix, "bash", str(script)], env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"namespace script failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"


def cogumi_step(args, tag: str, host: Path) -> str:
    cmd = " ".join(shlex.quote(str(a)) for a in [sys.executable, "-m", "cogumi", *args])
    return f"{cmd} > {host}/{tag}.out 2> {host}/{tag}.err; echo $? > {host}/{tag}.rc"


def outcome(host: Path, tag: str) -> tuple[int, str]:
    return int((host / f"{tag}.rc").read_text()), (host / f"{tag}.err").read_text()


def du_bytes(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in Path(path).rglob("*") if p.is_file())


def clear_disk_full_error(rc: int, err: str) -> list[str]:
    problems = []
    if rc == 0:
        problems.append("exit 0 although the disk was full")
    if "Traceback" in err:
        problems.append("a traceback instead of one clear message")
    if not any(w in err.lower() for w in ("no space left", "disk is full", "disk full", "not enough disk")):
        problems.append("the message does not say the disk is full")
    if "error:" not in err:
        problems.append("no 'error:' line")
    return problems


def test_disk_full_during_a_checkpoint(namespace, tmp_path, train_reference, tiny_base, adv_data):
    ref = train_reference.path
    checkpoint = du_bytes(ref / "checkpoints" / "checkpoint-6")
    before_last = du_bytes(ref) - checkpoint - du_bytes(ref / "adapter")
    size_kb = (before_last + checkpoint // 2) // 1024          # full half-way through checkpoint-6
    host, mnt = tmp_path / "host", tmp_path / "mnt"
    host.mkdir()
    args = train_args(tiny_base, adv_data["train"], mnt / "run")
    run_steps(namespace, [
        f"mount -t tmpfs -o size={size_kb}k tmpfs {mnt}",
        cogumi_step(args, "full", host),
        f"cp -a {mnt}/run {host}/after-full",
        f"mount -o remount,size=256m {mnt}",
        cogumi_step([*args, "--resume"], "resumed", host),
        f"cp -a {mnt}/run {host}/after-resume",
    ], host, mnt)
    rc, err = outcome(host, "full")
    left = host / "after-full"
    scan = scan_artifacts(left)
    report("disk_full", {"scenario": "train-checkpoint", "tmpfs_kb": size_kb, "rc": rc, "message": err[-600:],
                         "complete": scan.complete_checkpoints, "partial": scan.partial_checkpoints})
    assert rc != 0 and not (left / "adapter").exists(), "the run did not hit the full disk; resize the tmpfs"
    assert not scan.problems, scan.problems
    assert scan.complete_checkpoints, "no complete checkpoint survived the full disk"
    rc2, err2 = outcome(host, "resumed")
    assert rc2 == 0, err2[-3000:]
    said = (host / "resumed.out").read_text() + err2
    assert f"continuing from {scan.complete_checkpoints[-1]}" in said
    assert_same_tensors(host / "after-resume" / "adapter", ref / "adapter", "adapter_model.safetensors")
    problems = clear_disk_full_error(rc, err)
    assert not problems, f"{problems}; what the user saw:\n{err[-2500:]}"


def test_merge_refused_up_front_when_the_output_cannot_fit(namespace, tmp_path, train_reference):
    host, mnt = tmp_path / "host", tmp_path / "mnt"
    host.mkdir()
    run_steps(namespace, [
        f"mount -t tmpfs -o size=8m tmpfs {mnt}",
        cogumi_step(["merge", train_reference.path / "adapter", "--out", mnt / "merged", "--no-fidelity"], "merge", host),
        f"ls -A {mnt} > {host}/listing",
    ], host, mnt)
    rc, err = outcome(host, "merge")
    report("disk_full", {"scenario": "merge-precheck", "rc": rc, "message": err[-400:]})
    assert rc == 2 and err.startswith("error: not enough disk") and "Traceback" not in err, err[-2000:]
    assert (host / "listing").read_text().strip() == "", "something was written before the refusal"


def test_disk_full_during_a_merge_keeps_the_existing_output(namespace, tmp_path, train_reference, merge_reference):
    adapter, merged = train_reference.path / "adapter", merge_reference.path
    host, mnt = tmp_path / "host", tmp_path / "mnt"
    host.mkdir()
    # inodes: the mount root and the existing merged model, then room for the temporary dir and one shard only
    existing_inodes = 1 + 1 + sum(1 for _ in merged.rglob("*"))
    args = ["merge", adapter, "--out", mnt / "merged", "--overwrite", "--no-fidelity"]   # tensors are the same
    run_steps(namespace, [
        f"mount -t tmpfs -o size=512m,nr_inodes={existing_inodes + 3} tmpfs {mnt}",
        f"cp -a {merged} {mnt}/merged",
        f"cp -a {mnt}/merged {host}/before",
        cogumi_step(args, "full", host),
        f"cp -a {mnt} {host}/after-full",
        f"mount -o remount,nr_inodes=100000 {mnt}",
        cogumi_step(args, "again", host),
        f"cp -a {mnt} {host}/after-again",
    ], host, mnt)
    rc, err = outcome(host, "full")
    report("disk_full", {"scenario": "merge-midway", "rc": rc, "message": err[-600:]})
    assert rc != 0, "the merge did not hit the full disk"
    after = host / "after-full"
    assert tree_hash(after / "merged") == tree_hash(host / "before"), "the existing merged model was damaged"
    temporaries = [p.name for p in after.iterdir() if p.name != "merged"]
    assert not temporaries, f"temporary output left on the full disk: {temporaries}"
    rc2, err2 = outcome(host, "again")
    assert rc2 == 0, err2[-3000:]
    assert_same_tensors(host / "after-again" / "merged", merged)
    problems = clear_disk_full_error(rc, err)
    assert not problems, f"{problems}; what the user saw:\n{err[-2500:]}"
