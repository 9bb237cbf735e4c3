"""Model loading and chat formatting on the real embedded model."""

import shutil
import warnings

import pytest

from prism.errors import ModelLoadError
from prism.model import load_model
from prism.model.loading import resolve_device, resolve_dtype

# A template like Mistral-7B-Instruct-v0.3's: no system role, raises on one.
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}"
    "{% endfor %}"
)


@pytest.mark.slow  # the real model
def test_system_placement_on_a_template_with_system_role(embedded):
    assert embedded.supports_system_role
    text = embedded.user_prompt("What is 2+2?", persona="You are a mathematician.", placement="system")
    assert "<|im_start|>system\nYou are a mathematician.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    user = embedded.user_prompt("What is 2+2?", persona="You are a mathematician.", placement="user")
    assert "<|im_start|>user\nYou are a mathematician.\n\nWhat is 2+2?<|im_end|>" in user
    assert "You are a mathematician." not in embedded.user_prompt("What is 2+2?")


@pytest.mark.slow  # the real model
def test_template_without_system_role_moves_persona_to_user_turn_with_warning(embedded):
    original = embedded.tokenizer.chat_template
    try:
        embedded.tokenizer.chat_template = NO_SYSTEM_TEMPLATE
        from prism.model.chat import template_has_system_role as _template_has_system_role

        embedded.supports_system_role = _template_has_system_role(embedded.tokenizer)
        embedded._placement_warned = False
        assert not embedded.supports_system_role
        with pytest.warns(UserWarning, match="no system role"):
            text = embedded.user_prompt("Hi there", persona="You are a pirate.", placement="system")
        assert text == "[INST] You are a pirate.\n\nHi there [/INST]"
    finally:
        embedded.tokenizer.chat_template = original
        embedded.supports_system_role = True


@pytest.mark.slow  # the real model
def test_generation_is_batched_and_counts_tokens(embedded):
    prompts = [embedded.user_prompt(q) for q in ["Name a colour.", "Name a fruit that is yellow and long."]]
    before = embedded.tokens_generated
    gens = embedded.generate(prompts, max_new_tokens=8, temperature=0.0)
    assert len(gens) == 2 and all(g.text and 0 < g.n_tokens <= 8 for g in gens)
    assert embedded.tokens_generated - before == sum(g.n_tokens for g in gens)
    # Greedy decoding in a batch equals decoding alone (left padding is handled).
    alone = embedded.generate(prompts[:1], max_new_tokens=8, temperature=0.0)
    assert alone[0].text == gens[0].text


@pytest.mark.slow  # the real model
def test_continuation_logprobs_prefers_the_likely_answer(embedded):
    p = embedded.user_prompt("What is the capital of France?")
    (good, n1), (bad, n2) = embedded.continuation_logprobs([p, p], ["The capital of France is Paris.",
                                                                    "Bananas swim quietly under purple mountains."])
    assert n1 > 0 and n2 > 0 and good / n1 > bad / n2


def test_missing_model_and_bad_directories(tmp_path, monkeypatch):
    # Offline: huggingface_hub reads HF_HUB_OFFLINE once, at import, so the variable alone does not
    # reach it here (the hub was then tried with five retries, 46 s without a network).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer of 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(f))


