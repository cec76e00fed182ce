"""Choosing what to merge into: ``--target original | dequantized | auto`` and the base checks.

Features
  * ``plan_merge``: the merge base for the requested target, with the findings that apply (the base's
    fingerprint against the adapter's record; an adapter trained on a 4-bit base is the incident, red
    unless --force; a quantized dir is never a merge target).
  * ``measure_targets``: for ``auto``, held-out loss of both candidates as they would be written, and
    their top-1 agreement with the adapter applied on the 4-bit base it trained against.
  * ``_original_likeness``: is the --base really the bf16 original of the 4-bit base?

Failure modes: an unknown target, no recorded base, a quantized --base for ``original`` (``RedFlagError``),
a 4-bit base that is not a bitsandbytes checkpoint, ``auto`` without --base or held-out rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogumi.errors import CogumiError, RedFlagError
from cogumi.lineage import (
    Finding, adapter_lineage_findings, base_match_findings, fingerprint, recorded_base, resolve_model_dir,
    scan_weight_files, weight_level_findings,
)
from cogumi.merge.adapter import Adapter, AdaptedWeights
from cogumi.merge.layerwise import LayerwiseModel, Stream
from cogumi.merge.weights import Dequantized4bitDir, WeightDir, is_quantized_dir

TARGETS = ("original", "dequantized", "auto")
AUTO_MAX_ROWS = 32                    # held-out rows --target auto scores
AUTO_MAX_TOKENS = 256                 # tokens per held-out row


def holdout_rows(path: Path, tokenizer, *, max_rows: int = AUTO_MAX_ROWS, max_tokens: int = AUTO_MAX_TOKENS):
    """(token ids, assistant-token mask) of held-out rows, rendered exactly as training renders them."""
    from cogumi.data import RowProblem, encode_messages, row_to_messages
    from cogumi.io import read_jsonl
    rows = []
    for i, row in enumerate(read_jsonl(path)[:max_rows], start=1):
        try:
            messages, _ = row_to_messages(row)
        except RowProblem as e:
            raise CogumiError(f"{path}: row {i}: {e}") from None
        ids, mask = encode_messages(messages, tokenizer)
        ids, mask = ids[:max_tokens], mask[:max_tokens]
        if sum(mask[1:]) > 0:
            rows.append((ids, mask))
    if not rows:
        raise CogumiError(f"{path}: no usable held-out rows (each needs an assistant answer within "
                          f"{max_tokens} tokens)")
    return rows


def measure_targets(model: LayerwiseModel, original, quantized, adapter: Adapter, rows) -> dict:
    """--target auto: held-out loss of each merge candidate (as it would be written) and its top-1
    agreement with the adapter applied on the 4-bit base (dequantized weights + unmerged LoRA, what the
    adapter was trained and validated against)."""
    import torch
    t0 = time.time()
    streams = [Stream("reference_4bit_plus_adapter", AdaptedWeights(quantized, adapter, merge=False), adapter.loras),
               Stream("dequantized", AdaptedWeights(quantized, adapter, merge=True)),
               Stream("original", AdaptedWeights(original, adapter, merge=True))]
    ids = [r[0] for r in rows]
    final = model.hidden(streams, ids)
    # positions t predicting token t+1 where t+1 is an assistant token
    targets, select = [], []
    for tok, mask in rows:
        targets += tok[1:] + [0]
        select += [bool(m) for m in mask[1:]] + [False]
    dev = model.device
    targets_t = torch.tensor(targets, device=dev)
    sel = torch.tensor(select, device=dev)
    n = len(targets)
    stats = {s.name: {"lse": torch.full((n,), -math.inf, dtype=torch.float64, device=dev),
                      "best": torch.full((n,), -math.inf, device=dev),
                      "arg": torch.zeros(n, dtype=torch.long, device=dev),
                      "target": torch.zeros(n, dtype=torch.float64, device=dev)} for s in streams}
    for v0, chunk in model.logit_chunks(streams, final):
        for name, logits in chunk.items():
            st = stats[name]
            st["lse"] = torch.logaddexp(st["lse"], torch.logsumexp(logits.double(), dim=-1))
            best, arg = logits.max(dim=-1)
            better = best > st["best"]
            st["best"] = torch.where(better, best, st["best"])
            st["arg"] = torch.where(better, arg + v0, st["arg"])
            inside = (targets_t >= v0) & (targets_t < v0 + logits.shape[1])
            if inside.any():
                st["target"][inside] = logits[inside, targets_t[inside] - v0].double()
    ref = stats[streams[0].name]
    out: dict[str, Any] = {"rows": len(rows), "tokens_scored": int(sel.sum())}
    for s in streams:
        st = stats[s.name]
        nll = (st["lse"] - st["target"])[sel]
        out[s.name] = {"loss": float(nll.mean()),
                       "token_accuracy": float((st["arg"][sel] == targets_t[sel]).float().mean()),
                       "top1_agreement_with_4bit": float((st["arg"][sel] == ref["arg"][sel]).float().mean())}
    out["wall_s"] = round(time.time() - t0, 2)
    return out


@dataclass
class MergePlan:
    target: str                     # "original" | "dequantized"
    requested: str
    base_dir: Path                  # the dir whose weights are merged into
    original_dir: Path | None       # bf16 original (auto / original)
    quantized_dir: Path | None      # the 4-bit base the adapter trained on (dequantized / auto)
    findings: list[Finding]
    reason: str
    weights_4bit: str | None = None         # the merge base's weights went through 4-bit (the statistic)
    weights_4bit_accepted: bool = False     # ... and the adapter was knowingly trained on exactly them


def _weight_levels(adapter: Adapter, base_dir: Path) -> tuple[list[Finding], str | None, bool]:
    """The merge base's weight levels (``cogumi.lowbit``). A base whose weights went through 4-bit is red,
    unless the adapter's manifest shows it was trained on exactly this base with --allow-quantized-base
    (a test model such as SmolLM2): then the merge is faithful and the lineage is carried as a warning."""
    found, _ = weight_level_findings(base_dir, what="merge base")
    red = next((f for f in found if f.level == "red"), None)
    if red is None:
        return [f for f in found if f.level == "warn"], None, False
    summary = (red.measured or {}).get("summary") or red.message
    man = adapter.manifest or {}
    same_base = (man.get("base") or {}).get("fingerprint") == fingerprint(base_dir)
    if same_base and man.get("quantized_base_override_used"):
        return [Finding("warn", "quantized-weights", f"merge base {base_dir}: its weights went through 4-bit "
                        f"quantization ({summary}); the adapter was trained on exactly this base with "
                        "--allow-quantized-base, so the merge is faithful; the lineage is recorded",
                        "fine for a test model; for a real run, start from the full-precision original")], summary, True
    return [red], summary, False


def _resolve(id_or_path: str, what: str) -> Path:
    try:
        return resolve_model_dir(id_or_path)
    except CogumiError as e:
        raise CogumiError(f"{what}: {e}") from None


def _original_likeness(original: Path, quantized: Path, limit: int = 3) -> Finding:
    """Is ``original`` the full-precision model that ``quantized`` was made from? NF4 weights are within
    ~10% (relative Frobenius error) of their originals; another model is ~140% away."""
    import torch
    orig, q = WeightDir(original), Dequantized4bitDir(quantized)
    packed = [n for n in q.names() if n in q._aux][:limit]
    worst = 0.0
    for name in packed:
        if not orig.has(name) or orig.shape(name) != q.shape(name):
            return Finding("red", "base-not-original", f"{original} has no {name} of shape {q.shape(name)}, so it is "
                           f"not the full-precision original of {quantized}", "pass --base with the bf16 original")
        a, b = orig.get(name).float(), q.get(name).float()
        worst = max(worst, float(torch.linalg.norm(a - b) / torch.linalg.norm(a).clamp_min(1e-12)))
    if worst > 0.3:
        return Finding("red", "base-not-original",
                       f"{original} is not the original of the 4-bit base {quantized}: dequantized weights differ "
                       f"from it by {worst:.0%} (NF4 rounding is ~10%)", "pass --base with the bf16 original")
    return Finding("ok", "base-is-original", f"{original} is the full-precision original of {quantized} "
                   f"(NF4 relative error {worst:.1%})")


def plan_merge(adapter: Adapter, *, base: str | None, target: str, log) -> MergePlan:
    rec = recorded_base(adapter.config, adapter.manifest)
    lineage = adapter_lineage_findings(adapter.path, adapter.config, adapter.manifest)
    quant_lineage = bool(rec["quantized"])
    recorded = rec.get("path") or rec.get("id")
    if target not in TARGETS:
        raise CogumiError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")

    if target in ("dequantized", "auto") and not quant_lineage:
        if target == "dequantized":
            raise CogumiError(f"--target dequantized is for adapters trained on a 4-bit base; {adapter.path} was "
                              f"trained on {rec.get('id')} (full precision). Use --target original.")
        log("merge: --target auto: the adapter was trained on a full-precision base, so there is nothing to "
            "choose; merging into the original weights")
        plan = plan_merge(adapter, base=base, target="original", log=log)
        plan.requested, plan.reason = "auto", "adapter trained on a full-precision base"
        return plan

    if target == "original":
        base_id = base or recorded
        if not base_id:
            raise CogumiError(f"{adapter.path}: the adapter records no base model; pass --base")
        base_dir = _resolve(base_id, "--base" if base else "the adapter's recorded base")
        if is_quantized_dir(base_dir):
            raise RedFlagError(
                f"{base_dir} is quantized; --target original merges into full-precision weights and cogumi never "
                "writes a merge into a quantized model (PEFT would re-quantize the merged weights). "
                + ("Pass --base with the bf16 original, or use --target auto to measure both targets."
                   if quant_lineage else "Pass --base with the full-precision base."))
        findings: list[Finding] = []
        if quant_lineage:
            findings += lineage      # the incident: red unless --force
            qdir = Path(rec["path"]) if rec.get("path") and Path(rec["path"]).is_dir() else None
            if qdir is not None and any(".quant_state.bitsandbytes__" in n for n in scan_weight_files(qdir)[0]):
                findings.append(_original_likeness(base_dir, qdir))
        else:
            findings += base_match_findings(rec, base_dir, base_label=base_id) + lineage
        levels, weights_4bit, accepted = _weight_levels(adapter, base_dir)
        findings += levels
        return MergePlan("original", "original", base_dir, base_dir, None, findings,
                         "requested" if not quant_lineage else "requested (naive merge of a 4-bit-trained adapter)",
                         weights_4bit, accepted)

    # dequantized / auto, adapter trained on a 4-bit base
    qdir_id = base if (target == "dequantized" and base) else recorded
    if not qdir_id:
        raise CogumiError(f"{adapter.path}: the adapter records no base; cannot find the 4-bit base it trained on")
    qdir = _resolve(qdir_id, "the adapter's recorded 4-bit base")
    if not any(".quant_state.bitsandbytes__" in n for n in scan_weight_files(qdir)[0]):
        raise CogumiError(f"{qdir}: not a bitsandbytes 4-bit checkpoint; --target {target} dequantizes the 4-bit base "
                          "the adapter was trained on (a local dir saved with save_pretrained)")
    findings = base_match_findings(rec, qdir, base_label=str(qdir))
    findings.append(Finding("warn", "quantized-lineage",
                            f"adapter {adapter.path} was trained on the 4-bit base {rec.get('id')}; --target {target} "
                            + ("merges into its dequantized weights (what the adapter trained against)"
                               if target == "dequantized" else "measures which merge target is better"),
                            "prefer retraining on the full-precision base; compare the result before shipping"))
    if target == "dequantized":
        return MergePlan("dequantized", "dequantized", qdir, None, qdir, findings, "requested")
    if not base:
        raise CogumiError(f"--target auto compares merging into the 4-bit base's dequantized weights with merging "
                          f"into the full-precision original: pass --base with the bf16 original of {rec.get('id')}")
    orig = _resolve(base, "--base")
    if is_quantized_dir(orig):
        raise CogumiError(f"--base {orig} is quantized; --target auto needs the full-precision original")
    findings.append(_original_likeness(orig, qdir))
    return MergePlan("auto", "auto", qdir, orig, qdir, findings, "measured")
