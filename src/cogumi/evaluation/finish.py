"""How a completion finished: stop sequences, truncation at ``max_new_tokens``, and looping.

Features
  * ``task_stops(task)``: the task's stop sequences (``extract.STOP_SEQUENCES``) -- text after which a
    model has finished whatever it writes next (GSM8K: a model that starts a new ``Question:`` has answered;
    end-of-turn markers written as text). Prompt sets may add their
    own (``prompts.PromptSet.stops``). Applied alike to local generation (generation stops there), to
    endpoints (sent as ``stop=`` and trimmed again locally, since servers differ) and to completions read
    from cache or from predictions files.
  * ``trim_at_stop(text, stops) -> (text, stopped)``: the text before the earliest stop sequence.
  * ``is_truncated(finish_reason, stopped)``: True when the generation hit ``max_new_tokens`` (local
    ``"length"``, an endpoint's ``finish_reason == "length"``) and no stop sequence ended it first; None
    when nobody knows (a predictions file, a server that gives no finish_reason).
  * ``repetition(text)``: the looping measure, ``1 - distinct / total`` over the completion's word
    4-grams (words = whitespace-separated): the share of 4-grams that repeat an earlier one. 0.0 when no
    4-gram repeats (or the text has fewer than 4 words); a passage repeated k times scores about
    1 - 1/k (a loop to the token cap scores near 1). Word-level, so it needs no tokenizer and means the
    same for local models, endpoints and predictions files. Measured on the benchmarks' own solutions in
    docs/evaluation.md ("Prompts and truncation").

Failure modes: none of its own; ``None`` text (no completion) gives ``None`` measures.
"""

from __future__ import annotations

REPETITION_N = 4

def task_stops(task: str) -> tuple[str, ...]:
    """The task's own stop sequences: ``extract.STOP_SEQUENCES`` (what scoring cuts stored completions at)."""
    from cogumi.evaluation.extract import STOP_SEQUENCES
    return tuple(STOP_SEQUENCES.get(task, ()))


def trim_at_stop(text: str | None, stops) -> tuple[str | None, bool]:
    """``text`` cut before the earliest occurrence of any stop sequence; whether one was found."""
    if text is None:
        return None, False
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def is_truncated(finish_reason: str | None, stopped: bool) -> bool | None:
    """Cut off by the token limit: finish_reason "length" without a stop sequence; None when unknown."""
    if stopped:
        return False
    if finish_reason is None:
        return None
    return finish_reason == "length"


def repetition(text: str | None, n: int = REPETITION_N) -> float | None:
    """Share of the word n-grams of ``text`` that repeat an earlier one (see the module docstring)."""
    if text is None:
        return None
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
