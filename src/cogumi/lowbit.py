"""Weights that went through 4-bit quantization and back, told from the values themselves.

A 4-bit model dequantized and saved as bf16/fp16/fp32 carries no quantization metadata, no packed tensor
and no telling name (SmolLM2 converted from a GGUF Q4_1 file; a base round-tripped through bitsandbytes
NF4 and ``save_pretrained`` in bf16). It is the incident's root cause in bf16 clothes. What it cannot hide:
every quantization block holds at most 16 distinct values (the 4-bit codes times the block's scale, plus
its offset), where a trained or freshly initialised bf16 matrix holds ~31 distinct values in 32.

Features
  * ``measure_levels(model_dir)``: samples every 2-D float weight (a few 2,048-value runs per matrix at
    fixed, evenly spread positions, read with ``os.pread`` at the safetensors offsets -- about 16 KiB per
    matrix, so an 8B model costs a few MB of reads, not 16 GB), cuts the runs into 32-value blocks aligned
    as 4-bit formats align them, and counts the distinct nonzero values of each block.
      - A block is *eligible* when it has >= 24 nonzero values and >= 2 distinct ones (zero runs, pruned
        or constant blocks say nothing), *4-bit-like* when those values take <= 16 distinct levels.
      - A matrix is 4-bit-like when >= 75% of its eligible blocks are.
      - The format is named when most 4-bit-like blocks fit it: the NF4 or FP4 codebook after dividing by
        the block's largest magnitude (bitsandbytes, 64-wide absmax blocks, double quantization or not),
        or a uniform grid ``scale * q + offset`` (GGUF Q4_0/Q4_1/Q4_K, GPTQ/AWQ groups without act-order).
  * ``lowbit_findings``: red when >= 10% of the sampled matrices are 4-bit-like (a bnb-4bit model: all
    but embeddings and lm_head; GGUF Q4_K_M: ~3/4), a warning for fewer; the message carries the
    measured statistic.

Why it survives saving in bf16: rounding maps each level to one value (levels may merge, never split),
so a block keeps <= 16 distinct values. What it does not see, by design or by limits:
  * a LoRA merged on top of dequantized 4-bit weights: base + a dense low-rank delta. Each element moves
    by a different amount, so the levels blur once the delta exceeds the bf16 spacing of the weights
    (trained adapters do; measured in docs/gates.md). That lineage is caught upstream instead: ``cogumi
    merge`` runs this check on the base it merges into and records the result in the merged model's
    manifest, and ``cogumi verify`` carries it forward.
  * an adapter trained on a 4-bit base and merged into the original bf16 weights (the incident itself):
    the weights never were 4-bit; the adapter's lineage (its manifest and adapter_config) catches it.
  * 5-bit and wider formats (32+ levels per block), and GPTQ with act-order (a block mixes groups).

Failure modes: unreadable or truncated files are reported by ``scan_weight_files`` before this runs; a
file that shrank meanwhile is a ``CogumiError`` naming it. Never loads a whole tensor.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cogumi.errors import CogumiError

BLOCK = 32                      # GGUF Q4 blocks; half of bitsandbytes' default 64 (so inside one 64-block)
MAX_LEVELS = 16                 # 4 bits
MIN_NONZERO = 24                # an eligible block: enough values that a continuous one shows > 16 levels
MATRIX_SHARE = 0.75             # a matrix is 4-bit-like when this share of its eligible blocks is
MODEL_SHARE = 0.10              # red flag when this share of the sampled matrices is 4-bit-like
RUNS_PER_MATRIX = 4
RUN_VALUES = 2048               # values per run (4 KiB of bf16)
FLOAT_TAGS = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}

# The bitsandbytes 4-bit codebooks (bitsandbytes.functional.get_4bit_type, copied so that the check needs
# no bitsandbytes: it must run wherever `cogumi verify` does).
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
FP4_CODE = (0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204,
            0.25, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5,
            -0.1666666716337204, -0.25)
CODE_TOLERANCE = 0.012          # bf16 keeps 8 significant bits: a level is off by <= 2^-8 of the block max
GRID_TOLERANCE = 0.15           # of one grid step
FORMAT_NAMES = {"nf4": "the NF4 codebook (bitsandbytes 4-bit)", "fp4": "the FP4 codebook (bitsandbytes 4-bit)",
                "grid": "a uniform 16-level grid per 32-value block (GGUF Q4_0/Q4_1/Q4_K, GPTQ/AWQ style)"}


@dataclass
class LevelStats:
    """What ``measure_levels`` saw: the statistic every message quotes."""
    matrices: int = 0                     # 2-D float weights sampled
    low_matrices: list[str] = field(default_factory=list)
    blocks: int = 0                       # eligible 32-value blocks
    low_blocks: int = 0                   # ... with <= 16 distinct nonzero values
    median_levels: float | None = None    # distinct nonzero values per eligible block
    format: str | None = None             # "nf4" | "fp4" | "grid" | None
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def matrix_share(self) -> float:
        return len(self.low_matrices) / self.matrices if self.matrices else 0.0

    @property
    def block_share(self) -> float:
        return self.low_blocks / self.blocks if self.blocks else 0.0

    def summary(self) -> str:
        fmt = f"; their levels match {FORMAT_NAMES[self.format]}" if self.format else ""
        median = "-" if self.median_levels is None else f"{self.median_levels:g}"
        return (f"{len(self.low_matrices)} of {self.matrices} weight matrices are 4-bit-like: "
                f"{self.block_share:.1%} of {self.blocks:,} sampled {BLOCK}-value blocks hold <= {MAX_LEVELS} "
                f"distinct values (median {median} per block; a bf16-trained matrix has ~31 and ~0% such "
                f"blocks){fmt}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["low_matrices"] = self.low_matrices[:8] + ([f"... {len(self.low_matrices) - 8} more"]
                                                     if len(self.low_matrices) > 8 else [])
        d.update(matrix_share=round(self.matrix_share, 4), block_share=round(self.block_share, 4),
                 summary=self.summary())
        return d


def _run_spans(numel: int, runs: int, run_values: int) -> list[tuple[int, int]]:
    """(first element, count) of the runs read from a matrix: evenly spread, each starting on a multiple
    of 64 (so 32-blocks sit inside bitsandbytes' 64-blocks and on GGUF's 32-blocks) and a whole number of
    blocks long."""
    usable = numel - numel % BLOCK
    if usable <= runs * run_values:
        return [(0, usable)] if usable else []
    spans = []
    for i in range(runs):
        start = int((i + 0.5) * usable / runs) // 64 * 64
        count = min(run_values, usable - start)
        spans.append((start, count - count % BLOCK))
    return spans


def _read_values(fd: int, path: Path, entry, spans, itemsize: int, dtype):
    import torch
    parts = []
    for start, count in spans:
        nbytes = count * itemsize
        raw = os.pread(fd, nbytes, entry.start + start * itemsize)
        if len(raw) != nbytes:
            raise CogumiError(f"{path}: ended early while reading {entry.name}; the file changed or is truncated")
        parts.append(torch.frombuffer(bytearray(raw), dtype=dtype).float())
    return torch.cat(parts) if parts else torch.empty(0)


def _distinct_nonzero(blocks):
    """(distinct nonzero values, nonzero count) per row of ``blocks``."""
    import torch
    nonzero = blocks != 0
    ordered, _ = torch.sort(torch.where(nonzero, blocks, torch.full_like(blocks, float("inf"))), dim=1)
    finite = torch.isfinite(ordered)
    distinct = finite[:, 0].long() + ((ordered[:, 1:] != ordered[:, :-1]) & finite[:, 1:]).sum(1)
    return distinct, nonzero.sum(1)


def _fits_code(levels, code) -> bool:
    import torch
    scale = levels.abs().max()
    if scale == 0:
        return False
    gap = (levels / scale).unsqueeze(1) - torch.tensor(code).unsqueeze(0)
    return bool(gap.abs().min(1).values.max() <= CODE_TOLERANCE)


def _fits_grid(levels) -> bool:
    if len(levels) < 3:
        return False
    step = (levels[1:] - levels[:-1]).min()
    if step <= 0:
        return False
    k = (levels - levels[0]) / step
    return bool((k - k.round()).abs().max() <= GRID_TOLERANCE and k[-1] <= 2 ** 4 - 1 + GRID_TOLERANCE)


def _block_format(values, width: int) -> str | None:
    """The 4-bit format one block's values fit, if any (``values``: one block, ``width`` long)."""
    import torch
    levels = torch.unique(values[values != 0])
    with_zero = torch.unique(values)
    if len(with_zero) > MAX_LEVELS:
        return None
    if _fits_code(with_zero, NF4_CODE):
        return "nf4"
    if _fits_code(with_zero, FP4_CODE):
        return "fp4"
    if width == BLOCK and (_fits_grid(with_zero) or _fits_grid(levels)):
        return "grid"
    return None


