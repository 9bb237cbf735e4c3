"""Self-distillation of a persona into one LoRA adapter.

Teacher: the base model WITH the persona in context. Student: base model + LoRA WITHOUT it.
Loss: KL(teacher || student) on the response tokens, against the teacher's top-k logits at
temperature T, scaled by T^2; with `distill.answer_weight` also that weight times the
cross-entropy of the response tokens themselves (answers a program check picked, for contexts
with one). Teacher logits are computed once and cached as safetensors.
The LoRA skips decoder layer 0, so the gate's input (layer 0's output) does not depend on it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file

from prism.io import atomic_write_json, atomic_write_tensors
from prism.model.batching import chunked_logits, hidden_states, pad

log = logging.getLogger(__name__)


# ----- the loss (pure) ---------------------------------------------------------------------
def topk_kl(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 2.0,
    teacher_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over masked positions of KL(p_teacher || p_student) * T^2, on the teacher's top-k.

    student_logits (B, L, V); teacher_values / teacher_indices (B, L, K): the teacher's top-k
    logits and their token ids; mask (B, L) marks response positions. Both distributions are
    taken at temperature T over k+1 buckets: the k tokens and "everything else". The teacher's
    "else" mass needs its full log-normaliser `teacher_lse` = logsumexp(logits / T) (B, L);
    without it both sides are renormalised over the k tokens. Either way the loss is exactly 0
    when student and teacher agree.
    """
    t = temperature
    # Only the masked (response) positions enter the loss: select them before the full-vocabulary
    # softmax, which is the memory peak of a training step (B x L x V floats otherwise).
    sel = mask != 0
    m = mask[sel].float()
    if teacher_lse is not None:
        teacher_lse = teacher_lse[sel]
    student_logits, teacher_values, teacher_indices = student_logits[sel], teacher_values[sel], teacher_indices[sel]
    s_logp = torch.log_softmax(student_logits.float() / t, dim=-1).gather(-1, teacher_indices)
    if teacher_lse is None:
        t_logp = torch.log_softmax(teacher_values.float() / t, dim=-1)
        s_logp = s_logp - s_logp.logsumexp(-1, keepdim=True)
    else:
        t_logp = teacher_values.float() / t - teacher_lse.float().unsqueeze(-1)
        t_logp = torch.cat([t_logp, _rest(t_logp)], dim=-1)
        s_logp = torch.cat([s_logp, _rest(s_logp)], dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return (kl * m).sum() / m.sum().clamp(min=1) * (t * t)


def answer_nll(student_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the distilled answer's own tokens: student_logits (B, L, V),
    targets (B, L) the token each position predicts, mask (B, L) the response positions."""
    sel = mask != 0
    return torch.nn.functional.cross_entropy(student_logits[sel].float(), targets[sel])


def _rest(logp: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside the given tokens."""
    covered = logp.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6)
    return torch.log1p(-covered)


# ----- examples ----------------------------------------------------------------------------
@dataclass
class DistillExample:
    key: str
    teacher_ids: list[int]  # persona prompt + response
    student_ids: list[int]  # plain prompt + response
    n_response: int


def build_example(model, key: str, query: str, response: str, persona: str, placement: str,
                  max_seq_len: int) -> DistillExample:
    """Token ids of one example; the response ends with the end-of-turn token so the student
    also learns where the teacher stops, and is cut to fit `max_seq_len`."""
    tok = model.tokenizer
    teacher_prompt = tok(model.user_prompt(query, persona, placement), add_special_tokens=False)["input_ids"]
    student_prompt = tok(model.user_prompt(query), add_special_tokens=False)["input_ids"]
    resp = tok(response, add_special_tokens=False)["input_ids"] + [model.end_of_turn_id]
    room = max_seq_len - max(len(teacher_prompt), len(student_prompt))
    if room < 2:
        raise ValueError(f"{key}: the prompt alone is longer than distill.max_seq_len={max_seq_len}")
    resp = resp[:room]
    return DistillExample(key, teacher_prompt + resp, student_prompt + resp, len(resp))


# ----- teacher cache -----------------------------------------------------------------------
@torch.inference_mode()
def teacher_topk(model, examples: Sequence[DistillExample], k: int, batch_size: int, pad_id: int,
                 temperature: float = 2.0, progress=None) -> dict[str, torch.Tensor]:
    """The teacher's top-k logits at each response position and its log-normaliser at
    temperature T: {key.values, key.indices, key.lse}.

    Batches hold examples of similar length; rows are left-padded so every response ends at the
    last position, and the vocabulary projection runs only for the response positions, a chunk
    at a time."""
    out: dict[str, torch.Tensor] = {}
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].teacher_ids))
    dev = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        part = [examples[i] for i in order[start : start + batch_size]]
        ids, mask, positions = pad([e.teacher_ids for e in part], pad_id)
        hidden = hidden_states(model, ids.to(dev), mask.to(dev), positions.to(dev))
        width = ids.shape[1]
        spans = torch.cat([hidden[row, width - 1 - e.n_response : width - 1] for row, e in enumerate(part)])
        vals, idx, lse = [], [], []
        for _, logits in chunked_logits(model, spans):
            v, i = logits.topk(k, dim=-1)
            vals.append(v)
            idx.append(i)
            lse.append(torch.logsumexp(logits / temperature, dim=-1))
        vals_t, idx_t, lse_t = torch.cat(vals).cpu(), torch.cat(idx).cpu(), torch.cat(lse).cpu()
        at = 0
        for e in part:
            out[f"{e.key}.values"] = vals_t[at : at + e.n_response].contiguous()
            out[f"{e.key}.indices"] = idx_t[at : at + e.n_response].to(torch.int32).contiguous()
            out[f"{e.key}.lse"] = lse_t[at : at + e.n_response].contiguous()
            at += e.n_response
        if progress is not None:
            progress.update(len(part))
    return out


