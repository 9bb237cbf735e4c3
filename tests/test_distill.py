"""The distillation loss alone, then on the real embedded model: initial KL, training, layer 0."""

import math

import pytest
import torch

from prism.distill import build_example, lora_config, student_batch, teacher_topk, topk_kl
from prism.model import decoder_layers


def test_topk_kl_is_zero_for_identical_distributions_over_the_full_vocabulary():
    logits = torch.randn(2, 5, 11)
    vals, idx = logits.topk(11, dim=-1)
    mask = torch.ones(2, 5)
    assert topk_kl(logits, vals, idx, mask, 2.0).item() == pytest.approx(0.0, abs=1e-5)


def test_topk_kl_matches_a_hand_computed_case():
    student = torch.tensor([[[0.0, 0.0, 0.0]]])  # uniform over 3 tokens
    teacher_full = torch.tensor([2.0, 0.0, 0.0])
    teacher_vals, teacher_idx = torch.tensor([[[2.0, 0.0]]]), torch.tensor([[[0, 1]]])  # top-2
    t = 2.0
    e = math.e
    # With the teacher's normaliser: buckets {token 0, token 1, rest}, teacher at T=2 is
    # (e, 1, 1) / (e + 2), the student is uniform.
    p = torch.tensor([e, 1.0, 1.0]) / (e + 2)
    expected = float((p * (p / (1 / 3)).log()).sum()) * t * t
    lse = torch.logsumexp(teacher_full / t, -1).reshape(1, 1)
    got = topk_kl(student, teacher_vals, teacher_idx, torch.ones(1, 1), t, lse).item()
    assert got == pytest.approx(expected, rel=1e-5)
    # Without it: both renormalised over the two tokens: teacher (e, 1)/(e+1), student (1/2, 1/2).
    p2 = torch.tensor([e, 1.0]) / (e + 1)
    expected2 = float((p2 * (p2 / 0.5).log()).sum()) * t * t
    assert topk_kl(student, teacher_vals, teacher_idx, torch.ones(1, 1), t).item() == pytest.approx(expected2, rel=1e-5)


def test_topk_kl_with_the_teacher_normaliser_counts_the_mass_outside_top_k():
    teacher = torch.randn(1, 3, 50) * 3
    vals, idx = teacher.topk(5, dim=-1)
    lse = torch.logsumexp(teacher / 2.0, dim=-1)
    mask = torch.ones(1, 3)
    assert topk_kl(teacher, vals, idx, mask, 2.0, lse).item() == pytest.approx(0.0, abs=1e-5)
    # A student that matches the top-k shape but puts its tail mass elsewhere is penalised only
    # when the teacher's normaliser is known.
    student = teacher.clone()
    student.scatter_(-1, idx, student.gather(-1, idx) - 3.0)
    assert topk_kl(student, vals, idx, mask, 2.0).item() == pytest.approx(0.0, abs=1e-5)
    assert topk_kl(student, vals, idx, mask, 2.0, lse).item() > 0.1


def test_topk_kl_ignores_masked_positions_and_scales_with_t_squared():
    s, tv = torch.randn(1, 4, 9), torch.randn(1, 4, 9)
    vals, idx = tv.topk(9, dim=-1)
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    garbage = s.clone()
    garbage[0, 2:] = 100 * torch.randn(2, 9)
    assert topk_kl(s, vals, idx, m, 1.0).item() == pytest.approx(topk_kl(garbage, vals, idx, m, 1.0).item())
    # Over the full vocabulary the loss is T^2 * KL(teacher || student) of the distributions softened
    # by T, both sides divided by the same T, averaged over the unmasked positions: by hand for
    # several T (a wrong T on either side, or a missing T^2, changes every value).
    for t in (0.5, 1.0, 2.0, 4.0):
        p = torch.softmax(tv[0, :2] / t, -1)
        q = torch.softmax(s[0, :2] / t, -1)
        by_hand = float((p * (p.log() - q.log())).sum(-1).mean()) * t * t
        assert topk_kl(s, vals, idx, m, t).item() == pytest.approx(by_hand, rel=1e-4), t
        lse = torch.logsumexp(tv / t, -1)  # with the teacher's normaliser: the same here (k = V)
        assert topk_kl(s, vals, idx, m, t, lse).item() == pytest.approx(by_hand, rel=1e-4), t