def _guess_format(samples: list) -> str | None:
    """The format most 4-bit-like blocks fit: codebooks on 64-wide blocks (bitsandbytes' default, which
    holds the absmax element), then 32-wide ones; the uniform grid on 32-wide blocks."""
    from collections import Counter
    votes: Counter = Counter()
    for values in samples:
        for width in (64, BLOCK):
            if len(values) < width:
                continue
            fmt = _block_format(values[:width], width)
            if fmt:
                votes[fmt] += 1
                break
    if not votes:
        return None
    fmt, n = votes.most_common(1)[0]
    return fmt if n >= len(samples) / 2 else None


def measure_levels(model_dir: str | os.PathLike, entries: dict | None = None, *, runs: int = RUNS_PER_MATRIX,
                   run_values: int = RUN_VALUES, max_format_samples: int = 64) -> LevelStats:
    """Sample every 2-D float weight of a safetensors model dir (see the module docstring)."""
    import torch

    from cogumi.lineage import scan_weight_files
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    if entries is None:
        entries, _ = scan_weight_files(model_dir)
    stats = LevelStats()
    distinct_all = []
    format_samples: list = []
    by_file: dict[str, list] = {}
    for e in entries.values():
        if e.dtype in FLOAT_TAGS and len(e.shape) == 2 and e.numel >= 2 * BLOCK:
            by_file.setdefault(e.file, []).append(e)
    for fname, file_entries in sorted(by_file.items()):
        path = model_dir / fname
        fd = os.open(path, os.O_RDONLY)
        try:
            for e in sorted(file_entries, key=lambda x: x.start):
                dtype = getattr(torch, FLOAT_TAGS[e.dtype])
                spans = _run_spans(e.numel, runs, run_values)
                values = _read_values(fd, path, e, spans, dtype.itemsize, dtype)
                stats.bytes_read += values.numel() * dtype.itemsize
                blocks = values.reshape(-1, BLOCK)
                distinct, nonzero = _distinct_nonzero(blocks)
                eligible = (nonzero >= MIN_NONZERO) & (distinct >= 2)
                low = eligible & (distinct <= MAX_LEVELS)
                n_eligible, n_low = int(eligible.sum()), int(low.sum())
                stats.matrices += 1
                stats.blocks += n_eligible
                stats.low_blocks += n_low
                distinct_all.append(distinct[eligible])
                if n_eligible >= 8 and n_low >= MATRIX_SHARE * n_eligible:
                    stats.low_matrices.append(e.name)
                    if len(format_samples) < max_format_samples:
                        pairs = values.reshape(-1, 2 * BLOCK) if values.numel() % (2 * BLOCK) == 0 else blocks
                        format_samples += list(pairs[: max(1, max_format_samples // 8)])
        finally:
            os.close(fd)
    if distinct_all:
        joined = torch.cat(distinct_all)
        stats.median_levels = float(joined.float().median()) if joined.numel() else None
    if stats.low_matrices:
        stats.format = _guess_format(format_samples[:max_format_samples])
    stats.seconds = round(time.perf_counter() - t0, 4)
    return stats


def lowbit_findings(model_dir: str | os.PathLike, entries: dict | None = None, *,
                    what: str = "model") -> tuple[list, LevelStats]:
    """Findings for weights that went through 4-bit quantization (red / warn / ok), and the statistic."""
    from cogumi.lineage import INCIDENT, Finding
    stats = measure_levels(model_dir, entries)
    if not stats.matrices:
        return [], stats
    low = len(stats.low_matrices)
    if low and stats.matrix_share >= MODEL_SHARE:
        return [Finding("red", "quantized-weights",
                        f"{what} {model_dir}: its weights went through 4-bit quantization and back (no quantization "
                        f"metadata says so): {stats.summary()}. {INCIDENT}",
                        "use the original full-precision checkpoint, not one converted from a 4-bit file "
                        "(GGUF Q4, bnb-4bit, GPTQ/AWQ); if this is deliberate (a test model), pass "
                        "--allow-quantized-base to train on it", stats.as_dict())], stats
    if low:
        return [Finding("warn", "quantized-weights",
                        f"{what} {model_dir}: {low} weight matrix(es) look 4-bit ({', '.join(stats.low_matrices[:3])}"
                        f"{', ...' if low > 3 else ''}): {stats.summary()}",
                        "check where these matrices came from", stats.as_dict())], stats
    return [Finding("ok", "weight-levels", f"{what} {model_dir}: no 4-bit levels in the weights "
                    f"({stats.blocks:,} sampled {BLOCK}-value blocks of {stats.matrices} matrices, median "
                    f"{stats.median_levels:g} distinct values per block)", measured=stats.as_dict())], stats
