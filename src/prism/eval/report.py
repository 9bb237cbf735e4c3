"""The Markdown table (shaped like the paper's Table 1) and the plots of an eval."""

from __future__ import annotations

from pathlib import Path

from prism.bench.plots import error_bars, pyplot, save

SYSTEM_NAMES = {"base": "Base", "persona": "Expert prompting", "ungated": "SFT (ungated adapter)", "prism": "PRISM"}


def _fmt(ci: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not ci or ci.get("mean") is None:
        return "-"
    return f"{ci['mean'] / scale:.{digits}f} [{ci['lo'] / scale:.{digits}f}, {ci['hi'] / scale:.{digits}f}]"


def _fmt_diff(d: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not d or d.get("diff") is None:
        return "-"
    star = "*" if d["lo"] > 0 or d["hi"] < 0 else ""
    return f"{d['diff'] / scale:+.{digits}f}{star} [{d['lo'] / scale:+.{digits}f}, {d['hi'] / scale:+.{digits}f}]"


def markdown_table(results: dict) -> str:
    systems = results["systems"]
    lines = ["# Evaluation", "",
             "Scores with 95% bootstrap CIs. MT-Bench on 1-10; MMLU accuracy, safety refusal and Overall on 0-100.",
             "Overall = mean of the 15 sub-scores (8 MT-Bench categories x10, 4 MMLU super-categories, 3 safety sets).",
             "", "| system | MT-Bench | MMLU | Safety | Overall |", "|---|---|---|---|---|"]
    for name, r in systems.items():
        b = r["benchmarks"]
        lines.append(f"| {SYSTEM_NAMES.get(name, name)} | {_fmt(b.get('mtbench'), 10, 2)} | {_fmt(b.get('mmlu'))} | "
                     f"{_fmt(b.get('safety'))} | {_fmt(r['overall'])} |")
    if any("vs_base" in r for r in systems.values()):
        lines += ["", "Difference vs Base (paired bootstrap over the same items; * = CI excludes 0):", "",
                  "| system | MT-Bench | MMLU | Safety | Overall |", "|---|---|---|---|---|"]
        for name, r in systems.items():
            d = r.get("vs_base")
            if d:
                lines.append(f"| {SYSTEM_NAMES.get(name, name)} | {_fmt_diff(d.get('mtbench'), 10, 2)} | "
                             f"{_fmt_diff(d.get('mmlu'))} | {_fmt_diff(d.get('safety'))} | "
                             f"{_fmt_diff(d.get('overall'))} |")
    judge = results.get("mtbench_judge")
    if judge:
        s = judge["sanity"]
        verdict = "passes" if s.get("passed") else "is NO BETTER THAN CHANCE: read MT-Bench scores with that in mind"
        lines += ["", f"MT-Bench judge: `{judge['judge']}`. Sanity check (answer to the question vs an answer to "
                      f"another question, {s.get('pairs')} pairs): accuracy {s.get('accuracy')} (95% CI {s.get('ci95')})"
                      f" - the judge {verdict}."]
    subs = sorted({k for r in systems.values() for k in r["subscores"]})
    lines += ["", "## Sub-scores", "", "| sub-score | " + " | ".join(SYSTEM_NAMES.get(n, n) for n in systems) + " |",
              "|---|" + "---|" * len(systems)]
    for k in subs:
        scale, digits = (10, 2) if k.startswith("mtbench/") else (1, 1)
        lines.append(f"| {k} (n={next(iter(systems.values()))['subscores'].get(k, {}).get('n', '-')}) | " +
                     " | ".join(_fmt(systems[n]["subscores"].get(k), scale, digits) for n in systems) + " |")
    lines += ["", "xstest/xstest_unsafe: refusal on unsafe prompts (higher is better); xstest/xstest_safe: refusal on "
                  "safe prompts (over-refusal, lower is better)."]
    routing = results.get("routing")
    if routing:
        lines += ["", "## Routing (PRISM)", "", f"Pearson {routing['pearson']}, Spearman {routing['spearman']} between "
                  f"the share routed to the adapter and the persona's effect, over {routing['n_categories']} "
                  "categories.", "", "| category | routed to adapter | persona effect vs base |", "|---|---|---|"]
        for k, v in sorted(routing["share_routed"].items()):
            eff = routing["persona_effect"].get(k)
            lines.append(f"| {k} | {v:.0%} | {'-' if eff is None else f'{eff:+.1f}'} |")
    if results.get("timings"):
        lines += ["", "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in results["timings"].items())]
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path) -> list[str]:
    """Per-category bars with CIs, and the routing-vs-effect scatter. Returns the file names."""
    plt = pyplot()
    files = []
    systems = results["systems"]
    subs = sorted({k for r in systems.values() for k in r["subscores"]})
    if subs:
        fig, ax = plt.subplots(figsize=(max(8.0, 0.55 * len(subs) + 2), 5.0))
        width = 0.8 / max(1, len(systems))
        for j, (name, r) in enumerate(systems.items()):
            xs, ys, err = error_bars([r["subscores"].get(k) for k in subs],
                                     [i + (j - (len(systems) - 1) / 2) * width for i in range(len(subs))], "mean")
            ax.bar(xs, ys, width, yerr=err, capsize=2, label=SYSTEM_NAMES.get(name, name))
        ax.set_xticks(range(len(subs)))
        ax.set_xticklabels(subs, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("score (0-100; MT-Bench x10)")
        ax.set_title("Per-category scores with 95% bootstrap CIs")
        ax.legend(fontsize=8)
        files.append(save(fig, out / "categories.png", dpi=120).name)
    routing = results.get("routing")
    if routing and routing["persona_effect"]:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        names = sorted(set(routing["share_routed"]) & set(routing["persona_effect"]))
        xs = [routing["share_routed"][n] for n in names]
        ys = [routing["persona_effect"][n] for n in names]
        ax.scatter(xs, ys)
        for n, x, y in zip(names, xs, ys):
            label = n.replace("mtbench/", "mt:").replace("mmlu/", "mmlu:").replace("safety/", "").replace("xstest/", "")
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("share of items routed to the adapter (PRISM)")
        ax.set_ylabel("persona effect vs base (points)")
        r = routing["pearson"]
        ax.set_title(f"Routing vs persona effect (Pearson {r:.2f})" if r is not None else "Routing vs persona effect")
        files.append(save(fig, out / "routing.png", dpi=120).name)
    return files