def _examples(model, persona, n=4):
    qa = [("What is the capital of Italy?", "La capitale de l'Italie est Rome."),
          ("How many legs does a spider have?", "Une araignée a huit pattes."),
          ("Name a primary colour.", "Le rouge est une couleur primaire."),
          ("What do bees make?", "Les abeilles fabriquent du miel.")][:n]
    return [build_example(model, f"q{i}", q, a, persona, "system", 128) for i, (q, a) in enumerate(qa)]


@pytest.mark.slow
def test_initial_kl_is_positive_with_the_persona_and_training_lowers_it(embedded):
    from peft import get_peft_model

    persona = "Always answer in French. Réponds toujours en français."
    model, pad = embedded.model, embedded.tokenizer.pad_token_id
    examples = _examples(embedded, persona)
    cache = teacher_topk(model, examples, 64, 4, pad)
    batch = student_batch(examples, cache, pad, 64)
    with torch.no_grad():
        kl0 = batch.kl(batch.logits(model), 2.0).item()
    # The authors' pitfall: a teacher without the persona equals the student, KL ~ 0.
    same = _examples(embedded, persona=None)
    same_batch = student_batch(same, teacher_topk(model, same, 64, 4, pad), pad, 64)
    with torch.no_grad():
        kl_same = same_batch.kl(same_batch.logits(model), 2.0).item()
    assert kl0 > 0.05 and kl0 > 20 * max(kl_same, 1e-6), (kl0, kl_same)

    n_layers = len(decoder_layers(model))
    peft_model = get_peft_model(model, lora_config(n_layers, 8, 16, 0.0, ["q_proj", "v_proj", "o_proj", "up_proj"]))
    try:
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
        peft_model.train()
        for _ in range(12):
            loss = batch.kl(batch.logits(peft_model), 2.0)
            loss.backward()
            opt.step()
            opt.zero_grad()
        peft_model.eval()
        with torch.no_grad():
            kl1 = batch.kl(batch.logits(peft_model), 2.0).item()
        assert kl1 < 0.5 * kl0, (kl0, kl1)
    finally:
        peft_model.unload()
        model.eval()


@pytest.mark.slow
def test_gate_input_is_identical_with_the_adapter_on_and_off(embedded):
    from peft import get_peft_model

    model = embedded.model
    n_layers = len(decoder_layers(model))
    cfg = lora_config(n_layers, 8, 16, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    peft_model = get_peft_model(model, cfg)
    try:
        names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
        assert names and not any(".layers.0." in n for n in names)  # layer 0 carries no LoRA
        with torch.no_grad():  # a non-trivial adapter (B starts at zero)
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        prompts = [embedded.user_prompt("Explain gravity."), embedded.user_prompt("Write a poem about rain, please.")]
        peft_model.base_model.enable_adapter_layers()
        on = embedded.layer1_states(prompts, pooling="mean")
        on_logits = embedded.next_token_logprobs(prompts)
        peft_model.base_model.disable_adapter_layers()
        off = embedded.layer1_states(prompts, pooling="mean")
        off_logits = embedded.next_token_logprobs(prompts)
        assert torch.equal(on, off)
        assert not torch.allclose(on_logits, off_logits, atol=1e-3)  # the adapter is really active
    finally:
        peft_model.base_model.enable_adapter_layers()
        peft_model.unload()
        model.eval()


def test_lr_schedule_warms_up_then_decays():
    from prism.distill import lr_lambda

    f = lr_lambda(total_steps=10, warmup_steps=2)
    assert f(0) == 0.5 and f(1) == 1.0
    assert f(2) == pytest.approx(1.0) and f(9) < 0.1 and f(10) == pytest.approx(0.0)
    assert all(f(i) >= f(i + 1) for i in range(2, 10))
    assert not math.isnan(f(100))


@pytest.mark.slow
def test_teacher_cache_equals_the_full_logits_of_each_example_alone(embedded):
    persona = "Always answer in French. Réponds toujours en français."
    model, pad = embedded.model, embedded.tokenizer.pad_token_id
    examples = _examples(embedded, persona)
    cache = teacher_topk(model, examples, 16, 3, pad)  # batches of unequal lengths, left-padded
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e.teacher_ids])).logits[0]
            start = len(e.teacher_ids) - e.n_response - 1  # the position predicting the first response token
            span = logits[start : start + e.n_response]
            vals, idx = span.topk(16, dim=-1)
            assert torch.allclose(cache[f"{e.key}.values"], vals, atol=1e-3)
            assert torch.equal(cache[f"{e.key}.indices"], idx.to(torch.int32))
            assert torch.allclose(cache[f"{e.key}.lse"], torch.logsumexp(span / 2.0, -1), atol=1e-3)


