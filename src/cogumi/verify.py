"""``cogumi verify PATH [--base BASE] [--json]``: the "critical verification" as a command.

For any adapter dir (``adapter_config.json``) or model dir (``config.json``), ours or anyone's:
  * lineage: the base recorded in ``adapter_config.json`` / ``cogumi.json``, and a quantized base anywhere
    upstream (by name, quantization_config, or a manifest carried forward) -- the incident;
  * a merged model that was forced past red flags, or failed its fidelity check;
  * quantization in the dir itself (quantization_config, packed 4/8-bit tensors, int dtypes);
  * weights that went through 4-bit quantization and back although nothing says so (few distinct values
    per block: ``cogumi.lowbit``; a dequantized GGUF/bnb model saved as bf16 is the incident's base);
  * dtype and size against the config (parameters x bytes per dtype: an 8B bf16 model under 10 GB is
    wrong), every expected tensor present, missing or truncated files, NaN/Inf in any tensor;
  * with ``--base``: whether an adapter matches that base (fingerprint, tensor shapes) and whether the
    base is quantized.

One line per finding, each with what to do. Exit 0: clean (warnings allowed); 1: red flags; 2: unusable
input (no such dir, neither an adapter nor a model, unreadable config). All rules live in
``cogumi.lineage``, shared with ``cogumi train`` and ``cogumi merge``.
"""

from __future__ import annotations

import json
import sys
import os
from dataclasses import asdict
from pathlib import Path

from cogumi.errors import CogumiError
from cogumi.lineage import (
    Finding, adapter_lineage_findings, base_match_findings, config_dtype, human_bytes, human_count, manifest_lineage_findings,
    nonfinite_findings, quantization_findings, read_json_file, read_manifest, read_model_config, recorded_base,
    red_findings, resolve_model_dir, scan_weight_files, unsupported_lora_options, weight_level_findings,
    weights_findings,
)


def _manifest(path: Path) -> tuple[dict | None, list[Finding]]:
    try:
        return read_manifest(path), []
    except CogumiError as e:
        return None, [Finding("red", "corrupt-manifest", str(e), "the directory may come from an interrupted run; "
                              "re-create it")]


def _weight_findings(path: Path, cfg: dict | None) -> tuple[dict, list[Finding]]:
    entries, findings = scan_weight_files(path)
    if cfg is not None:
        findings += weights_findings(path, cfg, entries)
    if entries and not any(f.code in ("truncated-file", "corrupt-file") for f in findings):
        findings += nonfinite_findings(path, entries)
    return entries, findings


def verify_model(path: Path, base: str | None = None) -> list[Finding]:
    cfg = read_model_config(str(path))
    manifest, findings = _manifest(path)
    name = cfg.get("_name_or_path") or path.name
    findings += quantization_findings(cfg, str(name), what="model")
    if not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        findings.append(Finding("warn", "pickle-weights", f"{path}: weights are pickle *.bin files; verify reads "
                                "safetensors only", "re-save with save_pretrained(safe_serialization=True)"))
        entries = {}
    else:
        entries, more = _weight_findings(path, cfg)
        findings += more
        if entries and not red_findings(more):
            findings += _level_findings(path, entries, manifest)
    findings += manifest_lineage_findings(manifest, str(path))
    if manifest and manifest.get("kind") == "merged":
        fid = manifest.get("fidelity") or {}
        if fid.get("passed") is False:
            findings.append(Finding("red", "fidelity", f"{path}: its merge failed the fidelity check (KL "
                                    f"{fid.get('kl_mean')}, top-1 agreement {fid.get('top1_agreement')})",
                                    "re-merge; use the adapter unmerged meanwhile"))
        elif fid.get("skipped"):
            findings.append(Finding("warn", "fidelity-skipped", f"{path}: merged with --no-fidelity",
                                    "re-merge without --no-fidelity to check merged == base + adapter"))
    if base:
        base_dir = resolve_model_dir(base)
        parent = ((manifest or {}).get("parents") or {}).get("base") or {}
        if parent.get("fingerprint"):
            findings += base_match_findings({"fingerprint": parent["fingerprint"], "id": parent.get("id"),
                                             "source": "cogumi.json"}, base_dir)
        else:
            findings.append(Finding("warn", "base-unconfirmed", f"{path} records no base fingerprint; cannot "
                                    f"check it against {base}", ""))
    if entries and not red_findings(findings):
        total = sum(e.nbytes for e in entries.values())
        params = sum(e.numel for e in entries.values())
        findings.append(Finding("ok", "model", f"model {path}: {len(entries)} tensors, {human_count(params)} "
                                f"parameters, {human_bytes(total)}, dtype {config_dtype(cfg)}"
                                + (f", {manifest.get('kind')} by cogumi" if manifest else "")))
    return findings


def _level_findings(path: Path, entries: dict, manifest: dict | None) -> list[Finding]:
    """Weights that went through 4-bit quantization (``cogumi.lowbit``): red, unless this is a merge
    whose manifest records that the adapter was knowingly trained on exactly that base (a test model)."""
    found, _ = weight_level_findings(path, entries)
    if (manifest or {}).get("weights_4bit_accepted"):
        found = [Finding("warn", f.code, f.message + " (a merge onto a base trained with --allow-quantized-base)",
                         f.fix, f.measured) if f.level == "red" else f for f in found]
    return found


