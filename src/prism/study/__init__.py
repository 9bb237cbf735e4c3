"""`prism study`: when do personas help or hurt? (the analysis half of the paper).

For one or more models, every condition of the grid (prism.study.grid) is scored on MT-Bench
categories, MMLU super-categories and the safety sets with the shared loaders, judges and caches
(prism.study.scores over prism.bench); the effects and their CIs come from prism.study.analysis;
figures, findings.md and a self-contained report.html from prism.study.report.

Output folder:
  models/<model>/   caches (generations, MMLU scores, judgments), judge_sanity.json, scores.json
  figures/          PNGs: <model>-heatmap, <model>-expert, <model>-length_placement, models
  results.json      every effect with its CI; findings.md; report.html
"""

from __future__ import annotations

import gc
import logging
import re
import time
from pathlib import Path
from typing import Any

from prism.config import STUDY_PRESETS, StudyConfig, load_study_config
from prism.study.grid import Condition, expand_grid

log = logging.getLogger(__name__)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def run_study(out: str | Path, models: list[Any] | None = None, preset: str | None = None,
              config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
              quiet: bool = False, cfg: StudyConfig | None = None) -> dict:
    """Run (or resume) the study in `out` on `models` (loaded ChatModels; default: the settings'
    model names) and write results.json, findings.md, report.html and the figures."""
    from prism.bench.data import default_dir
    from prism.io import atomic_write_json
    from prism.model import ChatModel, load_model
    from prism.contexts import ContextRegistry
    from prism.study.analysis import analyse
    from prism.study.scores import GridScorer

    cfg = cfg or load_study_config(preset, config_file, overrides)
    data_dir = str(cfg.data or default_dir())
    out = Path(out)
    registry = ContextRegistry.load(cfg.persona_dir)
    for name in [*(cfg.personas or []), *cfg.persona_map.values()]:
        registry.get(name)  # an unknown persona fails before a model is loaded
    models = models or list(cfg.models)
    t0 = time.perf_counter()
    analyses, scored = [], []
    for spec in models:
        model = spec if isinstance(spec, ChatModel) else load_model(str(spec), dtype=cfg.dtype,
                                                                     batch_size=cfg.batch_size)
        scorer = GridScorer(model, cfg, registry, out / "models" / _slug(model.name), data_dir, quiet=quiet)
        result = scorer.run()
        scored.append({k: v for k, v in result.items() if k != "rows"})
        analyses.append(analyse(result, cfg))
        if not isinstance(spec, ChatModel):
            del model, scorer
            gc.collect()
    settings = {**cfg.model_dump(mode="json"), "models": [a["model"] for a in analyses], "data_dir": data_dir}
    results = write_outputs(out, analyses, cfg, settings)
    results.update(models=scored, seconds=round(time.perf_counter() - t0, 1))
    atomic_write_json(out / "results.json", results)
    return results


def write_outputs(out: str | Path, analyses: list[dict], cfg: StudyConfig, settings: dict) -> dict:
    """Figures, findings.md, report.html and results.json from the analyses of one or more models."""
    from prism.io import atomic_write_json, atomic_write_text
    from prism.study.analysis import all_tests, mark_significance, model_summary
    from prism.study.report import (expert_figure, findings_markdown, heatmap_figure, html_report,
                                    length_placement_figure, models_figure)

    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    names = [a["model"] for a in analyses]
    if len(set(names)) != len(names):
        raise ValueError(f"two models in the study have the same name ({names}); their results would mix")
    summary = model_summary(analyses)
    tests = mark_significance([t for a in analyses for t in all_tests(a)])
    figures: dict[str, dict[str, Path]] = {}
    for a in analyses:
        slug = _slug(a["model"])
        figures[a["model"]] = {
            "heatmap": heatmap_figure(a, out / "figures" / f"{slug}-heatmap.png"),
            "expert": expert_figure(a, out / "figures" / f"{slug}-expert.png"),
            "length_placement": length_placement_figure(a, cfg.lengths, cfg.placements,
                                                        out / "figures" / f"{slug}-length_placement.png"),
        }
    if len(analyses) > 1:
        figures["_all"] = {"models": models_figure(summary, out / "figures" / "models.png")}
    findings = findings_markdown(tests, analyses, cfg)
    atomic_write_text(out / "findings.md", findings)
    atomic_write_text(out / "report.html", html_report(analyses, summary, figures, findings, cfg, settings))
    results = {"settings": settings, "analyses": analyses, "summary": summary, "tests": tests,
               "figures": {m: {k: str(v) for k, v in f.items()} for m, f in figures.items()}}
    atomic_write_json(out / "results.json", results)
    return results


__all__ = ["run_study", "write_outputs", "StudyConfig", "Condition", "expand_grid", "load_study_config", "STUDY_PRESETS"]
