"""Stage 1: for each persona, the model writes N realistic user queries that persona answers well.

Candidates are sampled in batches, cleaned (first real line, no numbering or quotes), filtered
(too short), deduplicated on normalised text across all personas, and topped up until each
persona has N or the round budget is spent.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

from prism.io import append_jsonl, read_jsonl
from prism.personas import Persona
from prism.records import QueryRecord
from prism.stages.context import StageContext

log = logging.getLogger(__name__)

# Measured on the embedded model: short, concrete instructions work best at 135M parameters.
QUERY_INSTRUCTION = "Write one specific question that a user might ask {description}. Only write the question."
_NUMBERING = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d{1,3}[.):\]]|#+|q\d*[.:)]|question\s*\d*\s*[:.)-])\s*", re.I)
_PREAMBLE = re.compile(r"^(sure|certainly|of course|here(?:'s| is| are)|okay|ok)\b", re.I)
_QUOTES = "\"'\u201c\u201d\u2018\u2019`"
_LEAD_IN = re.compile(r"^[A-Za-z][\w ,'-]{0,40}:\s+")  # "A user might ask: ...", "Friend: ..."
_QUOTED = re.compile(r"[\"\u201c]([^\"\u201c\u201d]{10,})[\"\u201d]?")


def clean_query(raw: str) -> str:
    """The query in a raw generation: its first real line without numbering, labels, quotes
    or markdown emphasis. Returns '' when there is none."""
    for line in raw.splitlines():
        line = line.strip()
        if not line:
            continue
        # Preamble lines ("Sure! Here is a question:") introduce the query on the next line.
        if line.endswith(":") or (_PREAMBLE.match(line) and len(line) < 60 and not line.endswith("?")):
            continue
        for _ in range(3):  # labels can stack: "1. **Question:** ..."
            line = line.replace("**", "").replace("__", "").strip()
            line = _NUMBERING.sub("", line).strip()
        line = _LEAD_IN.sub("", line, count=1)
        quoted = _QUOTED.search(line)
        if quoted and (quoted.start() > 0 or "?" in quoted.group(1)):
            line = quoted.group(1)  # 'One might ask: "How ...?" and then' -> 'How ...?'
        if "?" in line:  # keep the sentence holding the first question mark, nothing after it
            head = line[: line.index("?") + 1]
            line = re.split(r"(?<=[.!])\s+", head)[-1]
        line = line.strip(_QUOTES).strip()
        return " ".join(line.split())
    return ""


def normalise(text: str) -> str:
    """Key for deduplication: lowercase words only."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def accept(candidates: list[str], seen: set[str], min_chars: int, need: int) -> list[tuple[int, str]]:
    """Clean, filter and deduplicate candidates, keeping at most `need` as (index, text);
    updates `seen`."""
    kept = []
    for i, raw in enumerate(candidates):
        if len(kept) >= need:
            break
        text = clean_query(raw)
        key = normalise(text)
        if len(text) < min_chars or not key or key in seen:
            continue
        seen.add(key)
        kept.append((i, text))
    return kept


def query_prompt(ctx: StageContext, persona: Persona) -> str:
    description = persona.description.rstrip(".") or f"an expert in {persona.name}"
    instruction = QUERY_INSTRUCTION.format(description=description[0].lower() + description[1:])
    persona_text = ctx.persona_text(persona) if ctx.config.queries.persona_in_context else None
    return ctx.model.user_prompt(instruction, persona_text, ctx.config.placement)


def run_queries(ctx: StageContext) -> dict:
    cfg = ctx.config.queries
    path = ctx.run.queries
    rows = [QueryRecord.from_dict(r) for r in read_jsonl(path)]
    have: dict[str, int] = defaultdict(int)
    seen: set[str] = set()
    for r in rows:
        have[r.persona] += 1
        seen.add(normalise(r.text))
    target = cfg.n_per_persona
    total_need = sum(max(0, target - have[p.name]) for p in ctx.personas)
    bar = ctx.progress(total=total_need, desc="stage 1/5 queries")
    for round_no in range(cfg.max_rounds):
        needy = [p for p in ctx.personas if have[p.name] < target]
        if not needy:
            break
        prompts, owners = [], []
        for p in needy:
            # Oversample: some candidates are dropped by cleaning and dedup.
            k = target - have[p.name] + 1 + round_no
            prompts += [query_prompt(ctx, p)] * k
            owners += [p.name] * k
        seed = ctx.config.seed * 100_003 + (len(rows) * 101 + round_no) * 10_000  # disjoint per round
        gens = ctx.model.generate(prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed=seed)
        new_rows = []
        for p in needy:
            mine = [g for g, o in zip(gens, owners) if o == p.name]
            for i, text in accept([g.text for g in mine], seen, cfg.min_chars, target - have[p.name]):
                have[p.name] += 1
                new_rows.append(QueryRecord(id=f"{p.name}-{have[p.name]:04d}", persona=p.name,
                                            text=text, n_tokens=mine[i].n_tokens))
        append_jsonl(path, (r.to_dict() for r in new_rows))
        rows += new_rows
        bar.update(len(new_rows))
    bar.close()
    short = {p.name: have[p.name] for p in ctx.personas if have[p.name] < target}
    if short:
        log.warning("stage 1: after %d rounds these personas have fewer than %d queries: %s",
                    cfg.max_rounds, target, short)
    return {"count": len(rows), "per_persona": {p.name: have[p.name] for p in ctx.personas}, "short": short}