@pytest.mark.slow
def test_distillation_resumes_after_a_crash_mid_checkpoint_swap(micro_run, embedded, tmp_path, monkeypatch, caplog):
    """Stage 5 of the shared micro run again, crashed in epoch 2 between the two renames of its
    checkpoint swap (epoch 1's checkpoint moved aside as `checkpoint.old`, epoch 2's left as
    `checkpoint.tmp`). The next run must put epoch 1's back, resume after it (not start over), drop
    the losses row of the lost epoch, and end with the adapter an uninterrupted run trains, tensor
    for tensor."""
    import json
    import logging
    import shutil

    from safetensors.torch import load_file

    import prism.stages.distill as stage
    from conftest import copy_run
    from prism.config import load_config
    from prism.io import read_jsonl
    from prism.pipeline import run_pipeline

    run = copy_run(micro_run, tmp_path / "run")
    work = run / "distill"  # the teacher cache stays: only training is redone
    shutil.rmtree(run / "adapter")
    shutil.rmtree(work / "checkpoint")
    (work / "losses.jsonl").unlink()
    (work / "summary.json").unlink()
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["distill"] = {"status": "pending"}
    manifest["adapters"] = []
    (run / "manifest.json").write_text(json.dumps(manifest))

    class Crash(Exception):
        pass

    real_append, appended = stage.append_jsonl, []

    def append_then_crash_in_epoch_2(path, rows):
        n = real_append(path, rows)
        appended.append(rows)
        if len(appended) == 2:  # epoch 2's losses row is on disk, its checkpoint not yet
            raise Crash
        return n

    monkeypatch.setattr(stage, "append_jsonl", append_then_crash_in_epoch_2)
    with pytest.raises(Crash):
        run_pipeline(load_config("micro"), run, quiet=True, model=embedded)
    monkeypatch.setattr(stage, "append_jsonl", real_append)
    epoch1 = read_jsonl(work / "losses.jsonl")[0]
    assert [r["epoch"] for r in read_jsonl(work / "losses.jsonl")] == [1, 2]
    assert json.loads((work / "checkpoint" / "trainer_state.json").read_text())["epochs_done"] == 1
    # What a kill between the swap's two renames leaves: the old checkpoint aside, the new one not in.
    (work / "checkpoint").rename(work / "checkpoint.old")
    (work / "checkpoint.tmp").mkdir()
    (work / "checkpoint.tmp" / "adapter.safetensors").write_bytes(b"half written")

    caplog.set_level(logging.INFO, logger="prism.stages.distill")
    run_pipeline(load_config("micro"), run, quiet=True, model=embedded)
    assert "resuming after epoch 1" in caplog.text  # resumed, not started over
    losses = read_jsonl(work / "losses.jsonl")
    assert losses[0] == epoch1  # epoch 1 kept as it was (its time too): not trained again
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in losses] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(micro_run / "distill" / "losses.jsonl")]
    assert not (work / "checkpoint.old").exists() and not (work / "checkpoint.tmp").exists()
    assert json.loads((work / "checkpoint" / "trainer_state.json").read_text())["epochs_done"] == 2
    mine = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    ref = load_file(str(micro_run / "adapter" / "adapter_model.safetensors"))
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)


def test_the_answer_term_scores_exactly_the_response_tokens(embedded):
    """Each masked position's target is the response token it predicts, so the answer term equals a
    plain causal-LM loss on the response computed by hand."""
    model, pad = embedded.model, embedded.tokenizer.pad_token_id
    examples = _examples(embedded, "Always answer in French.")[:3]  # responses of different lengths
    batch = student_batch(examples, teacher_topk(model, examples, 8, 4, pad), pad, 8)
    with torch.no_grad():
        logits = batch.logits(model)
        got = batch.answer_nll(logits).item()
        by_hand = []
        for e in examples:
            full = model(input_ids=torch.tensor([e.student_ids])).logits[0].float().log_softmax(-1)
            resp = e.student_ids[-e.n_response:]
            start = len(e.student_ids) - e.n_response
            by_hand += [-full[start - 1 + j, t].item() for j, t in enumerate(resp)]
    assert batch.mask.sum().item() == sum(e.n_response for e in examples)
    assert got == pytest.approx(sum(by_hand) / len(by_hand), rel=2e-3)
