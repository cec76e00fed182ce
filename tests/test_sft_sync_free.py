"""cogumi.sft: the sync-free SFTTrainer trains exactly like TRL's and logs the same metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer_support import tiny_config, tiny_trainer


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    from cogumi.tiny import synthetic_instructions, write_jsonl
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", synthetic_instructions(40, seed=3))


def _train(tmp_path, tiny_base, train_file, packing: str, sync_free: bool):
    from cogumi.speed import resolve_speed_settings

    out = tmp_path / f"{packing}-{sync_free}"
    cfg = tiny_config(tiny_base, train_file, out, f"training.packing={packing}", "training.max_length=192",
                      "training.max_steps=3", "training.logging_steps=3", "training.save_steps=2",
                      "training.batch_size=2", "training.grad_accum=3")
    speed = resolve_speed_settings(cfg.training)
    speed.sync_free_metrics = sync_free
    trainer = tiny_trainer(tiny_base, cfg, speed=speed)
    assert type(trainer).__name__ == ("SyncFreeSFTTrainer" if sync_free else "SFTTrainer")
    trainer.train()
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return lora, logs, trainer.state.num_input_tokens_seen, out


@pytest.mark.parametrize("packing", ["on", "off"])
def test_sync_free_trainer_equals_trl(tmp_path, tiny_base, train_file, packing):
    fast_lora, fast_logs, fast_seen, out = _train(tmp_path, tiny_base, train_file, packing, True)
    ref_lora, ref_logs, ref_seen, ref_out = _train(tmp_path, tiny_base, train_file, packing, False)
    assert fast_lora.keys() == ref_lora.keys() and fast_lora
    for name in ref_lora:
        assert torch.equal(fast_lora[name], ref_lora[name]), name
    assert [h["step"] for h in fast_logs] == [h["step"] for h in ref_logs] == [1, 3]   # first step, then every 3
    for got, want in zip(fast_logs, ref_logs):
        assert got["loss"] == want["loss"] and got["step"] == want["step"]
        assert got["num_tokens"] == want["num_tokens"] > 0
        assert got["num_input_tokens_seen"] == want["num_input_tokens_seen"] > 0
        for key in ("entropy", "mean_token_accuracy"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert fast_seen == ref_seen
    # the checkpoint written at step 2, between two logging steps, carries the count so far (a resume reads it)
    import json
    state, ref_state = (json.loads((o / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
                        for o in (out, ref_out))
    assert state["num_input_tokens_seen"] == ref_state["num_input_tokens_seen"] > ref_logs[0]["num_input_tokens_seen"]
