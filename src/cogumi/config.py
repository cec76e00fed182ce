"""Typed run configuration: one YAML file per run, validated before any model is loaded.

Unknown keys, wrong types and missing files raise one ``ConfigError`` naming the dotted key.
Keys and defaults are the dataclasses below (``training.packing_unit``: with packing, whether a step covers
the recipe's ``batch_size x grad_accum`` rows -- ``rows``, the default -- or that many packs -- ``packs``).
``--set key=value`` overrides any key; the value is parsed as YAML (``--set training.max_steps=20``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cogumi.errors import ConfigError

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DataConfig:
    train: str = ""                       # local JSONL/JSON/Parquet file, or a hub dataset id
    split: str = "train"                  # split of a hub dataset
    eval: str | None = None               # optional held-out file; else ``holdout`` rows are held out
    holdout: int = 0                      # rows of train held out for eval / merge --target auto
    overlong: Literal["truncate", "drop"] = "truncate"   # policy for rows longer than max_length
    system_prompt: str | None = None      # optional system message prepended to every row


@dataclass
class LoraConfig:
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    use_rslora: bool = False


@dataclass
class TrainingConfig:
    epochs: float = 1.0
    max_steps: int = -1                   # > 0 overrides epochs
    batch_size: int = 8                   # per device
    grad_accum: int = 4
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_length: int = 2048
    grad_clip: float = 1.0
    save_steps: int = 1000
    save_total_limit: int = 5
    logging_steps: int = 10
    seed: int = 42
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"   # auto: bf16 on GPU, fp32 on CPU
    packing: Literal["auto", "on", "off"] = "auto"                     # auto: on for GPU
    # With packing, what batch_size x grad_accum counts. "rows" (default): an optimizer step covers on average
    # the rows the unpacked recipe's step covers, so an epoch takes the recipe's steps (cogumi.batching sizes
    # the packs). "packs": a step sees batch_size x grad_accum packs of max_length tokens -- several times the
    # recipe's rows per step, at the same learning rate and warm-up; opt in only if that is what you want.
    packing_unit: Literal["rows", "packs"] = "rows"
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    liger: Literal["auto", "on", "off"] = "auto"                       # fused kernels when installed
    optim: str = "auto"                   # auto: adamw_torch_fused on GPU, adamw_torch on CPU
    attn_implementation: str = "auto"
    torch_compile: Literal["auto", "on", "off"] = "auto"               # auto: each decoder layer compiled on GPU
    loss_spike_factor: float = 3.0        # warn when loss > factor x its running mean
    plateau_steps: int = 0                # warn if loss has not improved for this many logged steps (0: off)
    # Several processes (accelerate launch / torchrun): "ddp" replicates the base on every GPU; "fsdp" shards
    # it (FSDP2, full shard); "auto": fsdp when the base's weights take more than half of one GPU, else ddp.
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"


@dataclass
class CostConfig:
    gpu_hourly_usd: float = 2.5
    tokens_per_second: float | None = None   # measured throughput; None: use the benchmark default


@dataclass
class RunConfig:
    base_model: str = ""
    base_revision: str | None = None
    output_dir: str = ""
    phase: str = "1a"
    allow_quantized_base: bool = False    # the explicit override; recorded in the manifest and shouted
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------

def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and lightly coerce: int -> float) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        choices = typing.get_args(tp)
        # YAML 1.1 reads a bare on/off as true/false; for auto/on/off knobs take them as meant.
        if isinstance(value, bool) and "on" in choices and "off" in choices:
            return True, "on" if value else "off"
        return value in choices, value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, value
        out = []
        for x in value:
            ok, v = _type_ok(x, item_tp)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, "null" if tp is type(None) else str(tp))


def from_dict(cls, data: Any, *, prefix: str = "", source: str = "config"):
    """Build dataclass ``cls`` from ``data``; raise ConfigError naming the dotted key on any problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top level>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}'"
                          f" (known keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, prefix=key + ".", source=source)
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"{source}: key '{key}' must be {_describe(tp)}, got {value!r}")
        kwargs[name] = coerced
    return cls(**kwargs)


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply ``key.sub=value`` strings (value parsed as YAML) to a raw config dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set training.max_steps=20")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return raw


def load_run_config(path: str | Path, overrides: list[str] | None = None, *, check_files: bool = True) -> RunConfig:
    raw = apply_overrides(load_yaml(path), overrides)
    cfg = from_dict(RunConfig, raw, source=str(path))
    validate_run_config(cfg, source=str(path), base_dir=Path(path).parent, check_files=check_files)
    return cfg


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.endswith((".jsonl", ".json", ".parquet", ".csv")) or s.count("/") != 1


def validate_run_config(cfg: RunConfig, *, source: str = "config", base_dir: Path | None = None,
                        check_files: bool = True) -> None:
    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise ConfigError(f"{source}: key '{key}' {msg}")

    need(bool(cfg.base_model), "base_model", "is required (a hub id like meta-llama/Meta-Llama-3.1-8B-Instruct or a local dir)")
    need(bool(cfg.data.train), "data.train", "is required (a JSONL/JSON/Parquet file or a hub dataset id)")
    need(bool(cfg.output_dir), "output_dir", "is required")
    need(cfg.lora.r > 0, "lora.r", "must be > 0")
    need(cfg.lora.alpha > 0, "lora.alpha", "must be > 0")
    need(0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    need(len(cfg.lora.target_modules) > 0, "lora.target_modules", "must name at least one module")
    t = cfg.training
    need(t.batch_size > 0, "training.batch_size", "must be > 0")
    need(t.grad_accum > 0, "training.grad_accum", "must be > 0")
    need(t.learning_rate > 0, "training.learning_rate", "must be > 0")
    need(t.max_length >= 16, "training.max_length", "must be >= 16")
    need(t.epochs > 0 or t.max_steps > 0, "training.epochs", "must be > 0 (or set training.max_steps)")
    need(t.save_steps > 0, "training.save_steps", "must be > 0")
    need(cfg.data.holdout >= 0, "data.holdout", "must be >= 0")
    if check_files:
        cfg.base_model = resolve_local(cfg.base_model, "base_model", source, base_dir)
        cfg.data.train = resolve_local(cfg.data.train, "data.train", source, base_dir)
        if cfg.data.eval:
            cfg.data.eval = resolve_local(cfg.data.eval, "data.eval", source, base_dir)


def resolve_local(value: str, key: str, source: str, base_dir: Path | None) -> str:
    """An existing local path (relative to the CWD, else to the config's folder) becomes absolute;
    something that looks like a path but does not exist is an error; anything else is a hub id."""
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [p] + ([base_dir / p] if base_dir is not None else [])
    for c in candidates:
        if c.exists():
            return str(c.resolve())
    if _looks_like_path(value):
        raise ConfigError(f"{source}: key '{key}' points to {value!r}, which does not exist")
    return value
