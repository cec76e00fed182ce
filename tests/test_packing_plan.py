"""Packing keeps the recipe: with ``packing_unit: rows`` an epoch takes the unpacked recipe's optimizer steps
(whatever micro-batch budget the device picks), ``packs`` is the explicit opt-in to packs as the unit, and
the loss of a step is the mean over all its tokens however its micro-batches are filled."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from cogumi.batching import count_packs, hf_steps, plan_batches
from cogumi import speed
from cogumi.config import TrainingConfig
from cogumi.speed import resolve_speed_settings
from trainer_support import tiny_config, tiny_trainer


def _lengths(n: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


def _packed(device_budget: int | None, **training):
    t = TrainingConfig(packing="on", **training)
    s = resolve_speed_settings(t, "cpu")
    s.micro_batch_tokens = device_budget
    return s, t


@pytest.mark.parametrize("budget", [None, 4096, 16384])
@pytest.mark.parametrize("batch,accum,lo,hi,processes", [(8, 4, 60, 900, 1), (2, 8, 200, 2048, 1),
                                                         (4, 2, 30, 300, 2), (1, 3, 100, 700, 1)])
def test_packed_epoch_takes_the_recipes_steps(budget, batch, accum, lo, hi, processes):
    lengths = _lengths(2000, lo, hi, seed=batch * 7 + accum)
    s, t = _packed(budget, batch_size=batch, grad_accum=accum, max_length=2048)
    plan = plan_batches(s, t, lengths, processes=processes)
    recipe = hf_steps(len(lengths), batch, accum, processes)
    assert plan.recipe_steps_per_epoch == recipe and plan.unit == "rows" and plan.per_device == 1
    assert abs(plan.steps_per_epoch - recipe) <= max(1, 0.03 * recipe), plan
    # the plan's numbers are the real packer's: the packs of its length make its steps
    assert plan.sequences == count_packs(lengths, plan.pack_length)
    assert plan.steps_per_epoch == hf_steps(plan.sequences, 1, plan.grad_accum, processes)
    assert max(lengths) <= plan.pack_length <= max(budget or batch * 2048, max(lengths))
    assert plan.rows_per_step == pytest.approx(batch * accum * processes, rel=0.03)


def test_packs_hold_the_longest_evaluation_row_too():
    s, t = _packed(4096, batch_size=8, grad_accum=4, max_length=2048)
    lengths = _lengths(600, 60, 300)
    plain = plan_batches(s, t, lengths)
    assert plain.pack_length < 2900
    held = plan_batches(s, t, lengths, min_pack_length=2900)
    assert held.packing and held.pack_length >= 2900
    assert held.steps_per_epoch == plain.steps_per_epoch == held.recipe_steps_per_epoch


def test_packs_unit_is_an_explicit_opt_in_with_fewer_steps():
    lengths = _lengths(2000, 60, 500)
    s, t = _packed(4096, batch_size=8, grad_accum=4, max_length=2048, packing_unit="packs")
    plan = plan_batches(s, t, lengths)
    assert (plan.unit, plan.per_device, plan.grad_accum, plan.pack_length) == ("packs", 2, 16, 2048)
    assert plan.steps_per_epoch < plan.recipe_steps_per_epoch / 4       # ~280 tokens a row: ~7 rows a pack
    unpacked = plan_batches(resolve_speed_settings(TrainingConfig(packing="off"), "cpu"), t, lengths)
    assert (unpacked.per_device, unpacked.grad_accum, unpacked.steps_per_epoch) == (8, 4, 63)


def test_a_sample_of_lengths_plans_a_big_set():
    lengths = _lengths(24_000, 60, 900, seed=3)
    s, t = _packed(4096, batch_size=8, grad_accum=4, max_length=2048)
    plan = plan_batches(s, t, lengths[:3000], total_rows=len(lengths))
    exact = count_packs(lengths, plan.pack_length)
    assert abs(hf_steps(exact, 1, plan.grad_accum) - plan.recipe_steps_per_epoch) <= 0.02 * plan.recipe_steps_per_epoch


def test_a_step_smaller_than_the_longest_row_trains_unpacked_and_says_why():
    s, t = _packed(None, batch_size=1, grad_accum=2, max_length=512)
    plan = plan_batches(s, t, [500] + [20] * 99)
    assert not plan.packing and (plan.per_device, plan.grad_accum, plan.steps_per_epoch) == (1, 2, 50)
    assert "packing off" in plan.note and "500" in plan.note
    kw = speed.trainer_speed_kwargs(s, t, plan)
    assert not kw["packing"] and "pad_to_multiple_of" not in kw and "max_length" not in kw
    opted_in = plan_batches(s, TrainingConfig(packing="on", batch_size=1, grad_accum=2, max_length=512,
                                              packing_unit="packs"), [500] + [20] * 99)
    assert opted_in.packing and opted_in.steps_per_epoch < 50


# ---------------------------------------------------------------------------------------------
# on the tiny model: real runs and the loss of an accumulated step
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    from cogumi.tiny import synthetic_instructions, write_jsonl
    return write_jsonl(tmp_path_factory.mktemp("pack") / "train.jsonl", synthetic_instructions(72, seed=5))


def test_packing_on_and_off_take_the_same_steps_and_the_manifest_says_so(tmp_path, tiny_base, train_file):
    from cogumi.lineage import read_manifest
    from cogumi.train import run_training

    manifests = {}
    for packing in ("off", "on"):
        cfg = tiny_config(tiny_base, train_file, tmp_path / packing, f"training.packing={packing}",
                          "training.max_steps=-1", "training.save_steps=1000", "training.max_length=192",
                          "data.holdout=0", "training.batch_size=4", "training.grad_accum=2", "lora.dropout=0.0")
        manifests[packing] = read_manifest(run_training(cfg, log=lambda *_: None))
    off, on = manifests["off"], manifests["on"]
    assert off["steps"] == off["batch_plan"]["steps_per_epoch"] == 9                   # ceil(ceil(72 / 4) / 2)
    assert on["batch_plan"]["packing"] and on["batch_plan"]["unit"] == "rows"
    assert on["steps"] == on["batch_plan"]["steps_per_epoch"] == on["batch_plan"]["recipe_steps_per_epoch"] == 9
    assert on["batch_plan"]["rows_per_step"] == pytest.approx(8, rel=0.05)
    assert on["tokens_seen"] <= off["tokens_seen"]                # the same rows, without padding


def test_accumulated_step_is_the_mean_over_all_its_tokens(tmp_path, tiny_base, train_file):
    """Micro-batches of different token counts: the step's gradient equals one big batch's token-mean
    gradient (HF's num_items_in_batch), not the mean of the micro-batches' means."""
    from transformers import TrainerCallback

    cfg = tiny_config(tiny_base, train_file, tmp_path / "out", "training.packing=on", "training.max_steps=1",
                      "training.max_length=192", "training.batch_size=4", "training.grad_accum=3",
                      "lora.dropout=0.0", "training.grad_clip=0", "training.save_steps=100")
    settings = resolve_speed_settings(cfg.training)
    settings.micro_batch_tokens = 200                          # a budget that takes several micro-batches a step
    trainer = tiny_trainer(tiny_base, cfg, speed=settings)
    assert trainer.args.gradient_accumulation_steps >= 2
    seen = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}, num_items_in_batch))
        return compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    trainer.compute_loss = recording
    grads = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            params = [p for p in model.parameters() if p.requires_grad]
            grads["trainer"] = [p.grad.detach().clone() for p in params]
            sums, counts = [], []
            for inputs, _ in seen:                       # the step's micro-batches again, as plain HF forwards
                labels = inputs["labels"]
                count = int((labels[:, 1:] != -100).sum())
                sums.append(model(**{k: v for k, v in inputs.items() if k != "labels"}, labels=labels).loss * count)
                counts.append(count)
            token_mean = torch.stack(sums).sum() / sum(counts)
            grads["token_mean"] = torch.autograd.grad(token_mean, params, retain_graph=True)
            mean_of_means = torch.stack([s / c for s, c in zip(sums, counts)]).mean()
            grads["mean_of_means"] = torch.autograd.grad(mean_of_means, params)
            grads["counts"] = counts

    trainer.add_callback(Capture())
    trainer.train()
    counts = grads["counts"]
    assert len(counts) == trainer.args.gradient_accumulation_steps and len(set(counts)) > 1, counts
    assert all(int(n) == sum(counts) for _, n in seen)                     # every micro-batch knew the step's total
    for got, want in zip(grads["trainer"], grads["token_mean"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    differs = [not torch.allclose(a, b, rtol=1e-3, atol=1e-7) for a, b in zip(grads["trainer"], grads["mean_of_means"])]
    assert any(differs)                                       # the control: the naive mean is another gradient
