"""`prism eval RUN --suite contexts`: does the gate earn its place for contexts a program can check?

Held-out questions written for prism (bench/suites/contexts_questions.yaml; the pipeline never
sees them): questions about each of the run's contexts (the answer must state the fact the
question asks about) and general questions (MT-Bench first turns and simple factual questions)
that no context serves. Systems, all greedy:

  base      the model alone
  prompted  the contexts in the system prompt (for a user's question, that user's memory)
  always_on the adapter on for every question (runs with one adapter)
  prism     the gate decides; a question of a user names that user's context
  oracle    each question routed to its own context's adapter, general ones to the base model

Metrics, each with a 95% bootstrap CI: recall per context; on general questions the share
answered exactly as the base model answers, the share that leaks a context's facts and the
accuracy on the checkable ones; routing accuracy per gate class; prompt tokens saved per request
and time to first token against the prompted model, for each context and a 2,000-token tool
registry (bench/suites: the contexts folder's tool_registry).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import yaml

from prism.bench.data import Item, load_mt_bench
from prism.bench.scoring import Cell, Scorer
from prism.bench.stats import mean_ci, paired_diff_ci
from prism.bench.suites import suite_questions
from prism.contexts import Context, ContextRegistry
from prism.gate import BASE
from prism.io import atomic_write_json, atomic_write_text
from prism.judging.verifiers import leaked_facts, states

log = logging.getLogger(__name__)
GENERAL = "general"


def suite_items(contexts: dict[str, Context], data_dir: str, n_mtbench: int, seed: int,
                limit: int | None = None) -> list[Item]:
    """The held-out questions of the run's contexts, then the general questions (at most `limit`
    per context and of the factual ones)."""
    raw = yaml.safe_load(suite_questions("contexts").read_text())
    items = []
    for name, context in contexts.items():
        for i, q in enumerate(raw.get(name, [])[:limit]):
            fact = next((f for f in context.facts if f.key == q["key"]), None)
            if fact is None:
                raise ValueError(f"suite question {q['q']!r} names key {q['key']!r}, which {name} does not have")
            items.append(Item(f"{name}-{i}", name, name, [q["q"]], reference=list(fact.match)))
    for i, q in enumerate(raw["general"][:limit]):
        items.append(Item(f"fact-{i}", GENERAL, "factual", [q["q"]], reference=[str(a) for a in q["answer"]]))
    for it in load_mt_bench(data_dir, n_mtbench, seed):
        items.append(Item(f"gen-{it.id}", GENERAL, "mtbench", [it.turns[0]]))
    return items


class ContextSuite:
    def __init__(self, prism, registry: ContextRegistry, run_contexts: list[str], out: str | Path,
                 data_dir: str, max_new_tokens: int = 48, n_mtbench: int = 40, seed: int = 0, n_boot: int = 2000,
                 quiet: bool = False, limit: int | None = None):
        self.prism = prism
        self.model = prism.model
        self.contexts = {n: registry.get(n) for n in run_contexts}
        self.registry = registry
        self.out = Path(out)
        self.items = suite_items(self.contexts, data_dir, n_mtbench, seed, limit)
        self.timing = (1, 2) if limit else (5, 8)  # (repeats, questions) of the TTFT medians; a limited run is a smoke test
        self.max_new_tokens, self.seed, self.n_boot = max_new_tokens, seed, n_boot
        key = json.dumps({**self.model.source, "dtype": self.model.dtype_name}, sort_keys=True, default=str)
        variant = "adapter:" + str(prism.run_dir.resolve() if prism.run_dir else "") + f"|{prism.created}"
        self.scorer = Scorer(self.model, self.out, key, quiet, prism, variant)

    # ----- systems: one cell per item --------------------------------------------------------
    def user_context(self, item: Item) -> str | None:
        """The context a question's user names: its own context for a context's question, else
        the first member of each shared class (a general question's user is the first user)."""
        return item.benchmark if item.benchmark != GENERAL else None

    def prompt_text(self, item: Item) -> str:
        """The system prompt of the prompted system: one context per gate class, the user's own."""
        chosen = []
        for members in self.prism.members.values():
            present = [m for m in members if m in self.contexts]
            if present:
                own = self.user_context(item)
                chosen.append(own if own in present else present[0])
        return "\n\n".join(self.contexts[n].text() for n in chosen)

    def cells(self, system: str) -> list[Cell]:
        own = [self.user_context(it) for it in self.items]
        if system == "base":
            routes = [None] * len(self.items)
        elif system == "prompted":
            return [Cell(it, self.prompt_text(it), "system", None) for it in self.items]
        elif system == "always_on":
            routes = [{"adapter": self.prism.only_adapter(), "score": None}] * len(self.items)
        elif system == "oracle":
            routes = [{"adapter": o, "score": None} for o in own]
        else:  # prism: a user's question names its context within a shared class
            named = [o if o and len(self.prism.members[self.prism.class_of(o)]) > 1 else None for o in own]
            found = self.prism.route([[{"role": "user", "content": it.turns[0]}] for it in self.items], named)
            # the class the gate chose: for a class of several contexts and no name, that class (the base model answers)
            routes = [{"adapter": r.adapter, "score": r.probability, "class": r.gate_class} for r in found]
        return [Cell(it, None, "system", r) for it, r in zip(self.items, routes)]

    # ----- scoring ------------------------------------------------------------------------------
    def run(self) -> dict:
        systems = ["base", "prompted", *(["always_on"] if len(self.prism.adapters) == 1 else []), "prism", "oracle"]
        replies = {s: self.scorer.replies(self.cells(s), [[{"role": "user", "content": it.turns[0]}]
                                                         for it in self.items], self.max_new_tokens, f"suite {s}")
                   for s in systems}
        routes = {s: [c.route for c in self.cells(s)] for s in ("prism",)}
        results = {"systems": {}, "items": len(self.items), "contexts": list(self.contexts),
                   "classes": self.prism.gate.spec.classes, "members": self.prism.members,
                   "gate_rule": "constant " + str(self.prism.gate.spec.constant) if self.prism.gate.spec.constant else "gate"}
        base_text = [r["text"] for r in replies["base"]]
        for s in systems:
            texts = [r["text"] for r in replies[s]]
            results["systems"][s] = self.metrics(texts, base_text)
        for s in systems[1:]:
            results["systems"][s]["recall_vs_base"] = {
                name: paired_diff_ci(*self._recall_pair(name, [r["text"] for r in replies[s]], base_text),
                                     self.n_boot, self.seed) for name in self.contexts}
        results["routing"] = self.routing(routes["prism"])
        results["cost"] = self.cost(*self.timing)
        results["samples"] = {s: [{"q": it.turns[0], "a": r["text"][:160]} for it, r in zip(self.items, replies[s])][::9]
                              for s in systems}
        results.update(suite="contexts", out=str(self.out))
        atomic_write_json(self.out / "suite.json", results)
        atomic_write_text(self.out / "suite.md", table(results))
        return results

    def _recall_pair(self, name, texts, base_text):
        idx = [i for i, it in enumerate(self.items) if it.benchmark == name]
        return ([float(states(texts[i], self.items[i].reference)) for i in idx],
                [float(states(base_text[i], self.items[i].reference)) for i in idx])

    def metrics(self, texts: list[str], base_text: list[str]) -> dict:
        nb, seed = self.n_boot, self.seed
        out: dict = {"recall": {}}
        for name in self.contexts:
            hits = [float(states(t, it.reference)) for t, it in zip(texts, self.items) if it.benchmark == name]
            out["recall"][name] = mean_ci(hits, nb, seed)
        general = [(t, b, it) for t, b, it in zip(texts, base_text, self.items) if it.benchmark == GENERAL]
        out["general_as_base"] = mean_ci([float(t == b) for t, b, _ in general], nb, seed)
        out["general_leak"] = mean_ci([float(any(leaked_facts(t, c) for c in self.contexts.values()))
                                       for t, _, _ in general], nb, seed)
        out["factual_accuracy"] = mean_ci([float(states(t, it.reference)) for t, _, it in general
                                           if it.category == "factual"], nb, seed)
        return out

    def routing(self, routes: list[dict]) -> dict:
        """Share of each class's held-out questions the gate sends to that class."""
        by_class: dict[str, list[float]] = {}
        for it, r in zip(self.items, routes):
            truth = BASE if it.benchmark == GENERAL else self.prism.class_of(it.benchmark)
            by_class.setdefault(truth, []).append(float(r["class"] == truth))
        return {c: mean_ci(v, self.n_boot, self.seed) for c, v in by_class.items()}

    def cost(self, repeats: int = 5, n: int = 8) -> dict:
        """Prompt tokens per request and time to first token (one request at a time, median of
        `repeats`): each context (and the tool registry) in the prompt, against PRISM's routed
        request without it (the gate's layer-0 pass included)."""
        registry = ContextRegistry.load("suite:contexts").get("tool_registry")
        questions = [it.turns[0] for it in self.items if it.benchmark != GENERAL][:n] or ["Hello?"]
        out = {}
        for name, text in [*((n_, c.text()) for n_, c in self.contexts.items()), ("tool_registry", registry.text())]:
            prompted = [self.model.user_prompt(q, text) for q in questions]
            plain = [self.model.user_prompt(q) for q in questions]
            t_prompted = self._ttft(prompted, repeats)
            t_prism = self._ttft(plain, repeats, route=True)
            tok_p = statistics.mean(len(self.model.token_ids(p)) for p in prompted)
            tok_r = statistics.mean(len(self.model.token_ids(p)) for p in plain)
            out[name] = {"context_tokens": len(self.model.token_ids(text)), "prompt_tokens_prompted": round(tok_p, 1),
                         "prompt_tokens_prism": round(tok_r, 1), "tokens_saved": round(tok_p - tok_r, 1),
                         "ttft_prompted_ms": round(1000 * t_prompted, 2), "ttft_prism_ms": round(1000 * t_prism, 2),
                         "ttft_ratio": round(t_prompted / t_prism, 3)}
        return out

    def _ttft(self, prompts: list[str], repeats: int, route: bool = False) -> float:
        times = []
        for _ in range(repeats):
            for p in prompts:
                t0 = time.perf_counter()
                if route:
                    self.prism.route_prompts([p])
                self.model.generate([p], 1)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def _ci(c: dict | None, pct: bool = True) -> str:
    if not c or c.get("mean") is None:
        return "-"
    f = 100 if pct else 1
    return f"{f * c['mean']:.1f} [{f * c['lo']:.1f}, {f * c['hi']:.1f}]"


def table(r: dict) -> str:
    systems = r["systems"]
    names = r["contexts"]
    lines = ["# Context suite", "", f"{r['items']} held-out questions; gate rule: {r['gate_rule']}. "
             "Percentages with 95% bootstrap CIs.", "",
             "| system | " + " | ".join(f"recall {n}" for n in names) + " | general: as base | general: leaks | factual acc. |",
             "|---|" + "---|" * (len(names) + 3)]
    for s, m in systems.items():
        lines.append(f"| {s} | " + " | ".join(_ci(m["recall"][n]) for n in names) +
                     f" | {_ci(m['general_as_base'])} | {_ci(m['general_leak'])} | {_ci(m['factual_accuracy'])} |")
    lines += ["", "Routing accuracy of the gate on held-out questions, per class:", "",
              "| class | routed to it |", "|---|---|"]
    lines += [f"| {c} | {_ci(v)} |" for c, v in r["routing"].items()]
    lines += ["", "Cost of the context in the prompt vs PRISM (one request at a time, medians):", "",
              "| context | context tokens | tokens saved per request | TTFT prompted (ms) | TTFT PRISM (ms) | ratio |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {c['context_tokens']} | {c['tokens_saved']} | {c['ttft_prompted_ms']} | {c['ttft_prism_ms']} | "
              f"{c['ttft_ratio']} |" for n, c in r["cost"].items()]
    return "\n".join(lines) + "\n"