@pytest.mark.slow  # the real model
def test_local_directory_and_tokenizer_without_chat_template(embedded, tmp_path):
    src = embedded.source  # the cached safetensors folder of the embedded model
    from prism.model.loading import embedded_model_dir

    local = tmp_path / "model"
    shutil.copytree(embedded_model_dir(), local)
    m = load_model(str(local))
    assert m.source["kind"] == "local" and src["kind"] == "embedded"
    (local / "chat_template.jinja").unlink()
    cfg = (local / "tokenizer_config.json").read_text()
    import json

    data = json.loads(cfg)
    data.pop("chat_template", None)
    (local / "tokenizer_config.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="no chat template"):
        load_model(str(local))


def test_unknown_dtype_and_device():
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")
    with pytest.raises(ModelLoadError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch

        # Both branches assert: without a GPU asking for one is an error, with one it is used.
        if torch.cuda.is_available():
            assert resolve_device("cuda").type == "cuda"
        else:
            with pytest.raises(ModelLoadError, match="no CUDA GPU"):
                resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_shared_prefixes_groups_sequences_with_a_long_common_start():
    from prism.model.batching import shared_prefixes

    a, b = [1] * 40 + [2, 3], [1] * 40 + [4]
    same = [7] * 50
    prefix, group = shared_prefixes([a, [9, 9], b, same, same, [5] * 3], min_len=32)
    assert prefix[0] == prefix[2] == 40 and group[0] == group[2] >= 0
    assert prefix[3] == prefix[4] == 49 and group[3] == group[4] != group[0]  # one token left to prefill
    assert prefix[1] == prefix[5] == 0 and group[1] == group[5] == -1
    assert shared_prefixes([a], 32) == ([0], [-1])


@pytest.mark.slow  # the real model
def test_prefix_cache_generates_exactly_what_plain_generation_does(embedded):
    persona = ("You are a meticulous mathematician who explains every step of a calculation, names the rule used, "
               "checks the result by another route and states the final answer on its own line.")
    queries = ["What is 12 times 13?", "Is 91 prime?", "What is the square root of 144?"]
    prompts = ([embedded.user_prompt(q, persona) for q in queries] + [embedded.user_prompt(q) for q in queries]
               + [embedded.user_prompt(queries[0], persona)] * 2)
    before = embedded.prefix_cache
    try:
        embedded.prefix_cache = False
        plain = embedded.generate(prompts, 12)
        embedded.prefix_cache = True
        cached = embedded.generate(prompts, 12)
    finally:
        embedded.prefix_cache = before
    assert [g.text for g in cached] == [g.text for g in plain]
    assert [g.n_tokens for g in cached] == [g.n_tokens for g in plain]


@pytest.mark.slow  # the real model
def test_inference_dtype_casts_for_the_block_and_restores_the_exact_weights(embedded):
    import torch

    weight = embedded.model.get_input_embeddings().weight
    before = weight.detach().clone()
    with embedded.inference_dtype("bfloat16"):
        assert all(p.dtype == torch.bfloat16 for p in embedded.model.parameters())
        assert embedded.generate([embedded.user_prompt("Say hello.")], 4)[0].n_tokens > 0
    assert all(p.dtype == torch.float32 for p in embedded.model.parameters())
    assert torch.equal(embedded.model.get_input_embeddings().weight, before)
    with embedded.inference_dtype("model"):  # no change
        assert embedded.model.get_input_embeddings().weight.dtype == torch.float32


@pytest.mark.slow  # the real model
def test_next_token_logprobs_come_back_in_input_order(embedded):
    import torch

    prompts = [embedded.user_prompt("Write a long and detailed essay about the history of the Roman Empire."),
               embedded.user_prompt("Hi"), embedded.user_prompt("What is two plus two?")]
    together = embedded.next_token_logprobs(prompts)
    for i, p in enumerate(prompts):
        assert torch.allclose(together[i], embedded.next_token_logprobs([p])[0], atol=1e-3)


@pytest.mark.slow  # the real model
def test_query_pooling_reads_the_users_words_only(embedded):
    import torch

    from prism.model.batching import first_layer_output

    prompts = [embedded.user_prompt(q) for q in ("What is my name?", "Explain photosynthesis to a child, briefly.")]
    for q, p in zip(("What is my name?", "Explain photosynthesis to a child, briefly."), prompts):
        span = embedded.query_span(p)
        ids = embedded.token_ids(p)
        assert 0 in span and embedded.tokenizer.decode([t for t, s in zip(ids, span) if s]) == q
    with pytest.warns(UserWarning, match="pool over every token"):
        assert set(embedded.query_span("plain text, no template")) == {1}  # not the template's: every token
    # Batched and left-padded, each row is the mean of that prompt's own user tokens.
    means, maxima = (embedded.layer1_states(prompts, pooling=p) for p in ("query", "max"))
    with torch.no_grad():
        for mean, top, p in zip(means, maxima, prompts):
            ids = torch.tensor([embedded.token_ids(p)])
            h = first_layer_output(embedded.model, ids, torch.ones_like(ids))[0].float()
            span = torch.tensor(embedded.query_span(p), dtype=torch.bool)
            assert torch.allclose(mean, h[span].mean(0), atol=1e-4)
            assert not torch.allclose(mean, h.mean(0), atol=1e-3)  # not the plain mean
            assert torch.allclose(top, h[span].max(0).values, atol=1e-4)  # padding never wins the max
