"""Stage 1: for each context, the model writes N realistic user queries that context serves; with
`queries.n_general`, also queries on general topics that no context serves (the gate's negatives).

The prompt depends on the kind: a persona is asked for questions its expert answers well (the
paper's prompt); any other context for a question about each of its fact keys in turn (its
`queries` hint, e.g. "a question that I might ask you about my {key}"), with the start of the
question written into the reply (an opener such as "What is my"): measured on the embedded model,
that keeps 50-70% of the questions on the named key, against 10-25% without. Candidates are sampled in batches,
cleaned (first real line, no numbering or quotes), filtered (too short; for a context with facts,
naming none of its fact keys), deduplicated on
normalised text across all sources, and topped up until each has N or the round budget is spent.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

from prism.contexts import Context
from prism.io import append_jsonl, read_jsonl
from prism.records import GENERAL, QueryRecord
from prism.stages.context import StageContext

log = logging.getLogger(__name__)

# Measured on the embedded model: short, concrete instructions work best at 135M parameters.
QUERY_INSTRUCTION = "Write one specific question that a user might ask {description}. Only write the question."
CONTEXT_INSTRUCTION = "Write {queries}. Only write the question."
QUESTION = "Question: "  # the reply starts with this and an opener; the model writes the rest
# General queries in three styles, cycled: users also ask short quiz questions and give tasks, and a
# gate that only saw long questions sent exactly those (held-out trivia, MT-Bench math and
# extraction tasks) to a context. Each style: (instruction, the reply's start, openers).
GENERAL_STYLES = (
    ("Write one specific question that a user might ask an AI assistant about {topic}. Only write the question.",
     QUESTION, None),
    ("Write one short quiz question about {topic} with a one-word answer. Only write the question.",
     QUESTION, ("What", "Who", "Which", "Where", "When", "How many")),
    ("Write one task that a user might give an AI assistant about {topic}: something to write, solve, plan or "
     "explain. Only write the task.", "Task: ", ("Write", "Explain", "Solve", "Create", "Give me", "Plan", "Describe",
                                                 "Compare")),
)
# People ask about themselves with "my" and with "I" alike, and ask general questions in the first
# person too: a gate that only saw "my ..." for the memory learns the word, not the question
# (measured: it routed exactly the held-out memory questions containing "my", 20 of 40).
OPENERS = ("What", "Can you tell me", "How can I", "Do you know", "Tell me", "Which", "How", "What's", "Should I",
           "When", "Where", "Who", "What should I")
MEMORY_OPENERS = ("What is my", "Can you remind me", "Where do I", "What's my", "What do I", "Who is my",
                  "Where did I", "When is my", "Which", "What did I", "Do you remember my", "Tell me my")
GENERAL_TOPICS = (
    "history", "cooking", "space", "sports", "music", "health", "travel", "money", "gardening", "programming",
    "physics", "animals", "films", "language learning", "geography", "chemistry", "art", "fitness", "cars",
    "philosophy", "weather", "mathematics", "photography", "books", "the ocean", "computers", "jobs", "politics",
    "fashion", "games", "biology", "architecture", "energy", "law", "psychology", "farming", "trains", "birds",
)
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


def accept(candidates: list[str], seen: set[str], min_chars: int, need: int,
           on_target=None) -> list[tuple[int, str]]:
    """Clean, filter and deduplicate candidates, keeping at most `need` as (index, text);
    updates `seen`. `on_target(text)`, if given, must also hold."""
    kept = []
    for i, raw in enumerate(candidates):
        if len(kept) >= need:
            break
        text = clean_query(raw)
        key = normalise(text)
        if len(text) < min_chars or not key or key in seen or (on_target is not None and not on_target(text)):
            continue
        seen.add(key)
        kept.append((i, text))
    return kept


def query_prompts(ctx: StageContext, source: Context | None, k: int, offset: int) -> list[tuple[str, str]]:
    """k (prompt, opener) pairs asking for queries of `source` (None: general queries); the reply
    continues the opener. `offset` cycles the fact keys, topics and openers across rounds."""
    if source is not None and source.kind == "persona":
        description = source.description.rstrip(".") or f"an expert in {source.name}"
        instruction = QUERY_INSTRUCTION.format(description=description[0].lower() + description[1:])
        text = ctx.persona_text(source) if ctx.config.queries.persona_in_context else None
        return [(ctx.model.user_prompt(instruction, text, ctx.config.placement), "")] * k
    out = []
    for j in range(offset, offset + k):
        lead = QUESTION
        if source is None:
            instruction, lead, openers = GENERAL_STYLES[j % len(GENERAL_STYLES)]
            instruction, openers = instruction.format(topic=GENERAL_TOPICS[j % len(GENERAL_TOPICS)]), openers or OPENERS
            prompt = ctx.model.user_prompt(instruction)
        else:
            key = source.facts[j % len(source.facts)].key if source.facts else ""
            instruction = CONTEXT_INSTRUCTION.format(queries=source.queries.replace("{key}", key))
            openers = MEMORY_OPENERS if source.kind == "memory" else OPENERS
            text = ctx.persona_text(source) if ctx.config.queries.persona_in_context else None
            prompt = ctx.model.user_prompt(instruction, text, ctx.config.placement)
        cycle = max(1, len(source.facts) if source else len(GENERAL_STYLES))
        opener = openers[(j + j // cycle) % len(openers)]  # each pass over the keys (styles) shifts the openers
        out.append((prompt + lead + opener, opener))
    return out


def on_target(source: Context | None):
    """For a context with facts, a query must name one of its fact keys (Context.fact_for):
    measured on the embedded model, a quarter of a memory's self-written questions named none
    ("Where is Mount Etna?"), and as the memory's examples they taught the gate that any short
    question is about the user. None (no check) for personas, fact-less contexts and general queries."""
    if source is None or source.kind == "persona" or not source.facts:
        return None
    return lambda text: source.fact_for(text) is not None


def join(opener: str, continuation: str) -> str:
    """The opener and the model's continuation of it (which generation returns stripped)."""
    if not opener:
        return continuation
    return opener + ("" if continuation[:1] in (",", ".", "?", "'", "!") else " ") + continuation


