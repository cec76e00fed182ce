"""The batch plan: how one epoch's rows become micro-batches and optimizer steps, with or without packing.

Features
  * ``plan_batches(settings, training, lengths, processes=1, total_rows=None) -> BatchPlan``: the one place
    ``cogumi train``, ``cogumi estimate`` and the benchmarks get the per-device micro-batch, the
    accumulation steps, the pack length and the steps per epoch from.
  * Unpacked: ``batch_size`` rows per micro-batch, ``grad_accum`` micro-batches per step (the user's recipe).
  * Packed, ``training.packing_unit: rows`` (the default): packing keeps the recipe. An optimizer step covers
    on average the rows the unpacked recipe's step covers (``batch_size x grad_accum x processes``), so an
    epoch takes the recipe's number of steps (the learning rate, warm-up and schedule mean what they meant).
    A micro-batch is one pack of ``pack_length`` tokens (TRL's best-fit-decreasing packer, padding-free),
    at most the device's micro-batch token budget (``SpeedSettings.micro_batch_tokens``; else the recipe's
    own ``batch_size x max_length``) and at least the longest row; the accumulation is the fewest micro-batches
    that fit a step's tokens in that budget, and the pack length is then searched (on TRL's own packer, over
    a seeded sample of the row lengths for big sets) so that the packs of one epoch make exactly the recipe's
    number of steps.
  * Packed, ``training.packing_unit: packs``: the previous behaviour, for who wants it: a step sees
    ``batch_size x grad_accum`` packs of ``max_length`` tokens (several times the recipe's rows per step).
  * Steps per epoch are counted as the HF Trainer counts them (``ceil(batches / grad_accum)``, batches per
    process rounded up), so a plan's number equals what a run reports.

Loss normalisation: micro-batches of packs carry different numbers of loss tokens. HF's Trainer counts the
loss tokens of all micro-batches of a step (``num_items_in_batch``) and TRL/cogumi.sft divide every
micro-batch's summed loss by that count, so a step's gradient is the mean over all its tokens however they
are split (tests/test_packing_plan.py checks it against one big batch).

Failure modes: no rows -> ValueError; rows longer than the micro-batch budget widen the budget to the longest
row; a recipe whose step holds fewer tokens than the longest row (``batch_size x grad_accum x mean length``
below it) cannot be packed to its rows: with ``packing_unit: rows`` the plan trains unpacked and says why in
``note`` (the recipe wins over speed).
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import asdict, dataclass

PACKING_UNITS = ("rows", "packs")
SEARCH_ROWS = 8192          # the pack-length search packs at most this many (sampled) row lengths per probe
LENGTH_STEP = 8             # pack lengths are multiples of this (kernel-friendly shapes)
STEPS_TOLERANCE = 0.03      # packing_unit rows: packed steps per epoch within this of the recipe's, else unpacked


@dataclass
class BatchPlan:
    packing: bool
    unit: str                         # "rows": steps follow the recipe's rows; "packs": batch x accum packs
    per_device: int                   # micro-batch: rows (unpacked) or packs
    grad_accum: int
    pack_length: int | None           # tokens per pack (TRL's packing length); None unpacked
    micro_batch_tokens: int | None    # packed: the most tokens one micro-batch holds
    processes: int
    rows: int                         # training rows in one epoch
    sequences: int                    # rows or packs in one epoch (all processes)
    steps_per_epoch: int
    recipe_rows_per_step: int         # batch_size x grad_accum x processes
    recipe_steps_per_epoch: int       # the unpacked recipe's steps per epoch
    rows_per_step: float              # rows / steps_per_epoch
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for logs: the unit, the micro-batch, and the steps against the recipe's."""
        item = "packs" if self.packing else "rows"
        what = f"{self.per_device} {item}" + (f" of {self.pack_length} tokens" if self.packing else "")
        return (f"{what} x {self.grad_accum} accumulation x {self.processes} process(es) per step; "
                f"{self.rows_per_step:.1f} rows per step on average (recipe {self.recipe_rows_per_step}), "
                f"{self.steps_per_epoch} steps per epoch (recipe {self.recipe_steps_per_epoch}); "
                f"packing unit: {self.unit}" + (f"; {self.note}" if self.note else ""))


