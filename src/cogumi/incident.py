"""The incident cogumi exists for, reproduced on the tiny model in under a minute on a CPU.

A LoRA adapter trained on a 4-bit (NF4) copy of a base and then merged into the base's bf16 weights
("naive merge") is the setup that corrupted the user's model. This module:
  1. makes an NF4 copy of the tiny bf16 base with bitsandbytes (``BitsAndBytesConfig``, ``save_pretrained``);
  2. trains a LoRA on it with ``cogumi.train.run_training`` (``allow_quantized_base=True``: recorded and shouted);
  3. merges it naively (``--target original --force``) and with ``--target auto`` (measured on the run's
     held-out rows);
  4. trains the same LoRA on the full-precision base and merges it (the right way);
  5. scores every variant on the same held-out rows (loss and next-token accuracy on the answer tokens)
     and runs ``cogumi verify`` on each, which flags the naive path;
  6. adds the 4-bit base's weights dequantized and saved as plain bf16 with the original config -- a 4-bit
     model in bf16 clothes, no metadata saying so -- which ``cogumi verify`` flags from the values alone
     (``cogumi.lowbit``: <= 16 distinct values per block, the NF4 codebook).

``reproduce_incident(work_dir)`` returns the table and verify results (the demo prints them). Failure
modes: bitsandbytes missing (a CogumiError saying how to install it), ``work_dir`` already holding a
previous reproduction (reused: each step is skipped when its output exists).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from cogumi.errors import CogumiError

BF16_CLOTHES = "the 4-bit weights saved as plain bf16 (no quantization metadata)"
TRAIN_ROWS = 160
HOLDOUT_ROWS = 16
MAX_STEPS = 12


def _quantize_base(base: Path, out: Path) -> Path:
    """An NF4 copy of ``base`` exactly as a bnb-4bit upload ships it (config with quantization_config)."""
    if (out / "config.json").exists():
        return out
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise CogumiError("the incident reproduction needs bitsandbytes (pip install 'cogumi[quant]')") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from cogumi.io import atomic_dir
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    with atomic_dir(out) as tmp:
        AutoModelForCausalLM.from_pretrained(str(base), quantization_config=q, device_map="cpu").save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(tmp))
    return out


def _dequantized_copy(base4: Path, base: Path, out: Path) -> Path:
    """The 4-bit base's weights dequantized (bitsandbytes) and saved as plain bf16 with the bf16 base's own
    config and tokenizer: what converting a 4-bit upload back to "full precision" gives."""
    if (out / "config.json").exists():
        return out
    import shutil

    import torch
    from safetensors.torch import save_file

    from cogumi.io import atomic_dir
    from cogumi.merge import Dequantized4bitDir
    weights = Dequantized4bitDir(base4)
    with atomic_dir(out) as tmp:
        save_file({n: weights.get(n).to(torch.bfloat16).contiguous() for n in weights.names()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in base.iterdir():      # config, generation config, tokenizer: the bf16 base's own
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                shutil.copyfile(f, tmp / f.name)
    return out


def _run_config(base: Path, train_file: Path, out: Path, *, quantized: bool):
    from cogumi.config import DataConfig, LoraConfig, RunConfig, TrainingConfig, validate_run_config
    cfg = RunConfig(
        base_model=str(base), output_dir=str(out), allow_quantized_base=quantized,
        data=DataConfig(train=str(train_file), holdout=HOLDOUT_ROWS),
        lora=LoraConfig(r=8, alpha=16, dropout=0.0),
        training=TrainingConfig(max_steps=MAX_STEPS, batch_size=8, grad_accum=1, learning_rate=1e-2, warmup_steps=2,
                                max_length=96, save_steps=10_000, logging_steps=8, seed=0),
        report_to=[])
    validate_run_config(cfg, source="incident")
    return cfg


def _train(base: Path, train_file: Path, out: Path, *, quantized: bool, log) -> Path:
    if (out / "adapter" / "cogumi.json").exists():
        return out / "adapter"
    from cogumi.train import run_training
    return run_training(_run_config(base, train_file, out, quantized=quantized), resume=False, log=log)


def _merge(adapter: Path, out: Path, *, log, **kwargs) -> dict:
    from cogumi.lineage import read_manifest
    from cogumi.merge import merge_adapter
    if (out / "cogumi.json").exists():
        return read_manifest(out)
    return merge_adapter(adapter, out, log=log, **kwargs)


def heldout_scores(model, tokenizer, rows: list[dict]) -> dict:
    """Mean loss and next-token accuracy on the answer tokens of ``rows`` (rendered as training renders)."""
    import torch

    from cogumi.data import encode_messages, row_to_messages
    total_nll, correct, count = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for row in rows:
            ids, mask = encode_messages(row_to_messages(row)[0], tokenizer)
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(ids[1:])
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            nll = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
            total_nll += float(nll)
            correct += int((logits[keep].argmax(-1) == target[keep]).sum())
            count += int(keep.sum())
    return {"loss": total_nll / max(1, count), "token_accuracy": correct / max(1, count), "tokens": count}


def _load(path: Path, adapter: Path | None = None, *, quantized: bool = False):
    import torch
    from transformers import AutoModelForCausalLM
    kwargs: dict[str, Any] = {"device_map": "cpu"} if quantized else {"dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter))
    return model


def format_table(rows: list[dict]) -> str:
    lines = ["| model | held-out loss | token accuracy | cogumi verify |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['loss']:.3f} | {r['token_accuracy']:.1%} | {r['verify']} |")
    return "\n".join(lines)


def reproduce_incident(work_dir: str | Path, *, log: Callable[[str], Any] = print) -> dict:
    """Reproduce the incident on the tiny model under ``work_dir``; returns {"table", "verify", "auto", ...}."""
    from transformers import AutoTokenizer

    from cogumi.io import read_jsonl
    from cogumi.lineage import red_findings
    from cogumi.tiny import build_tiny_base, synthetic_instructions, write_jsonl
    from cogumi.verify import verify_path

    t0 = time.time()
    work = Path(work_dir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    quiet = lambda *_: None   # noqa: E731  (the sub-steps' own logs would drown the story)

    base = work / "base-bf16"
    if not (base / "config.json").exists():
        build_tiny_base(base, dtype="bfloat16")
    train_file = work / "train.jsonl"
    if not train_file.exists():
        write_jsonl(train_file, synthetic_instructions(TRAIN_ROWS, seed=7))
    log("incident: 1/5 NF4 4-bit copy of the base (bitsandbytes), like unsloth/...-bnb-4bit")
    base4 = _quantize_base(base, work / "base-bnb-4bit")

    log("incident: 2/5 LoRA trained on the 4-bit base (allow_quantized_base=true: the incident's setup)")
    adapter4 = _train(base4, train_file, work / "run-4bit", quantized=True, log=quiet)
    log("incident: 3/5 the same LoRA trained on the full-precision base")
    adapter_fp = _train(base, train_file, work / "run-bf16", quantized=False, log=quiet)

    log("incident: 4/5 merges: naive (--target original --force), --target auto, and the full-precision run's")
    naive = _merge(adapter4, work / "merged-naive", log=quiet, base=str(base), target="original", force=True)
    auto = _merge(adapter4, work / "merged-auto", log=quiet, base=str(base), target="auto")
    good = _merge(adapter_fp, work / "merged-bf16-trained", log=quiet)

    log("incident: 5/5 held-out scores and `cogumi verify`")
    holdout = read_jsonl(work / "run-4bit" / "holdout.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    variants = [
        ("base model, no adapter", base, None, False, None),
        ("4-bit base + adapter, unmerged (as trained)", base4, adapter4, True, adapter4),
        ("naive merge into bf16 (--target original --force)", work / "merged-naive", None, False, work / "merged-naive"),
        (f"--target auto (kept '{auto['target']}')", work / "merged-auto", None, False, work / "merged-auto"),
        ("trained on the bf16 base, merged", work / "merged-bf16-trained", None, False, work / "merged-bf16-trained"),
        (BF16_CLOTHES, _dequantized_copy(base4, base, work / "base-converted-to-bf16"), None, False,
         work / "base-converted-to-bf16"),
    ]
    table, verdicts = [], {}
    for label, path, adapter, quantized, checked in variants:
        scores = heldout_scores(_load(path, adapter, quantized=quantized), tokenizer, holdout)
        verdict = "-"
        if checked is not None:
            findings = verify_path(checked)
            reds = red_findings(findings)
            verdicts[label] = {"path": str(checked), "exit_code": 1 if reds else 0,
                               "red_flags": [f.line() for f in reds],
                               "warnings": [f.line() for f in findings if f.level == "warn"]}
            verdict = f"RED FLAG ({reds[0].code})" if reds else "clean" + (" (warning)" if verdicts[label]["warnings"] else "")
        table.append({"model": label, "path": str(path), **scores, "verify": verdict})
    text = format_table(table)
    log(text)
    naive_red = verdicts[variants[2][0]]["red_flags"]
    if naive_red:
        log("cogumi verify on the naive merge: " + naive_red[0][:240])
    log(f"--target auto measured: original loss {auto['auto']['original']['loss']:.3f}, dequantized loss "
        f"{auto['auto']['dequantized']['loss']:.3f} -> kept '{auto['target']}'")
    return {"table": table, "table_text": text, "verify": verdicts, "auto": auto.get("auto"),
            "naive_forced": bool(naive.get("forced")), "merged_fidelity": {
                "naive": naive.get("fidelity"), "auto": auto.get("fidelity"), "bf16_trained": good.get("fidelity")},
            "paths": {"base": str(base), "base_4bit": str(base4), "adapter_4bit": str(adapter4),
                      "adapter_bf16": str(adapter_fp)},
            "wall_s": round(time.time() - t0, 1)}
