"""Lineage and integrity: fingerprints, manifests, quantization detection.

This module is the one home of cogumi's red-flag rules. ``cogumi train`` (preflight), ``cogumi merge``
(base check, output check) and ``cogumi verify`` all call the functions here, so a rule changes in one
place. A rule returns ``Finding`` objects; callers decide whether a red finding stops them.

The incident these rules exist for: a LoRA adapter trained on
``unsloth/meta-llama-3.1-8b-instruct-unsloth-bnb-4bit`` was merged into bf16 weights and the model came
out corrupted (GSM8K ties vs GPT-4 fell from ~70% to 28%).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cogumi import __version__
from cogumi.errors import CogumiError, RedFlagError

MANIFEST_NAME = "cogumi.json"

# Name fragments used by quantized re-uploads (Unsloth, TheBloke, ...). Matched case-insensitively
# against each path component of a hub id or directory name.
QUANTIZED_NAME_PATTERNS = [
    r"bnb[-_]?4bit", r"bnb[-_]?8bit", r"(^|[-_.])4bit($|[-_.])", r"(^|[-_.])8bit($|[-_.])", r"(^|[-_.])nf4($|[-_.])",
    r"gptq", r"awq", r"gguf", r"exl2", r"hqq", r"(^|[-_.])int4($|[-_.])", r"(^|[-_.])int8($|[-_.])",
    r"(^|[-_.])fp8($|[-_.])", r"(^|[-_.])w4a16($|[-_.])", r"(^|[-_.])w8a8($|[-_.])", r"aqlm", r"eetq",
]
QUANTIZED_DTYPES = {"int8", "uint8", "int4", "uint4", "float8_e4m3fn", "float8_e5m2", "F8_E4M3", "F8_E5M2", "I8", "U8"}

INCIDENT = ("In the incident cogumi exists for, an adapter trained on "
            "unsloth/meta-llama-3.1-8b-instruct-unsloth-bnb-4bit was merged and the model came out corrupted "
            "(GSM8K ties vs GPT-4 fell from ~70% to 28%).")
FULL_PRECISION_HINT = ("Use the full-precision base instead, e.g. meta-llama/Meta-Llama-3.1-8B-Instruct "
                       "(bf16), or a local copy of it.")


@dataclass
class Finding:
    level: str            # "red" (stops the run), "warn", "ok"
    code: str             # stable identifier, e.g. "quantized-base"
    message: str          # what is wrong, naming the file/key
    fix: str = ""         # what to do

    def line(self) -> str:
        tag = {"red": "RED FLAG", "warn": "warning", "ok": "ok"}.get(self.level, self.level)
        return f"[{tag}] {self.message}" + (f" -> {self.fix}" if self.fix else "")


def red_findings(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == "red"]


# ---------------------------------------------------------------------------------------------
# locating models and reading their config without loading weights
# ---------------------------------------------------------------------------------------------

def is_local(id_or_path: str | os.PathLike) -> bool:
    return Path(id_or_path).expanduser().exists()


def resolve_model_dir(id_or_path: str, revision: str | None = None, *, allow_download: bool = True) -> Path:
    """A local directory for a model: the path itself, or a hub snapshot (real download code)."""
    p = Path(id_or_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CogumiError(f"{p}: expected a model directory (with config.json), found a file")
        return p.resolve()
    if not allow_download:
        raise CogumiError(f"{id_or_path}: no such local directory")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(id_or_path, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
    except Exception as e:  # network down, gated repo, typo
        raise CogumiError(f"{id_or_path}: not a local directory, and downloading it from the hub failed "
                          f"({type(e).__name__}: {e}). Check the id, your HF_TOKEN, or pass a local path.") from None


def read_model_config(id_or_path: str, revision: str | None = None) -> dict:
    """config.json of a local dir or hub repo, without downloading weights."""
    p = Path(id_or_path).expanduser()
    if p.exists():
        cfg_path = p / "config.json"
        if not cfg_path.exists():
            raise CogumiError(f"{p}: no config.json here; is this a Hugging Face model directory?")
    else:
        try:
            from huggingface_hub import hf_hub_download
            cfg_path = Path(hf_hub_download(id_or_path, "config.json", revision=revision))
        except Exception as e:
            raise CogumiError(f"{id_or_path}: not a local directory, and its config.json could not be fetched "
                              f"from the hub ({type(e).__name__}: {e}). Check the id or pass a local path.") from None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CogumiError(f"{cfg_path}: config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CogumiError(f"{cfg_path}: config.json must be a JSON object")
    return cfg


def config_dtype(cfg: dict) -> str | None:
    return cfg.get("dtype") or cfg.get("torch_dtype")


# ---------------------------------------------------------------------------------------------
# quantization rules
# ---------------------------------------------------------------------------------------------

def quantized_name(name: str) -> str | None:
    """The pattern a model name matches if it looks like a quantized upload, else None."""
    for part in re.split(r"[/\\]", str(name)):
        for pat in QUANTIZED_NAME_PATTERNS:
            if re.search(pat, part, flags=re.IGNORECASE):
                return part
    return None


def quantization_findings(cfg: dict | None, name: str, *, what: str = "base model") -> list[Finding]:
    """Red findings if a model's config or name says it is quantized."""
    out: list[Finding] = []
    cfg = cfg or {}
    qc = cfg.get("quantization_config")
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        bits = ""
        if isinstance(qc, dict):
            if qc.get("load_in_4bit"):
                bits = " 4-bit"
            elif qc.get("load_in_8bit"):
                bits = " 8-bit"
            elif qc.get("bits"):
                bits = f" {qc['bits']}-bit"
        out.append(Finding("red", "quantized-config",
                           f"{what} {name} is quantized: its config.json has a quantization_config "
                           f"(quant_method={method}{bits}). {INCIDENT}", FULL_PRECISION_HINT))
    for key in ("load_in_4bit", "load_in_8bit"):
        if cfg.get(key):
            out.append(Finding("red", "quantized-config", f"{what} {name}: config.json sets {key}=true. {INCIDENT}",
                               FULL_PRECISION_HINT))
    dtype = config_dtype(cfg)
    if dtype and str(dtype) in QUANTIZED_DTYPES:
        out.append(Finding("red", "quantized-dtype", f"{what} {name}: config.json dtype is {dtype}", FULL_PRECISION_HINT))
    part = quantized_name(name)
    if part:
        out.append(Finding("red", "quantized-name",
                           f"{what} {name}: the name '{part}' marks a quantized upload. {INCIDENT}",
                           FULL_PRECISION_HINT))
    return out


