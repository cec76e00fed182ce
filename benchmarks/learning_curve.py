"""Learning-curve parity: the same rows trained packed (cogumi's default on a GPU, ``packing_unit: rows``) and
unpacked, the same optimizer steps, held-out loss after each of several checkpoints -- on a real pretrained
model (SmolLM2-135M-Instruct by default, ``cogumi.smollm2``), through ``cogumi.train.build_trainer``.

Why: the throughput benchmark's parity check shows one packed forward pass equals the rows run alone; it does
not show that training follows the same recipe. This does: packing must keep steps per epoch (the batch
plan) and the held-out loss must follow the unpacked run's at every checkpoint. ``--arms`` may add ``packs``
(``packing_unit: packs``, the old unit: fewer, larger steps) to show what the recipe change looks like.

Rows: ``--data FILE`` (any cogumi row shape, or GSM8K's {question, answer}), else seeded synthetic
arithmetic word problems, 1 to ``--problems`` per row (lengths vary, as packing needs). ``--holdout`` rows are held out;
their loss (mean over assistant tokens, the same function for every arm, no packing) is measured before
training and after every ``--every`` optimizer steps.

  python benchmarks/learning_curve.py --out curve.json                        # GPU: the defaults
  python benchmarks/learning_curve.py --device cpu --out curve.json           # CPU: 40 rows, 2 epochs, ~15 min
  python benchmarks/learning_curve.py --smoke                                 # tiny model, CPU, seconds (CI)

Prints a table (step, rows seen, held-out loss per arm, the difference) and writes JSON. Exit 1 when the
packed arm's steps per epoch differ from the unpacked arm's, or its last held-out loss is further than
``--tolerance`` (relative) from the unpacked arm's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAMES = ["Ann", "Ben", "Cal", "Dana", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena", "Milo", "Nora"]
THINGS = ["apples", "books", "coins", "pens", "shells", "stamps", "marbles", "cards", "plums", "rocks"]


def log(*a):
    print(*a, flush=True)


def arithmetic_rows(n: int, seed: int, most: int = 6) -> list[dict]:
    """Word problems with worked answers, 1 to ``most`` per row: a format and arithmetic a small model learns."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        questions, answers = [], []
        for _ in range(rng.randint(1, most)):
            name, thing = rng.choice(NAMES), rng.choice(THINGS)
            a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(1, 9)
            questions.append(f"{name} has {a} {thing} and buys {b} more, then gives away {c}. "
                             f"How many {thing} does {name} have now?")
            answers.append(f"{name} has {a} + {b} = {a + b} {thing}, then {a + b} - {c} = {a + b - c}.\n"
                           f"#### {a + b - c}")
        rows.append({"instruction": "\n\n".join(questions), "response": "\n\n".join(answers)})
    return rows


def read_rows(path: str, n: int, seed: int) -> list[dict]:
    """Rows of a data file (GSM8K's {question, answer} become {instruction, response}), a seeded sample."""
    from cogumi.io import read_jsonl
    rows = [{"instruction": r["question"], "response": r["answer"]} if "question" in r else r
            for r in read_jsonl(path)]
    return random.Random(seed).sample(rows, min(n, len(rows)))


