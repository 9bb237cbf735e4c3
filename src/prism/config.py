"""Every setting of prism, typed and validated: the run (`PrismConfig`), the evaluation
(`EvalConfig`) and the persona-effect study (`StudyConfig`), each with named presets. One loader
merges preset -> YAML file -> flags; unknown keys are errors (a typo must not fall back to a default)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prism.errors import ConfigError, yaml_problem

EMBEDDED_MODEL = "embedded"

Placement = Literal["system", "user"]
PersonaLength = Literal["long", "short", "minimal"]
JudgeKind = Literal["prompted", "likelihood", "generate", "program"]
STAGES = ("queries", "answers", "verdicts", "gate", "distill")


class Section(BaseModel):
    """A block of settings: frozen, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class QueryConfig(Section):
    """Stage 1: the model writes its own queries for each persona."""

    n_per_persona: int = Field(8, ge=1)
    temperature: float = Field(0.9, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(48, ge=4)
    min_chars: int = Field(15, ge=1)  # shorter candidates are dropped
    max_rounds: int = Field(6, ge=1)  # sampling rounds used to top up after filtering/dedup
    # The paper writes queries with the persona in context. Turn this off for contexts that
    # would leak into the queries themselves (e.g. "answer in French" makes French queries).
    persona_in_context: bool = True
    # Queries on general topics that no context serves: the gate's examples of "leave the base
    # model alone" (without them it can only learn "always on").
    n_general: int = Field(0, ge=0)


class AnswerConfig(Section):
    """Stage 2: one answer without the persona and one with it, per query."""

    temperature: float = Field(0.7, ge=0)  # 0 means greedy
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(96, ge=1)
    # Also answer every query under every other context of scope `all` (a persona, "answer in
    # French"), so the gate's decision rule sees what it does beyond its own queries.
    cross: bool = False
    # Answers sampled per (query, own context); with a program check the best-checked one is kept
    # (best-of-n against a verifier: more of the context's facts reach the distill set).
    samples: int = Field(1, ge=1, le=16)


class JudgeConfig(Section):
    """Stage 3: the model judges its own pairs (see prism.stages.verdicts for each kind)."""

    kind: JudgeKind = "likelihood"
    model: str | None = None  # another local model / hub id as the judge; None = the model itself
    margin: float = Field(0.0, ge=0)  # |calibrated score| at or below this is a TIE
    sanity_pairs: int = Field(24, ge=0)  # relevant-vs-mismatched pairs for the judge check
    program: str | None = None  # "module:function" scoring one answer, for kind=program
    max_new_tokens: int = Field(5, ge=1)  # kind=generate only (the authors' judge)

    @model_validator(mode="after")
    def _program_needs_target(self) -> "JudgeConfig":
        if self.kind == "program" and not self.program:
            raise ValueError("judge.kind=program needs judge.program='module:function'")
        return self


class GateConfig(Section):
    """Stage 4: the classifier that picks base or an adapter per prompt, and its decision rule."""

    # What it learns: `verdicts` (the paper): the adapter where its context won the verdict;
    # `source`: which context's queries a prompt is like (general queries: base).
    labels: Literal["verdicts", "source"] = "verdicts"
    # mean: every token of the prompt; query: the user's words only (not the chat template); max:
    # their elementwise maximum; last: the last token. auto: all, the best cross-validated one kept.
    pooling: Literal["auto", "last", "mean", "query", "max"] = "auto"
    hidden: tuple[int, ...] = (128, 64)  # () = a linear classifier (logistic regression)
    l2: float = Field(1.0, gt=0)  # linear: fitted to convergence with this L2 penalty on the weights
    # An MLP: AdamW with these settings, stopped early on an inner split of each training fold.
    dropout: float = Field(0.1, ge=0, lt=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    max_epochs: int = Field(200, ge=1)
    patience: int = Field(20, ge=1)
    holdout: float = Field(0.25, gt=0, lt=1)  # that inner split's share
    min_examples: int = Field(8, ge=2)  # fewer (or a single class) -> a constant rule
    folds: int = Field(5, ge=2)  # cross-validation folds for the decision rule
    # The utility of sending a prompt to an adapter is its context's gain there minus this cost:
    # leaving the base model must buy something. For a context of scope `own` (a memory) on a query
    # it does not serve the cost is `unserved_cost`: there the base model's answer is the right one.
    switch_cost: float = Field(0.05, ge=0)
    unserved_cost: float = Field(1.0, ge=0)


class DistillConfig(Section):
    """Stage 5: self-distillation of the persona into one LoRA."""

    rank: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    top_k: int = Field(64, ge=1)
    temperature: float = Field(2.0, gt=0)
    lr: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(4, ge=1)  # effective batch = batch_size * grad_accum
    epochs: int = Field(10, ge=1)
    max_seq_len: int = Field(512, ge=16)
    train_dtype: Literal["float32", "bfloat16"] = "float32"
    # Which answers are distilled: `wins` (the paper: where the context won stage 3) or `served`
    # (every answer of a context to its own queries: the teacher's distributions carry its facts
    # even where its sampled answer missed them).
    examples: Literal["wins", "served"] = "wins"
    # Weight of a cross-entropy term on the distilled answers' own tokens, added to the KL (0: KL
    # alone, the paper). Where a program check picked the best of several sampled answers
    # (`answers.samples`), this pulls the student toward answers that pass the check rather than
    # toward the teacher's average reply (measured: the prompted teacher's own greedy reply states
    # the fact for 20% of its training queries).
    answer_weight: float = Field(0.0, ge=0)


class PrismConfig(Section):
    """Everything a run needs. Stored resolved in the run's manifest."""

    model: str = EMBEDDED_MODEL
    model_revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda", "mps"] = "cpu"
    personas: tuple[str, ...] | None = None  # None = every persona in the registry
    persona_dir: str | None = None  # extra personas: a directory of YAML files or one YAML file
    persona_length: PersonaLength = "long"
    placement: Placement = "system"
    # shared: one adapter for every context (the paper); per_context: one adapter per context and a
    # gate with one class per context group plus "base".
    adapters: Literal["shared", "per_context"] = "shared"
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    # Stages 1-3 and the teacher logits of stage 5 may run with the weights cast to another dtype
    # ("model": as loaded). bfloat16 generates 1.8x faster than float32 on a CPU with AVX512-BF16
    # (benchmarks/bootstrap_speed.py); training keeps the loaded weights.
    # "auto": bfloat16 where the hardware has bf16 units (AVX512-BF16/AMX CPUs, recent GPUs), else "model".
    infer_dtype: Literal["model", "auto", "float32", "bfloat16", "float16"] = "model"
    # Prompts sharing a long token prefix (a persona system prompt; one query prompt sampled k
    # times) prefill it once per batch and reuse its KV cache. Same maths: a speed setting.
    prefix_cache: bool = True
    # Stages 1-3 may generate on an OpenAI-compatible server (vLLM, SGLang, `prism serve`) serving
    # the same model; None = generate locally. Speed settings: a run may resume with other values.
    generator_url: str | None = None
    generator_model: str | None = None  # the server's name for the model; None = its first model
    generator_concurrency: int = Field(16, ge=1)  # requests in flight to the server
    # What generates stages 1-3 locally: "torch", "llamacpp" (in-process llama.cpp on a GGUF of the
    # model: `gguf`, or the embedded model's float16 copy), or "auto" (the faster one for bulk
    # generation on this machine, benchmarks/engines.py). Speed settings, like generator_url.
    engine: Literal["auto", "torch", "llamacpp", "vllm"] = "auto"
    gguf: str | None = None
    # More flags for the vllm engine's server, e.g. ["--tensor-parallel-size", "2"] (vLLM's own).
    vllm_args: list[str] = Field(default_factory=list)
    queries: QueryConfig = QueryConfig()
    answers: AnswerConfig = AnswerConfig()
    judge: JudgeConfig = JudgeConfig()
    gate: GateConfig = GateConfig()
    distill: DistillConfig = DistillConfig()

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


# Presets are plain override dicts on top of the defaults, so each one reads as a diff.
PRESETS: dict[str, dict[str, Any]] = {
    # The embedded 135M model on a 2-core CPU: the whole pipeline in about 15 minutes.
    "quick": {
        "persona_length": "long",
        "infer_dtype": "auto",  # bf16 generation where the CPU has bf16 units: 1.7x (benchmarks/bootstrap_speed.py)
        "queries": {"n_per_persona": 8},
        "answers": {"max_new_tokens": 96},
        "judge": {"kind": "likelihood", "sanity_pairs": 24},
        # Few examples give few optimizer steps: a higher learning rate than the paper's 2e-4
        # (measured on the French-context benchmark: 2e-4 x 4 epochs transferred 20% of the
        # prompted behaviour, 1e-3 x 8 epochs 87%).
        # bf16 autocast: 1.79x faster per step on this Zen 4 CPU, loss within 1.5e-4 of float32
        # (benchmarks/train_dtype.py). Micro-batches of 1 (x 8 accumulated: the same 8 per step):
        # a step's activations are the memory peak of the run. Whole quick run, /usr/bin/time -v:
        # peak 2.92 GB with 1 (stage 5 206 s), 3.23 GB with 2 (197 s), 4.27 GB with 4.
        "distill": {"epochs": 4, "lr": 1e-3, "batch_size": 1, "grad_accum": 8, "max_seq_len": 384,
                    "train_dtype": "bfloat16"},
    },
    # The paper's settings (PRISM_METHOD.md section 2).
    "paper": {
        "persona_length": "long",
        "queries": {"n_per_persona": 50, "temperature": 0.9, "max_new_tokens": 64},
        "answers": {"temperature": 0.7, "max_new_tokens": 512},
        "judge": {"kind": "prompted", "sanity_pairs": 100},
        "gate": {"hidden": [128, 64]},
        "distill": {"epochs": 10, "batch_size": 4, "grad_accum": 4, "max_seq_len": 1024},
    },
    # Contexts, not personas: a user's memory, a product sheet and a travel guide (prism's context
    # suite, `prism eval RUN --suite contexts`), one adapter each behind a 4-way gate that also sees
    # general queries. Checks are programs (the answer states the fact), so no model judge runs.
    # Measured with Maya's memory alone (README, "The context suite"): facts reach the weights only
    # with many questions per fact (48 per context: 2.5% held-out recall; 160: 20%), the best of 6
    # checked answers and the answer term (20% -> 52.5%, the prompted model: 40%); the gate needs
    # many general questions to say "base" to short quiz questions.
    "contexts": {
        "persona_dir": "suite:contexts", "personas": ["memory_maya", "zorblax", "vellmoor"],
        "adapters": "per_context", "infer_dtype": "auto",
        "queries": {"n_per_persona": 160, "n_general": 288, "persona_in_context": False},
        "answers": {"cross": True, "max_new_tokens": 48, "samples": 6},
        "gate": {"labels": "source", "hidden": [], "lr": 3e-2, "max_epochs": 300, "patience": 30},
        "distill": {"epochs": 20, "lr": 1e-3, "batch_size": 4, "grad_accum": 2, "max_seq_len": 384,
                    "train_dtype": "bfloat16", "answer_weight": 1.0},
    },
    # Tests: the context suite's memory and product sheet, a handful of queries each.
    "micro-contexts": {
        "persona_dir": "suite:contexts", "personas": ["memory_maya", "zorblax"], "adapters": "per_context",
        "queries": {"n_per_persona": 6, "n_general": 6, "persona_in_context": False, "max_new_tokens": 24},
        "answers": {"cross": True, "max_new_tokens": 16, "samples": 2},
        "gate": {"labels": "source", "hidden": [], "lr": 3e-2, "max_epochs": 100, "min_examples": 4, "folds": 3},
        "distill": {"epochs": 1, "batch_size": 2, "grad_accum": 1, "max_seq_len": 256},
    },
    # Tiny settings for tests: minutes on the embedded model.
    "micro": {
        "personas": ["math", "writing"],
        "persona_length": "minimal",  # keeps teacher prompts inside the short max_seq_len
        "queries": {"n_per_persona": 3, "max_new_tokens": 32, "max_rounds": 4},
        "answers": {"max_new_tokens": 24},
        "judge": {"kind": "likelihood", "sanity_pairs": 4},
        "gate": {"max_epochs": 20, "min_examples": 4},
        # Two epochs: a kill can land between checkpoints (tests/test_faults.py resumes from one).
        "distill": {"epochs": 2, "batch_size": 2, "grad_accum": 1, "max_seq_len": 128},
    },
}
DEFAULT_PRESET = "quick"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


S = TypeVar("S", bound=BaseModel)


def load_settings(
    cls: type[S],
    presets: dict[str, dict[str, Any]],
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    default_preset: str | None = None,
    what: str = "run",
    base: dict[str, Any] | None = None,
) -> S:
    """Resolve preset -> YAML file -> overrides into one validated `cls`.

    A YAML file may name its own preset (`preset: paper`); an explicit `preset` argument wins.
    Without either, `base` (a resumed run's own settings) takes the preset's place.
    Overrides may use dotted keys (`{"queries.n_per_persona": 4}`); None values are skipped.
    """
    file_data: dict[str, Any] = {}
    source = "settings"
    if config_file is not None:
        path = Path(config_file)
        file_data = _read_yaml(path)
        file_preset = file_data.pop("preset", None)
        if preset is None and file_preset:
            preset = str(file_preset)
        source = f"config file {path}"
    if preset is None and base is None:
        preset = default_preset or next(iter(presets))
    if preset is not None and preset not in presets:
        raise ConfigError(f"unknown {what} preset {preset!r}; choose one of {', '.join(presets)}")
    merged = deep_merge(presets[preset] if preset is not None else base, file_data)
    merged = deep_merge(merged, undot(overrides or {}))
    try:
        return cls(**merged)
    except ValidationError as e:
        problems = "; ".join(_problem(err) for err in e.errors())
        start = f"preset {preset!r}" if preset is not None else "the run's own settings"
        raise ConfigError(f"invalid {what} {source} ({start}): {problems}") from None


def _problem(err: dict) -> str:
    """One validation error as `where: what (got VALUE)`."""
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    text = f"{where}: {err['msg'].removeprefix('Value error, ')}"
    if err["type"] not in ("missing", "value_error") and not isinstance(err.get("input"), dict):
        text += f" (got {err['input']!r:.60})"
    return text


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> PrismConfig:
    """The settings of a run (see load_settings)."""
    return load_settings(PrismConfig, PRESETS, preset, config_file, overrides, DEFAULT_PRESET, base=base)


def undot(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}; None values are dropped (an unset flag)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


# ----- evaluation and study settings ---------------------------------------------------------
ItemLimit = Annotated[int, Field(ge=0)] | None  # None = all items
# The benchmark files a limit can name (the study scores no xstest).
EvalSet = Literal["mtbench", "mmlu", "harmbench", "jailbreak", "pku", "xstest"]
StudySet = Literal["mtbench", "mmlu", "harmbench", "jailbreak", "pku"]


class RatingJudgeConfig(Section):
    """Who grades MT-Bench answers (1-10): the evaluated model itself, another local model, or an
    OpenAI-compatible endpoint."""

    model: str = "self"  # "self" or a local model directory / hub id
    url: str | None = None  # an OpenAI-compatible endpoint; wins over `model`
    served_model: str | None = None  # the model's name at `url`; None = the server's first model
    key_env: str = "OPENAI_API_KEY"  # environment variable holding the endpoint's API key


class ScoringConfig(Section):
    """What eval and study share: the data, the item limits, the answer lengths and the judges."""

    data: str | None = None  # benchmark folder; None = ../shared/benchmarks or $PRISM_BENCHMARKS
    limits: dict[EvalSet, ItemLimit] = {}
    mt_max_new_tokens: int = Field(512, ge=1)
    safety_max_new_tokens: int = Field(256, ge=1)
    persona_map: dict[str, str] = {}  # category -> persona overrides of the default expert match
    judge: RatingJudgeConfig = RatingJudgeConfig()
    refusal: Literal["pattern", "judge"] = "pattern"
    sanity_pairs: int = Field(16, ge=0)
    seed: int = 0
    n_boot: int = Field(2000, ge=100)


EvalSystem = Literal["base", "persona", "ungated", "prism"]
EvalBenchmark = Literal["mtbench", "mmlu", "safety", "xstest"]


class EvalConfig(ScoringConfig):
    """`prism eval`: which systems are compared on which benchmarks."""

    systems: tuple[EvalSystem, ...] = Field(("base", "persona", "ungated", "prism"), min_length=1)
    benchmarks: tuple[EvalBenchmark, ...] = Field(("mtbench", "mmlu", "safety", "xstest"), min_length=1)
    mmlu_shots: int = Field(0, ge=0, le=5)
    persona_length: PersonaLength | None = None  # None = the run's
    placement: Placement | None = None  # None = the run's
    # `paper`: Table 1 (the benchmarks above); `contexts`: prism's context suite on a context run
    # (held-out questions per context, general questions, routing, prompt cost).
    suite: Literal["paper", "contexts"] = "paper"
    # What generates the replies of a run's systems (as `prism run --engine`; auto: torch here);
    # letter scores, judges and the gate stay in torch.
    engine: Literal["auto", "torch", "llamacpp", "vllm"] = "auto"
    gguf: str | None = None
    vllm_args: list[str] = Field(default_factory=list)
    suite_max_new_tokens: int = Field(48, ge=1)
    suite_mtbench: int = Field(40, ge=0)  # MT-Bench first turns among the suite's general questions
    suite_limit: int | None = Field(None, ge=1)  # at most this many questions per context and of the factual ones


EVAL_PRESETS: dict[str, dict[str, Any]] = {
    # All four systems and all benchmarks on the embedded model in about 20 minutes (MT-Bench's
    # two turns and long judge prompts dominate: 16 questions at 96 tokens took 12-22 minutes).
    "quick": {"limits": {"mtbench": 8, "mmlu": 114, "harmbench": 24, "jailbreak": 8, "pku": 24, "xstest": 40},
              "mt_max_new_tokens": 64, "safety_max_new_tokens": 48, "sanity_pairs": 12},
    "full": {"limits": {}, "mt_max_new_tokens": 512, "safety_max_new_tokens": 256, "sanity_pairs": 40},
    # Tests: a handful of items of every benchmark, a few tokens each.
    "micro": {"limits": {"mtbench": 2, "mmlu": 8, "harmbench": 2, "jailbreak": 1, "pku": 2, "xstest": 4},
              "mt_max_new_tokens": 8, "safety_max_new_tokens": 8, "sanity_pairs": 2, "n_boot": 200,
              "suite_max_new_tokens": 12, "suite_mtbench": 3, "suite_limit": 6},
}


def load_eval_config(preset: str | None = None, config_file: str | Path | None = None,
                     overrides: dict[str, Any] | None = None) -> EvalConfig:
    return load_settings(EvalConfig, EVAL_PRESETS, preset, config_file, overrides, "quick", "eval")


class StudyConfig(ScoringConfig):
    """`prism study`: the persona x length x placement grid (see prism.study.grid)."""

    models: tuple[str, ...] = Field((EMBEDDED_MODEL,), min_length=1)  # each studied in turn
    personas: tuple[str, ...] | None = None  # None = every persona in the registry
    persona_dir: str | None = None  # extra personas: a directory of YAML files or one YAML file
    lengths: tuple[PersonaLength, ...] = Field(("long", "short", "minimal"), min_length=1)
    placements: tuple[Placement, ...] = Field(("system", "user"), min_length=1)
    reference_length: PersonaLength = "long"
    reference_placement: Placement = "system"
    cross: Literal["reference", "full"] = "reference"
    random_control: bool = True
    benchmarks: tuple[Literal["mtbench", "mmlu", "safety"], ...] = Field(("mtbench", "mmlu", "safety"), min_length=1)
    limits: dict[StudySet, ItemLimit] = {}
    mt_turns: int = Field(1, ge=1, le=2)
    sanity_pairs: int = Field(12, ge=0)
    batch_size: int = Field(16, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"  # bfloat16: faster on CPUs with bf16 units
    prefix_cache: bool = True  # prompts sharing a persona prefill it once per batch (same outputs, faster)

    @model_validator(mode="after")
    def _check(self):
        if self.reference_length not in self.lengths:
            raise ValueError(f"reference_length {self.reference_length!r} is not in lengths {list(self.lengths)}")
        if self.reference_placement not in self.placements:
            raise ValueError(f"reference_placement {self.reference_placement!r} is not in placements "
                             f"{list(self.placements)}")
        return self


STUDY_PRESETS: dict[str, dict[str, Any]] = {
    # About 30-35 minutes on the embedded model on 2 CPU cores: 23 distinct persona prompts per item
    # (16 MT-Bench, 60 MMLU and 40 safety items took 57 minutes with another job on the machine).
    "quick": {"limits": {"mtbench": 16, "mmlu": 48, "harmbench": 12, "jailbreak": 8, "pku": 12},
              "mt_turns": 1, "mt_max_new_tokens": 64, "safety_max_new_tokens": 48},
    # The paper's grid on the full sets: every persona at every length and placement.
    "full": {"limits": {"mtbench": None, "mmlu": None, "harmbench": None, "jailbreak": None, "pku": None},
             "cross": "full", "mt_turns": 2, "mt_max_new_tokens": 512, "safety_max_new_tokens": 256,
             "sanity_pairs": 40},
    # Tests: two personas, one length and placement beside the reference, a handful of items.
    "micro": {"personas": ["math", "writing", "safety_monitor"], "lengths": ["long", "minimal"],
              "placements": ["system", "user"], "limits": {"mtbench": 2, "mmlu": 4, "harmbench": 2, "jailbreak": 1,
                                                           "pku": 1},
              "mt_max_new_tokens": 12, "safety_max_new_tokens": 12, "sanity_pairs": 2, "n_boot": 200},
}


def load_study_config(preset: str | None = None, config_file: str | Path | None = None,
                      overrides: dict[str, Any] | None = None) -> StudyConfig:
    return load_settings(StudyConfig, STUDY_PRESETS, preset, config_file, overrides, "quick", "study")
