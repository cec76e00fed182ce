"""Cost of cogumi's 4-bit weight check (cogumi.lowbit) on the Llama-3.1-8B shape.

Writes a safetensors file with the 8B model's embedding, lm_head and ``--layers`` decoder layers of its
exact linear shapes (random bf16: the check reads the same bytes whatever the values), then times
``measure_levels`` with the file's pages dropped from the page cache (``posix_fadvise(DONTNEED)``: a cold
read, no root needed) and warm, and extrapolates per weight matrix to the 226 matrices of the full model.

  python benchmarks/lowbit_cost.py --workdir /tmp/lowbit-8b [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HIDDEN, INTER, VOCAB, KV = 4096, 14336, 128256, 1024
LAYER = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
         "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
         "mlp.down_proj": (HIDDEN, INTER)}
FULL_MATRICES = 32 * len(LAYER) + 2


def write_model(path: Path, layers: int) -> None:
    import torch

    from cogumi.merge.writer import OutTensor, SafetensorsStreamWriter
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}.weight": s for k, s in LAYER.items()})
    writer = SafetensorsStreamWriter(path, [OutTensor(n, "BF16", list(s)) for n, s in shapes.items()])
    g = torch.Generator().manual_seed(0)
    for name, (rows, cols) in shapes.items():
        for r0 in range(0, rows, 4096):          # 4096 rows at a time: bounded memory
            chunk = (torch.randn(min(4096, rows - r0), cols, generator=g) * 0.02).to(torch.bfloat16)
            writer.write_bytes(name, chunk.reshape(-1).view(torch.uint8))
    writer.close()


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/lowbit-8b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from cogumi.lowbit import measure_levels
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    f = wd / "model.safetensors"
    if not f.exists():
        write_model(f, a.layers)
    measure_levels(wd)                      # imports and first-call costs, untimed
    runs = []
    for cold in (True, True, True, False, False, False):
        if cold:
            drop_cache(f)
        t0 = time.perf_counter()
        stats = measure_levels(wd)
        runs.append({"cold": cold, "seconds": time.perf_counter() - t0, "matrices": stats.matrices,
                     "bytes_read": stats.bytes_read})
    result = {"file_gb": round(f.stat().st_size / 1e9, 2), "matrices": runs[0]["matrices"], "runs": runs}
    for kind, cold in (("cold", True), ("warm", False)):
        best = min(r["seconds"] for r in runs if r["cold"] == cold)
        per = best / runs[0]["matrices"]
        result[kind] = {"seconds": round(best, 4), "per_matrix_ms": round(per * 1e3, 3),
                        "full_8b_seconds_extrapolated": round(per * FULL_MATRICES, 3)}
    result["full_8b_bytes_read"] = runs[0]["bytes_read"] // runs[0]["matrices"] * FULL_MATRICES
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