@dataclass
class StudentBatch:
    """Left-padded student inputs, and the teacher's targets for the last `keep` positions (where
    every row's response is predicted; the model projects only those to the vocabulary)."""

    ids: torch.Tensor
    attn: torch.Tensor
    positions: torch.Tensor
    keep: int
    values: torch.Tensor  # (B, keep, K)
    indices: torch.Tensor
    mask: torch.Tensor  # (B, keep): 1 where a position predicts a response token
    lse: torch.Tensor | None  # None: a teacher without its full normaliser (vLLM's); see topk_kl
    targets: torch.Tensor  # (B, keep): the response token each position predicts

    def logits(self, model) -> torch.Tensor:
        dev = next(model.parameters()).device
        return model(input_ids=self.ids.to(dev), attention_mask=self.attn.to(dev),
                     position_ids=self.positions.to(dev), logits_to_keep=self.keep).logits

    def kl(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        dev = logits.device
        return topk_kl(logits, self.values.to(dev), self.indices.to(dev), self.mask.to(dev), temperature,
                       None if self.lse is None else self.lse.to(dev))

    def answer_nll(self, logits: torch.Tensor) -> torch.Tensor:
        return answer_nll(logits, self.targets.to(logits.device), self.mask.to(logits.device))


def student_batch(examples: Sequence[DistillExample], cache: dict[str, torch.Tensor], pad_id: int,
                  k: int) -> StudentBatch:
    """The student's inputs with the teacher targets aligned to the positions that predict each
    response token (the last position predicts beyond the response and is kept but masked)."""
    ids, attn, pos = pad([e.student_ids for e in examples], pad_id)
    keep = max(e.n_response for e in examples) + 1
    b = len(examples)
    values = torch.zeros((b, keep, k), dtype=torch.float32)
    indices = torch.zeros((b, keep, k), dtype=torch.long)
    # A cache without `.lse` entries (a vLLM teacher) has top-k log-probabilities only.
    lse = torch.zeros((b, keep), dtype=torch.float32) if f"{examples[0].key}.lse" in cache else None
    mask = torch.zeros((b, keep), dtype=torch.long)
    for i, e in enumerate(examples):
        span = slice(keep - 1 - e.n_response, keep - 1)
        values[i, span] = cache[f"{e.key}.values"].float()
        indices[i, span] = cache[f"{e.key}.indices"].long()
        if lse is not None:
            lse[i, span] = cache[f"{e.key}.lse"].float()
        mask[i, span] = 1
    # Position j of the kept window predicts the token after it; the last predicts nothing (masked).
    targets = torch.cat([ids[:, ids.shape[1] - keep + 1 :], torch.zeros((b, 1), dtype=ids.dtype)], dim=1)
    return StudentBatch(ids, attn, pos, keep, values, indices, mask, lse, targets.long())


# ----- LoRA ----------------------------------------------------------------------------------
def lora_config(n_layers: int, rank: int, alpha: float, dropout: float, target_modules: Sequence[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
        layers_to_transform=list(range(1, n_layers)),  # never layer 0: the gate reads its output
        layers_pattern="layers", bias="none", task_type="CAUSAL_LM",
    )


def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # cosine decay to 0

    return f


# ----- optimizer state without pickle -----------------------------------------------------
def save_optimizer(opt: torch.optim.Optimizer, sched, path: Path, extra: dict) -> None:
    tensors, meta = {}, {"scalars": {}, "sched": sched.state_dict() if sched else None, **extra}
    for pid, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                meta["scalars"][f"{pid}.{name}"] = value
    meta["param_groups"] = opt.state_dict()["param_groups"]
    atomic_write_tensors(path / "optimizer.safetensors", tensors)
    meta["sched"] = {k: v for k, v in (meta["sched"] or {}).items() if k != "lr_lambdas"}
    atomic_write_json(path / "trainer_state.json", meta)


def load_optimizer(opt: torch.optim.Optimizer, sched, path: Path) -> dict:
    meta = json.loads((path / "trainer_state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if sched is not None and meta.get("sched"):
        sched.load_state_dict({**sched.state_dict(), **meta["sched"]})
    return meta