def hf_steps(sequences: int, per_device: int, accum: int, processes: int = 1) -> int:
    """Optimizer steps of one epoch as HF's Trainer counts them."""
    per_process = math.ceil(sequences / max(processes, 1))
    batches = math.ceil(per_process / per_device)
    return max(batches // accum + int(batches % accum > 0), 1)


def count_packs(lengths, pack_length: int) -> int:
    """Packs TRL's best-fit-decreasing packer makes of rows of these token lengths (the real packer, fed a
    column of the same lengths; the token values do not matter to it)."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled
    from trl.data_utils import pack_dataset

    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return 0
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    column = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.zeros(int(offsets[-1]), dtype=np.int8)))
    dataset = Dataset(InMemoryTable(pa.table({"input_ids": column})))
    shown = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        return len(pack_dataset(dataset, int(pack_length), "bfd"))
    finally:
        if shown:
            enable_progress_bar()


def dataset_lengths(dataset, column: str = "input_ids") -> list[int]:
    """Token length of every row of a ``datasets.Dataset`` (read from its Arrow offsets, not as Python lists)."""
    import pyarrow.compute as pc
    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    if getattr(dataset, "_indices", None) is not None:         # a selected/shuffled view: rows in view order
        return [len(x) for x in dataset[column]]
    return pc.list_value_length(table.column(column)).to_numpy(zero_copy_only=False).tolist()


def plan_batches(settings, training, lengths, *, processes: int = 1, total_rows: int | None = None,
                 seed: int = 0, min_pack_length: int = 0) -> BatchPlan:
    """The batch plan for rows of these token ``lengths`` (all rows, or a sample of ``total_rows``).
    ``min_pack_length``: packs at least this long (the longest evaluation row: TRL packs those to the same
    length, and a row longer than its pack would be cut)."""
    lengths = [int(n) for n in lengths]
    if not lengths:
        raise ValueError("no training rows to plan batches for")
    rows = total_rows or len(lengths)
    bs, ga = training.batch_size, training.grad_accum
    recipe = hf_steps(rows, bs, ga, processes)
    common = dict(processes=processes, rows=rows, recipe_rows_per_step=bs * ga * processes,
                  recipe_steps_per_epoch=recipe)
    unpacked = BatchPlan(packing=False, unit="rows", per_device=bs, grad_accum=ga, pack_length=None,
                         micro_batch_tokens=None, sequences=rows, steps_per_epoch=recipe,
                         rows_per_step=rows / recipe, **common)
    if not settings.packing:
        return unpacked
    unit = getattr(training, "packing_unit", "rows")
    if unit not in PACKING_UNITS:
        raise ValueError(f"training.packing_unit must be one of {', '.join(PACKING_UNITS)}, got {unit!r}")
    if len(lengths) > SEARCH_ROWS:
        lengths = random.Random(seed).sample(lengths, SEARCH_ROWS)
    scale = rows / len(lengths)

    @functools.lru_cache(maxsize=None)
    def packs(pack_length: int) -> int:
        return math.ceil(count_packs(lengths, pack_length) * scale)

    budget = settings.micro_batch_tokens or bs * training.max_length
    if unit == "packs":
        per_device = max(1, min(budget // training.max_length, bs * ga))
        accum = max(1, math.ceil(bs * ga / per_device))
        sequences = packs(training.max_length)
        steps = hf_steps(sequences, per_device, accum, processes)
        return BatchPlan(packing=True, unit="packs", per_device=per_device, grad_accum=accum,
                         pack_length=training.max_length, micro_batch_tokens=per_device * training.max_length,
                         sequences=sequences, steps_per_epoch=steps, rows_per_step=rows / steps, **common)
    plan = _plan_rows_unit(lengths, packs, budget, recipe, common, tokens=sum(lengths) * scale,
                           shortest=max(max(lengths), min_pack_length))
    if plan.steps_per_epoch < (1 - STEPS_TOLERANCE) * recipe:
        unpacked.note = (f"packing off: a step of the recipe ({bs * ga} rows of {sum(lengths) / len(lengths):.0f} "
                         f"tokens on average) holds fewer tokens than the longest row ({max(lengths)}), so packs would "
                         f"cover more rows per step than the recipe ({plan.rows_per_step:.1f}); "
                         "training.packing_unit: packs packs anyway")
        return unpacked
    return plan


def _shortest_length_within(packs, target: int, shortest: int, longest: int, tokens: float) -> int:
    """The shortest pack length in (shortest, longest] (multiples of LENGTH_STEP) whose packs number at most
    ``target``, given ``packs(shortest) > target >= packs(longest)``. Packs ~ tokens / (length x fill), so a
    probe goes where that curve, with the fill the last probe saw, crosses the target (two or three probes
    for real length mixes); a probe that did not halve the bracket is followed by a bisection."""
    lo, hi = shortest // LENGTH_STEP, longest // LENGTH_STEP
    guess = tokens / target / LENGTH_STEP
    widths = [hi - lo]
    while hi - lo > 1:
        interpolate = len(widths) < 3 or widths[-1] <= widths[-3] // 2
        mid = min(max(math.ceil(guess), lo + 1), hi - 1) if interpolate else (lo + hi) // 2
        count = packs(mid * LENGTH_STEP)
        guess = mid * count / target
        if count <= target:
            hi, guess = mid, min(guess, mid - 1)    # is a shorter length still enough?
        else:
            lo = mid
        widths.append(hi - lo)
    return hi * LENGTH_STEP


def _round_up(n: int, step: int = LENGTH_STEP) -> int:
    return -(-n // step) * step


def _plan_rows_unit(lengths: list[int], packs, budget: int, recipe: int, common: dict, *,
                    tokens: float, shortest: int) -> BatchPlan:
    """One pack per micro-batch; the fewest micro-batches per step that fit in the token budget; the shortest
    pack length (>= ``shortest``, the longest row) whose packs make no more than the recipe's steps."""
    processes = common["processes"]
    shortest = _round_up(shortest)
    longest = max(budget // LENGTH_STEP * LENGTH_STEP, shortest)
    accum = max(1, math.ceil(packs(longest) / (recipe * processes)))
    target = recipe * accum * processes             # packs per epoch that make exactly `recipe` steps
    if packs(shortest) <= target:
        pack_length = shortest                      # the recipe's step is smaller than one longest row
    else:
        pack_length = _shortest_length_within(packs, target, shortest, longest, tokens)
    sequences = packs(pack_length)
    steps = hf_steps(sequences, 1, accum, processes)
    return BatchPlan(packing=True, unit="rows", per_device=1, grad_accum=accum, pack_length=pack_length,
                     micro_batch_tokens=pack_length, sequences=sequences, steps_per_epoch=steps,
                     rows_per_step=common["rows"] / steps, **common)
