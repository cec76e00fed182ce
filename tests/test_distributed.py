"""`cogumi train` unchanged under torchrun / accelerate launch: 2 CPU processes on gloo (DDP) give the loss
curve of one process with the same global batch; data is read and logs/manifests written once (rank 0); an
FSDP2 run killed with SIGKILL resumes (under the other launcher) to the DDP run's adapter."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cogumi.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
BIN = Path(sys.executable).parent


def common_sets(base, data, out) -> list[str]:
    # dropout off: each process draws its own dropout masks, which a single process would draw differently
    return ["--set", f"base_model={base}", "--set", f"data.train={data}", "--set", f"output_dir={out}",
            "--set", "lora.dropout=0.0", "--set", "training.max_steps=4", "--set", "training.save_steps=2",
            "--set", "training.grad_accum=2"]


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], **extra_env) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "cogumi", *args]
    return subprocess.run(cmd, env=env(**extra_env), capture_output=True, text=True, timeout=300)


def accelerate_launch(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "cogumi", *args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    from cogumi.tiny import synthetic_instructions, write_jsonl
    return write_jsonl(tmp_path_factory.mktemp("ddp") / "train.jsonl", synthetic_instructions(48, seed=0))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_base, train_file):
    out = tmp_path_factory.mktemp("ddp2") / "out"
    proc = torchrun(["train", str(CONFIG), *common_sets(tiny_base, train_file, out),
                     "--set", "training.batch_size=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_base, train_file,
                                                                         two_process_run, capsys):
    from cogumi.lineage import read_manifest

    single = tmp_path / "single"
    assert main(["train", str(CONFIG), *common_sets(tiny_base, train_file, single),
                 "--set", "training.batch_size=4"]) == 0                 # 4 x 2 x 1 process = 8
    capsys.readouterr()
    ddp, proc = two_process_run                                            # 2 x 2 x 2 processes = 8
    one, two = losses(single), losses(ddp)
    assert [s for s, _ in two] == [1, 2, 3, 4]                             # logged once, by rank 0
    assert [s for s, _ in one] == [s for s, _ in two]
    for (_, a), (_, b) in zip(one, two):
        assert b == pytest.approx(a, rel=1e-4)
    man, man1 = read_manifest(ddp / "adapter"), read_manifest(single / "adapter")
    assert man["world_size"] == 2 and man["global_batch_size"] == man1["global_batch_size"] == 8
    assert man["tokens_seen"] == man1["tokens_seen"]
    assert proc.stdout.count("data: 48 rows read") == 1                   # data read and reported once
    assert "2 process(es)); " in proc.stdout
    assert "2 rows x 2 accumulation x 2 process(es) per step; 8.0 rows per step on average (recipe 8)" in proc.stdout
    assert not (ddp / ".prepared").exists()                                # the shared cache is cleaned up


def test_fsdp_run_killed_then_resumed_under_accelerate_launch_equals_ddp(tmp_path, tiny_base, train_file,
                                                                        two_process_run):
    import torch
    from safetensors.torch import load_file

    from cogumi.lineage import read_manifest

    out = tmp_path / "out"
    args = ["train", str(CONFIG), *common_sets(tiny_base, train_file, out), "--set", "training.batch_size=2",
            "--set", "training.distributed=fsdp"]
    killed = torchrun(args, COGUMI_FAULT_KILL_AT_STEP="3")
    assert killed.returncode != 0 and not (out / "adapter").exists()
    assert (out / "checkpoints" / "checkpoint-2" / "cogumi-complete").exists()
    resumed = accelerate_launch(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing from checkpoint-2" in resumed.stdout and ", FSDP" in resumed.stdout
    assert read_manifest(out / "adapter")["distributed"] == "fsdp"
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))          # gathered: full shapes
    b = load_file(str(two_process_run[0] / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4]