def _lora_b_all_zero(path: Path, entries: dict) -> bool | None:
    from safetensors import safe_open
    names = [n for n in entries if ".lora_B." in n or n.endswith(".lora_embedding_B")]
    if not names:
        return None
    for fname in {entries[n].file for n in names}:
        with safe_open(str(path / fname), framework="pt") as f:
            for n in names:
                if entries[n].file == fname and bool(f.get_tensor(n).abs().max() > 0):
                    return False
    return True


def verify_adapter(path: Path, base: str | None = None) -> list[Finding]:
    acfg = read_json_file(path / "adapter_config.json", "adapter_config.json")
    manifest, findings = _manifest(path)
    rec = recorded_base(acfg, manifest)
    findings += adapter_lineage_findings(path, acfg, manifest)
    for problem in unsupported_lora_options(acfg):
        findings.append(Finding("warn", "unmergeable", f"{path}: {problem}; `cogumi merge` will refuse to merge it",
                                "serve it unmerged (PEFT), or retrain as a plain LoRA"))
    if not (path / "adapter_model.safetensors").exists():
        if (path / "adapter_model.bin").exists():
            findings.append(Finding("warn", "pickle-weights", f"{path}: adapter weights are a pickle .bin file; "
                                    "verify checks safetensors only", "re-save with safe_serialization=True"))
        else:
            findings.append(Finding("red", "missing-file", f"{path}: no adapter_model.safetensors (or .bin)",
                                    "the adapter is incomplete; re-copy it or re-run training"))
    entries, more = _weight_findings(path, None)
    findings += more
    if entries and not red_findings(more) and _lora_b_all_zero(path, entries):
        findings.append(Finding("warn", "no-op-adapter", f"{path}: every lora_B is zero, so the adapter changes "
                                "nothing (untrained, or saved before the first step)", "check the training run"))
    if base:
        base_dir = resolve_model_dir(base)
        base_cfg = read_model_config(str(base_dir))
        qf = quantization_findings(base_cfg, base, what="--base")
        qf += [f for f in weight_level_findings(base_dir, what="--base")[0] if f.level != "ok"]
        findings += qf
        if not red_findings(qf):
            findings += base_match_findings(rec, base_dir, base_label=base)
            from cogumi.merge import WeightDir, check_adapter_fits, load_adapter
            try:
                check_adapter_fits(load_adapter(path), WeightDir(base_dir))
            except CogumiError as e:
                findings.append(Finding("red", "shape-mismatch", str(e).split("\nPass --base")[0],
                                        "pass --base with the model the adapter was trained on"))
    if not red_findings(findings):
        n_pairs = sum(1 for n in entries if ".lora_A." in n or n.endswith(".lora_embedding_A"))
        findings.append(Finding("ok", "adapter", f"adapter {path}: LoRA r={acfg.get('r')} alpha={acfg.get('lora_alpha')}"
                                f"{' rsLoRA' if acfg.get('use_rslora') else ''}, {n_pairs} modules, base "
                                f"{rec.get('id')} ({rec.get('source')}"
                                + (f", fingerprint {rec['fingerprint']}" if rec.get("fingerprint") else "") + ")"))
    return findings


def verify_path(path: str | os.PathLike, base: str | None = None) -> list[Finding]:
    """Findings for an adapter or model dir; CogumiError when the input is unusable (exit 2)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CogumiError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise CogumiError(f"{p}: expected an adapter or model directory, found a file")
    if (p / "adapter_config.json").exists():
        return verify_adapter(p, base)
    if (p / "config.json").exists():
        return verify_model(p, base)
    raise CogumiError(f"{p}: neither an adapter (adapter_config.json) nor a model (config.json) directory; "
                      "point verify at the directory `cogumi train` or `cogumi merge` wrote")


def verify_command(path: str, *, base: str | None = None, as_json: bool = False) -> int:
    try:
        findings = verify_path(path, base)
    except CogumiError as e:
        if as_json:
            print(json.dumps({"path": str(path), "usable": False, "error": str(e), "exit_code": 2}, indent=1))
            return 2
        raise
    reds = red_findings(findings)
    code = 1 if reds else 0
    if as_json:
        print(json.dumps({"path": str(path), "usable": True, "exit_code": code,
                          "findings": [asdict(f) for f in findings]}, indent=1))
        return code
    for f in findings:
        print(f.line())
    warns = sum(f.level == "warn" for f in findings)
    print(f"verify {path}: " + (f"{len(reds)} red flag(s), {warns} warning(s)" if reds else
                                f"clean ({warns} warning(s))" if warns else "clean"))
    for f in reds:  # the CLI's convention for a refusal: one `error:` line per red flag on stderr
        print(f"error: {f.message}" + (f" -> {f.fix}" if f.fix else ""), file=sys.stderr)
    return code