def check_training_base(base: str, revision: str | None = None, *, allow_quantized: bool = False,
                        log=print) -> tuple[dict, list[Finding]]:
    """Preflight of a training base, before any weight loads. Raises RedFlagError on a quantized base
    unless ``allow_quantized``, in which case the findings are returned (to be recorded) and shouted."""
    cfg = read_model_config(base, revision)
    findings = quantization_findings(cfg, base)
    reds = red_findings(findings)
    if reds and not allow_quantized:
        raise RedFlagError("refusing to train on a quantized base:\n  " + "\n  ".join(f.line() for f in reds) +
                           "\n(Override with allow_quantized_base: true only if you know why; it is recorded.)")
    if reds:
        log("!" * 78)
        log("!! WARNING: TRAINING ON A QUANTIZED BASE (allow_quantized_base=true). THIS IS THE INCIDENT'S SETUP.")
        for f in reds:
            log("!! " + f.line())
        log("!" * 78)
    return cfg, findings


# ---------------------------------------------------------------------------------------------
# fingerprints
# ---------------------------------------------------------------------------------------------

def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CogumiError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise CogumiError(f"{path}: not a safetensors file (header length {n})")
        header = f.read(n)
        if len(header) < n:
            raise CogumiError(f"{path}: truncated safetensors file (header cut short)")
    try:
        return json.loads(header)
    except json.JSONDecodeError:
        raise CogumiError(f"{path}: corrupt safetensors header") from None


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        files = sorted(model_dir.glob("*.bin"))
    return files


def fingerprint(model_dir: str | os.PathLike, *, full: bool = False) -> str:
    """A cheap, content-sensitive fingerprint of a model or adapter directory.

    Hashes each weight file's size, its safetensors header (names, dtypes, shapes, offsets) and its
    first and last MiB of data; ``full`` hashes every byte instead (slow for 16 GB). Renaming the
    directory does not change it; changing a weight, dtype or shape does.
    """
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    files = weight_files(model_dir)
    if not files:
        raise CogumiError(f"{model_dir}: no *.safetensors or *.bin weight files to fingerprint")
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if full or size <= 2 << 20:
                while block := fh.read(1 << 20):
                    h.update(block)
            else:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return ("sha256-full:" if full else "sha256-quick:") + h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# manifests
# ---------------------------------------------------------------------------------------------

def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0], "cogumi": __version__}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors", "bitsandbytes",
                "liger-kernel"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def base_record(base: str, cfg: dict | None = None, *, revision: str | None = None,
                findings: list[Finding] | None = None) -> dict:
    """What a manifest records about a base model."""
    cfg = cfg if cfg is not None else read_model_config(base, revision)
    rec: dict[str, Any] = {
        "id": base, "revision": revision, "path": str(Path(base).resolve()) if is_local(base) else None,
        "dtype": config_dtype(cfg), "architectures": cfg.get("architectures"),
        "quantization_config": cfg.get("quantization_config"),
        "quantized": bool(red_findings(quantization_findings(cfg, base))),
        "num_parameters_hint": None,
    }
    if is_local(base):
        try:
            rec["fingerprint"] = fingerprint(base)
        except CogumiError:
            rec["fingerprint"] = None
    else:
        rec["fingerprint"] = None
    if findings:
        rec["findings"] = [asdict(f) for f in findings]
    return rec


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    from cogumi.io import atomic_write_json
    manifest = {"cogumi_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest}
    return atomic_write_json(Path(directory) / MANIFEST_NAME, manifest)


def read_manifest(directory: str | os.PathLike) -> dict | None:
    p = Path(directory) / MANIFEST_NAME
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CogumiError(f"{p}: manifest is not valid JSON ({e}); the directory may be from an interrupted run") from None
