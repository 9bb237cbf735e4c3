"""lm-evaluation-harness on a micro run, with no hub: the `prism` model in-process (through
`prism lm-eval`) and lm-eval's own `local-completions` client against a real `prism serve` on
loopback, both on the local MMLU task of examples/lm-eval, checked against `prism eval`."""

import glob
import json
import math
from pathlib import Path

import httpx
import pytest
import torch

from prism.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TASKS = str(ROOT / "examples" / "lm-eval")
LIMIT = 8  # lm-eval scores the first LIMIT documents of the 12 below
SYSTEM_OF_MODE = {"gated": "prism", "base": "base"}  # prism eval's name for each mode


@pytest.fixture(scope="module")
def offline():
    """No hub: lm-eval and datasets must work from local files only."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def run_dir(micro_run, offline):
    """The session's finished micro run (micro personas are minimal already); only read here."""
    return micro_run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, benchmarks_dir):
    """12 MMLU questions spread over the subset (several subjects, answers not all one letter)."""
    rows = (benchmarks_dir / "mmlu_subset_test.jsonl").read_text().splitlines()
    out = tmp_path_factory.mktemp("mmlu12")
    (out / "mmlu_subset_test.jsonl").write_text("\n".join(rows[::47][:12]) + "\n")
    return out


@pytest.fixture(scope="module")
def prism_eval(run_dir, data_dir, tmp_path_factory):
    """`prism eval`'s MMLU on all 12 questions, base and prism systems: {system: {item id: score}}
    and its cached letter rows."""
    from prism.eval import run_eval

    out = tmp_path_factory.mktemp("eval")
    run_eval(out, run_dir=run_dir, preset="micro", quiet=True,
             overrides={"data": str(data_dir), "benchmarks": ["mmlu"], "systems": ["base", "prism"],
                        "limits": {"mmlu": None}})
    raw = json.loads((out / "raw.json").read_text())["mmlu"]["systems"]
    scores = {s: dict(zip(r["item_ids"], r["scores"])) for s, r in raw.items()}
    routes = {s: dict(zip(r["item_ids"], r["routes"])) for s, r in raw.items()}
    letters = [json.loads(line) for line in (out / "mmlu_scores.jsonl").read_text().splitlines()]
    return scores, routes, letters


def lm_eval(out: Path, model: str, model_args: str, data_dir: Path, limit: int = LIMIT) -> tuple[dict, list[dict]]:
    """`prism lm-eval run ...` on the local MMLU task: lm-eval's results and its logged samples."""
    assert main(["lm-eval", "run", "--model", model, "--model_args", model_args, "--tasks", "prism_mmlu",
                 "--include_path", TASKS, "--apply_chat_template", "--limit", str(limit),
                 "--metadata", json.dumps({"data": str(data_dir)}), "--output_path", str(out),
                 "--log_samples"]) == 0
    [results] = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    [samples] = glob.glob(str(out / "**" / "samples_prism_mmlu_*.jsonl"), recursive=True)
    rows = [json.loads(line) for line in Path(samples).read_text().splitlines()]
    return json.loads(Path(results).read_text()), sorted(rows, key=lambda r: r["doc_id"])


@pytest.fixture(scope="module")
def in_process(run_dir, data_dir, offline, tmp_path_factory):
    """The `prism` model in both modes: {mode: (results, samples)}."""
    return {mode: lm_eval(tmp_path_factory.mktemp(mode), "prism", f"run={run_dir},mode={mode}", data_dir)
            for mode in SYSTEM_OF_MODE}


def letter_logprobs(sample: dict) -> list[float]:
    """Per letter, the log-sum-exp of its two spellings' log-likelihoods (choices A, " A", B, ...)."""
    lls = [float(r[0][0]) for r in sample["resps"]]
    return [math.log(math.exp(lls[2 * k]) + math.exp(lls[2 * k + 1])) for k in range(4)]


@pytest.mark.parametrize("mode", list(SYSTEM_OF_MODE))
def test_prism_model_scores_mmlu_as_prism_eval_does(mode, in_process, prism_eval, run_dir):
    results, samples = in_process[mode]
    scores, routes, letters = prism_eval
    system = SYSTEM_OF_MODE[mode]
    ids = [s["doc"]["id"] for s in samples]
    assert len(ids) == LIMIT
    # Same items, same verdict on each, so the same accuracy.
    assert [s["acc"] for s in samples] == [scores[system][i] for i in ids]
    expected = sum(scores[system][i] for i in ids) / LIMIT
    assert results["results"]["prism_mmlu"]["acc,none"] == pytest.approx(expected)
    assert 0 < sum(scores["base"].values()) < len(scores["base"])  # the items do tell answers apart
    # Same letter scores: each question's four letter log-probabilities are a row prism eval computed.
    rows = [r["logprobs"] for r in letters if (r["variant"] == "base") == (mode == "base")]
    for s in samples:
        mine = letter_logprobs(s)
        assert min(max(abs(a - b) for a, b in zip(mine, row)) for row in rows) < 1e-3
    # Route shares per task, written into lm-eval's results next to its metrics.
    info = results["config"]["prism"]
    assert info["run"] == str(run_dir) and info["mode"] == mode
    names = [(routes[system][i]["adapter"] or "base") for i in ids]
    shares = {name: round(names.count(name) / LIMIT, 4) for name in set(names)}
    assert info["routes"] == {"prism_mmlu": {"documents": LIMIT, "shares": shares}}