def heldout_loss(model, batches: list[dict]) -> float:
    """Mean loss over the held-out rows' assistant tokens (padded batches, no packing, no dropout)."""
    import torch

    from cogumi.speed import uncompiled
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), uncompiled():          # compiled layers (GPU) run eagerly: no recompiles for these shapes
        for batch in batches:
            batch = {k: v.to(model.device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def heldout_batches(tokenized, pad_id: int, batch_size: int = 8) -> list[dict]:
    import torch
    batches = []
    for i in range(0, len(tokenized.input_ids), batch_size):
        ids, masks = tokenized.input_ids[i:i + batch_size], tokenized.completion_mask[i:i + batch_size]
        longest = max(map(len, ids))
        input_ids = torch.full((len(ids), longest), pad_id)
        attention = torch.zeros((len(ids), longest), dtype=torch.long)
        labels = torch.full((len(ids), longest), -100)
        for j, (row, mask) in enumerate(zip(ids, masks)):
            input_ids[j, :len(row)] = torch.tensor(row)
            attention[j, :len(row)] = 1
            labels[j, :len(row)] = torch.tensor([t if m else -100 for t, m in zip(row, mask)])
        batches.append({"input_ids": input_ids, "attention_mask": attention, "labels": labels})
    return batches


def run_config(args, arm: str, workdir: Path):
    from cogumi.config import RunConfig
    cfg = RunConfig(base_model=args.model_dir, output_dir=str(workdir / arm), allow_quantized_base=True,
                    report_to=[])
    cfg.data.train = "rows.jsonl"
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = args.lora_r, 2 * args.lora_r, 0.0
    t = cfg.training
    t.batch_size, t.grad_accum, t.max_length = args.batch_size, args.grad_accum, args.max_length
    t.learning_rate, t.warmup_steps, t.epochs, t.max_steps = args.lr, args.warmup, args.epochs, -1
    t.logging_steps, t.save_steps, t.seed = args.every, 10**9, args.seed
    t.packing = "off" if arm == "unpacked" else "on"
    t.packing_unit = "packs" if arm == "packs" else "rows"
    return cfg


def train_arm(args, arm: str, dataset, heldout, tokenizer, workdir: Path) -> dict:
    """One arm: cogumi's trainer on the same rows; held-out loss at step 0 and every ``--every`` steps."""
    import torch
    from transformers import TrainerCallback

    from cogumi.speed import resolve_speed_settings
    from cogumi.train import build_trainer, load_base_model
    cfg = run_config(args, arm, workdir)
    speed = resolve_speed_settings(cfg.training, args.device)
    torch.manual_seed(args.seed)
    model = load_base_model(cfg, speed)
    if args.device == "cuda":
        model.to("cuda")
    trainer = build_trainer(cfg, model=model, tokenizer=tokenizer, train_dataset=dataset, speed=speed,
                            callbacks=[])
    plan = trainer.cogumi_batch_plan
    log(f"{arm}: {plan.describe()}")
    curve: list[dict] = []

    def measure(step: int):
        loss = heldout_loss(trainer.model, heldout)
        curve.append({"step": step, "rows_seen": round(step * plan.rows_per_step, 1), "heldout_loss": loss})
        log(f"{arm}: step {step:>4}  held-out loss {loss:.4f}")

    class Checkpoints(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step % args.every == 0 or state.global_step == state.max_steps:
                measure(state.global_step)

    trainer.add_callback(Checkpoints())
    measure(0)
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"arm": arm, "batch_plan": plan.to_dict(), "steps": trainer.state.global_step, "curve": curve,
            "train_seconds": round(wall, 1), "tokens_seen": tokens,
            "tokens_per_s": round(tokens / wall, 1) if wall else None}


def compare(results: dict, tolerance: float) -> dict:
    base, packed = results.get("unpacked"), results.get("packed")
    if not (base and packed):
        return {"checked": False}
    by_step = {c["step"]: c["heldout_loss"] for c in packed["curve"]}
    rows = [{"step": c["step"], "unpacked": c["heldout_loss"], "packed": by_step.get(c["step"]),
             "rel_diff": ((by_step[c["step"]] - c["heldout_loss"]) / c["heldout_loss"]
                          if c["step"] in by_step else None)}
            for c in base["curve"]]
    last = rows[-1]
    same_steps = packed["batch_plan"]["steps_per_epoch"] == base["batch_plan"]["steps_per_epoch"]
    learned = base["curve"][-1]["heldout_loss"] < base["curve"][0]["heldout_loss"]
    ok = same_steps and last["rel_diff"] is not None and abs(last["rel_diff"]) <= tolerance
    return {"checked": True, "rows": rows, "same_steps_per_epoch": same_steps, "learned": learned,
            "last_rel_diff": last["rel_diff"], "tolerance": tolerance, "passed": ok}


def print_table(results: dict, parity: dict) -> None:
    arms = [a for a in ("unpacked", "packed", "packs") if a in results]
    log("\n| step | " + " | ".join(f"{a}: rows seen | {a}: held-out loss" for a in arms) + " | packed vs unpacked |")
    log("|---|" + "---|---|" * len(arms) + "---|")
    steps = sorted({c["step"] for a in arms for c in results[a]["curve"]})
    for step in steps:
        cells = []
        for a in arms:
            c = next((c for c in results[a]["curve"] if c["step"] == step), None)
            cells += [f"{c['rows_seen']:g}", f"{c['heldout_loss']:.4f}"] if c else ["", ""]
        row = next((r for r in parity.get("rows", []) if r["step"] == step), None)
        diff = f"{100 * row['rel_diff']:+.2f}%" if row and row["rel_diff"] is not None else ""
        log(f"| {step} | " + " | ".join(cells) + f" | {diff} |")
    for a in arms:
        p = results[a]["batch_plan"]
        log(f"{a}: {p['steps_per_epoch']} steps/epoch (recipe {p['recipe_steps_per_epoch']}), "
            f"{p['rows_per_step']:.1f} rows/step, {results[a]['tokens_per_s']} tokens/s, "
            f"{results[a]['train_seconds']} s")
    if parity.get("checked"):
        log(f"learning-curve parity: {'PASS' if parity['passed'] else 'FAIL'} (last held-out loss "
            f"{100 * parity['last_rel_diff']:+.2f}% vs unpacked, tolerance {100 * parity['tolerance']:.0f}%; "
            f"same steps per epoch: {parity['same_steps_per_epoch']})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the tiny offline model on CPU, seconds (CI)")
    p.add_argument("--model", default="smollm2", help="'smollm2' (cogumi.smollm2) or a local HF model dir")
    p.add_argument("--device", default=None)
    p.add_argument("--data", default=None, help="a JSONL of rows (default: synthetic word problems)")
    p.add_argument("--arms", default="unpacked,packed", help="unpacked, packed, packs")
    p.add_argument("--rows", type=int, default=None, help="training rows")
    p.add_argument("--holdout", type=int, default=None, help="held-out rows")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--every", type=int, default=None, help="held-out loss every this many optimizer steps")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--problems", type=int, default=None, help="synthetic rows: at most this many problems a row")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.03)
    p.add_argument("--out", default=None)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    import torch
    args.device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    gpu = args.device == "cuda"
    defaults = dict(rows=(32 if args.smoke else 1200 if gpu else 40), holdout=(8 if args.smoke else 64 if gpu else 12),
                    problems=(1 if args.smoke else 6 if gpu else 3),
                    max_length=(384 if args.smoke else 1024 if gpu else 256), batch_size=(4 if args.smoke else 8),
                    grad_accum=(2 if args.smoke else 4 if gpu else 1), epochs=(1 if args.smoke else 1 if gpu else 2),
                    every=(2 if args.smoke else 5 if gpu else 2), lr=(1e-3 if args.smoke else 2e-4 if gpu else 5e-4))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cogumi-curve-"))
    if args.smoke:
        from cogumi.tiny import build_tiny_base
        args.model_dir = str(build_tiny_base(workdir / "tiny-base", dtype="float32"))
    elif args.model == "smollm2":
        from cogumi.smollm2 import cached_smollm2
        args.model_dir = str(cached_smollm2())
    else:
        args.model_dir = args.model

    from transformers import AutoTokenizer

    from cogumi.data import tokenize_rows
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = (read_rows(args.data, args.rows + args.holdout, args.seed) if args.data
            else arithmetic_rows(args.rows + args.holdout, args.seed, most=args.problems))
    train = tokenize_rows(rows[:args.rows], tokenizer, args.max_length, "truncate")
    held = tokenize_rows(rows[args.rows:], tokenizer, args.max_length, "truncate")
    if not held.input_ids or not train.input_ids:
        raise SystemExit(f"no {'held-out' if train.input_ids else 'training'} rows with an assistant token within "
                         f"--max-length {args.max_length}: raise it")
    heldout = heldout_batches(held, tokenizer.pad_token_id)
    lengths = sorted(map(len, train.input_ids))
    info = {"model": args.model_dir, "device": args.device, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if gpu else None, "threads": torch.get_num_threads(),
            "rows": train.stats["kept"], "heldout_rows": held.stats["kept"], "tokens": train.stats["tokens"],
            "median_row_tokens": lengths[len(lengths) // 2], "longest_row_tokens": lengths[-1],
            "settings": {k: getattr(args, k) for k in ("batch_size", "grad_accum", "max_length", "epochs", "lr",
                                                       "lora_r", "every", "seed")}}
    log(json.dumps(info))
    results: dict = {"info": info}
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        if arm not in ("unpacked", "packed", "packs"):
            raise SystemExit(f"--arms: unknown arm {arm!r} (unpacked, packed, packs)")
        results[arm] = train_arm(args, arm, train.to_dataset(), heldout, tokenizer, workdir)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    parity = compare(results, args.tolerance)
    results["parity"] = parity
    print_table(results, parity)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0 if not parity.get("checked") or parity["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