def run_queries(ctx: StageContext) -> dict:
    cfg = ctx.config.queries
    path = ctx.run.queries
    rows = [QueryRecord.from_dict(r) for r in read_jsonl(path)]
    have: dict[str, int] = defaultdict(int)
    seen: set[str] = set()
    for r in rows:
        have[r.persona] += 1
        seen.add(normalise(r.text))
    sources: list[tuple[str, Context | None, int]] = [(p.name, p, cfg.n_per_persona) for p in ctx.personas]
    if cfg.n_general:
        sources.append((GENERAL, None, cfg.n_general))
    total_need = sum(max(0, n - have[name]) for name, _, n in sources)
    bar = ctx.progress(total=total_need, desc="stage 1/5 queries")
    for round_no in range(cfg.max_rounds):
        needy = [(name, src, n) for name, src, n in sources if have[name] < n]
        if not needy:
            break
        prompts, owners, openers = [], [], []
        for name, src, n in needy:
            # Oversample: some candidates are dropped by cleaning and dedup (and about half of a
            # facts context's by the on-target check).
            k = (n - have[name]) * (2 if on_target(src) else 1) + 1 + round_no
            pairs = query_prompts(ctx, src, k, have[name] + round_no * 7)
            prompts += [p for p, _ in pairs]
            openers += [o for _, o in pairs]
            owners += [name] * k
        seed = ctx.config.seed * 100_003 + (len(rows) * 101 + round_no) * 10_000  # disjoint per round
        gens = ctx.model.generate(prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed=seed)
        new_rows = []
        for name, src, n in needy:
            mine = [(join(op, g.text), g) for g, o, op in zip(gens, owners, openers) if o == name]
            for i, text in accept([t for t, _ in mine], seen, cfg.min_chars, n - have[name], on_target(src)):
                have[name] += 1
                prefix = "general" if name == GENERAL else name
                new_rows.append(QueryRecord(id=f"{prefix}-{have[name]:04d}", persona=name, text=text,
                                            n_tokens=mine[i][1].n_tokens))
        append_jsonl(path, (r.to_dict() for r in new_rows))
        rows += new_rows
        bar.update(len(new_rows))
    bar.close()
    short = {name: have[name] for name, _, n in sources if have[name] < n}
    if short:
        log.warning("stage 1: after %d rounds these sources have fewer queries than asked: %s", cfg.max_rounds, short)
    return {"count": len(rows), "per_persona": {name: have[name] for name, _, _ in sources}, "short": short}