@pytest.fixture(scope="module")
def server(run_dir):
    """`prism serve` on the run, on a loopback port, with its own model copy."""
    from prism.routed import PrismModel
    from prism.serve.app import ServeOptions, create_app
    from prism.serve.server import BackgroundServer

    prism = PrismModel.load(run_dir)
    with BackgroundServer(create_app(prism, ServeOptions(context_length=2048))) as srv:
        srv.prism = prism
        yield srv


def complete(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json={"model": "prism-base", **body}, timeout=120)


def test_completions_score_the_prompt_as_vllm_does(server, embedded):
    """echo + logprobs + max_tokens 0 scores the prompt; token ids and text are the same prompt."""
    text = "The capital of France is Paris."
    ids = embedded.token_ids(text)
    scored = complete(server, prompt=text, echo=True, logprobs=2, max_tokens=0)
    assert scored.status_code == 200, scored.text
    choice = scored.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == text and "".join(lp["tokens"]) == text and len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(ids))]
    with torch.inference_mode():  # by hand: one forward pass of the base model
        ref = torch.log_softmax(embedded.model(torch.tensor([ids])).logits[0].float(), -1)
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-3)
        top = lp["top_logprobs"][i]  # the 2 likeliest tokens there, and the token itself
        assert embedded.tokenizer.decode([int(ref[i - 1].argmax())]) in top and lp["tokens"][i] in top
        assert 2 <= len(top) <= 3
    assert complete(server, prompt=ids, echo=True, logprobs=2, max_tokens=0).json()["choices"][0]["logprobs"] == lp
    # One generated token (what lm-eval's local-completions asks for): scored after the prompt's.
    one = complete(server, prompt=ids, echo=True, logprobs=0, max_tokens=1, temperature=0).json()["choices"][0]
    assert one["logprobs"]["token_logprobs"][:-1] == lp["token_logprobs"]
    assert one["text"].startswith(text) and len(one["logprobs"]["tokens"]) == len(ids) + 1
    assert [len(t) for t in one["logprobs"]["top_logprobs"][1:]] == [1] * len(ids)  # logprobs 0: the token only
    # Each bad scoring request gets one 400 naming its field.
    bad = [({"prompt": text, "max_tokens": 0}, "max_tokens"), ({"prompt": text, "logprobs": 21}, "logprobs"),
           ({"prompt": text, "echo": True, "stream": True}, "echo"), ({"prompt": [len(embedded.tokenizer)]}, "prompt"),
           ({"prompt": [-1]}, "prompt")]
    for body, param in bad:
        r = complete(server, **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_local_completions_on_prism_serve_matches_the_in_process_model(server, data_dir, in_process, offline,
                                                                        tmp_path):
    """lm-eval's own OpenAI-completions client scores through echo + logprobs on the real server."""
    server.prism.model.tokenizer.save_pretrained(tmp_path / "tokenizer")  # lm-eval tokenizes on the client side
    args = (f"base_url={server.url}/v1/completions,model=prism,tokenizer={tmp_path / 'tokenizer'},"
            "tokenizer_backend=huggingface,num_concurrent=8,max_retries=1")
    # The first half of the documents: over HTTP every choice re-scores its whole prompt (8 per
    # document), which takes most of this test's time.
    half = LIMIT // 2
    results, samples = lm_eval(tmp_path / "out", "local-completions", args, data_dir, limit=half)
    _, ref_samples = in_process["gated"]
    ref_samples = ref_samples[:half]
    assert [s["doc"]["id"] for s in samples] == [s["doc"]["id"] for s in ref_samples] and len(samples) == half
    assert [s["acc"] for s in samples] == [s["acc"] for s in ref_samples]
    assert results["results"]["prism_mmlu"]["acc,none"] == pytest.approx(sum(s["acc"] for s in ref_samples) / half)
    for s, ref in zip(samples, ref_samples):  # every choice's log-likelihood, not only the verdict
        assert letter_logprobs(s) == pytest.approx(letter_logprobs(ref), abs=1e-3)
