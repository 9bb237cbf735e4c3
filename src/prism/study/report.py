"""The study's figures (PNG), findings.md (plain sentences from the numbers) and one
self-contained HTML report (figures inlined, no external files or scripts)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from prism.bench.plots import error_bars, pyplot, save
from prism.study.analysis import BENCH_NAMES, significant

POINTS = "points on 0-100 (MT-Bench rating x10, MMLU accuracy, refusal rate)"


def _fmt(ci: dict | None, digits: int = 1) -> str:
    if not ci or ci.get("diff") is None:
        return "-"
    star = "*" if significant(ci) else ""
    return f"{ci['diff']:+.{digits}f}{star} [{ci['lo']:+.{digits}f}, {ci['hi']:+.{digits}f}]"


def _fmt_mean(ci: dict | None) -> str:
    if not ci or ci.get("mean") is None:
        return "-"
    return f"{ci['mean']:.1f} [{ci['lo']:.1f}, {ci['hi']:.1f}]"


# ----- figures ----------------------------------------------------------------------------------
def heatmap_figure(a: dict, path: Path) -> Path:
    """Figure 2a: persona (rows) x task (columns), change vs no persona, * where the CI excludes 0."""
    import numpy as np

    plt = pyplot()
    personas, subs = list(a["heatmap"]), a["subs"]
    rows = personas + [r for r in ("random",) if any(v["random_vs_none"] for v in a["expert"].values())]
    grid = np.full((len(rows), len(subs)), np.nan)
    cis: dict[tuple[int, int], dict] = {}
    for i, p in enumerate(rows):
        for j, sub in enumerate(subs):
            ci = a["heatmap"][p][sub] if p in a["heatmap"] else a["expert"][sub]["random_vs_none"]
            if ci and ci.get("diff") is not None:
                grid[i, j] = ci["diff"]
                cis[(i, j)] = ci
    finite = np.abs(grid[np.isfinite(grid)])
    vmax = max(5.0, float(np.ceil(finite.max() / 5) * 5)) if finite.size else 5.0
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(subs), 1.6 + 0.42 * len(rows)))
    im = ax.imshow(grid, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    for (i, j), ci in cis.items():
        star = "*" if significant(ci) else ""
        ax.text(j, i, f"{round(ci['diff']):+d}{star}", ha="center", va="center", fontsize=7.5,
                color="white" if abs(ci["diff"]) > 0.6 * vmax else "black",
                fontweight="bold" if star else "normal")
    for j, sub in enumerate(subs):  # outline the matched expert of each task
        p = a["matched_persona"].get(sub)
        if p in rows:
            i = rows.index(p)
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.8))
    ax.set_xticks(range(len(subs)), [s.split("/", 1)[1] for s in subs], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [r if r != "random" else "random (control)" for r in rows], fontsize=8)
    # benchmark group separators and names on top
    start = 0
    for j in range(1, len(subs) + 1):
        if j == len(subs) or subs[j].split("/")[0] != subs[start].split("/")[0]:
            if j < len(subs):
                ax.axvline(j - 0.5, color="black", linewidth=1.2)
            ax.text((start + j - 1) / 2, -0.8, BENCH_NAMES.get(subs[start].split("/")[0], subs[start].split("/")[0]),
                    ha="center", va="bottom", fontsize=9, fontweight="bold")
            start = j
    ref = a["reference"]
    ax.set_title(f"{a['model']}\nchange vs no persona ({ref['length']} persona, {ref['placement']} turn); "
                 "box = matched expert; * = significant", fontsize=9, pad=22)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02).set_label("points (0-100 scale)", fontsize=8)
    return save(fig, path)


def expert_figure(a: dict, path: Path) -> Path:
    """Figure 2b/c: matched expert vs no persona and vs a random persona, per task, with CIs."""
    plt = pyplot()
    subs = a["subs"]
    series = [("vs_none", "matched expert - no persona", "#1f77b4", -0.18),
              ("vs_random", "matched expert - random persona", "#ff7f0e", 0.18)]
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.34 * len(subs)))
    for key, name, colour, offset in series:
        ys, xs, err = error_bars([a["expert"][sub][key] for sub in subs], [k + offset for k in range(len(subs))])
        if xs:
            ax.errorbar(xs, ys, xerr=err, fmt="o", color=colour, label=name, capsize=2, markersize=4)
    ax.axvline(0, color="grey", linewidth=1)
    ax.set_yticks(range(len(subs)), [f"{s}  ({a['matched_persona'].get(s)})" for s in subs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("difference, points (0-100 scale), 95% paired bootstrap CI")
    ref = a["reference"]
    ax.set_title(f"{a['model']}: does the matched expert help? ({ref['length']}, {ref['placement']})", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(fontsize=8, loc="lower center", ncol=2, frameon=False)
    return save(fig, path, rect=(0, 0.05, 1, 1))


def length_placement_figure(a: dict, lengths: list[str], placements: list[str], path: Path) -> Path:
    """Figure 1a-c: matched expert vs no persona per benchmark, by persona length and placement."""
    plt = pyplot()
    benches = [b for b in a["length_placement"] if a["length_placement"][b]]
    fig, axes = plt.subplots(1, len(benches), figsize=(4.2 * len(benches), 3.6), squeeze=False)
    width = 0.8 / max(1, len(placements))
    colours = {"system": "#2a9d8f", "user": "#e76f51"}
    for ax, b in zip(axes[0], benches):
        cells = a["length_placement"][b]
        for k, P in enumerate(placements):
            xs, ys, err = error_bars([cells.get(f"{L}/{P}") for L in lengths],
                                     [i + (k - (len(placements) - 1) / 2) * width for i in range(len(lengths))])
            ax.bar(xs, ys, width, yerr=err, capsize=3, color=colours.get(P), label=f"{P} turn")
        ax.axhline(0, color="grey", linewidth=1)
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_xlabel("persona length")
        ax.set_title(f"{BENCH_NAMES[b]} (n={a['n_items'][b]})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("matched expert - no persona (points)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(placements), frameon=False)
    fig.suptitle(f"{a['model']}: persona length and placement (95% CI)", fontsize=10)
    return save(fig, path, rect=(0, 0.07, 1, 1))


def models_figure(summary: dict, path: Path) -> Path:
    """Figure 1d: model x benchmark, matched expert vs no persona."""
    import numpy as np

    plt = pyplot()
    models = list(summary)
    benches = [b for b in BENCH_NAMES if any(b in summary[m] for m in models)]
    grid = np.array([[summary[m].get(b, {}).get("diff") or np.nan for b in benches] for m in models], dtype=float)
    finite = np.abs(grid[np.isfinite(grid)])
    vmax = max(5.0, 1.25 * float(finite.max())) if finite.size else 5.0
    fig, ax = plt.subplots(figsize=(3.0 + 2.2 * len(benches), 1.4 + 0.55 * len(models)))
    im = ax.imshow(grid, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    for i, m in enumerate(models):
        for j, b in enumerate(benches):
            ci = summary[m].get(b)
            if ci and ci.get("diff") is not None:
                ax.text(j, i, _fmt(ci), ha="center", va="center", fontsize=8,
                        color="white" if abs(ci["diff"]) > 0.6 * vmax else "black")
    ax.set_xticks(range(len(benches)), [BENCH_NAMES[b] for b in benches])
    ax.set_yticks(range(len(models)), models)
    ax.set_title("matched expert - no persona, by model\n(points on 0-100, 95% CI; * = significant)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    return save(fig, path)


# ----- findings ---------------------------------------------------------------------------------
def sentence(t: dict) -> str:
    mt = t["what"].startswith(("MT-Bench", "mtbench/", "mtbench:"))
    extra = f"; {t['diff'] / 10:+.2f} on MT-Bench's 1-10 scale" if mt else ""
    verdict = ("significant after the false-discovery correction" if t.get("significant_fdr")
               else "CI excludes 0, but not after the false-discovery correction" if t["significant"]
               else "not significant")
    return (f"{t['what']}: {t['diff']:+.1f} points (95% CI {t['lo']:+.1f} to {t['hi']:+.1f}, n={t['n']}{extra}); "
            f"{verdict}.")


HEADLINE_FAMILIES = ("expert vs none", "expert vs random", "random vs none")


def _family_summary(tests: list[dict], title: str) -> list[str]:
    """Significant effects of a family as sentences; the rest as a count and the largest of them."""
    if not tests:
        return []
    sig = [t for t in tests if t["significant"]]
    lines = ["", f"## {title}", "",
             f"{len(sig)} of {len(tests)} effects are significant (about {0.05 * len(tests):.0f} would be by chance)."]
    lines += [f"- {sentence(t)}" for t in sorted(sig, key=lambda t: -abs(t["diff"]))]
    rest = [t for t in tests if not t["significant"]]
    if rest:
        big = max(rest, key=lambda t: abs(t["diff"]))
        lines.append(f"- The largest of the other {len(rest)}: {sentence(big)}")
    return lines


def findings_markdown(tests: list[dict], analyses: list[dict], cfg) -> str:
    lines = ["# Findings", "",
             f"Every number is a paired difference over the same items, in {POINTS}, with a 95% bootstrap CI "
             f"({cfg.n_boot} resamples). An effect counts as significant when its CI excludes 0 and a sign-flip "
             f"permutation test agrees (p < 0.05). Because {len(tests)} effects are tested, a few would pass that "
             "bar by chance alone, so each is also checked with Benjamini-Hochberg at a 5% false-discovery rate.", ""]
    for a in analyses:
        s = a.get("judge_sanity")
        if s and s.get("accuracy") is not None:
            lines.append(f"- MT-Bench judge for {a['model']}: {s['judge']} rated an answer above an answer to another "
                         f"question in {s['accuracy']:.0%} of {s['pairs']} pairs (95% CI {s['ci95'][0]:.0%}-"
                         f"{s['ci95'][1]:.0%}). " + ("It tells answers apart." if s.get("passed") else
                                                     "That is no better than chance: MT-Bench effects here measure "
                                                     "the judge's noise, not answer quality."))
        if a.get("supports_system_role") is False:
            lines.append(f"- {a['model']} has no system role: 'system' placements fell back to the user turn, so "
                         "the placement contrasts are zero by construction.")
        lines.append(f"- {a['model']}: items per benchmark " +
                     ", ".join(f"{BENCH_NAMES[b]} {n}" for b, n in a["n_items"].items()) + ".")
    sig = [t for t in tests if t["significant"]]
    lines += ["", "## Summary", "",
              f"{len(sig)} of {len(tests)} effects are significant; {sum(t['significant_fdr'] for t in tests)} survive "
              "the false-discovery correction." + ("" if sig else " Nothing in this study distinguishes a persona "
                                                  "from no persona at this sample size.")]
    lines += ["", "## Does the matched expert help, and is it the expertise?", ""]
    lines += [f"- {sentence(t)}" for t in tests if t["family"] in HEADLINE_FAMILIES]
    lines += _family_summary([t for t in tests if t["family"] == "length/placement"],
                             "Context length and placement (matched expert vs no persona)")
    lines += _family_summary([t for t in tests if t["family"] == "contrast"],
                             "Length and placement contrasts (matched expert against itself)")
    lines += _family_summary([t for t in tests if t["family"].endswith("(category)")],
                             "Per task category (matched expert vs no persona and vs a random persona)")
    lines += _family_summary([t for t in tests if t["family"] == "persona x task"], "Context x task heatmap")
    return "\n".join(lines) + "\n"


# ----- HTML -------------------------------------------------------------------------------------
def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.85em;margin:.8em 0}td,th{border:1px solid #ddd;padding:.25em .5em;
text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}
figcaption{font-size:.85em;color:#555}.warn{background:#fff3cd;border:1px solid #e0c36a;padding:.6em .8em}
.note{color:#555;font-size:.9em}li{margin:.25em 0}"""


