"""benchmarks/learning_curve.py stays runnable: its --smoke mode trains the tiny model packed, unpacked and with
packs as the unit, on CPU, and reports held-out losses at the same optimizer steps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_learning_curve_smoke(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        bench = __import__("learning_curve")
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "curve.json"
    assert bench.main(["--smoke", "--arms", "unpacked,packed,packs", "--out", str(out),
                       "--workdir", str(tmp_path / "w")]) == 0
    r = json.loads(out.read_text())
    unpacked, packed, packs = r["unpacked"], r["packed"], r["packs"]
    assert packed["batch_plan"]["packing"] and not unpacked["batch_plan"]["packing"]
    assert packed["steps"] == unpacked["steps"] > packs["steps"]            # packs as the unit: fewer steps
    assert [c["step"] for c in packed["curve"]] == [c["step"] for c in unpacked["curve"]]
    assert r["parity"]["checked"] and r["parity"]["passed"] and r["parity"]["learned"]
    first, last = unpacked["curve"][0]["heldout_loss"], unpacked["curve"][-1]["heldout_loss"]
    assert packed["curve"][0]["heldout_loss"] == first > last                # same start, then learning
