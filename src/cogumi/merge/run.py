"""``merge_adapter``: the whole merge, end to end (plan, stream, check, fidelity, manifest, rename).

See ``cogumi.merge`` for the features and failure modes; this module strings the parts together.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from cogumi.errors import CogumiError, RedFlagError
from cogumi.lineage import (
    FLOAT_DTYPES, INDEX_NAME, Finding, fingerprint, human_bytes, library_versions, read_model_config, recorded_base,
    red_findings, scan_weight_files, weights_findings, write_manifest,
)
from cogumi.memory import PeakMemory
from cogumi.merge.adapter import Adapter, AdaptedWeights, check_adapter_fits, load_adapter
from cogumi.merge.fidelity import FIDELITY_KL_MAX, FIDELITY_KL_REL, FIDELITY_TOP1_MIN, fidelity_check, load_tokenizer, probe_rows
from cogumi.merge.layerwise import LayerwiseModel
from cogumi.merge.targets import holdout_rows, measure_targets, plan_merge
from cogumi.merge.weights import Dequantized4bitDir, WeightDir
from cogumi.merge.writer import DEFAULT_MAX_SHARD_BYTES, INFLIGHT_BYTES, plan_shards, write_merged_shards

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt")


def _free_bytes(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _output_config(base_dir: Path, dtype_tag: str) -> dict:
    cfg = read_model_config(str(base_dir))
    cfg.pop("quantization_config", None)
    name = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(dtype_tag, "bfloat16")
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    cfg["dtype"] = name
    return cfg


def _copy_side_files(out: Path, base_dir: Path, adapter_dir: Path, original_dir: Path | None) -> None:
    for d in (original_dir, base_dir):
        if d is not None and (d / "generation_config.json").exists():
            shutil.copyfile(d / "generation_config.json", out / "generation_config.json")   # mode from the umask
            break
    tok_dir = next((d for d in (adapter_dir, original_dir, base_dir)
                    if d is not None and (d / "tokenizer_config.json").exists()), None)
    if tok_dir is not None:
        for name in TOKENIZER_FILES:
            if (tok_dir / name).exists():
                shutil.copyfile(tok_dir / name, out / name)


def merge_adapter(adapter: str | os.PathLike, out: str | os.PathLike, *, base: str | None = None,
                  target: str = "original", holdout: str | os.PathLike | None = None, overwrite: bool = False,
                  force: bool = False, fidelity: bool = True, log: Callable[[str], Any] = print,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, inflight_bytes: int = INFLIGHT_BYTES) -> dict:
    """Merge ``adapter`` into its base and write a HF model dir at ``out``; returns the manifest."""
    from cogumi.io import atomic_dir
    t_start = time.time()
    memory = PeakMemory().__enter__()       # this merge's own peak, not the process's (a pipeline trained first)
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise CogumiError(f"{out} already exists; pass --overwrite to replace it")
    ad = load_adapter(adapter)
    t_adapter = time.time()
    plan = plan_merge(ad, base=base, target=target, log=log)
    t_plan = time.time()

    reds = red_findings(plan.findings)
    for f in plan.findings:
        log(f"merge: {f.line()}")
    if reds and not force:
        raise RedFlagError("refusing to merge:\n  " + "\n  ".join(f.line() for f in reds)
                           + "\n(--force merges anyway and records it in the manifest.)")
    if reds:
        log("!" * 78)
        log("!! --force: MERGING DESPITE RED FLAGS (recorded in cogumi.json):")
        for f in reds:
            log("!! " + f.line())
        log("!" * 78)

    auto_numbers = None
    chosen = plan.target
    if plan.target == "auto":
        hpath = Path(holdout) if holdout else ad.path.parent / "holdout.jsonl"
        if not hpath.exists():
            raise CogumiError(f"--target auto scores both merge targets on held-out rows: {hpath} does not exist. "
                              "Pass --holdout FILE (JSONL rows in the training data's shape).")
        tokenizer = load_tokenizer(ad.path, plan.original_dir, plan.quantized_dir)
        if tokenizer is None:
            raise CogumiError("--target auto needs a tokenizer (in the adapter or base dir) to score held-out rows")
        rows = holdout_rows(hpath, tokenizer)
        log(f"merge: --target auto: scoring both targets on {len(rows)} held-out rows of {hpath}")
        model = LayerwiseModel(plan.original_dir)
        original, quantized = WeightDir(plan.original_dir), Dequantized4bitDir(plan.quantized_dir)
        check_adapter_fits(ad, original)
        check_adapter_fits(ad, quantized)
        auto_numbers = measure_targets(model, original, quantized, ad, rows)
        auto_numbers["holdout"] = str(hpath)
        chosen = min(("dequantized", "original"), key=lambda k: auto_numbers[k]["loss"])
        auto_numbers["chosen"] = chosen
        for k in ("reference_4bit_plus_adapter", "dequantized", "original"):
            v = auto_numbers[k]
            log(f"merge: auto: {k:28s} loss {v['loss']:.4f}  token acc {v['token_accuracy']:.3f}  "
                f"top-1 agreement with 4-bit+adapter {v['top1_agreement_with_4bit']:.3f}")
        log(f"merge: auto: keeping '{chosen}' (lower held-out loss)")
        plan.reason = f"--target auto: lower held-out loss ({auto_numbers[chosen]['loss']:.4f})"
        plan.base_dir = plan.quantized_dir if chosen == "dequantized" else plan.original_dir

    source = Dequantized4bitDir(plan.base_dir) if chosen == "dequantized" else WeightDir(plan.base_dir)
    check_adapter_fits(ad, source)
    weights = AdaptedWeights(source, ad, merge=True)
    shards = plan_shards(weights, max_shard_bytes)
    total = sum(s.nbytes for s in shards)
    free = _free_bytes(out.parent)
    if free < total + 64 * 2**20:
        raise CogumiError(f"not enough disk for the merged model at {out.parent}: need {human_bytes(total)}, "
                          f"{human_bytes(free)} free. Free space or choose another --out.")
    float_tags = [t.dtype for s in shards for t in s.tensors if t.dtype in FLOAT_DTYPES]
    out_tag = max(set(float_tags), key=float_tags.count)
    log(f"merge: {ad.path} -> {out} (target '{chosen}', base {plan.base_dir}); {len(ad.loras)} LoRA modules, "
        f"{len(ad.replacements)} replaced tensors; {human_bytes(total)} in {len(shards)} shard(s), {out_tag}")

    base_fp = fingerprint(plan.base_dir)
    timings = {"prepare": round(time.time() - t_start, 2),
               "prepare_parts": {"read_adapter": round(t_adapter - t_start, 2),
                                 "plan_and_checks": round(t_plan - t_adapter, 2),
                                 "open_base_and_fingerprint": round(time.time() - t_plan, 2)}}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        t_merge = time.time()
        stats = write_merged_shards(weights, shards, tmp, log=log, inflight_bytes=inflight_bytes)
        merge_s = time.time() - t_merge
        timings["merge"] = round(merge_s, 2)
        t_checks = time.time()
        if len(shards) > 1:
            from cogumi.io import atomic_write_json
            atomic_write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total},
                                                 "weight_map": {t.name: s.file for s in shards for t in s.tensors}})
        out_cfg = _output_config(plan.original_dir if chosen == "original" and plan.original_dir else plan.base_dir,
                                 out_tag)
        (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2) + "\n", encoding="utf-8")
        _copy_side_files(tmp, plan.base_dir, ad.path, plan.original_dir)

        # output checks: the same rules `cogumi verify` applies (NaN/Inf were checked per tensor above)
        entries, file_findings = scan_weight_files(tmp)
        out_findings = file_findings + weights_findings(tmp, out_cfg, entries)
        want = {t.name for s in shards for t in s.tensors}
        if set(entries) != want:
            out_findings.append(Finding("red", "missing-tensors", f"output tensors differ from the base's: "
                                        f"{sorted(want ^ set(entries))[:3]}"))
        if red_findings(out_findings):
            raise RedFlagError("the merged output failed its checks:\n  "
                               + "\n  ".join(f.line() for f in red_findings(out_findings)))

        timings["output_checks"] = round(time.time() - t_checks, 2)
        if auto_numbers:
            timings["auto"] = auto_numbers["wall_s"]
        fid: dict[str, Any] = {"skipped": True}
        if fidelity:
            model = LayerwiseModel(tmp)
            rows = probe_rows(load_tokenizer(tmp), model.vocab)
            merged_view = WeightDir(tmp)
            fid = fidelity_check(model, merged_view, source, ad, rows)
            merged_view.close()
            timings["fidelity"] = fid["wall_s"]
            conf = fid["top1_agreement_confident"]
            summary = (f"max |delta logit| {fid['max_abs_logit_diff']:.3g}, KL {fid['kl_mean']:.3g}, top-1 agreement "
                       f"{fid['top1_agreement']:.4f} ({'n/a' if conf is None else f'{conf:.4f}'} on "
                       f"{fid['confident_positions']} confident positions); the LoRA's own effect: max |delta logit| "
                       f"{fid['lora_effect']['max_abs_logit_diff']:.3g}, KL {fid['lora_effect']['kl_mean']:.3g}")
            log(f"merge: fidelity ({fid['probes']} probes, {fid['tokens']} tokens, {fid['wall_s']}s): {summary} -> "
                f"{'ok' if fid['passed'] else 'FAILED'}")
            if not fid["passed"]:
                f = Finding("red", "fidelity", f"merged model differs from base + adapter beyond tolerance ({summary}; "
                            f"tolerance: KL <= {FIDELITY_KL_MAX} or <= {FIDELITY_KL_REL:.0%} of the LoRA's effect, "
                            f"confident top-1 >= {FIDELITY_TOP1_MIN})",
                            "report this with the adapter_config.json; use the adapter unmerged meanwhile")
                if not force:
                    raise RedFlagError("merge failed its fidelity check: " + f.line())
                reds.append(f)

        manifest = {
            "kind": "merged",
            "parents": {
                "base": {"id": str(plan.base_dir), "path": str(plan.base_dir), "fingerprint": base_fp,
                         "dequantized_from_4bit": chosen == "dequantized",
                         **({"weights_4bit": plan.weights_4bit} if plan.weights_4bit else {})},
                "adapter": {"path": str(ad.path.resolve()), "fingerprint": ad.fingerprint(),
                            "lineage": _adapter_lineage(ad)},
                **({"original": {"path": str(plan.original_dir), "fingerprint": fingerprint(plan.original_dir)}}
                   if plan.original_dir and plan.original_dir != plan.base_dir else {}),
            },
            "target": chosen, "target_requested": plan.requested, "target_reason": plan.reason,
            "lineage_quantized": bool(recorded_base(ad.config, ad.manifest)["quantized"]),
            "forced": bool(force and reds), "force_flag": bool(force),
            "weights_4bit_accepted": plan.weights_4bit_accepted,
            "red_flags": [asdict(f) for f in reds],
            "findings": [asdict(f) for f in plan.findings],
            "auto": auto_numbers, "fidelity": fid,
            "adapter": ad.summary(),
            "output": {"dtype": out_tag, "bytes": total, "shards": len(shards), "tensors": stats["tensors"],
                       "lora_modules_merged": stats["lora_modules_merged"], "merge_jobs": stats["jobs"]},
            "libraries": library_versions(),
            "merge_wall_s": round(merge_s, 2), "wall_s": round(time.time() - t_start, 2), "timings_s": timings,
            **memory.read(),
        }
        write_manifest(tmp, manifest)
    log(f"merged model: {out} ({human_bytes(total)}, {out_tag}, target '{chosen}'{', FORCED' if manifest['forced'] else ''}); "
        f"{manifest['wall_s']:.1f}s, peak RSS {manifest['peak_rss_gib']:.2f} GiB")
    return manifest


def _adapter_lineage(ad: Adapter) -> dict | None:
    if not ad.manifest:
        return {"kind": "adapter", "base": {"id": ad.config.get("base_model_name_or_path"),
                                            "quantized": recorded_base(ad.config, None)["quantized"]}}
    keep = ("kind", "phase", "created", "base", "allow_quantized_base", "quantized_base_override_used", "red_flags")
    return {k: ad.manifest[k] for k in keep if k in ad.manifest}


def merge_command(adapter: str, *, out: str, base: str | None = None, target: str = "original",
                  holdout: str | None = None, overwrite: bool = False, force: bool = False,
                  fidelity: bool = True) -> int:
    merge_adapter(adapter, out, base=base, target=target, holdout=holdout, overwrite=overwrite, force=force,
                  fidelity=fidelity)
    return 0