def html_report(analyses: list[dict], summary: dict, figures: dict[str, dict[str, Path]], findings: str,
                cfg, settings: dict[str, Any]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Context-effect study</title>"
             f"<style>{CSS}</style></head><body>",
             "<h1>When do personas help or hurt?</h1>",
             f"<p class='note'>Scores are {html.escape(POINTS)}. Each effect is a paired difference over the same "
             "items with a 95% bootstrap CI; * marks a significant effect (the CI excludes 0 and a sign-flip test "
             "gives p &lt; 0.05).</p>"]
    for a in analyses:
        s = a.get("judge_sanity")
        if s and s.get("accuracy") is not None and not s.get("passed"):
            parts.append(f"<p class='warn'><b>{html.escape(a['model'])}:</b> the MT-Bench judge ({html.escape(s['judge'])}) "
                         f"is no better than chance at telling an answer from an answer to another question "
                         f"({s['accuracy']:.0%} of {s['pairs']} pairs, 95% CI {s['ci95'][0]:.0%}-{s['ci95'][1]:.0%}). "
                         "Read its MT-Bench numbers as noise; use --judge-url or --judge-model for a real judge.</p>")
    parts.append("<h2>Findings</h2>")
    in_list = False
    for line in findings.splitlines():
        if line.startswith("- ") != in_list:
            parts.append("<ul>" if not in_list else "</ul>")
            in_list = not in_list
        if line.startswith("- "):
            parts.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.startswith("## "):
            parts.append(f"<h3>{html.escape(line[3:])}</h3>")
        elif line.strip() and not line.startswith("# "):
            parts.append(f"<p>{html.escape(line)}</p>")
    if in_list:
        parts.append("</ul>")
    if len(summary) > 1 and "models" in figures.get("_all", {}):
        parts += ["<h2>Models compared</h2>", _img(figures["_all"]["models"], "Matched expert vs no persona by model")]
    benches = sorted({b for m in summary.values() for b in m}, key=list(BENCH_NAMES).index)
    parts += ["<h2>Context effect by model and benchmark</h2>",
              _table(["model"] + [BENCH_NAMES[b] for b in benches],
                     [[m] + [_fmt(summary[m].get(b)) for b in benches] for m in summary])]
    for a in analyses:
        figs = figures[a["model"]]
        ref = a["reference"]
        parts.append(f"<h2>{html.escape(a['model'])}</h2>")
        parts.append(_img(figs["heatmap"], "Figure A. Every persona on every task: change vs no persona"))
        parts.append(_img(figs["expert"], "Figure B. Matched expert vs no persona and vs a random persona"))
        parts.append(_img(figs["length_placement"], "Figure C. Context length and placement"))
        conds = list(a["absolute"])
        parts.append(f"<h3>Scores ({ref['length']} persona, {ref['placement']} turn)</h3>")
        parts.append(_table(["task", "matched persona"] + conds + ["expert - none", "expert - random"],
                            [[sub, a["matched_persona"].get(sub) or "-"] +
                             [_fmt_mean(a["absolute"][c][sub]) for c in conds] +
                             [_fmt(a["expert"][sub]["vs_none"]), _fmt(a["expert"][sub]["vs_random"])]
                             for sub in a["subs"]]))
        lp = a["length_placement"]
        cells = sorted({c for v in lp.values() for c in v}, key=lambda c: (cfg.lengths.index(c.split("/")[0]),
                                                                        cfg.placements.index(c.split("/")[1])))
        parts.append("<h3>Matched expert vs no persona, by length and placement</h3>")
        parts.append(_table(["benchmark"] + cells, [[BENCH_NAMES[b]] + [_fmt(lp[b].get(c)) for c in cells] for b in lp]))
        if a["contrasts"]:
            parts.append("<h3>Length and placement contrasts (first minus second)</h3>")
            parts.append(_table(["contrast", "difference"], [[k, _fmt(v)] for k, v in a["contrasts"].items()]))
    parts.append("<h2>Settings</h2>")
    parts.append(_table(["setting", "value"], [[k, str(v)] for k, v in settings.items()]))
    parts.append("</body></html>")
    return "\n".join(parts)
