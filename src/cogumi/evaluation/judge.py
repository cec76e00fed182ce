"""Judges: who won each item, the candidate or the reference.

Features:
  * ``exact_outcome(candidate_check, reference_check)``: objective judging from the task checks
    (answer match / tests pass): win = candidate right and reference wrong, loss = the reverse,
    tie = both right or both wrong (``tie_kind`` says which). An infrastructure failure on either
    side (sandbox error, timeout, no answer) gives no outcome: it is never counted as the model's loss.
  * ``LLMJudge``: pairwise judging through an OpenAI-compatible API with the MT-Bench pair prompt
    (reference-guided: the benchmark's gold solution is shown). Each pair is judged in BOTH orders
    (candidate as A, then as B); if the two verdicts disagree the item is a tie -- the MT-Bench
    practice that cancels position bias (a judge that always prefers the first answer yields ties).
    Every judgment is cached by content, so an interrupted run never pays twice.
  * ``parse_verdict``: ``[[A]]``/``[[B]]``/``[[C]]`` (last one wins, as explanations may quote the
    format), then fallbacks: ``[A]``, "Final verdict: Assistant B", "verdict: tie", a bare letter.

Failure modes: an unparseable judgment (after the endpoint's retries for unusable bodies) or a refused
request leaves the item without an outcome, recorded as an infrastructure error with the judge's text.
The prompts are FastChat's MT-Bench ``pair-v2`` / ``pair-math-v1`` (Zheng et al., 2023).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cogumi.evaluation.endpoint import ChatEndpoint, RequestFailed, ResponseCache, cached_complete

PAIR_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
    "to the user question displayed below. Your evaluation should consider correctness and helpfulness. You "
    "will be given a reference answer, assistant A's answer, and assistant B's answer. Your job is to evaluate "
    "which assistant's answer is better. Begin your evaluation by comparing both assistants' answers with the "
    "reference answer. Identify and correct any mistakes. Avoid any position biases and ensure that the order "
    "in which the responses were presented does not influence your decision. Do not allow the length of the "
    "responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    "possible. After providing your explanation, output your final verdict by strictly following this format: "
    "\"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie."
)

PAIR_TEMPLATE = (
    "[User Question]\n{question}\n\n"
    "[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)


def pair_messages(question: str, answer_a: str, answer_b: str, reference: str) -> list[dict]:
    return [
        {"role": "system", "content": PAIR_SYSTEM},
        {"role": "user", "content": PAIR_TEMPLATE.format(question=question, reference=reference,
                                                         answer_a=answer_a, answer_b=answer_b)},
    ]


# ---------------------------------------------------------------------------------------------
# verdict parsing
# ---------------------------------------------------------------------------------------------

_LETTER = {"A": "A", "B": "B", "C": "C", "TIE": "C"}
_VERDICT_PATTERNS = [
    re.compile(r"\[\[\s*(A|B|C|(?i:tie))\s*\]\]"),
    re.compile(r"\[\s*(A|B|C)\s*\]"),
    re.compile(r"(?i:verdict)\W{0,4}(?:(?i:is)\W{1,4})?(?:(?i:assistant)\s+)?(?:(?i:a)\s+)?(A|B|C|(?i:tie))\b"),
    re.compile(r"(?i:assistant)\s+(A|B)\s+(?i:is\s+(?:the\s+)?better)"),
]


def parse_verdict(text: str | None) -> str | None:
    """"A", "B" or "C" (tie) from a judge's reply, or None if no verdict can be found."""
    if not text:
        return None
    for pattern in _VERDICT_PATTERNS:
        found = pattern.findall(text)
        if found:
            return _LETTER[found[-1].upper()]
    bare = text.strip().strip("*.`'\" ").upper()
    return _LETTER.get(bare)


# ---------------------------------------------------------------------------------------------
# outcomes
# ---------------------------------------------------------------------------------------------

def exact_outcome(candidate_correct: bool | None, reference_correct: bool | None) -> tuple[str | None, str | None]:
    """(outcome, tie_kind) from both sides' objective correctness; (None, None) if either is unknown."""
    if candidate_correct is None or reference_correct is None:
        return None, None
    if candidate_correct and not reference_correct:
        return "win", None
    if reference_correct and not candidate_correct:
        return "loss", None
    return "tie", "both_right" if candidate_correct else "both_wrong"


def verdict_to_outcome(verdict: str | None, candidate_is_a: bool) -> str | None:
    if verdict is None:
        return None
    if verdict == "C":
        return "tie"
    candidate_letter = "A" if candidate_is_a else "B"
    return "win" if verdict == candidate_letter else "loss"


def combine_orders(first: str | None, second: str | None) -> tuple[str | None, bool | None]:
    """MT-Bench rule: the same outcome in both orders stands; a disagreement is a tie."""
    if first is None or second is None:
        return None, None
    return (first, True) if first == second else ("tie", False)


@dataclass
class PairJudgment:
    outcome: str | None              # "win" | "tie" | "loss" from the candidate's side, None on failure
    consistent: bool | None          # both orders agreed
    verdicts: list[str | None]       # raw letters: [candidate as A, candidate as B]
    outcomes_by_order: list[str | None]
    texts: list[str | None]
    cached: list[bool]
    infra_error: str | None

    def as_record(self, model: str) -> dict:
        return {"kind": "llm", "model": model, "outcome": self.outcome, "consistent": self.consistent,
                "verdicts": self.verdicts, "outcomes_by_order": self.outcomes_by_order,
                "orders": ["candidate=A", "candidate=B"], "texts": self.texts, "infra_error": self.infra_error}


class LLMJudge:
    """Pairwise judge in both orders, cached, through one ``ChatEndpoint``."""

    def __init__(self, endpoint: ChatEndpoint, cache: ResponseCache, *, max_tokens: int = 1024):
        self.endpoint = endpoint
        self.cache = cache
        self.max_tokens = max_tokens

    @property
    def model(self) -> str:
        return self.endpoint.spec.label

    def order_messages(self, question: str, candidate: str, reference: str, gold: str) -> list[list[dict]]:
        return [pair_messages(question, candidate, reference, gold),
                pair_messages(question, reference, candidate, gold)]

    def judge(self, question: str, candidate: str, reference: str, gold: str) -> PairJudgment:
        verdicts, outcomes, texts, cached, errors = [], [], [], [], []
        for candidate_is_a, messages in zip((True, False), self.order_messages(question, candidate, reference, gold)):
            try:
                text, hit = cached_complete(self.endpoint, self.cache, messages, max_tokens=self.max_tokens,
                                            kind="judge")
            except RequestFailed as e:
                text, hit = None, False
                errors.append(f"judge request failed: {e}")
            verdict = parse_verdict(text)
            if text is not None and verdict is None:
                errors.append(f"judge verdict unparseable: {text[-200:]!r}")
            verdicts.append(verdict)
            outcomes.append(verdict_to_outcome(verdict, candidate_is_a))
            texts.append(text)
            cached.append(hit)
        outcome, consistent = combine_orders(*outcomes)
        return PairJudgment(outcome=outcome, consistent=consistent, verdicts=verdicts, outcomes_by_order=outcomes,
                            texts=texts, cached=cached, infra_error="; ".join(errors) or None)
