"""The lm-eval task functions and the model registration, without a model."""

import math

import pytest

from prism.bench.data import load_mmlu
from prism.bench.scoring import mmlu_question
from prism.errors import DataError
from prism.lmeval import tasks


def test_the_task_reads_prism_evals_items_and_prompt(benchmarks_dir):
    test = tasks.mmlu_dataset(str(benchmarks_dir))["test"]
    items = load_mmlu(benchmarks_dir)
    assert len(test) == len(items) and test[3]["id"] == items[3].id == "mmlu-test-3"
    assert tasks.mmlu_text(test[3]) == mmlu_question(items[3])
    assert tasks.letter_choices(test[3]) == ["A", " A", "B", " B", "C", " C", "D", " D"]
    assert tasks.CHOICES[tasks.letter_target(test[3])] == "ABCD"[items[3].answer]


def test_a_letter_is_worth_both_its_spellings():
    doc = {"answer": 1}
    lp = [math.log(p) for p in (0.30, 0.01, 0.20, 0.20, 0.05, 0.05, 0.10, 0.09)]  # A alone wins, B summed wins
    assert tasks.letter_accuracy(doc, [(v, False) for v in lp]) == {"acc": 1.0}
    assert tasks.letter_accuracy({"answer": 0}, [(v, False) for v in lp]) == {"acc": 0.0}


def test_a_missing_data_folder_names_the_metadata_option(tmp_path):
    with pytest.raises(DataError, match="--metadata"):
        tasks.mmlu_dataset(str(tmp_path))


def test_prism_lm_eval_registers_the_model():
    from lm_eval.api.registry import get_model

    from prism.lmeval import register

    register()
    assert get_model("prism").__name__ == "PrismLM"
