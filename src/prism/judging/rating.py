"""MT-Bench single-answer graders (1-10), and their sanity check (`rating_sanity`).

- ModelRatingJudge: any local chat model (the evaluated model itself by default) reads
  MT-Bench's judge prompt; the rating is the expected value of the next token over the digits
  after "Rating: [[" (one forward pass, no free generation to parse).
- HttpRatingJudge: an OpenAI-compatible endpoint generates its judgment; "[[x]]" is parsed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

from prism.judging.sanity import SanityCheck, sanity_result
from prism.model import ChatModel
from prism.model.remote import OpenAIClient

RATING_PREFIX = "Rating: [["


@dataclass
class RatingRequest:
    questions: list[str]  # one or two user turns
    answers: list[str]  # the assistant's answers to them
    references: list[str] = field(default_factory=list)


def judge_messages(prompts: dict[str, dict], req: RatingRequest) -> list[dict]:
    """MT-Bench's own judge prompt for this request (math-style with a reference if given)."""
    multi = len(req.answers) > 1
    ref = bool(req.references)
    name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if multi else "")
    spec = prompts[name]
    values = {"question": req.questions[0], "answer": req.answers[0]}
    for i in range(len(req.questions)):
        values[f"question_{i + 1}"] = req.questions[i]
        values[f"answer_{i + 1}"] = req.answers[i] if i < len(req.answers) else ""
    for i, r in enumerate(req.references):
        values[f"ref_answer_{i + 1}"] = r
    user = re.sub(r"\{(\w+)\}", lambda m: str(values.get(m.group(1), m.group(0))), spec["prompt_template"])
    return [{"role": "system", "content": spec["system_prompt"]}, {"role": "user", "content": user}]


class RatingJudge:
    name = "judge"

    def rate(self, requests: Sequence[RatingRequest]) -> list[float | None]:
        raise NotImplementedError


class ModelRatingJudge(RatingJudge):
    def __init__(self, model: ChatModel, prompts: dict[str, dict], label: str | None = None,
                 max_chars: int = 2500):
        self.model = model
        self.prompts = prompts
        self.name = f"model:{label or model.name}"
        self.max_chars = max_chars
        # "10" is two tokens in most vocabularies: then the rating is read over 1-9.
        self.digits = {k: ids[0] for k in range(1, 11) if (ids := model.variant_ids(str(k)))}
        if len(self.digits) < 9:
            raise ValueError(f"{model.name}: the digits 1-9 are not single tokens; use another judge (--judge/--judge-url)")

    def rate(self, requests):
        prompts = []
        for req in requests:
            req = RatingRequest([q[: self.max_chars] for q in req.questions], [a[: self.max_chars] for a in req.answers],
                                [r[: self.max_chars] for r in req.references])
            msgs = judge_messages(self.prompts, req)
            if not self.model.supports_system_role:
                msgs = [{"role": "user", "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]}]
            prompts.append(self.model.prompt(msgs) + RATING_PREFIX)
        logp = self.model.next_token_logprobs(prompts)
        keys = sorted(self.digits)
        ids = [self.digits[k] for k in keys]
        probs = logp[:, ids].softmax(-1)
        values = probs @ torch.tensor([float(k) for k in keys])
        return [round(float(v), 4) for v in values]


class HttpRatingJudge(RatingJudge):
    """An OpenAI-compatible chat endpoint; the API key is read from an environment variable."""

    def __init__(self, url: str, model: str | None, prompts: dict[str, dict], key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0):
        self.client = OpenAIClient(url, os.environ.get(key_env) or None, timeout=timeout)
        self.model = model or self.client.first_model()
        self.prompts = prompts
        self.name = f"http:{self.model}"

    def rate(self, requests):
        return [parse_rating(self.client.chat(self.model, judge_messages(self.prompts, r), temperature=0,
                                              max_tokens=1024)) for r in requests]


def parse_rating(text: str) -> float | None:
    """The 1-10 rating in a judgment ("[[7]]", "Rating: [[7.5]]"); None when there is none."""
    m = re.search(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", text) or re.search(r"[Rr]ating:\s*(\d+(?:\.\d+)?)", text)
    if not m:
        return None
    v = float(m.group(1))
    return v if 1 <= v <= 10 else None


def rating_sanity(judge: RatingJudge, pairs: Sequence[tuple[str, str, str]]) -> SanityCheck:
    """Share of (question, right answer, wrong answer) where the right one is rated higher
    (ties count half). Near 0.5 means the grader cannot tell an answer from an unrelated one."""
    right = judge.rate([RatingRequest([q], [r]) for q, r, _ in pairs]) if pairs else []
    wrong = judge.rate([RatingRequest([q], [w]) for q, _, w in pairs]) if pairs else []
    credit = [1.0 if (a or 0) > (b or 0) else 0.5 if a == b else 0.0 for a, b in zip(right, wrong)]
    return sanity_result(judge.name, credit, round_credit=True)
