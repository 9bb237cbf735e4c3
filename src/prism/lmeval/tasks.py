"""The functions behind examples/lm-eval/prism_mmlu.yaml: `prism eval`'s MMLU as an lm-eval task.

Same items (the local mmlu_subset_test.jsonl, in file order: document i is prism's item
`mmlu-test-i`), same prompt (`mmlu_question` in the user turn; the task's `gen_prefix` opens the
assistant turn with MMLU_PREFIX) and same scoring: each letter is worth the log-sum-exp of its two
spellings as the next token, bare ("A") and after a space (" A"), which are the letter variants
`prism eval` sums for byte-level BPE vocabularies (SmolLM2, Llama 3, Qwen, GPT-2), and the most
likely letter wins, ties to the first. So with `--apply_chat_template` the accuracy equals
`prism eval`'s on the same items. Nothing here imports lm-eval.
"""

from __future__ import annotations

import math
from pathlib import Path

from prism.bench.data import Item, default_dir, load_mmlu
from prism.bench.scoring import LETTERS, mmlu_question, predicted_letter
from prism.errors import DataError

# The continuations lm-eval scores for every question, two per letter.
CHOICES = [spelling for letter in LETTERS for spelling in (letter, " " + letter)]


def mmlu_dataset(data: str | None = None, **_model_args):
    """The test split, read by prism's own loader from `data` (lm-eval's `--metadata
    '{"data": DIR}'`), else from where `prism eval` looks: $PRISM_BENCHMARKS or a shared/benchmarks
    folder beside or above the working directory. lm-eval also passes the model arguments: unused."""
    import datasets

    path = Path(data or default_dir()) / "mmlu_subset_test.jsonl"
    if not path.is_file():
        raise DataError(f"prism_mmlu: {path} not found; name the folder holding it with "
                        f"--metadata '{{\"data\": \"DIR\"}}' (or set PRISM_BENCHMARKS)")
    rows = [{"id": it.id, "subject": it.subject, "question": it.turns[0], "choices": it.choices, "answer": it.answer}
            for it in load_mmlu(path.parent)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def mmlu_text(doc: dict) -> str:
    return mmlu_question(Item(doc["id"], "mmlu", doc["subject"], [doc["question"]], choices=list(doc["choices"])))


def letter_choices(doc: dict) -> list[str]:
    return CHOICES


def letter_target(doc: dict) -> int:
    return CHOICES.index(LETTERS[doc["answer"]])


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def letter_accuracy(doc: dict, results: list[tuple[float, bool]]) -> dict:
    """1.0 when the most likely letter (its spellings' log-probabilities summed) is the answer."""
    per_letter = [_logsumexp([ll for (ll, _), c in zip(results, CHOICES) if c.strip() == letter]) for letter in LETTERS]
    return {"acc": float(predicted_letter(per_letter) == doc["answer"])}
