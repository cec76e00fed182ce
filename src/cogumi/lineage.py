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
from dataclasses import asdict, dataclass
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
    measured: dict | None = None   # the statistic behind it, where one was measured (e.g. weight levels)

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
    return read_json_file(cfg_path, "config.json")


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


def weight_level_findings(model_dir: str | os.PathLike, entries: dict | None = None, *,
                          what: str = "model") -> tuple[list[Finding], dict | None]:
    """Weights that went through 4-bit quantization and back, from the values (``cogumi.lowbit``):
    findings, and the measured statistic (None when the dir has no safetensors weights)."""
    from cogumi.lowbit import lowbit_findings
    model_dir = Path(model_dir)
    if entries is None:
        entries, problems = scan_weight_files(model_dir)
        if red_findings(problems):
            return [], None        # unreadable files are reported by the checks that read headers
    if not entries:
        return [], None
    findings, stats = lowbit_findings(model_dir, entries, what=what)
    return findings, stats.as_dict()


def base_weight_findings(base: str, revision: str | None = None, *, what: str = "base model",
                         download: bool = False) -> tuple[list[Finding], dict | None]:
    """``weight_level_findings`` of a base: a local dir as it is; a hub id from its snapshot (downloaded
    when ``download``: training downloads it next anyway; else only when already in the cache)."""
    if is_local(base):
        return weight_level_findings(Path(base).expanduser(), what=what)
    try:
        from huggingface_hub import snapshot_download
        snap = Path(snapshot_download(base, revision=revision, local_files_only=not download,
                                      allow_patterns=["*.json", "*.safetensors"]))
    except Exception:   # offline and not cached: the check runs where the weights are
        return [], None
    return weight_level_findings(snap, what=what)


def check_training_base(base: str, revision: str | None = None, *, allow_quantized: bool = False,
                        log=print, check_weights: bool = True) -> tuple[dict, list[Finding]]:
    """Preflight of a training base, before any weight loads into a trainer. Raises RedFlagError on a
    quantized base (config, name, or weights that went through 4-bit) unless ``allow_quantized``, in
    which case the findings are returned (to be recorded) and shouted."""
    cfg = read_model_config(base, revision)
    findings = quantization_findings(cfg, base)
    if check_weights and not red_findings(findings):
        weight_findings, _ = base_weight_findings(base, revision, download=True)
        findings += [f for f in weight_findings if f.level != "ok"]
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
    levels = next((f for f in findings or [] if f.code == "quantized-weights" and f.level == "red"), None)
    if levels is not None:
        rec["weights_4bit"] = levels.measured.get("summary") if levels.measured else levels.message
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


# ---------------------------------------------------------------------------------------------
# weight files: what is on disk, read from safetensors headers only
# ---------------------------------------------------------------------------------------------

# bytes per element of each safetensors dtype tag
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                           "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
                           "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1, "F6_E3M2": 1}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
CONFIG_DTYPE_TO_SAFETENSORS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
# tensor-name fragments that only quantized checkpoints carry (bitsandbytes, GPTQ/AWQ, int8)
QUANTIZED_TENSOR_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB",
                             ".qweight", ".qzeros", ".g_idx", ".weight_scale", ".input_scale")
INDEX_NAME = "model.safetensors.index.json"


@dataclass
class TensorEntry:
    name: str
    file: str             # file name inside the model dir
    dtype: str            # safetensors tag: "BF16", "F32", "U8", ...
    shape: list[int]
    start: int            # absolute byte offsets of the data in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def safetensors_entries(path: Path) -> list[TensorEntry]:
    """Tensors of one safetensors file, in data order; CogumiError if the header is unreadable."""
    header = safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    base = 8 + n
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            out.append(TensorEntry(name, path.name, info["dtype"], list(info["shape"]), base + start, base + end))
        except (KeyError, TypeError, ValueError):
            raise CogumiError(f"{path}: corrupt safetensors header entry for {name!r}") from None
    return sorted(out, key=lambda e: e.start)


