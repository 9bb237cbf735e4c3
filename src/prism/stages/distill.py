"""Stage 5: self-distil each adapter's contexts into a LoRA (see prism.distill for the maths): one
adapter for every context (`adapters: shared`, the paper) or one per context (`per_context`).
Each learns from its contexts' own queries where the context won (label 1).

Runs under `accelerate launch` as well as plainly: the data loader is sharded per process and
only the main process writes files. A checkpoint after every epoch (adapter, optimizer state
and step, all safetensors/JSON) lets a killed run continue from the last finished epoch.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import zlib

import torch
from safetensors.torch import load_file

from prism.distill import (build_example, load_optimizer, lora_config, lr_lambda, save_optimizer, student_batch,
                           teacher_topk)
from prism.io import (append_jsonl, atomic_directory, atomic_write_json, atomic_write_tensors, atomic_write_text,
                      read_jsonl, recover_directory)
from prism.model import decoder_layers
from prism.records import SHARED, AnswerRecord
from prism.stages.context import StageContext

log = logging.getLogger(__name__)


def adapters(ctx: StageContext) -> dict[str, list[str]]:
    """Adapter name -> the contexts it learns."""
    if ctx.config.adapters == "shared":
        return {SHARED: [p.name for p in ctx.personas]}
    return {p.name: [p.name] for p in ctx.personas}


def distill_examples(ctx: StageContext, members: list[str] | None = None):
    """The examples of one adapter: answers of its contexts to their own queries (that won, with
    `distill.examples: wins`)."""
    cfg = ctx.config.distill
    labels = {(r["query_id"], r["persona"]): r["label"] for r in read_jsonl(ctx.run.verdicts)}
    answers = [AnswerRecord.from_dict(r) for r in read_jsonl(ctx.run.answers)]
    # A context serves its own queries, and every query when its scope is `all`.
    serves = {p.name for p in ctx.personas if p.scope == "all"}
    chosen = [a for a in answers if (cfg.examples == "served" or labels.get((a.query_id, a.persona)) == 1)
              and (a.origin == a.persona or a.persona in serves) and (members is None or a.persona in members)]
    examples, too_long = [], []
    for a in chosen:
        try:
            examples.append(build_example(ctx.model, a.query_id, a.query, a.answer_persona,
                                          ctx.persona_text(ctx.persona_by_name(a.persona)), ctx.config.placement,
                                          cfg.max_seq_len))
        except ValueError:
            too_long.append(a.query_id)
    if too_long:
        log.warning("stage 5: %d examples skipped, their persona prompt alone exceeds distill.max_seq_len=%d "
                    "(raise it): %s", len(too_long), cfg.max_seq_len, too_long[:5])
    return examples


@torch.no_grad()
def mean_kl(model, examples, cache, pad_id, k, temperature, batch_size) -> float:
    """Token-weighted mean KL over examples, in eval mode (no dropout)."""
    was = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        part = examples[start : start + batch_size]
        batch = student_batch(part, cache, pad_id, k)
        n = int(batch.mask.sum())
        total += batch.kl(batch.logits(model), temperature).item() * n
        tokens += n
    model.train(was)
    return total / max(1, tokens)


def run_distill(ctx: StageContext) -> dict:
    from accelerate import Accelerator

    cfg = ctx.config.distill
    accelerator = Accelerator(
        cpu=ctx.model.device.type == "cpu", gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision="bf16" if cfg.train_dtype == "bfloat16" else "no",
    )
    facts = {}
    for name, members in adapters(ctx).items():
        summary = ctx.run.distill_path(name) / "summary.json"
        if (ctx.run.adapter_path(name) / "adapter_config.json").is_file() and name in ctx.run.finished_adapters():
            facts[name] = json.loads(summary.read_text()) if summary.is_file() else {}  # trained before a kill
            continue
        log.info("stage 5: adapter %r (%s)", name, ", ".join(members))
        facts[name] = distill_adapter(ctx, accelerator, name, distill_examples(ctx, members))
        if accelerator.is_main_process:
            atomic_write_json(summary, facts[name])
        ctx.run.finished_adapters(add=name)
    return facts[SHARED] if ctx.config.adapters == "shared" else {"adapters": facts}


def distill_adapter(ctx: StageContext, accelerator, name: str, examples) -> dict:
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    cfg = ctx.config.distill
    out = ctx.run.distill_path(name)
    pad_id = ctx.model.tokenizer.pad_token_id
    n_layers = len(decoder_layers(ctx.model.model))
    base = ctx.model.model

    # 1. The teacher's top-k logits, computed once with the persona in context.
    cache_path = out / "teacher_topk.safetensors"
    if examples:
        if accelerator.is_main_process and not cache_path.is_file():  # one process computes, all read
            bar = ctx.progress(total=len(examples), desc="stage 5/5 teacher logits")
            if ctx.teacher is not None:
                cache = ctx.teacher(examples, cfg.top_k, progress=bar)
            else:
                with ctx.model.inference_dtype(ctx.config.infer_dtype):
                    cache = teacher_topk(base, examples, cfg.top_k, ctx.model.batch_size, pad_id, cfg.temperature,
                                         progress=bar)
            bar.close()
            atomic_write_tensors(cache_path, cache)
        accelerator.wait_for_everyone()  # the others read the cache only once it is complete
    cache = load_file(str(cache_path)) if examples else {}

    # LoRA's random initialisation: seeded, so a run resumed in a new process trains the same adapter.
    torch.manual_seed(ctx.config.seed + zlib.crc32(name.encode()))
    peft_model = get_peft_model(base, lora_config(n_layers, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules))
    try:
        facts = _train(ctx, accelerator, peft_model, examples, cache, pad_id, out,
                       get_peft_model_state_dict, set_peft_model_state_dict)
        if cache:  # which teacher pass made the cache (a resumed run keeps the first one's)
            facts["teacher"] = "torch" if f"{examples[0].key}.lse" in cache else "vllm top-k log-probabilities"
        if accelerator.is_main_process:
            with atomic_directory(ctx.run.adapter_path(name)) as tmp:
                accelerator.unwrap_model(peft_model).save_pretrained(tmp)
                # PEFT records where the base weights were loaded from (for the embedded model, this
                # machine's cache); name the model instead, as the manifest does (it also keeps the hash).
                config = json.loads((tmp / "adapter_config.json").read_text())
                config["base_model_name_or_path"] = ctx.model.source["id"]
                if isinstance(config.get("target_modules"), list):  # PEFT writes a set, in hash order
                    config["target_modules"] = sorted(config["target_modules"])
                atomic_write_json(tmp / "adapter_config.json", config)
    finally:
        # Take the LoRA layers out again: the base model object is shared with the caller.
        peft_model.unload()
        base.eval()
    return facts


def _train(ctx, accelerator, peft_model, examples, cache, pad_id, out, get_state, set_state) -> dict:
    cfg = ctx.config.distill
    k, temp = cfg.top_k, cfg.temperature
    if not examples:
        log.warning("stage 5: the distill set is empty (no query where the persona won both orders); "
                    "the adapter stays at its initialisation (a no-op)")
        return {"examples": 0, "trained": False}
    kl_initial = mean_kl(peft_model, examples, cache, pad_id, k, temp, cfg.batch_size)
    log.info("stage 5: %d examples, initial KL %.4f", len(examples), kl_initial)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(list(range(len(examples))), batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(ctx.config.seed),
                                         collate_fn=lambda idx: idx)
    peft_model, opt, loader = accelerator.prepare(peft_model, opt, loader)
    # The schedule counts this process's optimizer steps (its share of the batches), so N processes
    # follow the curve one process follows at the same effective batch; the scheduler stays out of
    # accelerator.prepare, which would step it once per process.
    total_steps = cfg.epochs * math.ceil(len(loader) / cfg.grad_accum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, int(cfg.warmup_ratio * total_steps)))

    ckpt = out / "checkpoint"
    recover_directory(ckpt)  # killed between the two renames of a checkpoint swap
    start_epoch, step = 0, 0
    if (ckpt / "trainer_state.json").is_file():
        set_state(accelerator.unwrap_model(peft_model), load_file(str(ckpt / "adapter.safetensors")))
        meta = load_optimizer(opt, sched, ckpt)
        start_epoch, step = meta["epochs_done"], meta["step"]
        log.info("stage 5: resuming after epoch %d (step %d)", start_epoch, step)
    losses_path = out / "losses.jsonl"
    if accelerator.is_main_process:
        # An epoch's loss is logged before its checkpoint: rows of an epoch that a kill cut short go.
        logged = read_jsonl(losses_path)
        kept = [r for r in logged if r.get("epoch", 0) <= start_epoch]
        if kept != logged:
            atomic_write_text(losses_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    bar = ctx.progress(total=(cfg.epochs - start_epoch) * len(loader), desc="stage 5/5 distill")
    peft_model.train()
    for epoch in range(start_epoch, cfg.epochs):
        random.seed(ctx.config.seed + epoch)
        torch.manual_seed(ctx.config.seed + epoch)  # dropout: a resumed epoch draws what the first try drew
        loader_gen = getattr(loader, "generator", None) or getattr(getattr(loader, "base_dataloader", None),
                                                                    "generator", None)
        if loader_gen is not None:
            loader_gen.manual_seed(ctx.config.seed + epoch)
        epoch_loss, n_batches, t0 = 0.0, 0, time.perf_counter()
        for idx in loader:
            batch = student_batch([examples[i] for i in idx], cache, pad_id, k)
            with accelerator.accumulate(peft_model):
                with accelerator.autocast():
                    logits = batch.logits(peft_model)
                loss = batch.kl(logits, temp)
                if cfg.answer_weight:
                    loss = loss + cfg.answer_weight * batch.answer_nll(logits)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg.grad_clip)
                    step += 1
                opt.step()
                sched.step() if accelerator.sync_gradients else None
                opt.zero_grad()
            epoch_loss += loss.item()
            n_batches += 1
            bar.update(1)
        row = {"epoch": epoch + 1, "step": step, "loss": round(epoch_loss / max(1, n_batches), 5),
               "lr": sched.get_last_lr()[0], "seconds": round(time.perf_counter() - t0, 2)}
        if accelerator.is_main_process:
            append_jsonl(losses_path, [row])
            with atomic_directory(ckpt) as tmp:  # a complete checkpoint exists at every moment
                atomic_write_tensors(tmp / "adapter.safetensors",
                                     {k_: v.detach().cpu() for k_, v in get_state(accelerator.unwrap_model(peft_model)).items()})
                save_optimizer(opt, sched, tmp, {"epochs_done": epoch + 1, "step": step})
        log.info("stage 5: epoch %d/%d loss %.4f", epoch + 1, cfg.epochs, row["loss"])
    bar.close()
    kl_final = mean_kl(peft_model, examples, cache, pad_id, k, temp, cfg.batch_size)
    losses = read_jsonl(losses_path)
    facts = {"examples": len(examples), "trained": True, "kl_initial": round(kl_initial, 5),
             "kl_final": round(kl_final, 5), "epochs": cfg.epochs, "steps": step,
             # what the epoch losses measure: the KL alone, or KL + answer_weight x the answer term
             "loss": f"kl + {cfg.answer_weight:g} x answer" if cfg.answer_weight else "kl",
             "epoch_losses": [r["loss"] for r in losses]}
    return facts
