import json
"""Server building blocks without a server: request validation, stop strings, the decode loop."""

import pytest
import torch

from prism.serve import protocol as P
from prism.serve.decode import DecodeBatch, Row, Sampling, TextStream, decode_batch, sample


def test_request_validation_names_the_field():
    ok = P.parse(P.ChatRequest, {"model": "prism", "messages": [{"role": "developer", "content": "be brief"},
                                                                {"role": "user", "content": [
                                                                    {"type": "text", "text": "hi"}]}],
                                 "stop": "\n", "user": "someone", "temperature": None, "tools": [], "n": 1})
    assert ok.plain_messages() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ok.stop_list() == ["\n"] and ok.temperature == 1.0  # null means the default
    cases = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages.0"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "unknown_field": 1}, "unknown_field"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}]}, "messages.0.tool_calls"),
        ({}, "messages"),
    ]
    for body, field in cases:
        with pytest.raises(P.ApiError) as e:
            P.parse(P.ChatRequest, body)
        assert e.value.status == 400 and e.value.message.startswith(field), (body, e.value.message)
    with pytest.raises(P.ApiError, match="one prompt per request"):
        P.parse(P.CompletionRequest, {"prompt": ["a", "b"]})


def test_max_tokens_against_limit_and_context():
    req = P.parse(P.ChatRequest, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 100})
    assert P.resolve_max_tokens(req, prompt_tokens=50, context=512, limit=256, default=64) == 100
    with pytest.raises(P.ApiError) as e:  # prompt + max_tokens over the context
        P.resolve_max_tokens(req, prompt_tokens=450, context=512, limit=256, default=64)
    assert e.value.status == 413 and e.value.code == "context_length_exceeded"
    with pytest.raises(P.ApiError) as e:
        P.resolve_max_tokens(req, prompt_tokens=50, context=512, limit=99, default=64)
    assert e.value.status == 400
    unset = P.parse(P.ChatRequest, {"messages": [{"role": "user", "content": "x"}]})
    assert P.resolve_max_tokens(unset, prompt_tokens=500, context=512, limit=256, default=64) == 12  # what is left
    with pytest.raises(P.ApiError) as e:
        P.resolve_max_tokens(unset, prompt_tokens=512, context=512, limit=256, default=64)
    assert e.value.status == 413


def test_route_info_names_the_route_its_probability_and_the_runner_up():
    from prism.routed import Route

    assert P.route_info(Route(None, rule="forced")) == {
        "route": "base", "adapter": False, "score": None, "runner_up": None, "runner_up_score": None,
        "rule": "forced", "forced": True}
    info = P.route_info(Route("memory_maya", 0.81, "base", 0.12))
    assert info["route"] == "memory_maya" and info["adapter"] and info["score"] == 0.81
    assert info["runner_up"] == "base" and not info["forced"] and info["rule"] == "gate"
    assert json.loads(json.dumps(info)) == info


def test_model_ids_force_each_adapter_and_prism_adapter_names_an_only_adapter():
    assert P.model_ids(["adapter"]) == {"prism-base": None, "prism-adapter": "adapter"}
    assert P.model_ids(["french"]) == {"prism-base": None, "prism-french": "french", "prism-adapter": "french"}
    ids = P.model_ids(["memory_maya", "zorblax"])
    assert ids == {"prism-base": None, "prism-memory_maya": "memory_maya", "prism-zorblax": "zorblax"}
    assert P.check_model("prism", ["zorblax"]) is None
    assert P.check_model("prism-zorblax", ["zorblax"]).adapter == "zorblax"
    with pytest.raises(P.ApiError) as e:
        P.check_model("prism-adapter", ["memory_maya", "zorblax"])
    assert e.value.status == 404 and "prism-zorblax" in e.value.message


@pytest.mark.slow  # the real model
def test_text_stream_holds_back_possible_stop_strings(embedded):
    tok = embedded.tokenizer
    ids = tok("Hello there. The END is near", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, stop=["END"])
    sent = "".join(stream.push(t) for t in ids)
    assert stream.stopped and sent == "Hello there. The "  # nothing of the stop string leaked
    plain = TextStream(tok)
    text = "".join(plain.push(t) for t in ids) + plain.flush()
    assert text == "Hello there. The END is near" and not plain.stopped


def test_top_p_keeps_the_nucleus_only():
    logits = torch.tensor([5.0, 4.0, -5.0, -6.0])
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, Sampling(1, temperature=1.0, top_p=0.5), g) for _ in range(50)}
    assert draws == {0}  # token 0 alone holds more than half the mass
    draws = {sample(logits, Sampling(1, temperature=1.0, top_p=1.0), g) for _ in range(200)}
    assert draws >= {0, 1}
    assert sample(logits, Sampling(1, temperature=0.0), g) == 0