def scan_weight_files(model_dir: str | os.PathLike) -> tuple[dict[str, TensorEntry], list[Finding]]:
    """Every tensor a model/adapter dir holds (from headers, no data read) and red findings for missing,
    truncated or corrupt files and for an index that disagrees with the files."""
    model_dir = Path(model_dir)
    findings: list[Finding] = []
    entries: dict[str, TensorEntry] = {}
    index_path = model_dir / INDEX_NAME
    weight_map: dict[str, str] | None = None
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            findings.append(Finding("red", "corrupt-index", f"{index_path}: not a valid safetensors index "
                                    "(needs a 'weight_map' object)", "re-copy the model directory"))
            weight_map = None
    files = sorted(set(weight_map.values())) if weight_map else [p.name for p in sorted(model_dir.glob("*.safetensors"))]
    for fname in files:
        path = model_dir / fname
        if not path.exists():
            findings.append(Finding("red", "missing-file", f"{path}: listed in {INDEX_NAME} but missing",
                                    "re-copy or re-download the model directory; it is incomplete"))
            continue
        try:
            file_entries = safetensors_entries(path)
        except CogumiError as e:
            findings.append(Finding("red", "corrupt-file", str(e), "re-copy or re-download this file"))
            continue
        size = path.stat().st_size
        end = max((e.end for e in file_entries), default=0)
        if end > size:
            findings.append(Finding("red", "truncated-file",
                                    f"{path}: truncated ({size:,} bytes on disk, header needs {end:,})",
                                    "the copy or download was cut short; re-copy this file"))
            continue
        for e in file_entries:
            entries[e.name] = e
    if weight_map:
        missing = sorted(n for n, f in weight_map.items() if n not in entries and (model_dir / f).exists())
        if missing:
            findings.append(Finding("red", "missing-tensors",
                                    f"{model_dir}: {len(missing)} tensor(s) listed in {INDEX_NAME} are not in their "
                                    f"files (first: {missing[0]})", "the directory is inconsistent; re-copy it"))
    return entries, findings


# ---------------------------------------------------------------------------------------------
# expected shape of a Llama-family checkpoint, from config.json
# ---------------------------------------------------------------------------------------------

LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3"}
LINEAR_NAMES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _arch(cfg: dict) -> dict | None:
    try:
        h, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        return {"h": h, "layers": layers, "inter": int(cfg["intermediate_size"]), "vocab": int(cfg["vocab_size"]),
                "heads": heads, "kv": int(cfg.get("num_key_value_heads") or heads),
                "head_dim": int(cfg.get("head_dim") or h // heads), "tied": bool(cfg.get("tie_word_embeddings"))}
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def expected_tensor_names(cfg: dict) -> list[str] | None:
    """Weight names a Llama-family checkpoint must hold (None for other architectures)."""
    if cfg.get("model_type") not in LLAMA_FAMILY or not (a := _arch(cfg)):
        return None
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if a["tied"] else ["lm_head.weight"])
    for i in range(a["layers"]):
        p = f"model.layers.{i}."
        names += [p + n + ".weight" for n in LINEAR_NAMES]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    return names


def expected_parameter_count(cfg: dict) -> int | None:
    """Parameters a Llama-family config implies (None for other architectures)."""
    if cfg.get("model_type") not in LLAMA_FAMILY or not (a := _arch(cfg)):
        return None
    h, d = a["h"], a["head_dim"]
    q, kv = a["heads"] * d, a["kv"] * d
    attn = h * q + 2 * h * kv + q * h
    if cfg.get("attention_bias") or cfg.get("model_type") == "qwen2":
        attn += q + 2 * kv + (h if cfg.get("attention_bias") else 0)
    if cfg.get("model_type") == "qwen3":
        attn += 2 * d
    per_layer = attn + 3 * h * a["inter"] + 2 * h
    return a["vocab"] * h * (1 if a["tied"] else 2) + a["layers"] * per_layer + h


def human_count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def human_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{int(n):,} bytes"


def config_dtype_mismatch(model_dir: str | os.PathLike, cfg: dict) -> Finding | None:
    """The red dtype-mismatch finding of a local model dir (config.json vs safetensors headers), if any."""
    entries, _ = scan_weight_files(model_dir)
    if not entries:
        return None
    return next((f for f in weights_findings(Path(model_dir), cfg, entries)
                 if f.code == "dtype-mismatch" and f.level == "red"), None)


def weights_findings(model_dir: Path, cfg: dict, entries: dict[str, TensorEntry]) -> list[Finding]:
    """Dtype, size and completeness of a model dir's weights against its config (headers only)."""
    out: list[Finding] = []
    if not entries:
        return [Finding("red", "no-weights", f"{model_dir}: no *.safetensors weights here",
                        "copy the model's safetensors shards into this directory")]
    packed = [n for n, e in entries.items() if n.endswith(".weight") and e.dtype not in FLOAT_DTYPES]
    aux = [n for n in entries if n.endswith(QUANTIZED_TENSOR_SUFFIXES) or ".quant_state." in n]
    quant_tensors = packed + [n for n in aux if n not in packed]
    if quant_tensors:
        out.append(Finding("red", "quantized-tensors",
                           f"{model_dir}: {len(quant_tensors)} tensor(s) are stored quantized/packed "
                           f"(e.g. {quant_tensors[0]} {entries[quant_tensors[0]].dtype}). {INCIDENT}",
                           FULL_PRECISION_HINT))
    float_dtypes = {e.dtype for n, e in entries.items() if e.dtype in FLOAT_DTYPES and n not in aux}
    declared = CONFIG_DTYPE_TO_SAFETENSORS.get(str(config_dtype(cfg)))
    if declared and float_dtypes and float_dtypes != {declared}:
        # None of the weights in the declared dtype: loading with dtype="auto" would silently cast them all
        # (e.g. bf16 -> float16, which can overflow). Mixed dtypes that include the declared one only warn.
        level = "red" if declared not in float_dtypes else "warn"
        out.append(Finding(level, "dtype-mismatch",
                           f"{model_dir}: config.json says dtype {config_dtype(cfg)} but the weights are stored as "
                           f"{', '.join(sorted(float_dtypes))}",
                           "set config.json's dtype (and torch_dtype) to the weights' stored dtype"))
    expected_names = expected_tensor_names(cfg)
    if expected_names is not None:
        missing = [n for n in expected_names if n not in entries and not (n + ".absmax") in entries]
        if missing:
            out.append(Finding("red", "missing-tensors",
                               f"{model_dir}: {len(missing)} weight(s) the config implies are missing "
                               f"(first: {missing[0]})", "the checkpoint is incomplete; re-copy or re-merge it"))
    expected_params = expected_parameter_count(cfg)
    bytes_per = SAFETENSORS_DTYPE_BYTES.get(declared or "", 0) or (
        SAFETENSORS_DTYPE_BYTES[next(iter(float_dtypes))] if len(float_dtypes) == 1 else 0)
    total = sum(e.nbytes for e in entries.values())
    if expected_params and bytes_per:
        want = expected_params * bytes_per
        if total < 0.9 * want:
            out.append(Finding("red", "size-too-small",
                               f"{model_dir}: weights take {human_bytes(total)} but {human_count(expected_params)} "
                               f"parameters x {bytes_per} bytes ({config_dtype(cfg) or 'the weights dtype'}) should "
                               f"take about {human_bytes(want)}: quantized, truncated or incomplete",
                               "re-merge into the full-precision base with `cogumi merge`"))
        elif total > 1.1 * want:
            out.append(Finding("warn", "size-too-large",
                               f"{model_dir}: weights take {human_bytes(total)}, more than the "
                               f"{human_bytes(want)} the config implies", "check for duplicate or fp32 tensors"))
    return out


def all_finite(t) -> bool:
    """No NaN/Inf in a float tensor. ``aminmax`` is one vectorized pass that propagates NaN (and shows
    +-Inf as an extreme), several times faster on CPU than ``isfinite(t).all()``, which allocates a mask."""
    import torch
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def nonfinite_findings(model_dir: Path, entries: dict[str, TensorEntry], *, limit: int = 5) -> list[Finding]:
    """Red finding if any floating-point tensor holds NaN or Inf (reads every tensor, one at a time)."""
    from safetensors import safe_open
    bad: list[str] = []
    by_file: dict[str, list[str]] = {}
    for e in entries.values():
        if e.dtype in FLOAT_DTYPES:
            by_file.setdefault(e.file, []).append(e.name)
    for fname, names in sorted(by_file.items()):
        try:
            for name in names:
                # a fresh handle per tensor: pages of a held-open file stay resident (a 5 GB shard)
                with safe_open(str(model_dir / fname), framework="pt") as f:
                    if not all_finite(f.get_tensor(name)):
                        bad.append(name)
        except Exception as exc:  # a file safetensors itself cannot read
            return [Finding("red", "corrupt-file", f"{model_dir / fname}: unreadable ({type(exc).__name__}: {exc})",
                            "re-copy this file")]
    if not bad:
        return []
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    return [Finding("red", "nonfinite", f"{model_dir}: NaN/Inf in {len(bad)} tensor(s): "
                    f"{', '.join(bad[:limit])}{more}", "the weights are corrupted; re-merge or re-train")]


# ---------------------------------------------------------------------------------------------
# lineage: what an adapter was trained on, and whether a base is that one
# ---------------------------------------------------------------------------------------------

def read_json_file(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CogumiError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CogumiError(f"{path}: {what} must be a JSON object")
    return obj


def recorded_base(adapter_cfg: dict, manifest: dict | None) -> dict:
    """What an adapter says it was trained on: id, local path, fingerprint, and whether it was quantized
    (from cogumi.json when ``cogumi train`` wrote one, else adapter_config.json's base_model_name_or_path)."""
    rec: dict[str, Any] = {"id": adapter_cfg.get("base_model_name_or_path"), "path": None, "fingerprint": None,
                           "quantized": False, "quantization_config": None, "lineage": None,
                           "source": "adapter_config.json"}
    if manifest:
        base = manifest.get("base") or {}
        parent = (manifest.get("parents") or {}).get("base") or {}
        rec.update(id=base.get("id") or parent.get("id") or rec["id"], path=base.get("path") or parent.get("path"),
                   fingerprint=base.get("fingerprint") or parent.get("fingerprint"),
                   quantized=bool(base.get("quantized")), quantization_config=base.get("quantization_config"),
                   lineage=base.get("lineage"), source="cogumi.json")
    local = next((p for p in (rec["path"], rec["id"]) if p and Path(p).expanduser().is_dir()), None)
    if local:
        rec["path"] = str(Path(local).expanduser().resolve())
        try:
            cfg = read_model_config(local)
            if cfg.get("quantization_config"):
                rec["quantized"], rec["quantization_config"] = True, cfg["quantization_config"]
        except CogumiError:
            pass
    # local directories by their own name only (a parent folder called "int8-runs" says nothing)
    names = [Path(rec["path"]).name if rec["path"] else None,
             Path(rec["id"]).name if rec["id"] and Path(rec["id"]).expanduser().exists() else rec["id"]]
    if any(n and quantized_name(str(n)) for n in names):
        rec["quantized"] = True
    return rec


def manifest_lineage_findings(manifest: dict | None, where: str, _depth: int = 0, *,
                              quantized_handled: bool = False) -> list[Finding]:
    """Red flags a manifest carries forward: a forced merge, a quantized base anywhere upstream.

    A merge that knowingly handled a 4-bit-trained adapter (``--target dequantized/auto``, recorded as
    ``lineage_quantized`` without ``forced``) reports it as a warning instead of repeating the adapter's
    red flag; a forced merge is red."""
    if not manifest or _depth > 8:
        return []
    out: list[Finding] = []
    if manifest.get("kind") == "merged" and manifest.get("forced"):
        flags = "; ".join(f.get("message", "") for f in manifest.get("red_flags", []) if isinstance(f, dict))
        out.append(Finding("red", "forced-merge", f"{where} was merged with --force past red flags"
                           + (f": {flags}" if flags else ""),
                           "re-merge without --force (e.g. `cogumi merge --target auto`) or retrain on the "
                           "full-precision base"))
    elif manifest.get("kind") == "merged" and manifest.get("lineage_quantized"):
        out.append(Finding("warn", "quantized-lineage",
                           f"{where} comes from an adapter trained on a 4-bit base, merged into the "
                           f"'{manifest.get('target')}' target (chosen: {manifest.get('target_reason', 'by the user')})",
                           "compare it against a model trained on the full-precision base before shipping"))
    levels = ((manifest.get("parents") or {}).get("base") or {}).get("weights_4bit") or \
        (manifest.get("base") or {}).get("weights_4bit")
    if levels and not manifest.get("forced"):
        accepted = manifest.get("weights_4bit_accepted") or manifest.get("quantized_base_override_used")
        out.append(Finding("warn" if accepted else "red", "quantized-weights-lineage",
                           f"{where} comes from a base whose weights went through 4-bit quantization "
                           f"({levels})" + (" (trained with --allow-quantized-base)" if accepted else ""),
                           "fine for a test model; for a real run, start from the full-precision original"))
    if manifest.get("kind") == "adapter" and (manifest.get("base") or {}).get("quantized") and not quantized_handled:
        out.append(Finding("red", "quantized-lineage",
                           f"{where} was trained on a quantized base {(manifest.get('base') or {}).get('id')}. {INCIDENT}",
                           FULL_PRECISION_HINT))
    for key in ("lineage",):
        nested = (manifest.get("base") or {}).get(key)
        if isinstance(nested, dict):
            out += manifest_lineage_findings(nested, f"{where}'s base", _depth + 1)
    handled = manifest.get("kind") == "merged" and bool(manifest.get("lineage_quantized"))
    for parent_name, parent in (manifest.get("parents") or {}).items():
        if isinstance(parent, dict) and isinstance(parent.get("lineage"), dict):
            out += manifest_lineage_findings(parent["lineage"], f"{where}'s {parent_name}", _depth + 1,
                                             quantized_handled=handled)
    return out


def adapter_lineage_findings(adapter_dir: Path, adapter_cfg: dict, manifest: dict | None) -> list[Finding]:
    """Red flag if the adapter was trained on a quantized base (the incident), from any record we have."""
    rec = recorded_base(adapter_cfg, manifest)
    out: list[Finding] = []
    if rec["quantized"]:
        qc = rec["quantization_config"] or {}
        detail = f" (quant_method={qc.get('quant_method')})" if isinstance(qc, dict) and qc else ""
        out.append(Finding("red", "quantized-lineage",
                           f"adapter {adapter_dir} was trained on a quantized base {rec['id']}{detail} "
                           f"(from {rec['source']}). Merging it into full-precision weights gives weights it "
                           f"never saw. {INCIDENT}",
                           "retrain on the full-precision base; to salvage this adapter, run `cogumi merge "
                           "--target auto --base <the bf16 original>`, which measures both merge targets"))
    nested = rec.get("lineage")
    if isinstance(nested, dict):
        out += manifest_lineage_findings(nested, f"adapter {adapter_dir}'s base")
    return out


def base_match_findings(rec: dict, base_dir: Path, *, base_label: str | None = None) -> list[Finding]:
    """Whether ``base_dir`` is the base the adapter was trained on (fingerprint, else path/id)."""
    label = base_label or str(base_dir)
    try:
        have = fingerprint(base_dir)
    except CogumiError as e:
        return [Finding("red", "base-unreadable", str(e), "pass --base with a model directory holding safetensors")]
    want, how = rec.get("fingerprint"), "fingerprint"
    if not want and rec.get("path") and Path(rec["path"]).is_dir():
        try:
            want, how = fingerprint(rec["path"]), f"fingerprint of {rec['path']}"
        except CogumiError:
            want = None
    if want:
        if want == have:
            return [Finding("ok", "base-match", f"base {label} matches the adapter's recorded base ({how} {have})")]
        return [Finding("red", "base-mismatch",
                        f"base {label} (fingerprint {have}) is not the base the adapter was trained on: "
                        f"{rec.get('id')} ({how} {want}, from {rec.get('source')})",
                        "pass --base with the base it was trained on; --force merges anyway and is recorded")]
    rid = rec.get("id")
    if rid and (rid == str(base_dir) or rid == base_label):
        return [Finding("ok", "base-match", f"base {label} is the adapter's recorded base (by name)")]
    return [Finding("warn", "base-unconfirmed",
                    f"cannot confirm {label} is the adapter's base: it records only the name {rid!r}, "
                    "no fingerprint", "make sure it is the exact base (and revision) the adapter was trained on")]


# ---------------------------------------------------------------------------------------------
# LoRA variants cogumi merge can merge exactly
# ---------------------------------------------------------------------------------------------

# adapter_config.json keys that change what the adapter computes, and the only value cogumi merges.
_LORA_MUST_BE = {"use_dora": (False, "DoRA (use_dora)"), "lora_bias": (False, "LoRA bias (lora_bias)"),
                 "bias": ("none", "trained biases (bias != 'none')"),
                 "target_parameters": (None, "LoRA on raw parameters (target_parameters)"),
                 "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens)"),
                 "use_qalora": (False, "QA-LoRA (use_qalora)"), "layer_replication": (None, "layer_replication"),
                 "megatron_config": (None, "Megatron parallel LoRA (megatron_config)"),
                 "use_bdlora": (None, "BD-LoRA (use_bdlora)"), "arrow_config": (None, "Arrow routing (arrow_config)"),
                 "kasa_config": (None, "KaSA (kasa_config)"), "monteclora_config": (None, "MonteCLoRA"),
                 "velora_config": (None, "VeLoRA (velora_config)")}
# keys that only affect initialisation, training or bookkeeping (the merge math is the same)
_LORA_HARMLESS = {"alpha_pattern", "auto_mapping", "base_model_name_or_path", "corda_config", "ensure_weight_tying",
                  "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights",
                  "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout",
                  "lora_ga_config", "megatron_core", "modules_to_save", "peft_type", "peft_version",
                  "qalora_group_size", "r", "rank_pattern", "revision", "target_modules", "task_type",
                  "trainable_token_indices", "use_rslora", "target_modules_to_tie", "modules_to_tie"}


def unsupported_lora_options(adapter_cfg: dict) -> list[str]:
    """Why ``cogumi merge`` cannot merge this adapter exactly (empty when it can)."""
    out = []
    if str(adapter_cfg.get("peft_type", "LORA")).upper() != "LORA":
        return [f"peft_type is {adapter_cfg.get('peft_type')!r}; cogumi merges LoRA adapters only"]
    for key, (ok, label) in _LORA_MUST_BE.items():
        value = adapter_cfg.get(key, ok)
        if value != ok and not (ok is None and value in (False, [], {})) and not (ok is False and value is None):
            out.append(f"{label} = {value!r} is not supported")
    for key, value in adapter_cfg.items():
        if key not in _LORA_MUST_BE and key not in _LORA_HARMLESS and value not in (None, False, [], {}):
            out.append(f"unknown option {key} = {value!r}: cogumi cannot tell whether it changes the math")
    return out
