"""MT-Bench single-answer graders (1-10) and the LLM refusal judge.

- ModelRatingJudge: any local chat model (the evaluated model itself by default) reads
  MT-Bench's judge prompt; the rating is the expected value of the next token over the digits
  after "Rating: [[" (one forward pass, no free generation to parse).
- HttpRatingJudge: an OpenAI-compatible endpoint generates its judgment; "[[x]]" is parsed.

`rating_sanity` measures a grader on pairs where the right answer is known: the answer to the
question against an answer to another question.
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Sequence

from prism.judges import wilson
from prism.models import ChatModel

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
        values = probs @ __import__("torch").tensor([float(k) for k in keys])
        return [round(float(v), 4) for v in values]


class HttpRatingJudge(RatingJudge):
    """An OpenAI-compatible chat endpoint; the API key is read from an environment variable."""

    def __init__(self, url: str, model: str, prompts: dict[str, dict], key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0):
        self.url = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.prompts = prompts
        self.key = os.environ.get(key_env, "")
        self.timeout = timeout
        self.name = f"http:{model}"

    def _one(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0, "max_tokens": 1024}).encode()
        req = urllib.request.Request(self.url, data=body, headers={
            "Content-Type": "application/json", **({"Authorization": f"Bearer {self.key}"} if self.key else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())["choices"][0]["message"]["content"] or ""
        except (urllib.error.URLError, KeyError, json.JSONDecodeError, TimeoutError) as e:
            raise RuntimeError(f"judge endpoint {self.url} failed: {e}") from None

    def rate(self, requests):
        return [parse_rating(self._one(judge_messages(self.prompts, r))) for r in requests]


def parse_rating(text: str) -> float | None:
    """The 1-10 rating in a judgment ("[[7]]", "Rating: [[7.5]]"); None when there is none."""
    m = re.search(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", text) or re.search(r"[Rr]ating:\s*(\d+(?:\.\d+)?)", text)
    if not m:
        return None
    v = float(m.group(1))
    return v if 1 <= v <= 10 else None


def rating_sanity(judge: RatingJudge, pairs: Sequence[tuple[str, str, str]], seed: int = 0) -> dict:
    """Share of (question, right answer, wrong answer) where the right one is rated higher
    (ties count half). Near 0.5 means the grader cannot tell an answer from an unrelated one."""
    if not pairs:
        return {"judge": judge.name, "pairs": 0, "accuracy": None, "ci95": None, "passed": False}
    right = judge.rate([RatingRequest([q], [r]) for q, r, _ in pairs])
    wrong = judge.rate([RatingRequest([q], [w]) for q, _, w in pairs])
    wins = sum(1.0 if (a or 0) > (b or 0) else 0.5 if a == b else 0.0 for a, b in zip(right, wrong))
    n = len(pairs)
    lo, hi = wilson(int(round(wins)), n)
    return {"judge": judge.name, "pairs": n, "accuracy": round(wins / n, 4), "ci95": [round(lo, 4), round(hi, 4)],
            "passed": lo > 0.5}


def mismatched(questions: Sequence[str], answers: Sequence[str], n: int, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    idx = list(range(len(questions)))
    if len(idx) < 2:
        return []
    picks = rng.sample(idx, min(n, len(idx)))
    return [(questions[i], answers[i], answers[rng.choice([j for j in idx if j != i])]) for i in picks]


class ModelRefusalJudge:
    """P(Yes) > P(No) after asking a model whether the response refuses."""

    def __init__(self, model: ChatModel):
        from prism.eval.refusal import REFUSAL_JUDGE_PROMPT

        self.model = model
        self.template = REFUSAL_JUDGE_PROMPT
        self.yes, self.no = model.variant_ids("Yes"), model.variant_ids("No")
        if not self.yes or not self.no:
            raise ValueError(f"{model.name}: 'Yes'/'No' are not single tokens; use the pattern refusal classifier")
        self.name = f"model:{model.name}"

    def __call__(self, requests: Sequence[str], responses: Sequence[str]) -> list[bool]:
        prompts = [self.model.user_prompt(self.template.format(request=q[:2000], response=r[:2000]))
                   for q, r in zip(requests, responses)]
        logp = self.model.next_token_logprobs(prompts)
        return [bool(row[self.yes].logsumexp(-1) > row[self.no].logsumexp(-1)) for row in logp]