def _rows(model, prompts, sampling, out):
    rows = []
    for i, p in enumerate(prompts):
        out[i] = {"text": "", "reason": None}
        rows.append(Row(model.token_ids(p), sampling(i),
                        emit=lambda t, i=i: out[i].__setitem__("text", out[i]["text"] + t),
                        finish=lambda r, n, i=i: out[i].update(reason=r, n=n)))
    return rows


@pytest.mark.slow  # the real model
def test_decode_batch_greedy_matches_hf_generate(embedded):
    """The server's decode loop (KV cache, left padding, finished rows dropped from the batch)
    gives the same greedy text as Hugging Face generate, prompt by prompt."""
    prompts = [embedded.user_prompt(q) for q in
               ("Say hi.", "Name three colours of the rainbow, please, in a list.", "What is 2+2?")]
    out: dict = {}
    decode_batch(embedded, _rows(embedded, prompts, lambda i: Sampling(max_tokens=[4, 14, 9][i], temperature=0), out))
    for i, p in enumerate(prompts):
        ref = embedded.generate([p], max_new_tokens=[4, 14, 9][i], temperature=0.0)[0]
        assert out[i]["text"].strip() == ref.text, i
        assert out[i]["n"] == ref.n_tokens
        assert out[i]["reason"] == ("length" if ref.n_tokens == [4, 14, 9][i] else "stop")


@pytest.mark.slow  # the real model
def test_decode_batch_seeded_sampling_is_reproducible_across_batches(embedded):
    prompt = embedded.user_prompt("Write a short poem about the sea.")
    other = embedded.user_prompt("Explain what a compiler does in two sentences.")
    a, b = {}, {}
    decode_batch(embedded, _rows(embedded, [prompt], lambda i: Sampling(10, 1.0, 0.9, seed=7), a))
    decode_batch(embedded, _rows(embedded, [other, prompt], lambda i: Sampling(10, 1.0, 0.9, seed=[3, 7][i]), b))
    assert a[0]["text"] == b[1]["text"] and a[0]["text"]


@pytest.mark.slow  # the real model
def test_rows_joining_a_running_batch_decode_as_they_would_alone(embedded):
    """Continuous batching: rows that join mid-decode (a longer prompt than the running rows' whole
    history, and a shorter one), and rows that leave early, change nobody's greedy reply."""
    questions = ["Name three colours of the rainbow, please, in a list.", "Say hi.",
                 "Explain, in a long and careful answer with many words, what a compiler does and why.",
                 "What is 2+2?"]
    prompts = [embedded.user_prompt(q) for q in questions]
    budget = [16, 3, 12, 8]
    alone: dict = {}
    for i, p in enumerate(prompts):
        one: dict = {}
        decode_batch(embedded, _rows(embedded, [p], lambda _: Sampling(budget[i], temperature=0), one))
        alone[i] = one[0]
    out: dict = {}
    rows = _rows(embedded, prompts, lambda i: Sampling(budget[i], temperature=0), out)
    batch = DecodeBatch(embedded)
    batch.join(rows[:2])
    for _ in range(5):  # the second row (3 tokens) leaves meanwhile
        batch.step()
    assert len(batch) == 1
    batch.join(rows[2:])  # one prompt longer than the running row's history, one shorter
    assert len(batch) == 3
    while batch:
        batch.step()
    for i in range(4):
        assert out[i] == alone[i], questions[i]


def test_kv_caches_merge_left_padded_and_shed_unused_columns():
    """Rows joining a running batch: the shorter side is left-padded with masked-out zeros and the
    rows keep their own keys; columns nobody attends to any more are cut. Sliding-window caches
    (which keep only the window) are not merged."""
    from transformers import MistralConfig
    from transformers.cache_utils import DynamicCache

    from prism.model.batching import merge_caches, mergeable, trim_left

    def cache(batch, width, fill):
        c = DynamicCache()
        for layer in range(2):
            kv = torch.full((batch, 2, width, 4), float(fill + layer))
            c.update(kv, kv.clone(), layer)
        return c

    running, newcomers = cache(2, 5, 1), cache(1, 3, 10)
    assert mergeable(running) and not mergeable(DynamicCache())
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    merged, merged_mask = merge_caches(running, mask, newcomers, torch.ones(1, 3, dtype=torch.long))
    assert merged_mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    keys = merged.layers[1].keys
    assert keys.shape == (3, 2, 5, 4)
    assert (keys[2, :, :2] == 0).all() and (keys[2, :, 2:] == 11).all() and (keys[:2] == 2).all()
    merged.batch_select_indices(torch.tensor([0, 2]))  # the full-width row leaves
    trimmed = trim_left(merged, merged_mask[[0, 2]])
    assert trimmed.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert merged.layers[0].keys.shape[2] == 4 and merged.get_seq_length() == 4

    windowed = DynamicCache(config=MistralConfig(num_hidden_layers=2, sliding_window=8, hidden_size=64,
                                                 num_attention_heads=4, num_key_value_heads=2))
    for layer in range(2):
        windowed.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), layer)
    assert not mergeable(windowed)
